"""Tasks per second of meta-training in-process vs on Ray Train with 1 and 2 workers (1 thread each).

    python -m benchmarks.scaling                       # quick config, 20 meta-steps, Omniglot from ../shared
    python -m benchmarks.scaling --meta-steps 40 --data-root data/omniglot

Targets on a 2-core machine: Ray Train with 1 worker within 5% of the in-process loop; 2 workers at least 1.8x the
tasks per second of 1. Throughput is measured inside the meta-training loop (summary's ``tasks_per_second``), so
Ray's start-up (seconds, paid once per run) is reported separately as ``fit_seconds``.
Writes benchmarks/results/scaling.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "tune_configs" / "quick.yaml"))
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "omniglot"))
    p.add_argument("--meta-steps", type=int, default=20)
    p.add_argument("--meta-batch", type=int, default=4)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from metanas_ray.config import load
    from metanas_ray.ray_train import fit
    from metanas_ray.rundir import RunDir
    from metanas_ray.train_loop import Recorder, meta_train

    base = load(args.config, {"data.root": args.data_root, "run.meta_steps": args.meta_steps,
                              "meta.meta_batch": args.meta_batch, "eval.every": 0, "eval.test_tasks": 2,
                              "run.log_every": args.meta_steps, "run.checkpoint_every": args.meta_steps,
                              "run.threads": 1})
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        s = meta_train(base, Recorder(RunDir(Path(tmp) / "inproc").create(base)))
        results["in_process"] = {"tasks_per_second": s["tasks_per_second"], "seconds": time.perf_counter() - t0}
        for n in (1, 2):
            cfg = base.override({"scale.num_workers": n})
            t0 = time.perf_counter()
            s = fit(cfg, RunDir(Path(tmp) / f"ray{n}").create(cfg))
            results[f"ray_train_{n}"] = {"tasks_per_second": s["tasks_per_second"], "seconds": time.perf_counter() - t0,
                                         "fit_seconds": s["fit_seconds"]}
    tps = {k: v["tasks_per_second"] for k, v in results.items()}
    out = {
        "config": args.config, "meta_steps": args.meta_steps, "meta_batch": args.meta_batch,
        "runs": results,
        "ratio_ray1_vs_in_process": tps["ray_train_1"] / tps["in_process"],
        "ratio_ray2_vs_ray1": tps["ray_train_2"] / tps["ray_train_1"],
        "cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version(),
    }
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "scaling.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'run':<14}{'tasks/s':>10}{'wall s':>10}")
    for k, v in results.items():
        print(f"{k:<14}{v['tasks_per_second']:>10.2f}{v['seconds']:>10.1f}")
    print(f"Ray 1 worker / in-process: {out['ratio_ray1_vs_in_process']:.3f} (target >= 0.95)")
    print(f"Ray 2 workers / 1 worker:  {out['ratio_ray2_vs_ray1']:.3f} (target >= 1.8)")


if __name__ == "__main__":
    main()
