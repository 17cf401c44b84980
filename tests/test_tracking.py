"""Experiment tracking (metanas_ray.tracking): TensorBoard events in tb/, MLflow runs, read back."""
from __future__ import annotations

import csv
import struct
from pathlib import Path

import pytest

from metanas_ray.run import main

SMOKE = Path(__file__).resolve().parents[1] / "tune_configs" / "smoke.yaml"


def read_events(directory: Path) -> list:
    """Every event of the TFRecord files under ``directory`` (length, its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto import event_pb2

    events = []
    for f in sorted(Path(directory).rglob("events.out.tfevents.*")):
        data, i = f.read_bytes(), 0
        while i < len(data):
            n = struct.unpack("<Q", data[i:i + 8])[0]
            events.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
            i += 12 + n + 4
    return events


def scalars(events: list) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for e in events:
        for v in e.summary.value:
            if v.HasField("simple_value"):
                out.setdefault(v.tag, {})[e.step] = v.simple_value
    return out


def _run(tmp_path, *extra) -> Path:
    out = tmp_path / "run"
    assert main(["--config", str(SMOKE), "--in-process", "--output", str(out), "--set", "run.meta_steps=4",
                 "--set", "eval.every=2", "--set", "run.log_every=1", *extra]) == 0
    return out


@pytest.mark.slow
def test_a_run_writes_its_metrics_final_figures_genotype_and_plots_as_tensorboard_events(tmp_path):
    out = _run(tmp_path)
    events = read_events(out / "tb")
    s = scalars(events)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert s["meta_train/train_accuracy"] == pytest.approx({int(r["step"]): float(r["train_accuracy"]) for r in rows})
    assert sorted(s["meta_val/val_accuracy"]) == [2, 4]  # only the meta-validated steps
    import json
    summary = json.loads((out / "summary.json").read_text())
    assert s["meta_test/meta_test_accuracy_soft"][4] == pytest.approx(summary["meta_test_accuracy_soft"])
    tags = {v.tag for e in events for v in e.summary.value}
    assert any(t.startswith("genotype") for t in tags)
    pictures = {f"plots/{p.stem}" for p in (out / "plots").glob("*.png")}
    assert pictures and pictures <= tags
    assert all(v.image.encoded_image_string[:4] == b"\x89PNG" for e in events for v in e.summary.value
               if v.tag in pictures)


@pytest.mark.slow
def test_tensorboard_can_be_turned_off(tmp_path):
    out = _run(tmp_path, "--set", "run.tensorboard=false")
    assert not (out / "tb").exists()


@pytest.mark.slow
def test_mlflow_gets_the_config_the_metrics_per_step_and_the_run_directory(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = f"file:{tmp_path / 'mlruns'}"
    out = _run(tmp_path, "--mlflow", store)
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("metanas-ray").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["task.lr_w"] == "0.1" and run.data.params["run.mlflow"] == store
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_accuracy")}
    assert history == pytest.approx({int(r["step"]): float(r["train_accuracy"]) for r in rows})
    assert "meta_test/meta_test_accuracy_soft" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "metrics.csv", "config.yaml", "genotype.json", "plots", "checkpoints"} <= artifacts


def test_a_bad_mlflow_uri_is_one_error_before_any_work(tmp_path, capsys):
    pytest.importorskip("mlflow")
    out = tmp_path / "run"
    assert main(["--config", str(SMOKE), "--in-process", "--output", str(out), "--mlflow", "nosuchscheme://x"]) == 2
    err = capsys.readouterr().err
    assert "--mlflow nosuchscheme://x" in err and len(err.strip().splitlines()) == 2
    assert not out.exists()  # nothing computed, nothing left


def test_without_mlflow_installed_the_flag_says_what_to_install(tmp_path, capsys, monkeypatch):
    import builtins
    real = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name.startswith("mlflow"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    assert main(["--config", str(SMOKE), "--in-process", "--output", str(tmp_path / "r"), "--mlflow", "file:x"]) == 2
    assert "pip install 'metanas-ray[mlflow]'" in capsys.readouterr().err
