"""predict: a run's model adapted to a user's own labelled images, its predictions, and the export that needs
nothing from this package."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metanas_ray.predict import main as predict
from metanas_ray.run import main as run_main

from conftest import SMOKE

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "smoke"
    assert run_main(["--config", str(SMOKE), "--output", str(out), "--in-process", "--set", "run.meta_steps=2",
                     "--set", "eval.every=0", "--set", "eval.test_tasks=2"]) == 0
    return out


def _image(path: Path, size: tuple[int, int], mode: str, seed: int) -> Path:
    """A synthetic picture: a bright blob whose place depends on the seed, in any size and mode."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    a = (255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.05 * h * w))).astype(np.uint8)
    im = Image.fromarray(a, "L").convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def _folder(root: Path, classes: int, per_class: int, seed: int = 0) -> Path:
    """Class folders of PNG and JPEG files of mixed sizes and colour modes (L, RGB, RGBA, P)."""
    kinds = [((16, 16), "L", "png"), ((40, 30), "RGB", "jpg"), ((20, 24), "RGBA", "png"), ((33, 33), "P", "png")]
    for c in range(classes):
        for i in range(per_class):
            size, mode, ext = kinds[(c + i) % len(kinds)]
            _image(root / f"class_{c}" / f"img_{i}.{ext}", size, mode, seed + 100 * c + i)
    return root


