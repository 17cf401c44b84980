"""Ray Tune sweeps over any config key, ranked on meta-validation only: ``python -m metanas_ray.tune``.

    python -m metanas_ray.tune --config tune_configs/sweep_smoke.yaml --output runs/sweep-smoke   # ~30 s
    python -m metanas_ray.tune --config tune_configs/sweep_quick.yaml --output runs/sweep-quick \\
        --set data.root=../shared/data/omniglot                                              # Omniglot
    python -m metanas_ray.tune --output runs/sweep-quick --resume          # continue an interrupted sweep
    ray job submit --working-dir . -- python -m metanas_ray.tune \\
        --config tune_configs/sweep_cluster.yaml --output /shared/sweeps/paper                # GPU cluster

A sweep file (YAML; see ``tune_configs/sweep_*.yaml``)::

    base: smoke.yaml                   # a run config (relative to this file, else the cwd)
    overrides: {run.meta_steps: 6}     # fixed changes to the base, dotted keys (also: --set KEY=VALUE)
    search:                            # dotted key: {distribution: arguments}
      task.lr_w: {loguniform: [0.01, 3.0]}      # also uniform: [low, high], randint: [low, high] (inclusive)
      task.tau_schedule: {choice: [exponential, linear]}
      meta.lr_w: {grid: [1.0, 0.5]}             # every sample runs the whole grid
    num_samples: 4                     # Tune's num_samples: trials = num_samples × grid size
    search_alg: random                 # random | grid: Tune's BasicVariantGenerator, seeded with `seed`
    seed: 0                            # searcher seed: same file + seed = same trial configurations
    trial_seed: fixed                  # fixed: every trial uses run.seed (same tasks); sampled: one per trial
    metric: val_accuracy               # a reported value (see REPORTED) that ASHA and the ranking use
    mode: max
    scheduler: {name: asha, grace_period: 2, reduction_factor: 2, max_t: 6}   # or fifo (no early stops);
                                       # defaults: eval.every, 2, the longest run.meta_steps
    resources: {cpu: 1, gpu: 0, workers: 1}    # per worker; workers > 1 or gpu > 0: Ray Train workers
    max_concurrent: 2                  # 0: as many trials as the cluster holds

Every trial meta-trains its config and reports each meta-validation to Tune (``step`` = meta-steps is
ASHA's time attribute), with a checkpoint; no trial sees the meta-test classes. Small trials (one CPU worker)
run in the trial process; others run a per-trial ``TorchTrainer`` whose workers report through
``TuneReportCallback`` (the CLI then starts Ray with the dashboard: Train's placement-group cleanup after an
ASHA stop needs it). After the last trial, the best trial (best ``metric`` over its run) is meta-tested
once, from its best checkpoint. The output directory holds ``trials.csv``, ``best_config.yaml`` (runs with
``python -m metanas_ray.run --config``), ``summary.json``, ``plots/`` and the Tune experiment (``tune/``).
Everything that can be wrong with a sweep is checked before the first trial starts (``error: ...``, exit 2).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import yaml

from . import checkpoint
from .config import Config, ConfigError, flat_keys, from_dict, load, parse_overrides, plain, read_yaml_mapping, save
from .data import DataError, check_tasks, load_splits
from .ray_train import ScaleError, quiet_worker_logs, worker_env
from .train_loop import meta_train

log = logging.getLogger(__name__)

REPORTED = ("val_accuracy", "val_ci95", "train_accuracy", "train_loss", "tasks_per_second", "wall_seconds")
"""What every report to Tune carries besides ``step`` (the columns of a meta-validated metrics row)."""
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
_STATE_FILE = "state.pt"
_SWEEP_KEYS = {"base", "overrides", "search", "num_samples", "search_alg", "seed", "trial_seed", "metric", "mode",
               "scheduler", "resources", "max_concurrent"}


class SweepError(ValueError):
    """A sweep file, search space or request that cannot run."""


# ------------------------------------------------------------------------------------------------ the sweep
@dataclass(frozen=True)
class Sweep:
    """A parsed, validated sweep file. ``base`` already holds the fixed overrides (data.root absolute)."""

    base: Config
    search: dict[str, tuple[str, tuple]]  # key -> (distribution, arguments)
    num_samples: int = 1
    search_alg: str = "random"
    seed: int = 0
    trial_seed: str = "fixed"
    metric: str = "val_accuracy"
    mode: str = "max"
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int = 0  # 0: the longest run.meta_steps a trial can have
    cpu: float = 1.0
    gpu: float = 0.0
    workers: int = 1
    max_concurrent: int = 0

    @property
    def on_train(self) -> bool:
        """Whether trials run on Ray Train workers (else in the trial process)."""
        return self.workers > 1 or self.gpu > 0

    def per_trial(self) -> dict[str, float]:
        return {"CPU": self.workers * self.cpu, "GPU": self.workers * self.gpu}

    def to_dict(self) -> dict[str, Any]:
        """The sweep-file form, with ``base`` pointing at ``base_config.yaml`` next to it."""
        return {"base": "base_config.yaml", "overrides": {},
                "search": {k: {d: list(a)} for k, (d, a) in self.search.items()},
                "num_samples": self.num_samples, "search_alg": self.search_alg, "seed": self.seed,
                "trial_seed": self.trial_seed, "metric": self.metric, "mode": self.mode,
                "scheduler": {"name": self.scheduler, "grace_period": self.grace_period,
                              "reduction_factor": self.reduction_factor, "max_t": self.max_t},
                "resources": {"cpu": self.cpu, "gpu": self.gpu, "workers": self.workers},
                "max_concurrent": self.max_concurrent}

    def save(self, directory: Path) -> None:
        save(self.base, directory / "base_config.yaml")
        (directory / "sweep.yaml").write_text(yaml.safe_dump(plain(self.to_dict()), sort_keys=False))


def _number(key: str, value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SweepError(f"{key}: {what} must be a finite number, got {value!r}")
    return value


def _section(raw: dict, name: str) -> dict:
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise SweepError(f"sweep '{name}' must be a mapping, got {value!r}")
    return value


def _parse_dist(key: str, spec: Any, default: Any) -> tuple[str, tuple]:
    where = f"search space '{key}'"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SweepError(f"{where} must be one {{distribution: arguments}} mapping "
                         f"({', '.join(DISTRIBUTIONS)}), got {spec!r}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise SweepError(f"{where}: unknown distribution '{kind}'; known: {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        raise SweepError(f"{where}: {kind} needs a non-empty list, got {args!r}")
    if kind in ("choice", "grid"):
        return kind, tuple(args)
    if len(args) != 2:
        raise SweepError(f"{where}: {kind} needs [low, high], got {args!r}")
    low, high = (_number(where, a, f"{kind} bound") for a in args)
    if low > high:
        raise SweepError(f"{where}: {kind} low {low} is above high {high}")
    if kind == "loguniform" and low <= 0:
        raise SweepError(f"{where}: loguniform needs 0 < low, got low {low}")
    if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
        raise SweepError(f"{where}: randint needs integer bounds, got {args!r}")
    if isinstance(default, (bool, str, list, tuple)):
        raise SweepError(f"{where}: {kind} needs a numeric key, but '{key}' holds {type(default).__name__} "
                         f"values; use choice or grid")
    if isinstance(default, int) and kind != "randint":
        raise SweepError(f"{where}: '{key}' is an integer key; use randint, choice or grid, not {kind}")
    return kind, (int(low), int(high)) if kind == "randint" else (low, high)


def _find_base(name: Any, sweep_file: Path) -> Path:
    if not isinstance(name, str) or not name:
        raise SweepError(f"sweep 'base' must name a run config file, got {name!r}")
    for candidate in (sweep_file.parent / name, Path(name)):
        if candidate.is_file():
            return candidate
    raise SweepError(f"base config not found: {name} (looked next to {sweep_file} and in {Path.cwd()})")


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> Sweep:
    """Read and check a sweep file (``overrides``: more fixed overrides, e.g. from ``--set``): everything
    that needs no Ray cluster and no data."""
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep file", SweepError)
    unknown = sorted(set(raw) - _SWEEP_KEYS)
    if unknown:
        raise SweepError(f"unknown sweep key '{unknown[0]}'; known: {', '.join(sorted(_SWEEP_KEYS))}")
    base_file = _find_base(raw.get("base"), path)
    fixed = {**_section(raw, "overrides"), **(overrides or {})}
    try:
        base = load(base_file, fixed)
    except ConfigError as e:
        raise SweepError(f"base config {base_file} with the sweep's overrides: {e}") from None
    if base.data.dataset != "synthetic":  # trial processes run elsewhere: the data root must be absolute
        base = base.override({"data.root": str(Path(base.data.root).expanduser().resolve())})

    known = flat_keys(base)
    search_raw = _section(raw, "search")
    if not search_raw:
        raise SweepError("sweep 'search' is empty: name at least one config key to search")
    search = {}
    for key, spec in search_raw.items():
        if key not in known:
            raise SweepError(f"search space: unknown config key '{key}'")
        if key in fixed:
            raise SweepError(f"search space: '{key}' is also a fixed override; keep it in one place")
        search[key] = _parse_dist(key, spec, known[key])

    sched = raw.get("scheduler", {"name": "asha"})
    sched = {"name": sched} if isinstance(sched, str) else sched
    res = _section(raw, "resources")
    if not isinstance(sched, dict):
        raise SweepError(f"sweep 'scheduler' must be a name or a mapping, got {sched!r}")
    bad = sorted(set(sched) - {"name", "grace_period", "reduction_factor", "max_t"}) or \
        sorted(set(res) - {"cpu", "gpu", "workers"})
    if bad:
        raise SweepError(f"unknown sweep key '{bad[0]}' in scheduler/resources")
    try:
        sweep = Sweep(
            base=base, search=search, num_samples=int(raw.get("num_samples", 1)),
            search_alg=str(raw.get("search_alg", "random")), seed=int(raw.get("seed", 0)),
            trial_seed=str(raw.get("trial_seed", "fixed")), metric=str(raw.get("metric", "val_accuracy")),
            mode=str(raw.get("mode", "max")), scheduler=str(sched.get("name", "asha")),
            grace_period=int(sched.get("grace_period", base.eval.every or 1)),
            reduction_factor=float(sched.get("reduction_factor", 2)), max_t=int(sched.get("max_t", 0)),
            cpu=float(res.get("cpu", 1)), gpu=float(res.get("gpu", 0)), workers=int(res.get("workers", 1)),
            max_concurrent=int(raw.get("max_concurrent", 0)))
    except (TypeError, ValueError) as e:
        raise SweepError(f"sweep file {path}: a number is malformed ({e})") from None
    return _check(sweep)


def _check(s: Sweep) -> Sweep:
    """Settings, every possible value of each key, and every trial configuration the searcher will draw."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise SweepError(msg)

    need(s.num_samples >= 1, f"num_samples must be at least 1, got {s.num_samples}")
    need(s.search_alg in ("random", "grid"), f"search_alg must be random or grid, got '{s.search_alg}'")
    need(s.search_alg != "grid" or all(d == "grid" for d, _ in s.search.values()),
         "search_alg grid needs every search key to be a grid: [...] (or use search_alg: random)")
    need(s.trial_seed in ("fixed", "sampled"), f"trial_seed must be fixed or sampled, got '{s.trial_seed}'")
    need(s.trial_seed == "fixed" or "run.seed" not in s.search, "trial_seed sampled draws run.seed; "
         "do not search run.seed as well")
    need(s.metric in REPORTED, f"metric '{s.metric}' is never reported by a trial; reported: {', '.join(REPORTED)}")
    need(s.mode in ("max", "min"), f"mode must be max or min, got '{s.mode}'")
    need(s.scheduler in ("asha", "fifo"), f"scheduler must be asha or fifo, got '{s.scheduler}'")
    need(s.grace_period >= 1, f"scheduler grace_period must be at least 1 meta-step, got {s.grace_period}")
    need(s.reduction_factor > 1, f"scheduler reduction_factor must be above 1, got {s.reduction_factor}")
    need(s.cpu > 0 and s.gpu >= 0, f"resources need cpu > 0 and gpu >= 0, got cpu {s.cpu}, gpu {s.gpu}")
    need(s.workers >= 1, f"resources workers must be at least 1, got {s.workers}")
    need(s.max_concurrent >= 0, f"max_concurrent must be >= 0 (0: as many as fit), got {s.max_concurrent}")
    for key, (kind, args) in s.search.items():  # each value alone (ranges: both bounds), for a clear message
        for value in args:  # choice/grid: every value; uniform/loguniform/randint: both bounds
            try:
                s.base.override({key: value})
            except ConfigError as e:
                raise SweepError(f"search space '{key}': {kind} value {value!r} is invalid: {e}") from None
    configs = [trial_config(s, values) for values in _checked_samples(s)]
    longest = max(c.run.meta_steps for c in configs)
    if s.max_t == 0:
        s = replace(s, max_t=longest)
    need(s.grace_period <= s.max_t, f"scheduler grace_period {s.grace_period} exceeds max_t {s.max_t}")
    for cfg in configs:
        need(cfg.eval.every > 0, f"eval.every is 0: trials would never meta-validate, so nothing would "
                                 f"report '{s.metric}' to rank them on")
    return s


