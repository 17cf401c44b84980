"""ASHA against running every trial to the end (FIFO), on the same search space and searcher seed.

    python -m benchmarks.tune_efficiency            # defaults: 21 min measured on 2 shared cores (load 3-13)
    python -m benchmarks.tune_efficiency --trials 16 --meta-steps 96 --eval-every 8 --grace 8 --meta-batch 2
    python -m benchmarks.tune_efficiency --data-root /data/omniglot --json /tmp/eff.json

Both sweeps use the search space of ``tune_configs/sweep_quick.yaml`` on a reduced quick Omniglot 5-way 1-shot
setting (fewer meta-steps, a meta-batch of 1, smaller meta-validations), with the same searcher seed, so they
run the same trial configurations; with a fixed trial seed each ASHA trial is a prefix of its FIFO twin.
Writes ``benchmarks/results/tune_efficiency.json``: trial-steps (sum of meta-steps over trials) and the best
meta-validation accuracy each sweep found, their ratio and gap, and the meta-test accuracy of each best trial.
Target: ASHA within 1 accuracy point of FIFO's best for at most a third of its trial-steps.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.tune_efficiency")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tune_efficiency", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=8, help="trials per sweep (num_samples)")
    p.add_argument("--meta-steps", type=int, default=48, help="meta-steps of a full trial (ASHA's max_t)")
    p.add_argument("--eval-every", type=int, default=4, help="meta-validate every this many meta-steps")
    p.add_argument("--grace", type=int, default=4, help="ASHA grace period in meta-steps")
    p.add_argument("--rf", type=float, default=3.0, help="ASHA reduction factor")
    p.add_argument("--val-tasks", type=int, default=10, help="tasks per meta-validation")
    p.add_argument("--eval-steps", type=int, default=5, help="inner steps when adapting to a val/test task")
    p.add_argument("--meta-batch", type=int, default=1, help="tasks per meta-step")
    p.add_argument("--test-tasks", type=int, default=50, help="meta-test tasks for each sweep's best trial")
    p.add_argument("--concurrent", type=int, default=2, help="trials at a time")
    p.add_argument("--seed", type=int, default=0, help="searcher seed (both sweeps)")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "omniglot"))
    p.add_argument("--out", default="", help="sweep directories (default: runs/tune_efficiency-<time>)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "tune_efficiency.json"))
    return p


def sweep_file(args: argparse.Namespace, scheduler: dict, path: Path) -> Path:
    raw = yaml.safe_load((ROOT / "tune_configs" / "sweep_quick.yaml").read_text())
    raw["base"] = str(ROOT / "tune_configs" / "quick.yaml")
    raw["overrides"] = {**raw.get("overrides", {}), "data.root": args.data_root, "data.download": False,
                        "run.meta_steps": args.meta_steps, "run.log_every": args.eval_every,
                        "eval.every": args.eval_every, "eval.val_tasks": args.val_tasks,
                        "eval.steps": args.eval_steps, "eval.test_tasks": args.test_tasks,
                        "meta.meta_batch": args.meta_batch}
    raw.update(num_samples=args.trials, seed=args.seed, max_concurrent=args.concurrent, scheduler=scheduler)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    args = parser().parse_args(argv)
    import ray

    from metanas_ray.ray_train import init_ray
    from metanas_ray.sweep import SweepError, prepare
    from metanas_ray.tune import run_sweep

    out = Path(args.out or ROOT / "runs" / f"tune_efficiency-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    schedulers = {"asha": {"name": "asha", "grace_period": args.grace, "reduction_factor": args.rf,
                           "max_t": args.meta_steps},
                  "fifo": {"name": "fifo"}}
    try:
        sweeps = {m: prepare(sweep_file(args, sch, out / f"{m}.yaml"), out / m, resume=False)
                  for m, sch in schedulers.items()}
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    started = init_ray(sweeps["asha"].base)
    report: dict = {}
    try:
        for mode, s in sweeps.items():
            log.info("== %s: %d trials of up to %d meta-steps", mode, args.trials, args.meta_steps)
            t0 = time.perf_counter()
            outcome = run_sweep(s, out / mode)
            summ = outcome.summary
            report[mode] = {
                "trial_steps": summ["trial_steps"], "best_val_accuracy": summ["best_val_accuracy"],
                "best_trial": summ["best_trial"], "best_trial_index": int(summ["best_trial"].rsplit("_", 1)[1]),
                "best_values": summ["best_values"],
                "meta_test_accuracy_soft": summ["meta_test_accuracy_soft"],
                "meta_test_ci95_soft": summ["meta_test_ci95_soft"],
                "meta_test_accuracy_hard": summ["meta_test_accuracy_hard"],
                "trials_stopped_early": summ["trials_stopped_early"], "trials_errored": summ["trials_errored"],
                "meta_steps_per_trial": [t.meta_steps for t in outcome.trials],
                "best_val_per_trial": [round(t.best, 4) for t in outcome.trials],
                "wall_seconds": round(time.perf_counter() - t0, 1), "output": str(out / mode)}
            log.info("%s: %s", mode, {k: report[mode][k] for k in ("trial_steps", "best_val_accuracy",
                                                                     "trials_stopped_early", "wall_seconds")})
    finally:
        if started:
            ray.shutdown()
    a, f = report["asha"], report["fifo"]
    ratio = a["trial_steps"] / f["trial_steps"]
    gap = 100 * (f["best_val_accuracy"] - a["best_val_accuracy"])
    result = {
        "command": "python -m benchmarks.tune_efficiency " + " ".join(argv if argv is not None else sys.argv[1:]),
        "setting": {k: v for k, v in vars(args).items() if k not in ("json", "out")},
        "search_space": "tune_configs/sweep_quick.yaml (search:)", "asha": a, "fifo": f,
        "trial_steps_ratio": round(ratio, 4), "best_val_gap_points": round(gap, 2),
        "target": {"within_1_point": gap <= 1.0, "at_most_a_third_of_trial_steps": ratio <= 1 / 3},
        "machine": {"cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
                    "python": platform.python_version()},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"ASHA {a['trial_steps']} trial-steps, best meta-val {a['best_val_accuracy']:.4f} | FIFO "
          f"{f['trial_steps']} trial-steps, best meta-val {f['best_val_accuracy']:.4f} | ratio {ratio:.3f}, "
          f"gap {gap:.2f} points | {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
