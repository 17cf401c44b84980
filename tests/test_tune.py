"""Tune sweeps: a smoke sweep end to end (ASHA stops trials, every output, best_config.yaml runs), resume
keeps finished trials, the searcher seed fixes the trial configurations, bad input fails before any trial."""
import csv
import json
import os
import signal
from pathlib import Path

import pytest
import yaml
from ray import tune

from metanas_ray import run as run_cli
import importlib
tune_mod = importlib.import_module("metanas_ray.tune")
from metanas_ray.sweep import REPORTED, SweepError, load_sweep, prepare, sample_configs
from metanas_ray.tune import main, run_sweep

from conftest import ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

SWEEP_SMOKE = ROOT / "tune_configs" / "sweep_smoke.yaml"
OUTPUTS = ("trials.csv", "best_config.yaml", "summary.json", "plots/val_curves.png", "plots/search_values.png",
           "sweep.yaml", "base_config.yaml")


def _sweep_file(tmp_path, name="sweep.yaml", **changes):
    """The smoke sweep with top-level ``changes``, written into tmp_path; base as an absolute path."""
    raw = yaml.safe_load(SWEEP_SMOKE.read_text())
    raw["base"] = str(ROOT / "tune_configs" / "smoke.yaml")
    raw.update(changes)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _rows(out):
    return list(csv.DictReader((out / "trials.csv").open()))


def test_smoke_sweep_stops_bad_trials_writes_every_output_and_its_best_config_runs(ray_session, tmp_path, capsys):
    import importlib.util
    out = tmp_path / "sweep"
    store = f"file:{tmp_path / 'mlruns'}" if importlib.util.find_spec("mlflow") else ""
    assert main(["--config", str(SWEEP_SMOKE), "--output", str(out), "--verbose", "0",
                 *(["--mlflow", store] if store else [])]) == 0
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    rows = _rows(out)
    expected = sample_configs(load_sweep(SWEEP_SMOKE))
    assert len(rows) == len(expected) == 4
    for row, values in zip(rows, expected):  # the trials Tune ran are the ones the seeded searcher previews
        assert float(row["task.lr_w"]) == values["task.lr_w"]
        assert float(row["task.tau_alpha_end"]) == pytest.approx(values["task.tau_alpha_end"], rel=1e-12)
        assert row["task.tau_schedule"] == values["task.tau_schedule"]
        assert row["seed"] == "0" and row["status"] == "TERMINATED"
    stopped = {float(r["task.lr_w"]) for r in rows if r["stopped_early"] == "True"}
    assert {0.01, 0.02} <= stopped  # the bad inner learning rates (chance level) are cut at the first rung
    for r in rows:  # stopped at a rung (a good trial can lose at the second, to the other good one), or finished
        steps = int(r["meta_steps"])
        assert steps in ((2, 4) if r["stopped_early"] == "True" else (6,))
        if float(r["task.lr_w"]) in (0.01, 0.02):
            assert steps == 2
        assert float(r["best_val_accuracy"]) >= float(r["last_val_accuracy"]) - 1e-9

    summary = json.loads((out / "summary.json").read_text())
    best = max(rows, key=lambda r: float(r["best_val_accuracy"]))
    assert summary["best_trial"] == best["trial_id"] and summary["best_values"]["task.lr_w"] in (3.0, 2.0)
    assert summary["trials"] == 4 and summary["trials_errored"] == 0
    assert summary["trials_stopped_early"] == len([r for r in rows if r["stopped_early"] == "True"]) >= 2
    assert summary["trials_finished"] + summary["trials_stopped_early"] == 4
    assert summary["trial_steps"] == sum(int(r["meta_steps"]) for r in rows)
    assert summary["searcher_seed"] == 0 and summary["meta_test_tasks"] == 8
    for key in ("meta_test_accuracy_soft", "meta_test_accuracy_hard", "meta_test_ci95_soft", "meta_test_ci95_hard"):
        assert 0.0 <= summary[key] <= 1.0, key

    progress = list(csv.DictReader(next((out / "tune").glob(f"trial_{best['trial_id']}/progress.csv")).open()))
    assert set(REPORTED) | {"step"} <= set(progress[0])  # what the sweep may name as its metric is reported
    assert [int(p["step"]) for p in progress] == [2, 4, 6]  # one report per meta-validation
    # TensorBoard: Tune's own logger writes each trial's reports beside it (tensorboard --logdir runs/)
    from tb_events import read_events, scalars
    tb = scalars(read_events(out / "tune" / f"trial_{best['trial_id']}"))
    assert [v for k, v in tb.items() if k.endswith("/val_accuracy")][0] == pytest.approx(
        dict(enumerate((float(p["val_accuracy"]) for p in progress), 1)))
    if store:  # MLflow: one run per trial, its values and reports
        from mlflow.tracking import MlflowClient
        client = MlflowClient(store)
        runs = client.search_runs([client.get_experiment_by_name("metanas-ray-sweeps").experiment_id])
        assert sorted(float(r.data.params["task.lr_w"]) for r in runs) == sorted(float(r["task.lr_w"]) for r in rows)
        assert all("val_accuracy" in r.data.metrics for r in runs)

    capsys.readouterr()
    best_run = tmp_path / "best_run"
    assert run_cli.main(["--config", str(out / "best_config.yaml"), "--in-process", "--output", str(best_run)]) == 0
    rerun = json.loads((best_run / "summary.json").read_text())
    if summary["meta_test_checkpoint_step"] == rerun["meta_steps"]:  # same config, same final state, same test
        assert rerun["meta_test_accuracy_soft"] == pytest.approx(summary["meta_test_accuracy_soft"], abs=1e-6)


