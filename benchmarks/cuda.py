"""Seconds per task of the task-learner on one GPU, at the paper's Omniglot setting (as ``benchmarks.inner_loop``).

    python -m benchmarks.cuda                       # writes benchmarks/results/cuda.json (needs a CUDA GPU)
    python -m benchmarks.cuda --out /tmp/cuda.json --repeats 20

One task = ``inner_loop.adapt`` (5 first-order DARTS steps on 20 images, 20-way 1-shot 28×28) plus
``inner_loop.accuracy`` on 20 query images, for fresh α (every operation active) and annealed α (soft-pruned
terms skipped), each the median of ``--repeats`` synchronised runs after warm-up, in four forms: float32 with
PyTorch's defaults (cuDNN may use TF32) in NCHW, the layout runs use on a GPU (``state.place``), the same with
TF32 off, under bfloat16 autocast (``task.bf16``), and float32 with NHWC weights and activations. Where the time
goes: the GPU's kernel time per fresh task and the number of kernels (``torch.profiler``); wall time far above
kernel time means the task is bound by launching kernels and by the host, not by the GPU's arithmetic.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.inner_loop import annealed_alphas, paper_setting

RESULTS = Path(__file__).resolve().parent / "results" / "cuda.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.cuda needs a GPU that PyTorch sees (torch.cuda.is_available() is False)")
    from metanas_ray import inner_loop
    from metanas_ray.state import in_layout, place

    dev = torch.device("cuda")
    cfg, net, fresh, data = paper_setting(torch.Generator().manual_seed(0))
    x_train, y_train, x_query, y_query = (t.to(dev) for t in data)
    annealed = {"weights": fresh["weights"],
                "alphas": annealed_alphas(fresh["alphas"], len(cfg.model.ops), cfg.model.nodes)}
    nchw = {"fresh": (place(net, fresh, dev), 0.0), "annealed": (place(net, annealed, dev), 0.01)}
    nhwc = {name: ({p: in_layout(d, True) for p, d in st.items()}, thr) for name, (st, thr) in nchw.items()}
    tau = inner_loop.Temperature.from_config(cfg.task).final

    def task(state, threshold: float, task_cfg) -> float:
        net.threshold = threshold
        adapted, _ = inner_loop.adapt(net, state, x_train, y_train, task_cfg, cfg.task.steps)
        return inner_loop.accuracy(net, adapted, x_query, y_query, tau, bf16=task_cfg.bf16)[0]

    def timed(state, threshold, task_cfg) -> list[float]:
        for _ in range(args.warmup):
            task(state, threshold, task_cfg)
        out = []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            task(state, threshold, task_cfg)
            torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
        return out

    fp32, bf16 = cfg.task, dataclasses.replace(cfg.task, bf16=True)
    forms = {"float32": (False, fp32, True), "float32_no_tf32": (False, fp32, False), "bf16": (False, bf16, True),
             "float32_nhwc": (True, fp32, True)}
    seconds: dict[str, dict[str, list[float]]] = {}
    for form, (channels_last, task_cfg, tf32) in forms.items():
        net.channels_last = channels_last
        torch.backends.cudnn.allow_tf32 = tf32
        seconds[form] = {name: timed(state, thr, task_cfg)
                         for name, (state, thr) in (nhwc if channels_last else nchw).items()}
    torch.backends.cudnn.allow_tf32 = True
    net.channels_last = False

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        task(*nchw["fresh"], fp32)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_seconds = sum(e.time_range.elapsed_us() for e in kernels) / 1e6  # summed over the task's kernels

    med = {form: {k: statistics.median(v) for k, v in d.items()} for form, d in seconds.items()}
    out = {
        "seconds_per_task": med["float32"]["fresh"],
        "seconds_per_task_annealed": med["float32"]["annealed"],
        "seconds_per_task_by_form": med,
        "gpu_kernel_seconds_per_task": kernel_seconds,
        "gpu_kernels_per_task": len(kernels),
        "gpu": torch.cuda.get_device_name(), "torch_version": torch.__version__,
        "cudnn_version": torch.backends.cudnn.version(),
        "repeats": args.repeats, "warmup": args.warmup, "seconds_all": seconds,
        "task": {"n_way": 20, "k_shot": 1, "train_images": 20, "query_images": 20, "image_size": 28,
                 "steps": cfg.task.steps, "weights": sum(v.numel() for v in fresh["weights"].values())},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print(f"{'one task (5 steps + query)':<28}{'fresh s':>10}{'annealed s':>12}")
    for form, m in med.items():
        print(f"{form:<28}{m['fresh']:>10.4f}{m['annealed']:>12.4f}")
    print(f"GPU kernel time {kernel_seconds:.4f} s in {len(kernels)} kernels per fresh task "
          f"({100 * kernel_seconds / out['seconds_per_task']:.0f}% of its wall time)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
