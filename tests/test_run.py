"""End to end, in-process (the Ray Train path has its own tests): the run directory, determinism, resume, bad input."""
import csv
import json

import pytest
import torch

from metanas_ray.rundir import RunDir

from metanas_ray import checkpoint
from metanas_ray.run import main
from metanas_ray.recording import RunRecorder
from metanas_ray.train_loop import meta_train

from conftest import OFFICIAL, ROOT, SMOKE

pytestmark = pytest.mark.timeout(300)


def run(tmp_path, name, *extra):
    out = tmp_path / name
    code = main(["--config", str(SMOKE), "--output", str(out), "--in-process", *extra])
    return code, out


def _final_state(out):
    return checkpoint.load(checkpoint.latest(out / "checkpoints"))


@pytest.mark.slow
def test_smoke_config_writes_the_whole_run_directory(tmp_path, capsys):
    code, out = run(tmp_path, "smoke")
    assert code == 0
    for name in ("config.yaml", "metrics.csv", "genotype.json", "summary.json", "plots/learning_curves.png",
                 "plots/alphas.png", "plots/cell_normal.png", "plots/cell_reduce.png", "plots/cell_normal.dot"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert [p.name for p in checkpoint.list_checkpoints(out / "checkpoints")] == ["step_0000005.pt", "step_0000010.pt"]
    assert "found cells, in the official code's notation: Genotype(normal=[[" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    for key in ("meta_test_accuracy_soft", "meta_test_ci95_soft", "meta_test_accuracy_hard", "meta_test_ci95_hard"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["meta_steps"] == 10 and summary["wall_seconds"] > 0 and summary["tasks_per_second"] > 0
    # one worker's loop time: nearly all of it in the tasks, a little in the meta-update, nothing to wait for
    assert summary["seconds_in_tasks"][0] > 10 * summary["seconds_in_meta_update"][0] > 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4, 5, 6, 8, 10]
    assert rows[2]["val_accuracy"] and not rows[0]["val_accuracy"]
    # the saved run can be meta-tested again
    from metanas_ray.evaluate import main as evaluate
    assert evaluate([str(out), "--tasks", "4", "--split", "val"]) == 0
    printed = capsys.readouterr().out
    again = json.loads(printed[printed.rindex("\n{\n") + 1:])
    assert again["tasks"] == 4 and again["split"] == "val" and 0 <= again["accuracy_hard"] <= 1
    (kept,) = out.glob("evaluation-val-*.json")  # and kept in the run directory
    assert json.loads(kept.read_text()) == again and again["set"] == {}
    # evaluate takes --set for eval.* and data.*, and --output for the JSON
    assert evaluate([str(out), "--tasks", "2", "--set", "eval.steps=1", "--seed", "3",
                     "--output", str(tmp_path / "e.json")]) == 0
    other = json.loads((tmp_path / "e.json").read_text())
    assert other["set"] == {"eval.steps": 1, "run.seed": 3} and other["seed"] == 3 and other["split"] == "test"


@pytest.mark.slow
def test_a_meta_step_changes_w_and_alpha_and_seed_determines_everything(tmp_path, smoke_cfg):
    from metanas_ray.state import build_network, init_state
    cfg = smoke_cfg.override({"run.meta_steps": 2, "run.checkpoint_every": 1, "eval.every": 0, "eval.test_tasks": 2})
    start = init_state(cfg, build_network(cfg, 1))
    finals = []
    for name in ("a", "b"):
        from metanas_ray.rundir import RunDir
        meta_train(cfg, RunRecorder(RunDir(tmp_path / name).create(cfg), cfg))
        finals.append(_final_state(tmp_path / name)["state"])
    for part in ("weights", "alphas"):
        assert any(not torch.equal(finals[0][part][k], start[part][k]) for k in start[part]), part
        for k in start[part]:
            assert torch.equal(finals[0][part][k], finals[1][part][k])
    other = cfg.override({"run.seed": 1})
    meta_train(other, RunRecorder(RunDir(tmp_path / "c").create(other), other))
    assert not torch.equal(_final_state(tmp_path / "c")["state"]["weights"]["stem.0.weight"],
                           finals[0]["weights"]["stem.0.weight"])


class _Crash(Exception):
    pass


class CrashAfter(RunRecorder):
    def __init__(self, run, cfg, step):
        super().__init__(run, cfg)
        self.step = step

    def record(self, rows, payload, keep, comm=None, device="cpu"):
        super().record(rows, payload, keep, comm, device)
        if payload is not None and payload["step"] == self.step:
            raise _Crash()


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, OFFICIAL], ids=["ours", "official_options"])
def test_resume_is_bit_identical(tmp_path, smoke_cfg, options):
    from metanas_ray.rundir import RunDir
    cfg = smoke_cfg.override({"meta.optimizer": "adam", "meta.lr_w": 0.01, "meta.lr_alpha": 0.01, **options})
    meta_train(cfg, RunRecorder(RunDir(tmp_path / "straight").create(cfg), cfg))
    with pytest.raises(_Crash):
        meta_train(cfg, CrashAfter(RunDir(tmp_path / "broken").create(cfg), cfg, 5))
    assert main(["--resume", str(tmp_path / "broken"), "--in-process"]) == 0
    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "broken")
    for part in ("weights", "alphas"):
        for k in a["state"][part]:
            assert torch.equal(a["state"][part][k], b["state"][part][k]), k
    for k in a["meta_optimizer"]["m"]:
        assert torch.equal(a["meta_optimizer"]["m"][k], b["meta_optimizer"]["m"][k])
    if options:  # the task-learner's Adam moments, kept across tasks, are in the checkpoint too
        assert a["task_optimizer"]["t"] == b["task_optimizer"]["t"] and a["task_optimizer"]["t"]["weights"] > 0
        for part in ("weights", "alphas"):
            for k, v in a["task_optimizer"]["v"][part].items():
                assert torch.equal(v, b["task_optimizer"]["v"][part][k]), k
    sa = json.loads((tmp_path / "straight" / "summary.json").read_text())
    sb = json.loads((tmp_path / "broken" / "summary.json").read_text())
    assert sa["meta_test_accuracy_soft"] == sb["meta_test_accuracy_soft"]
    assert sa["meta_test_accuracy_hard"] == sb["meta_test_accuracy_hard"]
    rows_a = [(r["step"], r["train_accuracy"], r["val_accuracy"]) for r in csv.DictReader((tmp_path / "straight" / "metrics.csv").open())]
    rows_b = [(r["step"], r["train_accuracy"], r["val_accuracy"]) for r in csv.DictReader((tmp_path / "broken" / "metrics.csv").open())]
    assert rows_a == rows_b


