"""What logging one meta-step costs under Ray Train, against the time of one smoke meta-step.

    python -m benchmarks.logging_cost                     # 2 workers, 200 smoke meta-steps, logged every 2 and 200
    python -m benchmarks.logging_cost --meta-steps 400 --repeats 2

The same run (``tune_configs/smoke.yaml``, one checkpoint at the end, no meta-validation) is meta-trained on Ray
Train twice in one Ray session: once logging every 2 meta-steps, once only at the end. Both draw the same tasks
and end at the same meta-parameters. One logged meta-step costs, measured two ways:

- directly: rank 0's ``seconds_in_recording`` (the summary's time in writing metrics.csv and checkpoints and in
  reporting to Ray Train), the difference of the two runs over the difference of their logged rows;
- end to end: the same for their loop times (meta-steps over tasks per second, Ray's start-up excluded). Noise: a
  shared 2-core machine moves two ~1-minute loops by a second or two either way, i.e. ±0.02 s per logged step at
  100 logged steps, far more than the direct figure; it bounds the costs the direct figure cannot see (the
  progress line's trip to the driver).

Target: at most 5% of one smoke meta-step (the loop time of the quiet run over its meta-steps). With
``--repeats`` the two runs alternate, and medians are used. Writes benchmarks/results/logging_cost.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def loop_seconds(summary: dict, meta_batch: int) -> float:
    """Seconds of the meta-training loop: tasks done over tasks per second (start-up and meta-test excluded)."""
    return summary["meta_steps"] * meta_batch / summary["tasks_per_second"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.logging_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--meta-steps", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "logging_cost.json"))
    args = p.parse_args(argv)
    if args.meta_steps < 4 or args.repeats < 1 or args.workers < 1:
        p.error("--meta-steps must be at least 4, --repeats and --workers at least 1")

    import ray
    from metanas_ray.config import load
    from metanas_ray.ray_train import fit, init_ray
    from metanas_ray.rundir import RunDir

    T = args.meta_steps
    base = load(ROOT / "tune_configs" / "smoke.yaml", {
        "run.meta_steps": T, "run.checkpoint_every": T, "eval.every": 0, "eval.test_tasks": 2,
        "scale.num_workers": args.workers})
    variants = {"every_2": base.override({"run.log_every": 2}), "at_end": base.override({"run.log_every": T})}
    rows = {name: len(range(cfg.run.log_every, T + 1, cfg.run.log_every)) + (T % cfg.run.log_every != 0)
            for name, cfg in variants.items()}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    recording: dict[str, list[float]] = {name: [] for name in variants}
    init_ray(base)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeats):
                for name, cfg in variants.items():
                    summary = fit(cfg, RunDir(Path(tmp) / f"{name}-{r}").create(cfg))
                    seconds[name].append(loop_seconds(summary, cfg.meta.meta_batch))
                    recording[name].append(summary["seconds_in_recording"][0])
                    print(f"{name}: {rows[name]} logged meta-steps, loop {seconds[name][-1]:.2f} s, rank 0 recording "
                          f"{recording[name][-1]:.3f} s", flush=True)
    finally:
        ray.shutdown()
    extra_rows = rows["every_2"] - rows["at_end"]
    logged, quiet = (statistics.median(seconds[n]) for n in ("every_2", "at_end"))
    per_log_end_to_end = (logged - quiet) / extra_rows
    per_log = (statistics.median(recording["every_2"]) - statistics.median(recording["at_end"])) / extra_rows
    per_step = quiet / T
    result = {
        "what": "cost of one logged meta-step under Ray Train vs one smoke meta-step (tune_configs/smoke.yaml)",
        "command": f"python -m benchmarks.logging_cost --meta-steps {T} --workers {args.workers} "
                   f"--repeats {args.repeats}",
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "workers": args.workers, "meta_steps": T, "logged_rows": rows, "loop_seconds": seconds,
        "rank0_recording_seconds": recording,
        "seconds_per_logged_step": per_log, "seconds_per_logged_step_end_to_end": per_log_end_to_end,
        "seconds_per_meta_step": per_step, "ratio": per_log / per_step,
        "ratio_end_to_end": per_log_end_to_end / per_step, "target_ratio_at_most": 0.05,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"one logged meta-step costs {per_log * 1000:.2f} ms (end to end {per_log_end_to_end * 1000:+.0f} ms, see "
          f"the noise note), one smoke meta-step takes {per_step * 1000:.0f} ms: ratio {per_log / per_step:.4f} "
          f"(end to end {per_log_end_to_end / per_step:+.3f}; target ≤ 0.05) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