def _assert_resumed_from_checkpoints(sweep, out, rows):
    """Every trial's reports run 2, 4, 6 without a restart from the start. Tune logs a report before it registers
    the report's checkpoint, so a stop in between makes the resumed trial redo that meta-validation interval:
    the redone report must equal the first (same state, same task draws), and the histories that trials.csv and
    the plots read hold it once. Returns the redone steps."""
    redone = []
    for r in rows:
        reports = [json.loads(line) for line in
                   (out / "tune" / f"trial_{r['trial_id']}" / "result.json").read_text().splitlines()]
        steps = [rep["step"] for rep in reports]
        assert steps == sorted(steps) and sorted(set(steps)) == [2, 4, 6], steps
        first: dict[int, dict] = {}
        for rep in reports:
            assert rep["val_accuracy"] == pytest.approx(first.setdefault(rep["step"], rep)["val_accuracy"],
                                                        abs=1e-6), rep["step"]
        redone += [step for step in set(steps) if steps.count(step) > 1]
    for t in tune_mod._records(sweep, tune_mod._saved_results(sweep, out)):
        assert [int(h["step"]) for h in t.history] == [2, 4, 6]
    return redone


class _Interrupt(tune.Callback):
    """Sends the driver SIGUSR1 (Tune's graceful stop, as Ctrl+C), once (the restored experiment holds this
    callback too): when a trial has ended, or with ``at_step`` as Tune logs a report of that step (before Tune
    registers the report's checkpoint)."""

    def __init__(self, marker: Path, at_step: int | None = None):
        self.marker, self.at_step = marker, at_step

    def _stop_once(self) -> None:
        if not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.at_step is None:
            self._stop_once()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.at_step is not None and result.get("step") == self.at_step:
            self._stop_once()


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_session, tmp_path, capsys):
    sweep_file = _sweep_file(tmp_path, search={"task.lr_w": {"grid": [3.0, 0.01]},
                                               "task.tau_alpha_end": {"uniform": [0.05, 0.5]}},
                             scheduler={"name": "fifo"})
    out = tmp_path / "sweep"
    s = prepare(sweep_file, out, resume=False)
    first = run_sweep(s, out, callbacks=[_Interrupt(tmp_path / "interrupted")])
    assert first.interrupted and not (out / "summary.json").exists()
    finished = {t.trial_id: t for t in first.trials if t.status == "TERMINATED"}
    assert len(finished) == 1, [(t.trial_id, t.status) for t in first.trials]
    results_before = {tid: (out / "tune" / f"trial_{tid}" / "result.json").read_text() for tid in finished}

    capsys.readouterr()
    import metanas_ray as mr
    assert mr.tune(None, out, resume=True)["trials"] == 2  # the Python API continues it as --resume does
    rows = _rows(out)
    assert [r["status"] for r in rows] == ["TERMINATED"] * 2
    assert [int(r["meta_steps"]) for r in rows] == [6, 6]  # fifo: every trial runs to the end
    for tid, text in results_before.items():  # a rerun would have appended to (or rewritten) its results
        assert (out / "tune" / f"trial_{tid}" / "result.json").read_text() == text
        row = next(r for r in rows if r["trial_id"] == tid)
        assert float(row["best_val_accuracy"]) == pytest.approx(finished[tid].best)
    _assert_resumed_from_checkpoints(s, out, rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"] == 2 and summary["trial_steps"] == 12
    assert main(["--output", str(out), "--resume", "--config", str(SWEEP_SMOKE)]) == 2  # another sweep file
    assert "differs" in capsys.readouterr().err


def test_a_sweep_interrupted_at_a_report_redoes_one_interval_with_the_same_result(ray_session, tmp_path, capsys):
    sweep_file = _sweep_file(tmp_path, search={"task.lr_w": {"grid": [3.0]}}, scheduler={"name": "fifo"})
    out = tmp_path / "sweep"
    s = prepare(sweep_file, out, resume=False)
    assert run_sweep(s, out, callbacks=[_Interrupt(tmp_path / "interrupted", at_step=4)]).interrupted
    capsys.readouterr()
    assert main(["--resume", str(out), "--verbose", "0"]) == 0
    rows = _rows(out)
    assert [(r["status"], r["meta_steps"]) for r in rows] == [("TERMINATED", "6")]
    assert _assert_resumed_from_checkpoints(s, out, rows) == [4]  # resumed from step 2's checkpoint
    assert json.loads((out / "summary.json").read_text())["trial_steps"] == 6


class _CrashAfterFirstTrial(tune.Callback):
    """Raises inside Tune's loop once a trial has ended, once: as when Ray's OOM killer takes a trial's process
    (Tune 2.60 then ends the whole experiment with "Caught unexpected exception")."""

    def __init__(self, marker: Path):
        self.marker = marker

    def on_step_begin(self, iteration, trials, **info):
        if not self.marker.exists() and any(t.status == "TERMINATED" for t in trials):
            self.marker.touch()
            raise RuntimeError("2 worker(s) were killed due to the node running low on memory")


def test_a_sweep_that_tune_aborts_says_how_to_resume_and_resumes(ray_session, tmp_path, capsys):
    sweep_file = _sweep_file(tmp_path, search={"task.lr_w": {"grid": [3.0, 0.01]}}, scheduler={"name": "fifo"},
                             max_concurrent=1)
    out = tmp_path / "sweep"
    s = prepare(sweep_file, out, resume=False)
    with pytest.raises(SweepError) as e:
        run_sweep(s, out, callbacks=[_CrashAfterFirstTrial(tmp_path / "crashed")])
    message = str(e.value)
    assert "running low on memory" in message and f"--resume {out}" in message
    assert not (out / "summary.json").exists()
    assert main(["--output", str(out), "--resume", "--verbose", "0"]) == 0
    rows = _rows(out)
    assert [r["status"] for r in rows] == ["TERMINATED"] * 2 and [r["meta_steps"] for r in rows] == ["6", "6"]
    assert json.loads((out / "summary.json").read_text())["trials"] == 2


def test_the_searcher_seed_fixes_the_trial_configurations(tmp_path):
    s = load_sweep(_sweep_file(tmp_path, num_samples=3, trial_seed="sampled"))
    first, again = sample_configs(s), sample_configs(s)
    assert len(first) == 12 and first == again
    assert len({c["run.seed"] for c in first}) == 12  # a recorded seed per trial, drawn by the seeded searcher
    other = sample_configs(load_sweep(_sweep_file(tmp_path, "b.yaml", num_samples=3, trial_seed="sampled", seed=1)))
    assert [c["task.tau_alpha_end"] for c in other] != [c["task.tau_alpha_end"] for c in first]
    assert [c["task.lr_w"] for c in first[:4]] == [3.0, 2.0, 0.01, 0.02]  # grid values in the order written


BAD = [
    ({"search": {"task.nope": {"uniform": [0.1, 1.0]}}}, "unknown config key 'task.nope'"),
    ({"search": {"task.lr_w": {"uniform": [1]}}}, "uniform needs [low, high]"),
    ({"search": {"task.tau_schedule": {"choice": []}}}, "choice needs a non-empty list"),
    ({"search": {"task.lr_w": {"gaussian": [0.1, 1.0]}}}, "unknown distribution 'gaussian'"),
    ({"search": {"task.lr_w": {"uniform": [1.0, 0.1]}}}, "low 1.0 is above high 0.1"),
    ({"search": {"task.lr_w": {"loguniform": [0.0, 1.0]}}}, "loguniform needs 0 < low"),
    ({"search": {"task.lr_w": 0.1}}, "must be one {distribution: arguments} mapping"),
    ({"search": {"meta.meta_batch": {"uniform": [1, 5]}}}, "integer key; use randint"),
    ({"metric": "test_accuracy"}, "metric 'test_accuracy' is never reported"),
    ({"base": "no_such_config.yaml"}, "base config not found: no_such_config.yaml"),
    ({"resources": {"cpu": 64, "workers": 1}}, "a trial needs 64 CPU"),
    ({"resources": {"cpu": 1, "gpu": 1, "workers": 2}}, "a trial needs 2 GPU"),
    ({"search": {"task.tau_schedule": {"choice": ["exponential", "cosine"]}}},
     "choice value 'cosine' is invalid: config key 'task.tau_schedule' must be exponential"),
    ({"search": {"task.lr_w": {"uniform": [-1.0, 1.0]}}}, "uniform value -1.0 is invalid"),
    ({"search": {"task.tau_alpha_end": {"uniform": [0.5, 2.0]}}},
     "config key 'task.tau_alpha_end' must not exceed task.tau_alpha_start"),
    ({"search": {"task.lr_w": {"grid": [0.1]}}, "overrides": {"eval.every": 0}}, "eval.every is 0"),
]


@pytest.mark.parametrize("changes, needle", BAD + [({}, "data.n_way=50 but the meta-train split")],
                         ids=[b[1][:40] for b in BAD] + ["--set data.n_way=50"])
def test_bad_input_fails_with_one_line_before_any_trial(ray_session, tmp_path, capsys, changes, needle):
    out = tmp_path / "sweep"
    extra = ["--set", "data.n_way=50"] if not changes else []  # more classes than the data has
    assert main(["--config", str(_sweep_file(tmp_path, **changes)), "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1], err
    assert not (out / "tune").exists()  # no trial was started


def test_a_trial_on_ray_train_workers_matches_its_config_meta_trained_in_process(ray_session, tmp_path):
    """A per-trial TorchTrainer (2 workers) reports what one process meta-training the trial's config finds:
    meta-training does not depend on the number of workers (train_loop), so neither does the ranking."""
    from metanas_ray.recording import RunRecorder
    from metanas_ray.rundir import RunDir
    from metanas_ray.sweep import exec_config, trial_config
    from metanas_ray.train_loop import meta_train
    path = _sweep_file(tmp_path, search={"task.lr_w": {"grid": [3.0]}}, scheduler="fifo",
                       resources={"cpu": 1, "workers": 2}, max_concurrent=1)
    assert main(["--config", str(path), "--output", str(tmp_path / "train"), "--verbose", "0"]) == 0
    row = _rows(tmp_path / "train")[0]
    assert (tmp_path / "train" / "train").is_dir()  # the per-trial TorchTrainer runs
    s = load_sweep(path)
    cfg = exec_config(s, trial_config(s, sample_configs(s)[0]))
    alone = meta_train(cfg, RunRecorder(RunDir(tmp_path / "alone").create(cfg), cfg), final_test=False)
    assert row["meta_steps"] == "6" and cfg.run.meta_steps == 6
    assert float(row["best_val_accuracy"]) == pytest.approx(alone["meta_val_accuracy_best"], abs=1e-4)