def _checked_samples(s: Sweep) -> list[dict[str, Any]]:
    out = []
    for values in sample_configs(s):
        try:
            trial_config(s, values)
        except ConfigError as e:
            raise SweepError(f"search space: the trial configuration {values} is invalid: {e}") from None
        out.append(values)
    return out


def param_space(s: Sweep) -> dict[str, Any]:
    from ray import tune

    make = {"uniform": tune.uniform, "loguniform": tune.loguniform, "choice": lambda *a: tune.choice(list(a)),
            "grid": lambda *a: tune.grid_search(list(a)), "randint": lambda lo, hi: tune.randint(lo, hi + 1)}
    space = {key: make[kind](*args) for key, (kind, args) in s.search.items()}
    if s.trial_seed == "sampled":
        space["run.seed"] = tune.randint(0, 2**31 - 1)
    return space


def _searcher(s: Sweep, max_concurrent: int = 0):
    from ray.tune.search.basic_variant import BasicVariantGenerator
    return BasicVariantGenerator(random_state=s.seed, max_concurrent=max_concurrent)


def sample_configs(s: Sweep) -> list[dict[str, Any]]:
    """The searched values of every trial, in trial order, exactly as the sweep's searcher draws them."""
    gen = _searcher(s)
    gen.add_configurations({"preview": {"run": lambda config: None, "config": param_space(s),
                                        "num_samples": s.num_samples}})
    out = []
    while (trial := gen.next_trial()) is not None:
        out.append(dict(trial.config))
    return out


