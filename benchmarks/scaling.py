"""Tasks per second of meta-training in-process vs on Ray Train with 1 and 2 workers (1 thread each).

    python -m benchmarks.scaling                       # quick config, 20 meta-steps, 4 rounds, Omniglot from ../shared
    python -m benchmarks.scaling --meta-steps 40 --data-root data/omniglot

Targets on a 2-core machine: Ray Train with 1 worker within 5% of the in-process loop; 2 workers at least 1.8x the
tasks per second of 1. Throughput is measured inside the meta-training loop (summary's ``tasks_per_second``), so
Ray's start-up (seconds, paid once per run) is reported separately as ``fit_seconds``.
As the ceiling that the hardware allows, two in-process loops also run side by side (two processes, one thread
each, no Ray): ``in_process_x2`` is their summed tasks per second.
Writes benchmarks/results/scaling.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import multiprocessing
import platform
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _in_process(cfg, out_dir: str) -> dict:
    """One in-process meta-training run's summary (a process of its own: see ``in_process_x2``)."""
    import torch
    from metanas_ray.rundir import RunDir
    from metanas_ray.recording import RunRecorder
    from metanas_ray.train_loop import meta_train
    torch.set_num_threads(cfg.run.threads)
    return meta_train(cfg, RunRecorder(RunDir(Path(out_dir)).create(cfg), cfg))


def _row(summaries: list[dict], seconds: float, meta_steps: int) -> dict:
    """Tasks per second (summed over side-by-side runs) and where each worker's loop time went."""
    row = {"tasks_per_second": sum(s["tasks_per_second"] for s in summaries), "seconds": seconds}
    tasks = [n * meta_steps for s in summaries for n in s["tasks_per_worker"]]
    computing = [t for s in summaries for t in s["seconds_in_tasks"]]
    row["seconds_per_task_computing"] = [round(t / n, 4) for t, n in zip(computing, tasks)]  # per worker
    row["seconds_in_all_reduce"] = [x for s in summaries for x in s["seconds_in_all_reduce"]]
    row["tasks"] = sum(tasks)
    if "fit_seconds" in summaries[0]:
        row["fit_seconds"] = summaries[0]["fit_seconds"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "tune_configs" / "quick.yaml"))
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "omniglot"))
    p.add_argument("--meta-steps", type=int, default=20)
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4, help="repeat all four set-ups; the medians are reported")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from metanas_ray.config import load
    from metanas_ray.ray_train import fit
    from metanas_ray.rundir import RunDir

    base = load(args.config, {"data.root": args.data_root, "run.meta_steps": args.meta_steps,
                              "meta.meta_batch": args.meta_batch, "eval.every": 0, "eval.test_tasks": 2,
                              "run.log_every": args.meta_steps, "run.checkpoint_every": args.meta_steps,
                              "run.threads": 1})
    runs: dict[str, list[dict]] = {k: [] for k in ("in_process", "in_process_x2", "ray_train_1", "ray_train_2")}
    with tempfile.TemporaryDirectory() as tmp:
        def in_process(r: int) -> None:
            t0 = time.perf_counter()
            one = _in_process(base, str(Path(tmp) / f"inproc{r}"))
            runs["in_process"].append(_row([one], time.perf_counter() - t0, args.meta_steps))

        def in_process_x2(r: int) -> None:
            with multiprocessing.get_context("spawn").Pool(2) as pool:
                t0 = time.perf_counter()
                both = pool.starmap(_in_process, [(base, str(Path(tmp) / f"side{r}_{i}")) for i in (0, 1)])
            runs["in_process_x2"].append(_row(both, time.perf_counter() - t0, args.meta_steps))

        def ray_train(n: int, r: int) -> None:
            cfg = base.override({"scale.num_workers": n})
            t0 = time.perf_counter()
            s = fit(cfg, RunDir(Path(tmp) / f"ray{n}_{r}").create(cfg))
            runs[f"ray_train_{n}"].append(_row([s], time.perf_counter() - t0, args.meta_steps))

        setups = [in_process, in_process_x2, lambda r: ray_train(1, r), lambda r: ray_train(2, r)]
        for r in range(args.rounds):  # rounds interleave the four set-ups, so that all see the same background,
            for setup in setups if r % 2 == 0 else setups[::-1]:  # in alternating order (drift cancels)
                setup(r)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {v[-1]['tasks_per_second']:.2f} tasks/s ({statistics.mean(v[-1]['seconds_per_task_computing']):.3f}"
                f" s computing per task)" for k, v in runs.items()), flush=True)
    results = {k: {"tasks_per_second": statistics.median(x["tasks_per_second"] for x in v),
                   "seconds": statistics.median(x["seconds"] for x in v),
                   "seconds_per_task_computing": statistics.median(
                       statistics.mean(x["seconds_per_task_computing"]) for x in v),
                   "rounds": v} for k, v in runs.items()}
    tps = {k: v["tasks_per_second"] for k, v in results.items()}
    # the machine's speed drifts by several per cent over minutes: the ratio within each round, then the median
    per_round = [a["tasks_per_second"] / b["tasks_per_second"] for a, b in zip(runs["ray_train_2"], runs["ray_train_1"])]
    out = {
        "command": "python -m benchmarks.scaling " + " ".join(sys.argv[1:]),
        "config": args.config, "meta_steps": args.meta_steps, "meta_batch": args.meta_batch, "rounds": args.rounds,
        "runs": results,
        "ratio_ray1_vs_in_process": tps["ray_train_1"] / tps["in_process"],
        "ratio_ray2_vs_ray1": tps["ray_train_2"] / tps["ray_train_1"],
        "ratio_ray2_vs_ray1_per_round": per_round,
        "ratio_ray2_vs_ray1_median_of_rounds": statistics.median(per_round),
        "ratio_in_process_x2_vs_in_process": tps["in_process_x2"] / tps["in_process"],
        "cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version(),
    }
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "scaling.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'run (median)':<14}{'tasks/s':>10}{'wall s':>10}{'s/task computing':>18}")
    for k, v in results.items():
        print(f"{k:<14}{v['tasks_per_second']:>10.2f}{v['seconds']:>10.1f}{v['seconds_per_task_computing']:>18.3f}")
    print(f"Ray 1 worker / in-process: {out['ratio_ray1_vs_in_process']:.3f} (target >= 0.95)")
    print(f"Ray 2 workers / 1 worker:  {out['ratio_ray2_vs_ray1']:.3f} of the medians, "
          f"{out['ratio_ray2_vs_ray1_median_of_rounds']:.3f} the median of the rounds' ratios (target >= 1.8)")
    print(f"2 in-process loops side by side / 1: {out['ratio_in_process_x2_vs_in_process']:.3f} (no Ray: the ceiling)")


if __name__ == "__main__":
    main()