@pytest.mark.slow
def test_existing_run_is_not_overwritten(tmp_path, capsys):
    code, out = run(tmp_path, "x", "--set", "run.meta_steps=2", "--set", "eval.every=0")
    assert code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _ = run(tmp_path, "x")
    assert code == 2 and "--resume" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_a_run_finished_with_resume_drops_the_error_of_its_earlier_stop(tmp_path, smoke_cfg):
    cfg = smoke_cfg.override({"run.meta_steps": 2, "eval.every": 0})
    out = RunDir(tmp_path / "stopped").create(cfg)
    out.write_error("DataError: Omniglot not found")  # as a run that stopped before its first meta-step
    assert main(["--resume", str(out.path), "--in-process"]) == 0
    assert out.summary_file.is_file() and not out.error_file.exists()


@pytest.mark.parametrize("args, needle", [
    (["--set", "data.n_wya=3"], "data.n_wya"),
    (["--set", "task.lr_w=-1"], "task.lr_w"),
    (["--set", "data.n_way=13"], "data.n_way=13"),
    (["--set", "data.n_query=8"], "data.k_shot + data.n_query"),
    (["--set", "data.dataset=omniglot", "--set", "data.download=false"], "images_background.zip"),
    (["--set", "data.split_fractions=[0.5, 0.5]"], "data.split_fractions"),
])
def test_bad_input_gets_one_clear_message(tmp_path, capsys, args, needle):
    code, out = run(tmp_path, "bad", *args, "--data-root", str(tmp_path / "nodata")) if "omniglot" in " ".join(args) \
        else run(tmp_path, "bad", *args)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["omniglot_20way_1shot", "omniglot_20way_5shot"])
