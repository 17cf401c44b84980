"""Ray Tune sweeps over any config key, ranked on meta-validation only: ``python -m metanas_ray.tune``.

    python -m metanas_ray.tune --config tune_configs/sweep_smoke.yaml --output runs/sweep-smoke   # ~30 s
    python -m metanas_ray.tune --config tune_configs/sweep_quick.yaml --output runs/sweep-quick \\
        --set data.root=../shared/data/omniglot                                              # Omniglot
    python -m metanas_ray.tune --resume runs/sweep-quick                   # continue an interrupted sweep
    ray job submit --working-dir . -- python -m metanas_ray.tune \\
        --config tune_configs/sweep_cluster.yaml --output /shared/sweeps/paper                # GPU cluster

The sweep file's format, and every check made before the first trial starts, are in ``metanas_ray.sweep``
(``python -m pydoc metanas_ray.sweep``); this module runs the sweep.

Every trial meta-trains its config and reports each meta-validation to Tune (``step`` = meta-steps is
ASHA's time attribute), with a checkpoint; no trial sees the meta-test classes. Small trials (one CPU worker)
run in the trial process; others run a per-trial ``TorchTrainer`` whose workers report through
``TuneReportCallback`` (the CLI then starts Ray with the dashboard: Train's placement-group cleanup after an
ASHA stop needs it). After the last trial, the best trial (best ``metric`` over its run) is meta-tested
once, from its best checkpoint. The output directory holds ``trials.csv``, ``best_config.yaml`` (runs with
``python -m metanas_ray.run --config``), ``summary.json``, ``plots/`` and the Tune experiment (``tune/``).
Everything that can be wrong with a sweep is checked before the first trial starts (``error: ...``, exit 2).

A little past 400 lines: the two ways a trial runs, reading the results back, the best trial's meta-test and the
CLI belong together; the sweep file, which needs no Ray, is ``sweep.py``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from . import checkpoint
from .cli import add_shared
from .cli import overrides as shared_overrides
from .config import ConfigError, describe, from_dict, plain, save
from .data import DataError, check_tasks, load_splits
from .ray_train import (CHECKPOINT_FILE, ScaleError, load_reported, report_with_checkpoint, worker_env,
                        worker_setup)
from .sweep import (REPORTED, Sweep, SweepError, TrialRecord, check_data, exec_config, param_space, prepare,
                    resized, sample_configs, searcher, trial_config, write_trials_csv)
from .tracking import mlflow_callback
from .train_loop import meta_train

log = logging.getLogger(__name__)


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
        report_with_checkpoint(metrics, payload if with_checkpoint else None, self.rank, tune_session=not self.train)

    def replay(self, payload: dict[str, Any]) -> None:
        """Report a resumed checkpoint's meta-validation again: after an interruption, Tune may have missed
        the last reports of a Ray Train run (its checkpoint was saved, the trial stopped before Tune saw it)."""
        self.report(list(payload["metrics"]), payload, with_checkpoint=False)

    def finish(self, summary, state, cfg, rows) -> None:
        pass


def _trial_in_process(config: dict[str, Any], sweep: Sweep) -> None:
    """A Tune trial that meta-trains in its own process (one CPU worker)."""
    from ray import tune

    cfg = exec_config(sweep, trial_config(sweep, config))
    meta_train(cfg, TuneRecorder(), resume=load_reported(tune.get_checkpoint()), final_test=False)


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of a trial: its share of every meta-batch, the same reports on every rank."""
    cfg, rank, comm, device, resume = worker_setup(config)
    recorder = TuneRecorder(rank, train=True)
    if resume is not None:
        recorder.replay(resume)
    meta_train(cfg, recorder, comm, device, resume=resume, final_test=False)


