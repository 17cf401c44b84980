"""Tasks per second and GPU busy fraction of the task-learner at the paper's settings, in four forms (issue 15).

    python -m benchmarks.cuda                          # writes benchmarks/results/cuda.json (needs a CUDA GPU)
    python -m benchmarks.cuda --repeats 5 --ray-steps 0 --out /tmp/cuda.json
    bash benchmarks/gpu_check.sh                       # the GPU tests, then this: one script for a GPU session

Settings: ``tune_configs/omniglot_20way_1shot.yaml`` and ``miniimagenet_5way_1shot.yaml`` as they are (meta-training
tasks of ``train_shots`` images per class, minibatches of 20, drop-path, Adam with kept moments (those after one
task), α adapting), on
random images of their shapes. One meta-batch (``meta.meta_batch`` tasks: what one GPU worker runs per meta-step)
in four forms: ``eager`` (``inner_loop.run_task`` per task, the default), ``graph`` (``task.cuda_graph``: every inner
step a CUDA-graph replay), ``batched`` (``task.batched``: the tasks vmapped together) and ``graph_batched`` (both).

Per form: tasks per second (median of ``--repeats`` synchronised meta-batches after ``--warmup``); whether its first
task's adapted (w, α) match eager's, with SGD in place of Adam (max |Δ| relative to each tensor's scale, ≤ 1e-3;
Adam turns float noise on near-zero gradients into ±λ steps: 1e-2 between two eager layouts); the GPU's kernel time per
task (``torch.profiler``, one profiled meta-batch) and the busy fraction = kernel time ÷ unprofiled wall time (kernels
on one stream do not overlap, so the sum does not overcount; a form whose graph kernels the profiler does not see
reports null). Then ``--ray-steps`` meta-steps of a ``--num-gpus 1`` Ray Train run of the Omniglot config on
synthetic images, eager, in the fastest form, and in that form with two workers sharing the GPU
(``scale.workers_per_gpu: 2``), for the meta-training tasks/s a user gets (Ray's start excluded: the run's own
``tasks_per_second``). The projection: the paper's 30,000 meta-steps × 10 tasks at the best rate on 1
GPU, and on 8 at 8× (all-reduce and stragglers ignored: a lower bound on the time).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cuda.json"
SETTINGS = {"omniglot": "tune_configs/omniglot_20way_1shot.yaml",
            "miniimagenet": "tune_configs/miniimagenet_5way_1shot.yaml"}
FORMS = {"eager": {}, "graph": {"task.cuda_graph": True}, "batched": {"task.batched": True},
         "graph_batched": {"task.cuda_graph": True, "task.batched": True}}
TARGET = {"tasks_per_second": 8.0, "gpu_busy_fraction": 0.7}


def synthetic_tasks(cfg, channels: int, n: int, device) -> list:
    """``n`` meta-training tasks of the config's shapes (random pixels), each with its own generator seed."""
    from metanas_ray.data import Task
    d, g = cfg.data, torch.Generator().manual_seed(0)
    shots = d.train_shots or d.k_shot
    out = []
    for i in range(n):
        x_train = torch.rand(d.n_way * shots, channels, d.image_size, d.image_size, generator=g)
        x_query = torch.rand(d.n_way * d.n_query, channels, d.image_size, d.image_size, generator=g)
        labels = torch.arange(d.n_way)
        out.append(Task(x_train, labels.repeat_interleave(shots), x_query, labels.repeat_interleave(d.n_query),
                        list(range(d.n_way)), seed=1000 + i).to(device))
    return out


def kept_moments(cfg, net, state, task):
    """Adam's moments as a run carries them (``task.adam_moments: kept``): those after one eager task from zero."""
    from metanas_ray import inner_loop
    if cfg.task.optimizer != "adam":
        return None
    moments = inner_loop.Moments.zeros(state)
    inner_loop.run_task(net, state, task, cfg.task, cfg.task.steps, True, moments=moments)
    return moments


