"""Accuracy against wall-clock: MetaNAS and the Conv4 baseline at equal meta-training time (issue 12, item 7).

    python -m benchmarks.budget                                   # 10, 30, 60 minutes; quick, faithful, Conv4
    python -m benchmarks.budget --budgets 60 120 --test-tasks 20  # a few minutes, to try it
    python -m benchmarks.budget --variant best=tune_configs/quick.yaml:task.lr_w=0.05,meta.lr_w=0.5
    python -m benchmarks.budget --append --budgets 3600 --variant conv4=...   # a longer budget for one variant

Each variant (``name=CONFIG[:key=value,...]``) meta-trains once, as a user runs it here (``python -m
metanas_ray.run``: Ray Train, the default workers; ``--in-process`` for one process), for the longest budget. While
it runs, the checkpoint that follows each budget's crossing (the run's own meta-training seconds, as metrics.csv
and the checkpoint record them: Ray's start-up excluded) is kept; at the end the run is stopped with SIGTERM. Each
kept checkpoint is then meta-tested on the same ``--test-tasks`` tasks (``python -m metanas_ray.evaluate``), so every
point of a curve comes from one run and the variants see the same meta-test tasks.
The runs are open-ended (``run.meta_steps`` 10,000,000), so meta learning rates that anneal linearly to 0 over
``run.meta_steps`` stay at their start values, which is not how a user runs such a config: ``--planned`` then
runs each annealing variant once per budget, planned for the meta-steps the open-ended run reached there
(annealed to 0 at its end, as ``quick.yaml``'s 280 steps are), and adds those points as ``NAME (annealed)``.
Writes benchmarks/results/budget.json (per variant and budget: meta-steps done, the exact seconds, soft and hard
accuracy with 95% CIs) and budget.png. Noise: the machine must be otherwise idle (a busy core slows one variant's
minutes, not the others'); the meta-test CI says how far apart two points must be to differ.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FAITHFUL = ("model.input_weights=pairwise,model.prune_rule=separate,model.prune_threshold=0.01,task.optimizer=adam,"
            "task.adam_moments=kept,task.lr_w=0.005,task.lr_alpha=0.005,task.alpha_weight_decay=0.001,"
            "task.grad_clip=0,task.batch_size=20,task.batch_sampling=random,task.drop_path=0.2,"
            "task.tau_schedule=linear,task.tau_alpha_end=0.05,task.tau_beta_end=0.05,meta.anneal=constant")
VARIANTS = ("quick=tune_configs/quick.yaml", f"faithful=tune_configs/quick.yaml:{FAITHFUL}",
            "conv4=tune_configs/conv4_omniglot_5way_1shot.yaml:data.split=alphabets,data.n_query=5")  # quick's tasks


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    name, _, rest = text.partition("=")
    config, _, sets = rest.partition(":")
    if not name or not config:
        raise SystemExit(f"--variant must be NAME=CONFIG[:key=value,...], got {text!r}")
    return name, config, [kv for kv in sets.split(",") if kv]


def _last_wall(metrics: Path) -> float:
    try:
        rows = list(csv.DictReader(metrics.open()))
    except (OSError, csv.Error):
        return 0.0
    return float(rows[-1]["wall_seconds"]) if rows else 0.0


def train(name: str, config: str, sets: list[str], budgets: list[float], work: Path,
          args) -> dict[float, tuple[Path, float]]:
    """Meta-train one variant past the longest budget; by budget, the checkpoint kept there and its seconds."""
    out, kept = work / name, work / f"{name}-kept"
    kept.mkdir(parents=True)
    cmd = [sys.executable, "-m", "metanas_ray.run", "--config", str(ROOT / config), "--output", str(out),
           "--data-root", args.data_root, "--set", "run.meta_steps=10000000", "--set", "eval.every=0",
           "--set", f"run.log_every={args.every}", "--set", f"run.checkpoint_every={args.every}",
           *[a for kv in sets for a in ("--set", kv)], *(["--in-process"] if args.in_process else [])]
    log = (work / f"{name}.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    found: dict[float, tuple[Path, float]] = {}
    try:
        waiting = sorted(budgets)
        while waiting and proc.poll() is None:
            time.sleep(1.0)
            if _last_wall(out / "metrics.csv") < waiting[0]:
                continue
            newest = max((out / "checkpoints").glob("step_*.pt"), default=None)
            try:
                elapsed = float(torch.load(newest, weights_only=True)["elapsed"]) if newest else 0.0
            except (OSError, RuntimeError, EOFError):  # pruned or replaced while read: the next poll sees it
                continue
            while waiting and elapsed >= waiting[0]:
                found[waiting.pop(0)] = (Path(shutil.copy(newest, kept / newest.name)), elapsed)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    if len(found) < len(budgets):
        raise SystemExit(f"{name} stopped before its budgets {sorted(set(budgets) - set(found))}; see {log.name}")
    return found


def _anneals(config: str, sets: list[str]) -> bool:
    from metanas_ray.config import load, parse_overrides
    return load(ROOT / config, parse_overrides(sets)).meta.anneal == "linear"


def planned_run(name: str, config: str, sets: list[str], point: dict, work: Path, args) -> dict:
    """A run planned for ``point``'s meta-steps (its meta learning rates anneal to 0 over them, as a user's run of
    that length does), meta-tested at its end on the same test tasks; its seconds are its meta-training's."""
    steps = int(point["meta_steps"])
    out = work / f"{name}-planned-{steps}"
    cmd = [sys.executable, "-m", "metanas_ray.run", "--config", str(ROOT / config), "--output", str(out),
           "--data-root", args.data_root, "--set", f"run.meta_steps={steps}", "--set", "eval.every=0",
           "--set", f"eval.test_tasks={args.test_tasks}", "--set", f"run.log_every={args.every}",
           "--set", f"run.checkpoint_every={steps}", *[a for kv in sets for a in ("--set", kv)],
           *(["--in-process"] if args.in_process else [])]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name}, planned for {steps} meta-steps, failed: {done.stderr.strip()[-500:]}")
    summary = json.loads((out / "summary.json").read_text())
    r = {"budget_seconds": point["budget_seconds"], "seconds": _last_wall(out / "metrics.csv"), "meta_steps": steps,
         "accuracy_soft": summary["meta_test_accuracy_soft"], "ci95_soft": summary["meta_test_ci95_soft"],
         "accuracy_hard": summary["meta_test_accuracy_hard"], "ci95_hard": summary["meta_test_ci95_hard"],
         "tasks": summary["meta_test_tasks"]}
    print(f"{name} planned for {steps} meta-steps ({r['seconds']:.0f} s): soft {100 * r['accuracy_soft']:.1f}% "
          f"± {100 * r['ci95_soft']:.1f}, hard {100 * r['accuracy_hard']:.1f}%", flush=True)
    return r