def trial_config(s: Sweep, values: dict[str, Any]) -> Config:
    """The full resolved config of a trial (what ``best_config.yaml`` holds for the best one)."""
    return s.base.override({k: v for k, v in values.items() if k in s.search or k == "run.seed"})


def _exec_config(s: Sweep, cfg: Config) -> Config:
    """How a trial runs ``cfg``: a checkpoint at every meta-validation, threads = its CPUs. Neither changes
    the numbers, only when state is saved and how many cores compute them."""
    return cfg.override({"run.checkpoint_every": cfg.eval.every,
                         "run.threads": cfg.run.threads or max(1, int(s.cpu))})


# ------------------------------------------------------------------------------------------------ trials
class TuneRecorder:
    """The :class:`~metanas_ray.train_loop.Recorder` of a trial: reports every meta-validation (with a
    checkpoint) to Tune, which keeps the trial's state; no run directory.

    In the trial process (``train=False``) through ``ray.tune.report``; on Ray Train workers through
    ``ray.train.report`` on every rank, rank 0 attaching the checkpoint (``TuneReportCallback`` forwards it).
    """

    def __init__(self, rank: int = 0, train: bool = False):
        self.rank, self.train = rank, train

    def data_split(self, class_split: dict[str, Any]) -> None:
        pass  # the sweep's trials share the base config's data

    def resumed(self, rows: list[dict[str, Any]]) -> None:
        pass  # Tune restored the checkpoint; see replay()

    def record(self, rows: list[dict[str, Any]], payload: dict[str, Any] | None, keep: int, comm=None,
               device: Any = "cpu") -> None:
        self.report(rows, payload)

    def stop_requested(self) -> bool:
        return False  # Tune stops its trials itself

    def report(self, rows: list[dict[str, Any]], payload: dict[str, Any] | None,
               with_checkpoint: bool = True) -> None:
        row = rows[-1] if rows else None
        if payload is None or row is None or row["step"] != payload["step"] or math.isnan(row["val_accuracy"]):
            return  # not a meta-validation step
        metrics = {"step": int(row["step"]), **{k: float(row[k]) for k in REPORTED}}
        with tempfile.TemporaryDirectory() as tmp:
            if self.rank == 0 and with_checkpoint:
                checkpoint.save(Path(tmp) / _STATE_FILE, payload)
            if self.train:
                import ray.train
                ckpt = ray.train.Checkpoint.from_directory(tmp) if self.rank == 0 and with_checkpoint else None
                ray.train.report(metrics, checkpoint=ckpt)
            else:
                from ray import tune
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp) if with_checkpoint else None)

    def replay(self, payload: dict[str, Any]) -> None:
        """Report a resumed checkpoint's meta-validation again: after an interruption, Tune may have missed
        the last reports of a Ray Train run (its checkpoint was saved, the trial stopped before Tune saw it)."""
        self.report(list(payload["metrics"]), payload, with_checkpoint=False)

    def finish(self, summary, state, cfg, rows) -> None:
        pass