def meta_batch(cfg, net, state, tasks, moments) -> list:
    """The adapted states of one meta-batch in the form ``cfg.task`` says (α adapting, every task from a copy of
    ``moments``)."""
    from metanas_ray import graphed, inner_loop
    from metanas_ray.batched import run_tasks
    t = cfg.task
    if t.batched:
        adapted, _, _ = run_tasks(net, state, tasks, t, t.steps, True, moments=moments,
                                  capture=None if t.cuda_graph else False)
        return adapted
    run = graphed.run_task if t.cuda_graph else inner_loop.run_task
    return [run(net, state, task, t, t.steps, True, moments=moments.copy() if moments else None)[0]
            for task in tasks]


def max_rel_diff(a: dict, b: dict) -> float:
    return max(float((a[p][k] - b[p][k]).abs().max()) / max(1.0, float(b[p][k].abs().max()))
               for p in b for k in b[p])


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_setting(name: str, args) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from metanas_ray import graphed
    from metanas_ray.config import load
    from metanas_ray.state import build_network, init_state, place
    from metanas_ray.config import parse_overrides
    base = load(ROOT / SETTINGS[name], parse_overrides(args.set or []))
    channels = 1 if base.data.dataset == "omniglot" else 3
    net = build_network(base, channels)
    state = place(net, init_state(base, net), args.device)
    tasks = synthetic_tasks(base, channels, args.tasks or base.meta.meta_batch, args.device)
    reference, moments = None, kept_moments(base, net, state, tasks[0])
    out = {"config": SETTINGS[name], "tasks_per_meta_batch": len(tasks), "forms": {}}
    for form, over in FORMS.items():
        cfg = base.override(over)
        graphed.last_failure = None
        meta_batch(cfg, net, state, tasks, moments)  # (captures the graphs of a graph form)
        for _ in range(args.warmup):
            meta_batch(cfg, net, state, tasks, moments)
        seconds = []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            meta_batch(cfg, net, state, tasks, moments)
            sync()
            seconds.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CUDA] if args.device == "cuda" else [ProfilerActivity.CPU]) as prof:
            meta_batch(cfg, net, state, tasks, moments)
            sync()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        per_task = statistics.median(seconds) / len(tasks)
        kernel_s = sum(e.time_range.elapsed_us() for e in kernels) / 1e6 / len(tasks)
        # the check runs with SGD: under Adam, near-zero gradients turn float noise into ±λ steps (on the CPU, eager
        # NHWC against eager NCHW differ by 1e-2 that way), which would hide what the form itself computes
        sgd = cfg.override({"task.optimizer": "sgd", "task.adam_moments": "reset"})
        checked = meta_batch(sgd, net, state, tasks[:2], None)[0]
        if reference is None:
            reference = checked
        diff = max_rel_diff(checked, reference)
        out["forms"][form] = {
            "tasks_per_second": 1.0 / per_task, "seconds_per_task": per_task, "seconds_all": seconds,
            "gpu_kernel_seconds_per_task": kernel_s if kernels else None,
            "gpu_kernels_per_task": len(kernels) / len(tasks),
            "gpu_busy_fraction": min(1.0, kernel_s / per_task) if kernels else None,
            "max_rel_diff_vs_eager": diff, "matches_eager": diff <= 1e-3,
            "capture_failed": graphed.last_failure}
        f = out["forms"][form]
        busy = f"{100 * f['gpu_busy_fraction']:.0f}%" if f["gpu_busy_fraction"] is not None else "n/a"
        print(f"{name:<13}{form:<15}{f['tasks_per_second']:>8.2f} tasks/s  busy {busy:>5}  "
              f"{f['gpu_kernels_per_task']:>8.0f} kernels/task  Δ vs eager {diff:.1e}"
              + (f"  CAPTURE FAILED: {graphed.last_failure}" if graphed.last_failure else ""), flush=True)
    return out


