"""Meta-testing (the paper's Algorithm 3) and meta-validation; ``python -m metanas_ray.evaluate RUN_DIR``.

For each task: adapt w and α on D_train with the task-learner (``eval.steps`` steps, α and τ during the first
``eval.arch_steps``, soft-pruned at ``eval.prune_threshold``, as the official meta-test), then measure accuracy
on D_test twice: soft-pruned (the supernet at the final, lowest temperature) and hard-pruned (only the
derived genotype's operations and inputs). Reports mean accuracy and its 95% confidence interval
(1.96 · sample std / √n) over the tasks. Tasks are spread over workers; the sums meet in one all-reduce.

    python -m metanas_ray.evaluate runs/quick                  # meta-test the run's last checkpoint
    python -m metanas_ray.evaluate runs/quick --split val --tasks 100
    python -m metanas_ray.evaluate runs/quick --device cpu      # default: the GPU when PyTorch sees one
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from . import graphed
from .comm import LocalComm, my_share
from .config import Config, TaskLearnerConfig
from .data import TaskSampler
from .data.tasks import split_label
from .inner_loop import Moments, Temperature, accuracy, adapt, eval_task_config
from .state import State, place

log = logging.getLogger(__name__)


PROGRESS_SECONDS = 15.0  # a progress line at most this often while tasks are evaluated (rank 0)


def eta(seconds: float) -> str:
    """``seconds`` as 4m05s or 1h07m."""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _mean_ci(total: float, total_sq: float, n: int) -> tuple[float, float]:
    mean = total / n
    var = max(total_sq - n * mean * mean, 0.0) / (n - 1) if n > 1 else 0.0
    return mean, 1.96 * math.sqrt(var / n)


def meta_test(net: nn.Module, state: State, sampler: TaskSampler, n_tasks: int, cfg: Config,
              comm=None, device: str | torch.device = "cpu", hard: bool = True, *,
              moments: Moments | None = None, learn_arch: bool = True, hold_tau: bool = False,
              threshold: float | None = None) -> dict[str, float]:
    """Algorithm 3 on tasks ``sampler.sample(0, i)``, i < n_tasks: soft (and hard) accuracy with 95% CIs.

    Each task adapts ``eval.steps`` steps (α and τ in the first ``eval.arch_steps``; none with ``learn_arch=False``,
    τ held with ``hold_tau``) with :func:`~.inner_loop.eval_task_config`, from the meta-learned Adam ``moments``
    when there are any (every task from the same ones), soft-pruned at ``threshold`` (None: the network's)."""
    comm = comm or LocalComm()
    task_cfg, arch_steps, tau = test_protocol(cfg, learn_arch, hold_tau)
    hard = hard and bool(state["alphas"])
    sums = torch.zeros(5, dtype=torch.float64)
    saved = getattr(net, "threshold", None)
    if threshold is not None and saved is not None:
        net.threshold = threshold
    mine = my_share(n_tasks, comm)
    t0 = last = time.perf_counter()
    try:
        for done, i in enumerate(mine, 1):
            task = sampler.sample(0, i).to(device)
            adapted, _ = (graphed.adapt if task_cfg.cuda_graph else adapt)(  # (task.cuda_graph: replays on GPUs)
                net, state, task.x_train, task.y_train, task_cfg, cfg.eval.steps, learn_arch, arch_steps=arch_steps,
                hold_tau=hold_tau, generator=task.generator(), moments=None if moments is None else moments.copy())
            soft, _ = accuracy(net, adapted, task.x_query, task.y_query, tau, bf16=cfg.task.bf16)
            pruned = (accuracy(net, adapted, task.x_query, task.y_query, tau, hard=True, bf16=cfg.task.bf16)[0]
                      if hard else soft)
            sums += torch.tensor([1.0, soft, soft * soft, pruned, pruned * pruned], dtype=torch.float64)
            now = time.perf_counter()
            if comm.rank == 0 and now - last >= PROGRESS_SECONDS and done < len(mine):
                last = now
                log.info("%s: %d of %d tasks | soft accuracy %.1f%% so far%s | %s left", split_label(sampler.split),
                         done * comm.world,
                         n_tasks, 100 * float(sums[1]) / done, " (this worker's tasks)" if comm.world > 1 else "",
                         eta((len(mine) - done) * (now - t0) / done))
    finally:
        if saved is not None:
            net.threshold = saved
    sums = comm.all_reduce_sum(sums.to(device)).cpu()
    n = int(sums[0])
    soft_mean, soft_ci = _mean_ci(float(sums[1]), float(sums[2]), n)
    hard_mean, hard_ci = _mean_ci(float(sums[3]), float(sums[4]), n)
    return {"accuracy_soft": soft_mean, "ci95_soft": soft_ci, "accuracy_hard": hard_mean, "ci95_hard": hard_ci,
            "tasks": n}


def test_protocol(cfg: Config, learn_arch: bool = True, hold_tau: bool = False
                  ) -> tuple[TaskLearnerConfig, int | None, tuple[float, float]]:
    """Algorithm 3's adaptation as ``cfg.eval`` sets it: the task-learner config
    (:func:`~.inner_loop.eval_task_config`), the steps in which α adapts (None: all) and the final τ."""
    task_cfg = eval_task_config(cfg)
    arch_steps = None if cfg.eval.arch_steps < 0 else cfg.eval.arch_steps
    _, tau = Temperature.from_config(task_cfg).schedule_for(cfg.eval.steps, arch_steps if learn_arch else None,
                                                           hold_tau)
    return task_cfg, arch_steps, tau


def meta_test_threshold(cfg: Config) -> float:
    """The soft-pruning threshold of the final meta-test: ``eval.prune_threshold``, or ``model.prune_threshold``."""
    return cfg.model.prune_threshold if cfg.eval.prune_threshold < 0 else cfg.eval.prune_threshold


def _device(name: str) -> torch.device:
    """``name`` as a torch device ("auto": the GPU when PyTorch sees one); a ValueError names what is wrong."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {name}: PyTorch sees {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda devices are supported")
    return device


# keys that shape the trained network or the classes it was trained on: evaluate cannot change them
_FIXED_DATA = ("data.dataset", "data.n_way", "data.image_size")


def parser() -> argparse.ArgumentParser:
    from .cli import add_shared

    p = argparse.ArgumentParser(prog="python -m metanas_ray.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("run_dir", help="a run directory written by metanas_ray.run")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="the meta-test classes (default) or the meta-validation classes")
    p.add_argument("--tasks", type=int, default=0, help="number of tasks (default: eval.test_tasks / val_tasks)")
    p.add_argument("--checkpoint", default="", help="a checkpoint file (default: the run's latest)")
    add_shared(p, "evaluate")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    return p


def resolve(args: argparse.Namespace):
    """The run directory, its saved config, and that config with evaluate's overrides (``eval.*``, ``data.*``,
    ``run.seed``)."""
    from .cli import overrides
    from .config import ConfigError
    from .rundir import RunDir

    changes = overrides(args)
    for key in changes:
        if not key.startswith(("eval.", "data.")) and key != "run.seed" or key in _FIXED_DATA:
            raise ConfigError(f"evaluate cannot change '{key}': it takes eval.* and data.* keys (not "
                              f"{', '.join(_FIXED_DATA)}, which shape the trained network) and --seed")
    run = RunDir(args.run_dir)
    saved = run.open_existing()
    return run, saved, saved.override(changes)


def main(argv: list[str] | None = None) -> int:
    from . import checkpoint
    from .config import ConfigError, describe
    from .data import DataError, load_splits
    from .memory import keep_freed_memory
    from .rundir import RunDirError, writing
    from .state import build_network

    p = parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.tasks < 0:
        p.error(f"--tasks must be at least 1 (0: eval.test_tasks / eval.val_tasks), got {args.tasks}")
    try:
        run, saved, cfg = resolve(args)
        if args.print_config:
            print(describe(cfg), end="")
            return 0
        if args.num_gpus is not None and args.num_gpus > 1:
            raise ConfigError(f"--num-gpus {args.num_gpus}: evaluate runs on one device (0: the CPU, 1: the GPU)")
        device = _device({None: args.device, 0: "cpu", 1: "cuda"}[args.num_gpus])
        payload, ckpt_path = run.load_checkpoint(args.checkpoint, "to evaluate")
        splits = load_splits(cfg.data)
        pool = splits.test if args.split == "test" else splits.val
        d = cfg.data
        sampler = TaskSampler(pool, d.n_way, d.k_shot, d.n_query, cfg.run.seed, args.split)
        net = build_network(cfg, splits.channels)
        keep_freed_memory(cfg.run.keep_freed_memory_mb)
        n = args.tasks or (cfg.eval.test_tasks if args.split == "test" else cfg.eval.val_tasks)
        t0 = time.perf_counter()
        moments = Moments.of_checkpoint(payload, device)
        result = meta_test(net, place(net, payload["state"], device), sampler, n, cfg, device=device,
                           moments=moments, threshold=meta_test_threshold(cfg) if args.split == "test" else None)
        result.update(split=args.split, checkpoint=str(ckpt_path), meta_steps=payload["step"],
                      seconds=time.perf_counter() - t0, device=str(device), seed=cfg.run.seed,
                      set=_changed(cfg, saved))
        out = Path(args.output) if args.output else \
            run.path / f"evaluation-{args.split}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        with writing(out):
            out.write_text(json.dumps(result, indent=2) + "\n")
    except (ConfigError, RunDirError, checkpoint.CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    print(f"-> {out}", file=sys.stderr)
    return 0


def _changed(cfg: Config, saved: Config) -> dict:
    """The keys evaluate changed from the run's saved config (what the JSON was measured with)."""
    from .config import flat_keys
    before = flat_keys(saved)
    return {k: v for k, v in flat_keys(cfg).items() if before.get(k) != v}


if __name__ == "__main__":
    sys.exit(main())