def _resume_payload(ckpt) -> dict[str, Any] | None:
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return checkpoint.load(Path(d) / _STATE_FILE)


def _trial_in_process(config: dict[str, Any], sweep: Sweep) -> None:
    """A Tune trial that meta-trains in its own process (one CPU worker)."""
    from ray import tune

    cfg = _exec_config(sweep, trial_config(sweep, config))
    meta_train(cfg, TuneRecorder(), resume=_resume_payload(tune.get_checkpoint()), final_test=False)


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of a trial: its share of every meta-batch, the same reports on every rank."""
    import ray.train
    import ray.train.torch
    import torch

    from .comm import TorchDistComm

    cfg = from_dict(config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    quiet_worker_logs(rank)
    device = ray.train.torch.get_device() if cfg.scale.num_gpus else torch.device("cpu")
    recorder, resume = TuneRecorder(rank, train=True), _resume_payload(ray.train.get_checkpoint())
    if resume is not None:
        recorder.replay(resume)
    meta_train(cfg, recorder, TorchDistComm(), device, resume=resume, final_test=False)


def _trial_on_train(config: dict[str, Any], sweep: Sweep, storage: str) -> None:
    """A Tune trial that drives a TorchTrainer of ``workers`` workers: Ray's per-trial driver function for Tune
    around Train (the module docstring)."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = _exec_config(sweep, trial_config(sweep, config))
    cfg = cfg.override({"scale.num_workers": sweep.workers, "scale.num_gpus": sweep.workers if sweep.gpu else 0})
    per_worker = {"CPU": sweep.cpu, **({"GPU": sweep.gpu} if sweep.gpu else {})}
    TorchTrainer(
        _train_worker, train_loop_config={"cfg": cfg.to_dict()},
        scaling_config=ray.train.ScalingConfig(num_workers=sweep.workers, use_gpu=sweep.gpu > 0,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=f"train-{tune.get_context().get_trial_id()}", storage_path=storage,  # same name: resumes
            callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=sweep.metric,
                                                         checkpoint_score_order=sweep.mode),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scale.max_failures),
            worker_runtime_env={"env_vars": worker_env(cfg.run.threads)}),
    ).fit()