def ray_train_rate(over: dict, steps: int, timeout: float) -> dict:
    """Meta-training tasks/s of a ``--num-gpus 1`` Ray Train run of the Omniglot config on synthetic images."""
    with tempfile.TemporaryDirectory() as tmp:
        sets = {"data.dataset": "synthetic", "data.synthetic_per_class": 20, "data.synthetic_classes": 40,
                "run.meta_steps": steps, "run.log_every": max(1, steps // 4), "run.checkpoint_every": steps,
                "eval.every": 0, "eval.test_tasks": 2, "eval.steps": 10, "eval.arch_steps": 5, **over}
        cmd = [sys.executable, "-m", "metanas_ray.run", "--config", str(ROOT / SETTINGS["omniglot"]),
               "--output", f"{tmp}/run", "--num-gpus", "1",
               *[a for k, v in sets.items() for a in ("--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}")]]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            return {"error": (done.stderr or done.stdout)[-1500:], "settings": sets}
        summary = json.loads(Path(f"{tmp}/run/summary.json").read_text())
    return {"tasks_per_second": summary["tasks_per_second"], "meta_steps": steps, "command_seconds": wall,
            "device": summary["device"], "settings": sets}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cuda", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--ray-steps", type=int, default=8, help="meta-steps of each Ray Train run (0: none)")
    p.add_argument("--tasks", type=int, default=0, help="tasks per meta-batch (0: the config's meta.meta_batch)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a dry run of this script's code on the CPU (graph forms fall back to eager)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a key of both settings' configs (for a dry run: smaller tasks and network)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.cuda needs a GPU that PyTorch sees (torch.cuda.is_available() is False)")
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU (dry run, {args.device})"
    print(f"{device}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}", flush=True)
    if args.device == "cuda":  # (a graph form that falls back says so in its row, from the log's line)
        import logging
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    results = {"device": device, "torch_version": torch.__version__, "cudnn_version": torch.backends.cudnn.version(),
               "repeats": args.repeats, "warmup": args.warmup, "target": TARGET,
               "settings": {name: measure_setting(name, args) for name in args.settings}}
    if "omniglot" in results["settings"]:
        forms = results["settings"]["omniglot"]["forms"]
        ok = {k: f for k, f in forms.items() if f["matches_eager"] and not f["capture_failed"]}
        best = max(ok, key=lambda k: ok[k]["tasks_per_second"])
        busy = [f["gpu_busy_fraction"] for f in ok.values() if f["gpu_busy_fraction"] is not None]
        rate = ok[best]["tasks_per_second"]
        results.update({
            "best_form": best, "best_tasks_per_second": rate, "best_gpu_busy_fraction": max(busy, default=None),
            "target_met": rate >= TARGET["tasks_per_second"] and max(busy, default=0) > TARGET["gpu_busy_fraction"],
            "paper_omniglot_hours": {"gpus_1": 30000 * 10 / rate / 3600, "gpus_8": 30000 * 10 / rate / 3600 / 8}})
        if args.ray_steps:
            results["ray_train"] = {"eager": ray_train_rate({}, args.ray_steps, 580),
                                    best: ray_train_rate(FORMS[best], args.ray_steps, 580),
                                    f"{best}, 2 workers per GPU": ray_train_rate(
                                        {**FORMS[best], "scale.workers_per_gpu": 2}, args.ray_steps, 580)}
            print("Ray Train --num-gpus 1:", {k: v.get("tasks_per_second", v.get("error")) for k, v in
                                                results["ray_train"].items()}, flush=True)
        print(f"best at the paper's Omniglot setting: {best}, {rate:.2f} tasks/s; paper run "
              f"{results['paper_omniglot_hours']['gpus_1']:.1f} h on 1 GPU, "
              f"{results['paper_omniglot_hours']['gpus_8']:.1f} h on 8", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