def test_a_paper_config_runs_on_synthetic_data(tmp_path, name):
    """The faithful configs as they are, on synthetic 28×28 images, shrunk only in size and length."""
    out = tmp_path / name
    small = ["data.dataset=synthetic", "data.synthetic_classes=24", "data.synthetic_per_class=20",
             "model.init_channels=4", "meta.meta_batch=2", "meta.warmup_steps=1", "meta.prune_every=1",
             "run.meta_steps=2", "eval.every=2", "eval.val_tasks=2", "eval.test_tasks=2", "eval.steps=4",
             "eval.arch_steps=2", "run.threads=1"]
    args = ["--config", str(ROOT / "tune_configs" / f"{name}.yaml"), "--output", str(out), "--in-process"]
    assert main(args + [a for kv in small for a in ("--set", kv)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta_steps"] == 2 and summary["n_way"] == 20 and 0 <= summary["meta_test_accuracy_soft"] <= 1
    genotype = json.loads((out / "genotype.json").read_text())
    assert all(len(node) == 2 for node in genotype["normal"])  # pairwise input weights: two inputs per node


def test_meta_testing_prints_its_progress_with_the_running_accuracy_and_an_eta(smoke_cfg, synthetic_splits,
                                                                             caplog, monkeypatch):
    import re
    import metanas_ray.evaluate as ev
    from metanas_ray.data import check_tasks
    from metanas_ray.state import build_network, init_state
    monkeypatch.setattr(ev, "PROGRESS_SECONDS", 0.0)  # a line after every task (15 s apart otherwise)
    net = build_network(smoke_cfg, synthetic_splits.channels)
    sampler = check_tasks(smoke_cfg.data, synthetic_splits)["test"]
    with caplog.at_level("INFO", logger="metanas_ray"):
        ev.meta_test(net, init_state(smoke_cfg, net), sampler, 3, smoke_cfg)
    lines = [r.getMessage() for r in caplog.records if "tasks | soft accuracy" in r.getMessage()]
    assert len(lines) == 2  # none after the last task: the result follows
    assert all(re.fullmatch(r"meta-test: \d of 3 tasks \| soft accuracy [\d.]+% so far \| \dm\d\ds left", x)
               for x in lines), lines


def test_print_config_shows_every_key_its_default_and_meaning_and_writes_nothing(tmp_path, capsys):
    import yaml
    from metanas_ray.config import flat_keys, load
    out = tmp_path / "never"
    assert main(["--config", str(SMOKE), "--set", "task.lr_w=0.05", "--output", str(out), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    cfg = load(SMOKE, {"task.lr_w": 0.05})
    assert yaml.safe_load(printed) == cfg.to_dict()  # a config file as it is: --config accepts it
    assert "  lr_w: 0.05  # (default: 0.1) λ_task, SGD learning rate of the weights w" in printed
    assert "  k_shot: 1  # k training images per class (the task's D_train)" in printed  # the default: no note
    assert sum(1 for line in printed.splitlines() if line.startswith("  ")) == len(flat_keys())


def _flat_folder(root, n_classes, per_class):
    """``root/<class>/*.png``, a user's folder as it is: no train/val/test, greyscale and colour, sizes that differ."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        (root / f"kind{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            shape = (18 + i, 20 + c % 4) + ((3,) if c % 2 else ())
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / f"kind{c:02d}" / f"{i}.png")
    return root


@pytest.mark.slow
def test_a_flat_folder_of_class_folders_trains_end_to_end_and_writes_its_split(tmp_path):
    root = _flat_folder(tmp_path / "mine", 32, 4)  # default data.split_fractions: 21 / 5 / 6 classes
    code, out = run(tmp_path, "flat", "--data-root", str(root), "--set", "data.dataset=folder",
                    "--set", "run.meta_steps=2", "--set", "eval.every=0", "--set", "eval.test_tasks=2")
    assert code == 0 and (out / "summary.json").is_file()
    split = json.loads((out / "split.json").read_text())
    train, val, test = (set(split[s]) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (21, 5, 6)
    assert not (train & val or train & test or val & test)
    assert train | val | test == {f"kind{c:02d}" for c in range(32)}
    assert split["dataset"] == "folder" and "data.split_fractions=[0.64, 0.16, 0.2]" in split["split_rule"]


def test_the_split_file_goes_with_a_run_directory_that_is_discarded(tmp_path, smoke_cfg):
    run_dir = RunDir(tmp_path / "gone").create(smoke_cfg)
    run_dir.write_split({"dataset": "synthetic", "train": ["a"], "val": ["b"], "test": ["c"]})
    assert json.loads(run_dir.split_file.read_text())["test"] == ["c"]
    assert run_dir.discard() and not run_dir.path.exists()