def _trainable(s: Sweep, out: Path):
    """The trial function with its resources: the trial's workers are what it holds on the cluster."""
    from ray import tune

    if not s.on_train:
        return tune.with_resources(tune.with_parameters(_trial_in_process, sweep=s), {"cpu": s.cpu})
    # Ray Train V2 reserves the workers in its own placement group; the trial actor itself holds (almost)
    # nothing, and the concurrency cap (``_concurrency``) keeps the sum of all trials' workers within the cluster
    fn = tune.with_parameters(_trial_on_train, sweep=s, storage=str(out / "train"))
    return tune.with_resources(fn, {"cpu": 0, "memory": 256 * 1024**2})


# ------------------------------------------------------------------------------------------------ checks with Ray
def _concurrency(s: Sweep, cluster: dict[str, float]) -> int:
    """Trials that fit side by side, capped by ``max_concurrent``; a trial that cannot fit at all is an error."""
    fits = []
    for res, need in s.per_trial().items():
        have = float(cluster.get(res, 0))
        if need > have:
            raise ScaleError(f"a trial needs {need:g} {res} ({s.workers} worker(s) × "
                             f"{s.cpu if res == 'CPU' else s.gpu:g}) but the Ray cluster has {have:g}")
        if need > 0:
            fits.append(int(have // need))
    n = min(fits) if fits else 1
    return min(n, s.max_concurrent) if s.max_concurrent else n


def check_data(s: Sweep) -> None:
    """Every data setting the trials use loads and holds enough classes for their tasks (before any trial)."""
    seen: dict[tuple, Any] = {}
    for values in sample_configs(s):
        d = trial_config(s, values).data
        key = (d.dataset, d.root, d.image_size, d.split, d.split_fractions, d.synthetic_classes,
               d.synthetic_per_class)
        if key not in seen:
            seen[key] = load_splits(d)
        check_tasks(d, seen[key])


# ------------------------------------------------------------------------------------------------ running
@dataclass
class TrialRecord:
    """One trial as ``trials.csv`` shows it, plus its reported history."""

    trial_id: str
    index: int
    status: str
    values: dict[str, Any]
    seed: int
    meta_steps: int
    best: float
    best_step: int
    last: float
    wall_seconds: float
    stopped_early: bool
    error: str
    history: list[dict[str, Any]]
    checkpoints: list[tuple[dict[str, Any], Path]]


@dataclass
class SweepOutcome:
    trials: list[TrialRecord]
    summary: dict[str, Any] | None  # None while the sweep is unfinished (interrupted)
    out: Path

    @property
    def interrupted(self) -> bool:
        return self.summary is None


def _saved_results(s: Sweep, out: Path):
    """The experiment as saved: after an interruption the in-memory trials all read TERMINATED (stopped by the
    cleanup), while the saved state keeps the unfinished ones RUNNING/PENDING, as ``--resume`` will see them."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    return ResultGrid(ExperimentAnalysis(str(out / "tune"), default_metric=s.metric, default_mode=s.mode))


def _records(s: Sweep, rg) -> list[TrialRecord]:
    out = []
    for trial, result in zip(rg._experiment_analysis.trials, rg):
        df = result.metrics_dataframe
        history = [] if df is None or s.metric not in df else \
            [{k: v for k, v in r.items() if not (isinstance(v, float) and math.isnan(v))}
             for r in df.to_dict("records")]
        history = list({int(r["step"]): r for r in history if s.metric in r}.values())  # a replay: once
        scores = [r[s.metric] for r in history]
        pick = (max if s.mode == "max" else min) if scores else None
        best_row = pick(reversed(history), key=lambda r: r[s.metric]) if pick else {}
        cfg = trial_config(s, trial.config)
        steps = int(history[-1]["step"]) if history else 0
        ckpts: list[tuple[dict[str, Any], Path]] = []
        for ck, metrics in result.best_checkpoints or []:  # trials in the trial process
            ckpts.append((metrics, Path(ck.path) / _STATE_FILE))
        for row in history:  # trials on Ray Train: TuneReportCallback puts the path in the metrics
            if row.get("checkpoint_path"):
                ckpts.append((row, Path(row["checkpoint_path"]) / _STATE_FILE))
        error = " ".join(str(result.error).split())[:300] if result.error else ""
        out.append(TrialRecord(
            trial_id=trial.trial_id, index=int(trial.trial_id.rsplit("_", 1)[-1]), status=trial.status,
            values={k: trial.config.get(k) for k in s.search}, seed=cfg.run.seed, meta_steps=steps,
            best=float(best_row.get(s.metric, math.nan)), best_step=int(best_row.get("step", 0)),
            last=float(history[-1][s.metric]) if history else math.nan,
            wall_seconds=float(history[-1].get("time_total_s", 0.0)) if history else 0.0,
            stopped_early=trial.status == "TERMINATED" and not error and steps < cfg.run.meta_steps,
            error=error, history=history, checkpoints=[c for c in ckpts if c[1].is_file()]))
    return sorted(out, key=lambda t: t.index)


def write_trials_csv(s: Sweep, trials: Sequence[TrialRecord], path: Path) -> None:
    m = s.metric
    columns = ["trial_id", "trial", *s.search, "seed", f"best_{m}", f"best_{m}_step", f"last_{m}", "meta_steps",
               "stopped_early", "wall_seconds", "status", "error"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for t in trials:
            w.writerow([t.trial_id, t.index, *(_cell(t.values[k]) for k in s.search), t.seed,
                        _cell(t.best), t.best_step, _cell(t.last), t.meta_steps, t.stopped_early,
                        round(t.wall_seconds, 2), t.status, t.error])


def _cell(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return ""
    return yaml.safe_dump(list(v), default_flow_style=True).strip() if isinstance(v, (list, tuple)) else v


def _meta_test_task(cfg_dict: dict[str, Any], state_file: str, gpu: bool) -> dict[str, Any]:
    """Meta-test a checkpoint on the meta-test classes (Algorithm 3, soft and hard)."""
    import torch

    from .evaluate import meta_test
    from .memory import keep_freed_memory
    from .state import build_network, place

    cfg = from_dict(cfg_dict)
    torch.set_num_threads(max(1, cfg.run.threads))
    keep_freed_memory(cfg.run.keep_freed_memory_mb)
    device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
    payload = checkpoint.load(state_file)
    splits = load_splits(cfg.data)
    sampler = check_tasks(cfg.data, splits, cfg.run.seed)["test"]  # the sampler meta_train's final test uses
    net = build_network(cfg, splits.channels)
    result = meta_test(net, place(net, payload["state"], device), sampler, cfg.eval.test_tasks, cfg, device=device)
    return {**result, "step": int(payload["step"])}


def _best(s: Sweep, trials: Sequence[TrialRecord]) -> TrialRecord | None:
    ranked = [t for t in trials if not math.isnan(t.best) and t.checkpoints]
    if not ranked:
        return None
    sign = 1 if s.mode == "max" else -1
    return max(ranked, key=lambda t: (sign * t.best, -t.index))  # ties: the earlier trial


def _finish(s: Sweep, out: Path, trials: list[TrialRecord], elapsed: float) -> dict[str, Any]:
    import ray

    best = _best(s, trials)
    if best is None:
        raise SweepError(f"no trial reported '{s.metric}' with a checkpoint: nothing to select "
                         f"(errors: {[t.error for t in trials if t.error][:1]})")
    cfg = trial_config(s, best.values | {"run.seed": best.seed})
    save(cfg, out / "best_config.yaml")
    sign = 1 if s.mode == "max" else -1
    metrics, state_file = max(best.checkpoints, key=lambda c: (sign * c[0][s.metric], c[0]["step"]))
    log.info("meta-testing the best trial %s (meta-step %d checkpoint) on %d meta-test tasks",
             best.trial_id, metrics["step"], cfg.eval.test_tasks)
    task = ray.remote(num_cpus=s.cpu, num_gpus=s.gpu)(_meta_test_task)
    test = ray.get(task.remote(_exec_config(s, cfg).to_dict(), str(state_file), s.gpu > 0))
    summary = {
        "best_trial": best.trial_id, "best_values": best.values, "best_seed": best.seed,
        "metric": s.metric, "mode": s.mode, f"best_{s.metric}": best.best, f"best_{s.metric}_step": best.best_step,
        "best_val_ci95": next((r.get("val_ci95") for r in best.history if r["step"] == best.best_step), None),
        "meta_test_checkpoint_step": test["step"],
        "meta_test_accuracy_soft": test["accuracy_soft"], "meta_test_ci95_soft": test["ci95_soft"],
        "meta_test_accuracy_hard": test["accuracy_hard"], "meta_test_ci95_hard": test["ci95_hard"],
        "meta_test_tasks": test["tasks"],
        "trials": len(trials),
        "trials_finished": sum(t.status == "TERMINATED" and not t.stopped_early for t in trials),
        "trials_stopped_early": sum(t.stopped_early for t in trials),
        "trials_errored": sum(t.status == "ERROR" for t in trials),
        "trial_steps": sum(t.meta_steps for t in trials),
        "searcher_seed": s.seed, "trial_seed": s.trial_seed, "scheduler": s.scheduler,
        "search": {k: {d: list(a)} for k, (d, a) in s.search.items()},
        "wall_seconds": elapsed,
    }
    (out / "summary.json").write_text(json.dumps(plain(summary), indent=2) + "\n")
    return summary


def _plots(s: Sweep, out: Path, trials: list[TrialRecord]) -> None:
    try:
        from .tune_plots import write_sweep_plots
        write_sweep_plots(out / "plots", trials, s.metric, {k: d for k, (d, _) in s.search.items()}, s.mode)
    except Exception as e:  # plots are a convenience: never lose the results over one
        log.warning("could not draw the sweep plots: %s", e)


def prepare(sweep_file: str | Path | None, out: Path, resume: bool,
            overrides: dict[str, Any] | None = None) -> Sweep:
    """The sweep to run into ``out``: a new one from ``sweep_file``, or the saved one for ``--resume``."""
    saved = out / "sweep.yaml"
    if resume:
        if overrides:
            raise SweepError("--resume continues the saved sweep as it was; drop --set")
        if not saved.is_file() or not (out / "tune").is_dir():
            raise SweepError(f"--resume {out}: no sweep there (sweep.yaml or tune/ missing)")
        s = load_sweep(saved)
        given = load_sweep(sweep_file) if sweep_file is not None else s
        if (given.to_dict(), given.base) != (s.to_dict(), s.base):
            raise SweepError(f"--resume continues the sweep saved in {out}; {sweep_file} differs from it "
                             f"(drop --config or choose another --output)")
        return s
    if sweep_file is None:
        raise SweepError("--config SWEEP_FILE is needed (or --resume with --output of an existing sweep)")
    s = load_sweep(sweep_file, overrides)
    if saved.exists() or (out / "tune").exists():
        raise SweepError(f"{out} already holds a sweep; continue it with --resume or choose another --output")
    return s


def run_sweep(s: Sweep, out: str | Path, resume: bool = False, callbacks: Sequence[Any] = (),
              verbose: int = 0) -> SweepOutcome:
    """Run (or, ``resume``: continue) the sweep into ``out``. Ray must be initialised. Checks everything that
    can fail (resources, data) before the first trial starts."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # one report each
    out = Path(out).expanduser().resolve()
    max_concurrent = _concurrency(s, ray.cluster_resources())
    check_data(s)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "sweep_state.json"
    elapsed_before = json.loads(state_file.read_text())["elapsed_seconds"] if resume and state_file.is_file() else 0.0
    if not resume:
        s.save(out)
    t0 = time.perf_counter()
    trainable = _trainable(s, out)
    if resume:
        log.info("resuming the sweep in %s", out / "tune")
        tuner = tune.Tuner.restore(str(out / "tune"), trainable=trainable, resume_unfinished=True)
    else:
        scheduler = (ASHAScheduler(time_attr="step", max_t=s.max_t, grace_period=s.grace_period,
                                   reduction_factor=s.reduction_factor) if s.scheduler == "asha"
                     else FIFOScheduler())
        tuner = tune.Tuner(
            trainable, param_space=param_space(s),
            tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, num_samples=s.num_samples,
                                        scheduler=scheduler, search_alg=_searcher(s, max_concurrent),
                                        reuse_actors=not s.on_train,  # saves a process start per trial
                                        trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
            run_config=tune.RunConfig(
                name="tune", storage_path=str(out), verbose=verbose, callbacks=list(callbacks),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=s.metric,
                                                        checkpoint_score_order=s.mode)))
    log.info("sweep: %d sample(s), %s scheduler, up to %d trial(s) at a time, into %s",
             s.num_samples, s.scheduler, max_concurrent, out)
    try:
        tuner.fit()
    except Exception as e:  # Tune ends the whole experiment, e.g. when Ray's OOM killer takes a trial's process
        elapsed = elapsed_before + time.perf_counter() - t0
        state_file.write_text(json.dumps({"elapsed_seconds": elapsed, "finished": False}) + "\n")
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise SweepError(f"the sweep stopped: {reason} (trials finished so far and the checkpoints of the "
                         f"others are kept in {out}); continue with: python -m metanas_ray.tune "
                         f"--output {out} --resume") from e
    trials = _records(s, _saved_results(s, out))
    elapsed = elapsed_before + time.perf_counter() - t0
    write_trials_csv(s, trials, out / "trials.csv")
    _plots(s, out, trials)
    done = all(t.status in ("TERMINATED", "ERROR") for t in trials) and len(trials) >= len(sample_configs(s))
    state_file.write_text(json.dumps({"elapsed_seconds": elapsed, "finished": done}) + "\n")
    return SweepOutcome(trials, _finish(s, out, trials, elapsed) if done else None, out)


# ------------------------------------------------------------------------------------------------ CLI
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m metanas_ray.tune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--config", help="a sweep file (see tune_configs/sweep_*.yaml)")
    p.add_argument("--output", help="sweep directory (default: runs/sweep-<name>-<time>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a fixed override of the base config, e.g. --set data.root=../shared/data/omniglot")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep in --output")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--verbose", type=int, default=1, help="Tune's verbosity 0..3 (default 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    args = parser().parse_args(argv)
    started = False
    try:
        if args.resume and not args.output:
            raise SweepError("--resume needs --output DIR, the sweep to continue")
        stem = Path(args.config).stem if args.config else "sweep"
        out = Path(args.output or f"runs/{stem}-{time.strftime('%Y%m%d-%H%M%S')}").expanduser().resolve()
        sweep = prepare(args.config, out, args.resume, parse_overrides(args.overrides))
        from .ray_train import init_ray
        base = sweep.base.override({"scale.address": args.address}) if args.address else sweep.base
        started = init_ray(base, dashboard=sweep.on_train)  # Train's placement-group cleanup needs the dashboard
        outcome = run_sweep(sweep, out, args.resume, verbose=args.verbose)
    except (SweepError, ConfigError, DataError, ScaleError, checkpoint.CheckpointError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    finally:
        if started:
            import ray
            ray.shutdown()
    if outcome.interrupted:
        print(f"interrupted; continue with: python -m metanas_ray.tune --output {out} --resume", file=sys.stderr)
        return 130
    s = outcome.summary
    log.info("best trial %s %s: %s %.4f | meta-test soft %.2f%% ± %.2f, hard %.2f%% ± %.2f (%d tasks) | "
             "%d trial-steps, %d stopped early | %s", s["best_trial"], s["best_values"], s["metric"],
             s[f"best_{s['metric']}"], 100 * s["meta_test_accuracy_soft"], 100 * s["meta_test_ci95_soft"],
             100 * s["meta_test_accuracy_hard"], 100 * s["meta_test_ci95_hard"], s["meta_test_tasks"],
             s["trial_steps"], s["trials_stopped_early"], out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