def meta_test(run: Path, ckpt: Path, args) -> dict:
    cmd = [sys.executable, "-m", "metanas_ray.evaluate", str(run), "--checkpoint", str(ckpt), "--tasks",
           str(args.test_tasks), "--data-root", args.data_root, "--device", "cpu"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout[done.stdout.index("{"):])


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in results.items():
        xs = [p["seconds"] / 60 for p in points]
        ax.errorbar(xs, [100 * p["accuracy_soft"] for p in points], [100 * p["ci95_soft"] for p in points],
                    marker="o", capsize=3, label=f"{name} (soft)")
        if any(p["accuracy_hard"] != p["accuracy_soft"] for p in points):
            ax.plot(xs, [100 * p["accuracy_hard"] for p in points], ls="--", marker="x", label=f"{name} (hard)")
    ax.set_xlabel("meta-training wall-clock (minutes)")
    ax.set_ylabel("meta-test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.budget", description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[600, 1800, 3600], help="seconds of meta-training")
    p.add_argument("--variant", action="append", help="NAME=CONFIG[:key=value,...] (default: quick, faithful, conv4)")
    p.add_argument("--test-tasks", type=int, default=100)
    p.add_argument("--every", type=int, default=10, help="meta-steps between checkpoints (a budget's resolution)")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "omniglot"))
    p.add_argument("--in-process", action="store_true", help="meta-train in one process instead of Ray Train")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "budget.json"))
    p.add_argument("--planned", action="store_true",
                   help="then, for each variant whose meta learning rates anneal (meta.anneal: linear), one run per "
                        "budget planned for the meta-steps the open-ended run reached there, annealed over them "
                        "and meta-tested at its end: NAME (annealed)")
    p.add_argument("--append", action="store_true",
                   help="add these variants, or these budgets of a variant already there (a new run to the longest "
                        "missing budget; each point names its command), to the results in --out (same test tasks)")
    args = p.parse_args(argv)
    if min(args.budgets) <= 0 or args.test_tasks < 2 or args.every < 1:
        p.error("--budgets must be positive, --test-tasks at least 2, --every at least 1")
    variants = [parse_variant(v) for v in (args.variant or VARIANTS)]
    results: dict[str, list[dict]] = {}
    earlier: dict = json.loads(Path(args.out).read_text()) if args.append and Path(args.out).is_file() else {}
    if earlier and earlier.get("test_tasks") != args.test_tasks:
        p.error(f"--append: {args.out} was meta-tested on {earlier.get('test_tasks')} tasks, not {args.test_tasks}")
    results.update(earlier.get("results", {}))
    variants = [(n, c, s) for n, c, s in ((k, v["config"], v["set"]) for k, v in earlier.get("variants", {}).items())
                if n not in {v[0] for v in variants}] + variants
    args.earlier = earlier
    commands = earlier.get("commands", [earlier["command"]] if "command" in earlier else [])
    args.commands = commands + ["python -m benchmarks.budget " + " ".join(argv or sys.argv[1:])]
    args.all_budgets = sorted(set(earlier.get("budgets_seconds", [])) | set(args.budgets))
    asked = {parse_variant(v)[0] for v in args.variant or VARIANTS}
    for name, config, sets in variants:  # (before any work)
        before = earlier.get("variants", {}).get(name)
        if name in asked and before is not None and before != {"config": config, "set": sets}:
            p.error(f"--append: {name} was measured as {before}; give the new settings another name")
    with tempfile.TemporaryDirectory() as tmp:
        for name, config, sets in variants:
            have = {p["budget_seconds"] for p in results.get(name, [])}
            wanted = [b for b in args.budgets if b not in have] if name in asked else []
            if not wanted:  # measured by an earlier --append run at every budget asked for
                continue
            kept = train(name, config, sets, wanted, Path(tmp), args)
            points = results.setdefault(name, [])
            for budget, (ckpt, seconds) in sorted(kept.items()):
                r = meta_test(Path(tmp) / name, ckpt, args)
                points.append({"budget_seconds": budget, "seconds": seconds, "command": len(args.commands) - 1,
                               "meta_steps": r["meta_steps"], **{k: r[k] for k in (
                                   "accuracy_soft", "ci95_soft", "accuracy_hard", "ci95_hard", "tasks")}})
                print(f"{name} at {budget:.0f} s: {r['meta_steps']} meta-steps, soft {100 * r['accuracy_soft']:.1f}% "
                      f"± {100 * r['ci95_soft']:.1f}, hard {100 * r['accuracy_hard']:.1f}%", flush=True)
            points.sort(key=lambda q: q["budget_seconds"])
            write(results, variants, args, argv)  # after each variant: a later failure loses nothing measured
        for name, config, sets in variants if args.planned else []:
            planned = f"{name} (annealed)"
            if planned in results or not _anneals(config, sets) or name not in results:
                continue
            results[planned] = [planned_run(name, config, sets, point, Path(tmp), args) for point in results[name]]
            write(results, variants, args, argv)
    print(f"-> {args.out}, {Path(args.out).with_suffix('.png')}")
    return 0


