"""What keeping freed memory (``run.keep_freed_memory_mb``) gains, measured in fresh processes.

    python -m benchmarks.allocator              # 4 blocks; writes benchmarks/results/allocator.json
    python -m benchmarks.allocator --blocks 8

One process times fresh tasks of the paper's Omniglot setting (as ``benchmarks/inner_loop.py``: 20-way 1-shot,
5 steps + the query evaluation, 2 threads) after two warm-up tasks, with malloc as glibc leaves it or with
``metanas_ray.memory.keep_freed_memory`` called first. A comparison within one process cannot separate the two:
its later rounds run slower than its first, whatever malloc does. So each block runs four fresh processes in
the order default, kept, kept, default (a drift of the machine's speed cancels within a block) and its ratio is
kept / default of their summed medians; the result is the median ratio over the blocks. Also recorded: the minor
page faults and system CPU seconds per task of each process.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "allocator.json"


def child(keep_mb: int, tasks: int, threads: int) -> dict:
    """Time ``tasks`` fresh tasks in this process (after 2 warm-up tasks)."""
    import torch

    from benchmarks.inner_loop import _times, one_task, paper_setting
    from metanas_ray.memory import keep_freed_memory

    kept = keep_freed_memory(keep_mb)
    torch.set_num_threads(threads)
    t = _times({"fresh": one_task(*paper_setting(torch.Generator().manual_seed(0)))}, tasks, 2)
    return {"kept": kept, "seconds": t.wall["fresh"], "minor_page_faults": t.faults["fresh"],
            "system_cpu_seconds": t.system["fresh"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=4, help="blocks of 4 processes (default, kept, kept, default)")
    p.add_argument("--tasks", type=int, default=3, help="timed tasks per process")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep-freed-memory-mb", type=int, default=1024)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.tasks, args.threads)))
        return

    def run(mb: int) -> dict:
        out = subprocess.run([sys.executable, "-m", "benchmarks.allocator", "--child", str(mb), "--tasks",
                              str(args.tasks), "--threads", str(args.threads)],
                             cwd=ROOT, capture_output=True, text=True, check=True, timeout=600)
        return json.loads(out.stdout.strip().splitlines()[-1])

    blocks, ratios = [], []
    for b in range(args.blocks):
        block = [(mb, run(mb)) for mb in (0, args.keep_freed_memory_mb, args.keep_freed_memory_mb, 0)]
        med = {"default": sum(statistics.median(r["seconds"]) for mb, r in block if mb == 0),
               "kept": sum(statistics.median(r["seconds"]) for mb, r in block if mb != 0)}
        ratios.append(med["kept"] / med["default"])
        blocks.append({"order": ["default", "kept", "kept", "default"], "processes": [r for _, r in block],
                       "ratio_kept_to_default": ratios[-1]})
        print(f"block {b + 1}: default {med['default'] / 2:.3f} s, kept {med['kept'] / 2:.3f} s per task, "
              f"ratio {ratios[-1]:.3f}", flush=True)

    def per_task(key: str, kept: bool) -> float:
        return statistics.median(v for blk in blocks for r in blk["processes"] if r["kept"] == kept for v in r[key])

    out = {
        "ratio_kept_to_default": statistics.median(ratios),
        "ratios": ratios,
        "seconds_per_task_default": per_task("seconds", False),
        "seconds_per_task_kept": per_task("seconds", True),
        "minor_page_faults_per_task_default": per_task("minor_page_faults", False),
        "minor_page_faults_per_task_kept": per_task("minor_page_faults", True),
        "system_cpu_seconds_per_task_default": per_task("system_cpu_seconds", False),
        "system_cpu_seconds_per_task_kept": per_task("system_cpu_seconds", True),
        "keep_freed_memory_mb": args.keep_freed_memory_mb, "threads": args.threads, "tasks": args.tasks,
        "blocks": blocks, "cpus": os.cpu_count(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"kept / default: {out['ratio_kept_to_default']:.3f} (median of {len(ratios)} blocks; "
          f"{', '.join(f'{r:.3f}' for r in ratios)}); minor page faults per task "
          f"{out['minor_page_faults_per_task_default']:.0f} → {out['minor_page_faults_per_task_kept']:.0f}, "
          f"system CPU {out['system_cpu_seconds_per_task_default']:.3f} → "
          f"{out['system_cpu_seconds_per_task_kept']:.3f} s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