def test_predict_on_mixed_files_writes_one_row_per_query_and_the_accuracy(smoke_run, tmp_path, capsys):
    support = _folder(tmp_path / "support", classes=3, per_class=2)
    query = _folder(tmp_path / "query", classes=3, per_class=3, seed=7)
    out = tmp_path / "p.csv"
    assert predict([str(smoke_run), "--support", str(support), "--query", str(query), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 9 and set(rows[0]) == {"file", "predicted", "probability", "p_class_0", "p_class_1",
                                               "p_class_2"}
    for r in rows:
        probs = [float(r[f"p_class_{c}"]) for c in range(3)]
        assert sum(probs) == pytest.approx(1, abs=1e-5) and float(r["probability"]) == pytest.approx(max(probs))
        assert r["predicted"] == f"class_{int(np.argmax(probs))}"
    printed = capsys.readouterr().out
    assert "3-way 2-shot support (6 images), 9 queries, soft-pruned" in printed
    assert "accuracy on the labelled queries:" in printed


def test_predict_hard_pruned_on_an_unlabelled_folder(smoke_run, tmp_path, capsys):
    support = _folder(tmp_path / "support", classes=2, per_class=1)
    query = tmp_path / "query"
    for i in range(4):
        _image(query / f"q{i}.png", (28, 28), "L", 50 + i)
    out = tmp_path / "p.csv"
    assert predict([str(smoke_run), "--support", str(support), "--query", str(query), "--out", str(out), "--hard"]) == 0
    assert len(list(csv.DictReader(out.open()))) == 4
    printed = capsys.readouterr().out
    assert "hard-pruned" in printed and "accuracy" not in printed


@pytest.mark.parametrize("problem, needle", [
    ("too_many_classes", "has 6 classes but the run classifies at most 5 (its data.n_way)"),
    ("empty_class", "holds no images"),
    ("unreadable", "cannot read image"),
    ("empty_query", "holds no images"),
    ("unknown_query_class", "which --support does not have"),
])
def test_bad_support_or_query_is_one_message_before_any_work(smoke_run, tmp_path, capsys, problem, needle):
    support = _folder(tmp_path / "support", classes=6 if problem == "too_many_classes" else 3, per_class=1)
    query = _folder(tmp_path / "query", classes=2, per_class=1)
    if problem == "empty_class":
        (support / "class_9").mkdir()
    if problem == "unreadable":
        (query / "class_1" / "broken.png").write_bytes(b"not a png")
    if problem == "empty_query":
        query = tmp_path / "nothing"
        query.mkdir()
    if problem == "unknown_query_class":
        _image(query / "zebra" / "z.png", (20, 20), "L", 3)
    out = tmp_path / "p.csv"
    assert predict([str(smoke_run), "--support", str(support), "--query", str(query), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err
    assert not out.exists()


# the export, read by a process in which metanas_ray cannot be imported: the preprocessing is done from the JSON
_STANDALONE = r'''
import csv, json, sys
sys.modules["metanas_ray"] = None  # any import of the package now fails
import numpy as np, torch
from PIL import Image
export, predictions = sys.argv[1], sys.argv[2]
model = torch.jit.load(f"{export}/model.pt")
pre = json.load(open(f"{export}/preprocessing.json"))
classes = json.load(open(f"{export}/classes.json"))
rows, images = list(csv.DictReader(open(predictions))), []
for row in rows:
    im = Image.open(row["file"]).convert(pre["mode"]).resize((pre["image_size"],) * 2, Image.Resampling.LANCZOS)
    a = np.asarray(im, dtype=np.uint8)
    a = 255 - a if pre["invert"] else a
    x = torch.from_numpy(a.copy()).float().div(255)
    images.append(x[None] if x.dim() == 2 else x.permute(2, 0, 1))
probs = model(torch.stack(images))  # one batch, as predict classifies them (batch norm uses batch statistics)
worst = 0.0
for row, p in zip(rows, probs):
    assert classes[int(p.argmax())] == row["predicted"], row
    worst = max(worst, max(abs(float(p[i]) - float(row["p_" + c])) for i, c in enumerate(classes)))
print(worst)
'''


@pytest.mark.slow
def test_the_export_predicts_what_predict_printed_without_this_package(smoke_run, tmp_path):
    support = _folder(tmp_path / "support", classes=3, per_class=2)
    query = _folder(tmp_path / "query", classes=3, per_class=2, seed=11)
    out, export = tmp_path / "p.csv", tmp_path / "export"
    assert predict([str(smoke_run), "--support", str(support), "--query", str(query), "--out", str(out),
                    "--export", str(export)]) == 0
    assert json.loads((export / "classes.json").read_text()) == ["class_0", "class_1", "class_2"]
    assert json.loads((export / "preprocessing.json").read_text())["channels"] == 1
    done = subprocess.run([sys.executable, "-c", _STANDALONE, str(export), str(out)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip()) < 1e-5


@pytest.mark.slow
def test_the_readme_python_section_runs_as_written(tmp_path, monkeypatch):
    """The ``python`` block of README.md's "From Python", in a folder with the configs and the user's images."""
    from conftest import ROOT
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### From Python"):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("\n```", section.index("```python"))]
    shutil.copytree(ROOT / "tune_configs", tmp_path / "tune_configs")
    _folder(tmp_path / "my_support", classes=2, per_class=1)
    for name in ("a", "b"):
        _image(tmp_path / "my_images" / f"{name}.png", (28, 28), "L", ord(name))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "runs" / "api" / "summary.json").is_file() and (tmp_path / "exported" / "model.pt").is_file()


@pytest.mark.slow
def test_the_onnx_export_of_a_found_network_predicts_what_predict_does(tmp_path):
    """Only with the optional extra (pip install "metanas-ray[onnx]") and onnxruntime to run it. (A supernet's
    pruning decisions are data-dependent for torch.export: its export stays TorchScript alone.)"""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name, reason=f"the optional ONNX export needs {name}")
    import onnxruntime
    import torch
    import metanas_ray as mr
    cfg = mr.load_config(SMOKE, {"model.kind": "genotype", "model.genotype": "metanas_og_v2", "model.nodes": 3,
                                 "run.meta_steps": 2, "eval.every": 0, "eval.test_tasks": 2})
    run = mr.train(cfg, tmp_path / "run", in_process=True)
    support = _folder(tmp_path / "support", classes=3, per_class=1)
    predictor = mr.predict(run, support=support)
    written = predictor.export(tmp_path / "export")
    assert [p.name for p in written] == ["model.pt", "classes.json", "preprocessing.json", "model.onnx"]
    x = torch.rand(5, 1, 16, 16)
    session = onnxruntime.InferenceSession(str(tmp_path / "export" / "model.onnx"))
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(out - predictor(x).numpy()).max() < 1e-5  # the Predictor also takes tensors


def test_a_predictor_takes_tensors_and_paths_alike(smoke_run, tmp_path):
    import torch
    import metanas_ray as mr
    support = _folder(tmp_path / "support", classes=2, per_class=1)
    files = [_image(tmp_path / "q" / f"{i}.png", (16, 16), "L", 90 + i) for i in range(3)]
    predictor = mr.predict(mr.load_run(smoke_run), support=support)
    table = predictor(files)
    x = torch.stack([predictor.preprocessing.load(f) for f in files])
    probs = predictor(x)
    assert probs.shape == (3, 2) and list(table["predicted"]) == [f"class_{i}" for i in probs.argmax(-1).tolist()]
    assert np.allclose(table[["p_class_0", "p_class_1"]].to_numpy(), probs.numpy(), atol=1e-6)
