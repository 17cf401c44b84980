"""What the paper's Omniglot run (``tune_configs/omniglot_20way_1shot.yaml``, 30,000 meta-steps) takes, measured.

    python -m benchmarks.paper_scale --data-root ../shared/data/omniglot   # writes benchmarks/results/paper_scale.json

The faithful config runs as a user would run it here (``python -m metanas_ray.run``, Ray Train, 2 CPU workers), on the
real Omniglot data, for a few meta-steps in each of its two phases: warm-up (its first 15,000 meta-steps, w alone, τ
held) and search (w and α). ``summary.json``'s ``tasks_per_second`` is the meta-training rate of each (the loop
alone, without Ray's start-up). One meta-test task (100 steps, α in the first 50, batches of 10) is timed with
``python -m metanas_ray.evaluate`` (one process, all cores). The projection adds up:

    warm-up + search:   15,000 × 10 tasks at each phase's rate
    meta-validation:    12 evaluations × 25 tasks (every 2,500 meta-steps), at the meta-test task's time
    meta-test:          5,000 tasks

On GPUs it uses the per-task time of ``benchmarks/results/cuda.json`` (an H100, the paper setting's 5-step task
with our per-input supernet, not this config's options) for training tasks, 20× a 5-step task for a 100-step
meta-test task, and assumes N GPU workers are N times faster (measured on CPUs: 1.81× on 2 workers). These GPU
figures are a projection from one measured task, not a measured run; the CPU figures come from a few meta-steps,
whose rate drifts by up to a third on this shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tune_configs" / "omniglot_20way_1shot.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "paper_scale.json"
META_STEPS, WARMUP, META_BATCH, EVAL_EVERY, VAL_TASKS, TEST_TASKS = 30000, 15000, 10, 2500, 25, 5000


def _run(out: Path, data_root: str, steps: int, workers: int, *overrides: str) -> dict:
    sets = ["run.meta_steps=%d" % steps, "eval.every=0", "eval.test_tasks=1", "run.checkpoint_every=1000",
            *overrides]
    cmd = [sys.executable, "-m", "metanas_ray.run", "--config", str(CONFIG), "--data-root", data_root,
           "--num-workers", str(workers), "--output", str(out)] + [a for s in sets for a in ("--set", s)]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def _eval_seconds(run: Path, data_root: str, tasks: int) -> float:
    cmd = [sys.executable, "-m", "metanas_ray.evaluate", str(run), "--tasks", str(tasks), "--device", "cpu",
           "--data-root", data_root]
    done = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    return json.loads(done.stdout)["seconds"] / tasks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.paper_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "omniglot"))
    p.add_argument("--meta-steps", type=int, default=3, help="meta-steps timed in each phase")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--test-tasks", type=int, default=2, help="meta-test tasks timed")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if not Path(args.data_root).exists():
        raise SystemExit(f"no Omniglot at {args.data_root}; give --data-root")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        warm = _run(Path(tmp) / "warmup", args.data_root, args.meta_steps, args.workers)
        search = _run(Path(tmp) / "search", args.data_root, args.meta_steps, args.workers, "meta.warmup_steps=0")
        test_task = _eval_seconds(Path(tmp) / "search", args.data_root, args.test_tasks)
        measured = time.perf_counter() - t0
    rates = {"warmup": warm["tasks_per_second"], "search": search["tasks_per_second"]}
    train_s = (WARMUP * META_BATCH / rates["warmup"] + (META_STEPS - WARMUP) * META_BATCH / rates["search"])
    evals_s = (META_STEPS // EVAL_EVERY) * VAL_TASKS * test_task / args.workers
    test_s = TEST_TASKS * test_task / args.workers
    cpu_total = train_s + evals_s + test_s
    cuda = json.loads((ROOT / "benchmarks" / "results" / "cuda.json").read_text())
    # (benchmarks/cuda.py's current JSON: its best form at the paper's Omniglot setting; the first version's: a task)
    gpu_task = 1.0 / cuda["best_tasks_per_second"] if "best_tasks_per_second" in cuda else cuda["seconds_per_task"]
    cuda["gpu"] = cuda.get("device", cuda.get("gpu"))
    gpu = {}
    for n in (1, 8):
        tasks = META_STEPS * META_BATCH * gpu_task / n
        evals = ((META_STEPS // EVAL_EVERY) * VAL_TASKS + TEST_TASKS) * 20 * gpu_task / n
        gpu[f"{n}_gpus"] = {"seconds": tasks + evals, "days": (tasks + evals) / 86400}
    result = {
        "config": "tune_configs/omniglot_20way_1shot.yaml", "workers": args.workers,
        "tasks_per_second": rates, "meta_test_seconds_per_task": test_task,
        "cpu_projection": {"meta_training_seconds": train_s, "meta_validation_seconds": evals_s,
                           "meta_test_seconds": test_s, "total_seconds": cpu_total, "days": cpu_total / 86400},
        "gpu_projection": {"card": cuda["gpu"], "seconds_per_training_task": gpu_task, **gpu,
                           "note": "one measured 5-step task of our per-input supernet on the card, scaled; "
                                   "N GPUs assumed N times faster"},
        "measured_seconds": measured, "meta_steps_timed_per_phase": args.meta_steps,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.workers} CPU workers: warm-up {rates['warmup']:.2f} tasks/s, search {rates['search']:.2f} tasks/s, "
          f"meta-test task {test_task:.1f} s -> 30,000 meta-steps and the meta-test in {cpu_total / 86400:.1f} days; "
          f"{cuda['gpu']}: {gpu['1_gpus']['days']:.1f} days on 1, {gpu['8_gpus']['days'] * 24:.1f} hours on 8 "
          f"(projected) | {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