def crossover(results: dict, baseline: str = "conv4") -> dict:
    """Where each variant's soft accuracy would meet ``baseline``'s, in minutes: a least-squares line of accuracy
    against log(seconds) per variant, extrapolated (a rough guide: curves flatten, and three points with ±2-point
    CIs leave the slopes uncertain). None where the lines do not meet later (the variant is not catching up)."""
    import math

    def line(points):  # accuracy = a + b · ln(seconds)
        xs, ys = [math.log(p["seconds"]) for p in points], [p["accuracy_soft"] for p in points]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
        return my - b * mx, b

    if baseline not in results or len(results[baseline]) < 2:
        return {}
    ac, bc = line(results[baseline])
    out = {}
    for name, points in results.items():
        if name == baseline or len(points) < 2:
            continue
        a, b = line(points)
        behind_at_last = points[-1]["accuracy_soft"] < ac + bc * math.log(points[-1]["seconds"])
        t = math.exp((ac - a) / (b - bc)) if b > bc else math.inf
        out[name] = {"slope_per_doubling": b * math.log(2), "baseline_slope_per_doubling": bc * math.log(2),
                     "projected_crossover_minutes": (round(t / 60, 1) if behind_at_last and math.isfinite(t)
                                                     else None)}
    return out


def write(results: dict, variants: list, args, argv: list[str] | None) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"commands": args.commands, "variants": {n: {"config": c, "set": s} for n, c, s in variants},
            "budgets_seconds": args.all_budgets, "test_tasks": args.test_tasks,
            "machine": {"cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0]},
            "results": results, "crossover_with_conv4": crossover(results)}
    kept = {k: v for k, v in args.earlier.items() if k not in data and k != "command"}  # a person's notes, as they are
    out.write_text(json.dumps({**kept, **data}, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))


if __name__ == "__main__":
    sys.exit(main())