def _trial_on_train(config: dict[str, Any], sweep: Sweep, storage: str) -> None:
    """A Tune trial that drives a TorchTrainer of ``workers`` workers: Ray's per-trial driver function for Tune
    around Train (the module docstring)."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = exec_config(sweep, trial_config(sweep, config))
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


# ------------------------------------------------------------------------------------------------ running
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


@dataclass
class SweepOutcome:
    trials: list[TrialRecord]
    summary: dict[str, Any] | None  # None while the sweep is unfinished (interrupted)
    out: Path

    @property
    def interrupted(self) -> bool:
        return self.summary is None


def _saved_results(s: Sweep, out: Path) -> list[tuple[Any, Any]]:
    """(Tune's record of the trial, its ``Result``) for every trial of the experiment as saved: after an
    interruption the in-memory trials all read TERMINATED (stopped by the cleanup), while the saved state keeps
    the unfinished ones RUNNING/PENDING, as ``--resume`` will see them."""
    from ray import tune

    grid = tune.Tuner.restore(str(out / "tune"), trainable=_trainable(s, out)).get_results()
    trials = _saved_trials(out)
    return [(trials[result.path], result) for result in grid]


def _saved_trials(out: Path) -> dict[str, Any]:
    """Tune's saved record of each trial (``trial_id``, ``status``, ``config``), by trial path. A ``ResultGrid``
    has neither a trial's status (only counts of them) nor the config of a trial that never reported (PENDING
    when the sweep was interrupted); ``ExperimentAnalysis.trials`` (public, see its constructor) has both."""
    from ray.tune import ExperimentAnalysis

    return {trial.path: trial for trial in ExperimentAnalysis(str(out / "tune")).trials}


def _records(s: Sweep, results: Sequence[tuple[Any, Any]]) -> list[TrialRecord]:
    out = []
    for trial, result in results:
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
            ckpts.append((metrics, Path(ck.path) / CHECKPOINT_FILE))
        for row in history:  # trials on Ray Train: TuneReportCallback puts the path in the metrics
            if row.get("checkpoint_path"):
                ckpts.append((row, Path(row["checkpoint_path"]) / CHECKPOINT_FILE))
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
    test = ray.get(task.remote(exec_config(s, cfg).to_dict(), str(state_file), s.gpu > 0))
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
                                        scheduler=scheduler, search_alg=searcher(s, max_concurrent),
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
                         f"--resume {out}") from e
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
    add_shared(p, "tune")
    p.add_argument("--verbose", type=int, default=1, help="Tune's verbosity 0..3 (default 1)")
    return p


def _resolve(args: argparse.Namespace) -> tuple[Sweep, Path, bool]:
    """The sweep, its directory and whether it is resumed, from the shared flags."""
    resume = args.resume is not None
    if resume and not (args.resume or args.output):
        raise SweepError("--resume needs the sweep's directory: --resume DIR")
    if resume and args.resume and args.output and Path(args.resume).resolve() != Path(args.output).resolve():
        raise SweepError(f"--resume {args.resume} and --output {args.output} name two sweeps; give one")
    stem = Path(args.config).stem if args.config else "sweep"
    out = Path(args.resume or args.output or f"runs/{stem}-{time.strftime('%Y%m%d-%H%M%S')}").expanduser().resolve()
    changes = shared_overrides(args)
    runtime = {k: changes.pop(k) for k in ("scale.address", "run.mlflow", "scale.num_workers", "scale.num_gpus")
               if k in changes}  # how the sweep runs, not what its trials compute
    sweep = prepare(args.config, out, resume, changes)
    if args.num_workers is not None or args.num_gpus is not None:
        if resume:
            raise SweepError("--resume continues the saved sweep with its trial workers; drop --num-workers "
                             "and --num-gpus")
        sweep = resized(sweep, args.num_workers, args.num_gpus)
    base = {k: v for k, v in runtime.items() if k in ("scale.address", "run.mlflow")}
    return replace(sweep, base=sweep.base.override(base)) if base else sweep, out, resume


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    args = parser().parse_args(argv)
    started = False
    out = None
    try:
        sweep, out, resume = _resolve(args)
        if args.print_config:
            print(describe(sweep.base), end="")
            print("# search:\n" + "".join(f"#   {k}: {{{d}: {list(a)}}}\n" for k, (d, a) in sweep.search.items()),
                  end="")
            return 0
        callbacks = [mlflow_callback(args.mlflow)] if args.mlflow else []
        from .ray_train import init_ray
        started = init_ray(sweep.base, dashboard=sweep.on_train)  # Train's placement-group cleanup needs it
        outcome = run_sweep(sweep, out, resume, callbacks=callbacks, verbose=args.verbose)
    except (SweepError, ConfigError, DataError, ScaleError, checkpoint.CheckpointError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    finally:
        if started:
            import ray
            ray.shutdown()
    if outcome.interrupted:
        print(f"interrupted; continue with: python -m metanas_ray.tune --resume {out}", file=sys.stderr)
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