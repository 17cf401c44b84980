"""Meta-train a MetaNAS run end to end: ``python -m metanas_ray.run``.

    python -m metanas_ray.run                                    # the default: Omniglot 20-way 1-shot
    python -m metanas_ray.run --config tune_configs/quick.yaml   # Omniglot 5-way 1-shot, ~11 min on 2 cores
    python -m metanas_ray.run --config tune_configs/smoke.yaml --output runs/smoke
    python -m metanas_ray.run --config tune_configs/quick.yaml --num-workers 2
    python -m metanas_ray.run --num-gpus 8 --set meta.meta_batch=16   # on a GPU cluster (or ray job submit)
    python -m metanas_ray.run --resume runs/quick                # continue an interrupted run

Meta-training runs inside a Ray Train ``TorchTrainer`` (a local Ray on 127.0.0.1 unless ``--address`` or
``RAY_ADDRESS`` names a cluster); ``--in-process`` runs the same loop in this process without Ray.
Everything lands in the run directory given by ``--output`` (see ``metanas_ray.rundir``).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from . import checkpoint
from .cli import add_shared
from .cli import overrides as shared_overrides
from .config import RESUMABLE, Config, ConfigError, describe, load, resumable
from .data import DataError
from .inner_loop import NonFiniteLossError
from .interrupt import StopOnSignal, Stopped
from .rundir import RunDir, RunDirError
from .tracking import end_mlflow, start_mlflow
from .ray_train import ScaleError

log = logging.getLogger("metanas_ray")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m metanas_ray.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    add_shared(p, "run")
    p.add_argument("--in-process", action="store_true",
                   help="run the loop in this process, without Ray (on the GPU with --num-gpus 1)")
    return p


def resolve(args: argparse.Namespace) -> tuple[Config, RunDir, dict | None]:
    """The config, run directory and (for --resume) checkpoint payload that the arguments ask for."""
    overrides = shared_overrides(args)
    if args.resume:
        if args.config:
            raise ConfigError("--resume continues a run with its saved config; drop --config")
        run = RunDir(args.resume)
        saved = run.open_existing()
        bad = sorted(k for k in overrides if not resumable(k))
        if bad:
            raise ConfigError(f"--resume keeps the saved config; '{bad[0]}' cannot change "
                              f"(only {', '.join(RESUMABLE)} can)")
        cfg = saved.override(overrides)
        found = checkpoint.load_latest(run.checkpoints)  # the newest readable one: a corrupt newest is skipped
        payload = found[0] if found else None
        if payload is not None and cfg.run.meta_steps < int(payload["step"]):
            raise ConfigError(f"run.meta_steps={cfg.run.meta_steps} but {run.path} has already done "
                              f"{payload['step']} meta-steps (its last checkpoint); set run.meta_steps to at least "
                              f"{payload['step']}")
        if payload is None:
            log.info("no checkpoint in %s yet: starting it from the beginning", run.checkpoints)
        return cfg, run, payload
    cfg = load(args.config, overrides)
    stem = Path(args.config).stem if args.config else "default"
    out = args.output or f"runs/{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg, RunDir(out), None


def in_process_device(cfg: Config) -> str:
    """The device of an ``--in-process`` run: the CPU, or the one GPU that ``--num-gpus 1`` asks for."""
    if not cfg.scale.num_gpus:
        return "cpu"
    if cfg.scale.num_gpus > 1:
        raise ConfigError(f"--in-process runs in one process on one device; --num-gpus {cfg.scale.num_gpus} "
                          f"needs Ray Train (drop --in-process; to resume on the CPU: --num-gpus 0)")
    import torch
    if not torch.cuda.is_available():
        raise ConfigError("--num-gpus 1 asks for a GPU, but PyTorch sees none (torch.cuda.is_available() is False); "
                          "on the CPU drop --num-gpus (when resuming a GPU run: --num-gpus 0)")
    return "cuda"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    args = parser().parse_args(argv)
    run = None  # set once this invocation owns the run directory
    stop = None
    try:
        if args.print_config:
            print(describe(resolve(args)[0]), end="")
            return 0
        cfg, target, payload = resolve(args)
        device = in_process_device(cfg) if args.in_process else None  # checked before the run directory
        if args.resume:
            target.save_config(cfg)
        else:
            target.create(cfg)
        run = target
        log.info("run directory: %s", run.path)
        start_mlflow(run.path, cfg)  # a bad --mlflow fails here, before any work
        with StopOnSignal(run.stop_file) as stop:
            if args.in_process:
                from .recording import RunRecorder
                from .train_loop import meta_train
                summary = meta_train(cfg, RunRecorder(run, cfg), device=device, resume=payload)
            else:
                from .ray_train import fit
                summary = fit(cfg, run, resume=payload)
    except (ConfigError, DataError, RunDirError, checkpoint.CheckpointError, NonFiniteLossError, ScaleError) as e:
        print(f"error: {e}", file=sys.stderr)
        if run is not None:
            _after_error(run, e)
        return 2
    except (Stopped, KeyboardInterrupt) as e:
        return _after_stop(run, e, stop)
    log.info("meta-test accuracy: soft %.2f%% ± %.2f, hard %.2f%% ± %.2f (%d tasks) | %s",
             100 * summary["meta_test_accuracy_soft"], 100 * summary["meta_test_ci95_soft"],
             100 * summary["meta_test_accuracy_hard"], 100 * summary["meta_test_ci95_hard"],
             summary["meta_test_tasks"], run.summary_file)
    return 0


def _after_error(run: RunDir, e: Exception) -> None:
    """Leave ``run`` so that it can go on: removed when a config problem stopped it before any result (the
    same command works again once fixed), else with error.txt and the command that continues it."""
    end_mlflow(run.path, "FAILED")
    if isinstance(e, (ConfigError, DataError, ScaleError)) and run.discard():
        print(f"nothing was computed, and {run.path} is left as it was: once fixed, run the same command again",
              file=sys.stderr)
        return
    try:
        run.write_error(f"{type(e).__name__}: {e}")
    except RunDirError:  # an unwritable run directory: the message above is all there is
        pass
    last = run.latest_checkpoint()
    kept = f"it keeps its checkpoint of meta-step {checkpoint.step_of(last)}; " if last else ""
    print(f"the run directory keeps what was written ({kept}nothing else is lost); once fixed, continue with: "
          f"python -m metanas_ray.run --resume {run.path} (--data-root, --num-workers, --num-gpus, --address and "
          f"--set for the keys that --resume may change)", file=sys.stderr)


def _after_stop(run: RunDir | None, e: BaseException, stop: StopOnSignal | None) -> int:
    """One line for SIGINT/SIGTERM, the exit code a shell gives them (130 / 143), and how to continue."""
    code = stop.exit_code if stop is not None and stop.signum else 130
    name = stop.name if stop is not None and stop.signum else "SIGINT"
    if run is None:
        print(f"interrupted ({name}) before the run started", file=sys.stderr)
        return code
    end_mlflow(run.path, "KILLED")
    if isinstance(e, Stopped):
        where = f"after meta-step {e.step}, whose checkpoint is saved"
    else:
        last = run.latest_checkpoint()
        why = f": {e}" if str(e) else ""
        where = (f"at once{why}; the last checkpoint is of meta-step {checkpoint.step_of(last)}" if last else
                 f"at once{why}, before its first checkpoint")
    print(f"stopped by {name} {where}; continue with: python -m metanas_ray.run --resume {run.path}",
          file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
