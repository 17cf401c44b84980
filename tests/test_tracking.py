"""Experiment tracking (metanas_ray.tracking): TensorBoard events in tb/, MLflow runs, read back."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from metanas_ray.run import main
from tb_events import read_events, scalars

SMOKE = Path(__file__).resolve().parents[1] / "tune_configs" / "smoke.yaml"


def _has_mlflow() -> bool:
    import importlib.util
    return importlib.util.find_spec("mlflow") is not None


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One smoke run (4 meta-steps) with TensorBoard, and MLflow where the extra is installed: (run dir, store)."""
    tmp = tmp_path_factory.mktemp("tracked")
    store = f"file:{tmp / 'mlruns'}" if _has_mlflow() else ""
    out = tmp / "run"
    assert main(["--config", str(SMOKE), "--in-process", "--output", str(out), "--set", "run.meta_steps=4",
                 "--set", "eval.every=2", "--set", "run.log_every=1", *(["--mlflow", store] if store else [])]) == 0
    return out, store


@pytest.mark.slow
def test_a_run_writes_its_metrics_final_figures_genotype_and_plots_as_tensorboard_events(tracked_run):
    out, _ = tracked_run
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


def test_tensorboard_can_be_turned_off(tmp_path):
    from metanas_ray.config import load
    from metanas_ray.tracking import Tracker
    tracker = Tracker(tmp_path, load(SMOKE, {"run.tensorboard": False}))
    tracker.rows([{"step": 1, "train_accuracy": 0.5}])
    tracker.finish({"meta_test_accuracy_soft": 0.5}, "", tmp_path, 1)
    assert not (tmp_path / "tb").exists()


@pytest.mark.slow
def test_mlflow_gets_the_config_the_metrics_per_step_and_the_run_directory(tracked_run):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out, store = tracked_run
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


@pytest.mark.slow
def test_a_resumed_run_continues_its_mlflow_run_and_tensorboard_without_duplicates(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from metanas_ray.config import load
    from metanas_ray.recording import RunRecorder
    from metanas_ray.rundir import RunDir
    from metanas_ray.tracking import start_mlflow
    from metanas_ray.train_loop import meta_train

    class Crash(Exception):
        pass

    class CrashAfter(RunRecorder):
        def record(self, rows, payload, keep, comm=None, device="cpu"):
            super().record(rows, payload, keep, comm, device)
            if rows and rows[-1]["step"] == 3:  # a row logged after the checkpoint of step 2, then a crash
                raise Crash()

    store = f"file:{tmp_path / 'mlruns'}"
    cfg = load(SMOKE, {"run.meta_steps": 4, "eval.every": 0, "run.log_every": 1, "run.checkpoint_every": 2,
                       "run.mlflow": store})
    run = RunDir(tmp_path / "run").create(cfg)
    start_mlflow(run.path, cfg)
    with pytest.raises(Crash):
        meta_train(cfg, CrashAfter(run, cfg))
    assert main(["--resume", str(run.path), "--in-process"]) == 0
    rows = list(csv.DictReader(run.metrics_file.open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    client = MlflowClient(store)
    (mlrun,) = client.search_runs([client.get_experiment_by_name("metanas-ray").experiment_id])
    assert mlrun.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(mlrun.info.run_id, "train_accuracy")]
    assert sorted(set(steps)) == [1, 2, 3, 4]  # step 3 twice at most: MLflow keeps what the crashed session sent
    from tb_events import read_events
    events = read_events(run.path / "tb")
    purges = [e.step for e in events if e.HasField("session_log")]
    assert purges == [3]  # TensorBoard drops the crashed session's step 3 and shows the resumed one
