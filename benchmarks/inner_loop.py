"""Seconds per task of the task-learner on the paper's Omniglot supernet (CPU).

    python -m benchmarks.inner_loop                   # 2 threads; writes benchmarks/results/inner_loop.json
    python -m benchmarks.inner_loop --profile         # also: top operators by self CPU time (fresh α)
    python -m benchmarks.inner_loop --reference-repeats 0   # skip the (slow) per-edge reference

One task = ``inner_loop.adapt`` (5 first-order DARTS steps on 20 images: 20-way 1-shot, 28×28) plus
``inner_loop.accuracy`` on 20 query images, at ``Config()`` defaults (init_channels 28, 4 layers, reductions at
1 and 3, 3 nodes, the seven MetaNAS operations, channel_scale 1: 462,272 weights). Timed with

* fresh α: ``init_alphas`` (every operation of every edge active);
* annealed α: one operation per edge and two inputs per node carry all but ~1e-4 of the weight already at the
  start temperature (α, β: +10 on the kept logits), with ``model.prune_threshold`` 0.01 so the rest is skipped;

each as the median of ``--repeats`` runs after warm-up, alternating with the same task run in "module form"
(parameters copied into the one reused module, ``net(x, mix)`` + ``torch.autograd.grad`` over
``net.parameters()``) instead of ``torch.func.functional_call``. Also: the per-edge reference supernet
(``benchmarks/reference_search_space.py``, as it was) as is and with NHWC activations, each run alternating with a
fresh task so that the speed-up is a ratio of neighbours (the machine's speed drifts; both under glibc's default
malloc, as the official code runs, before the rest keeps freed memory), FLOPs per task
(FlopCounterMode; its convolution-backward formula ignores ``groups`` for the weight gradient, counting a
depthwise conv's ×C too high, so a corrected formula is used and the default count is reported beside it), and
the GFLOP/s of a 2048×2048 float32 matmul on the same threads.

malloc keeps freed memory as the meta-training workers do (``run.keep_freed_memory_mb``; the minor page faults
and system CPU seconds per fresh task are recorded; ``--keep-freed-memory-mb 0``: glibc's default throughout).
``python -m benchmarks.allocator`` measures what keeping it gains, in fresh processes.

Other processes share the CPU: the load average is recorded at the start, before each timed round and at the
end; rerun when it is high. With 2 threads on a busy 2-core machine OpenMP's default spin-waiting collapses
(measured: 10-30× slower per task); ``OMP_WAIT_POLICY=PASSIVE python -m benchmarks.inner_loop`` avoids that
(the policy is recorded too).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "inner_loop.json"


def _reference_module():
    """benchmarks/reference_search_space.py, the frozen per-edge supernet (also the tests' oracle)."""
    from benchmarks import reference_search_space
    return reference_search_space


def paper_setting(gen: torch.Generator):
    """The timed setting: ``(cfg, net, fresh state, (x_train, y_train, x_query, y_query))``, at ``Config()``
    defaults with 20-way 1-shot tasks of 28×28 images (drawn from ``gen``)."""
    from metanas_ray.config import Config
    from metanas_ray.state import build_network, init_state
    cfg = Config().override({"data.n_way": 20})
    x_train, y_train = torch.rand(20, 1, 28, 28, generator=gen), torch.arange(20)
    x_query, y_query = torch.rand(20, 1, 28, 28, generator=gen), torch.arange(20)
    net = build_network(cfg, 1)
    return cfg, net, init_state(cfg, net), (x_train, y_train, x_query, y_query)


def one_task(cfg, net: nn.Module, state, data) -> Callable[[], None]:
    """One task of ``net`` from ``state`` on ``data`` (as :func:`paper_setting` gives them): ``inner_loop.adapt``
    (``cfg.task.steps`` steps) plus ``inner_loop.accuracy`` on the query images at the final temperature."""
    from metanas_ray import inner_loop
    x_train, y_train, x_query, y_query = data
    tau_final = inner_loop.Temperature.from_config(cfg.task).final

    def task() -> None:
        adapted, _ = inner_loop.adapt(net, state, x_train, y_train, cfg.task, cfg.task.steps)
        inner_loop.accuracy(net, adapted, x_query, y_query, tau_final)

    return task


def reference_tasks(cfg, data) -> dict[str, Callable[[], None]]:
    """One fresh task of the per-edge reference supernet, as is and with NHWC activations (warmed up)."""
    from metanas_ray import inner_loop
    from metanas_ray.state import init_state
    R = _reference_module()
    x_train, y_train = data[:2]

    class ReferenceNHWC(R.SearchNetwork):
        """The per-edge reference with NHWC activations (its stem's 1-channel input leaves them NCHW)."""

        def forward(self, x, mix):
            s0 = s1 = self.stem(x).contiguous(memory_format=torch.channels_last)
            for cell in self.cells:
                s0, s1 = s1, cell(s0, s1, mix["reduce" if cell.reduction else "normal"], self.threshold)
            return self.classifier(s1.mean(dim=(2, 3)))

    tasks = {}
    for key, cls in (("reference", R.SearchNetwork), ("reference_nhwc", ReferenceNHWC)):
        ref = cls(cfg.model, 1, cfg.data.n_way)
        ref.channels_last = cfg.model.channels_last
        ref_state = init_state(cfg, ref)  # NHWC weights, as init_state gives them
        inner_loop.adapt(ref, ref_state, x_train, y_train, cfg.task, 1)  # warm-up: one step
        tasks[key] = one_task(cfg, ref, ref_state, data)
    return tasks


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of convolution_backward: the input and the weight gradient each cost the forward's FLOPs
    (torch's formula counts the weight gradient of a grouped conv ``groups`` times too high)."""
    from torch.utils.flop_counter import conv_flop_count
    fwd = (conv_flop_count(list(grad_out_shape), list(w_shape), list(x_shape), transposed=True) if transposed
           else conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=False))
    return fwd * (int(output_mask[0]) + int(output_mask[1]))


def adapt_module(net: nn.Module, params, x, y, cfg, steps: int, learn_arch: bool = True):
    """``inner_loop.adapt`` with the weights loaded into ``net``'s own parameters (one reused module) instead of
    ``functional_call``: the same updates, in place on ``net.parameters()``."""
    from metanas_ray.inner_loop import Temperature, _clip_
    from metanas_ray.search_space import mixture
    if getattr(cfg, "optimizer", "sgd") != "sgd":
        raise NotImplementedError("the module form mirrors adapt()'s SGD steps only")
    names = [k for k, _ in net.named_parameters()]
    w_list = list(net.parameters())
    with torch.no_grad():
        for p, k in zip(w_list, names):
            p.copy_(params["weights"][k])
    a = {k: v.detach().clone().requires_grad_(learn_arch) for k, v in params["alphas"].items()}
    a_list = list(a.values()) if learn_arch else []
    if getattr(net, "channels_last", False):
        x = x.contiguous(memory_format=torch.channels_last)
    temperature = Temperature.from_config(cfg)
    loss = logits = None
    for step in range(steps):
        tau = temperature.at(step, steps)
        logits = net(x, mixture(a, tau[0], tau[1], net.nodes))
        loss = F.cross_entropy(logits, y)
        # pruned terms leave some weights out of the graph: zero gradients for them
        grads = torch.autograd.grad(loss, w_list + a_list, allow_unused=True, materialize_grads=True)
        g_w, g_a = list(grads[:len(w_list)]), list(grads[len(w_list):])
        _clip_(g_w, cfg.grad_clip)
        with torch.no_grad():
            torch._foreach_add_(w_list, g_w, alpha=-cfg.lr_w)
            if g_a:
                _clip_(g_a, cfg.grad_clip)
                torch._foreach_add_(a_list, g_a, alpha=-cfg.lr_alpha)
    adapted = {"weights": {k: p.detach().clone() for k, p in zip(names, w_list)},
               "alphas": {k: v.detach() for k, v in a.items()}}
    return adapted, {"loss": float(loss.detach()), "accuracy": float((logits.detach().argmax(-1) == y).float().mean())}


def accuracy_module(net: nn.Module, adapted, x, y, tau) -> float:
    """Query accuracy with the adapted weights already in ``net`` (after :func:`adapt_module`)."""
    from metanas_ray.search_space import mixture
    if getattr(net, "channels_last", False):
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        logits = net(x, mixture(adapted["alphas"], tau[0], tau[1], net.nodes))
    return float((logits.argmax(-1) == y).float().mean())


def annealed_alphas(alphas: dict[str, torch.Tensor], n_ops: int, nodes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """+10 on one random operation per edge (α) and on two random inputs per node (β), 0 elsewhere: after the
    softmax, even at temperature 1, each of the rest weighs < 1e-4."""
    from metanas_ray.search_space import node_edges
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, v in alphas.items():
        if key.startswith("alpha_"):
            a = torch.zeros_like(v)
            a[torch.arange(v.shape[0]), torch.randint(0, n_ops, (v.shape[0],), generator=g)] = 10.0
        else:
            a = torch.zeros_like(v)
            for own in node_edges(nodes):
                a[own.start + torch.randperm(len(own), generator=g)[:2]] = 10.0
        out[key] = a
    return out


class Timings(NamedTuple):
    """Per function, one entry per timed call; ``loads``: the 1-minute load average before each round."""
    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]  # this process, all threads
    faults: dict[str, list[int]]  # minor page faults
    system: dict[str, list[float]]  # system CPU seconds
    loads: list[float]


def _times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> Timings:
    """Each function's timings, the functions run alternately so that all see the same background load."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    t = Timings(*({k: [] for k in fns} for _ in range(4)), loads=[])
    for _ in range(repeats):
        t.loads.append(os.getloadavg()[0])
        for k, f in fns.items():
            r0, t0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), time.process_time()
            f()
            t.wall[k].append(time.perf_counter() - t0)
            t.cpu[k].append(time.process_time() - c0)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            t.faults[k].append(r1.ru_minflt - r0.ru_minflt)
            t.system[k].append(r1.ru_stime - r0.ru_stime)
    return t


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(ts) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reference-repeats", type=int, default=3,
                   help="per-edge reference runs (~6 s per task), each beside a fresh task; 0: skip")
    p.add_argument("--keep-freed-memory-mb", type=int, default=None,
                   help="as run.keep_freed_memory_mb (default: the config's); 0: malloc's own default")
    p.add_argument("--profile", action="store_true", help="print the top operators of one fresh task")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()

    from metanas_ray import inner_loop
    from metanas_ray.memory import keep_freed_memory
    from metanas_ray.search_space import mixture
    from metanas_ray.state import build_network, init_state

    gen = torch.Generator().manual_seed(0)
    cfg, net, fresh, (x_train, y_train, x_query, y_query) = paper_setting(gen)
    keep_mb = cfg.run.keep_freed_memory_mb if args.keep_freed_memory_mb is None else args.keep_freed_memory_mb
    steps, tau_final = cfg.task.steps, inner_loop.Temperature.from_config(cfg.task).final
    annealed = {"weights": fresh["weights"],
                "alphas": annealed_alphas(fresh["alphas"], len(cfg.model.ops), cfg.model.nodes)}
    if cfg.model.channels_last:  # the module form holds NHWC weights too, as init_state's are
        for prm in net.parameters():
            if prm.dim() == 4:
                prm.data = prm.data.contiguous(memory_format=torch.channels_last)

    def task(state, threshold: float, model: nn.Module = net, data=(x_train, y_train, x_query, y_query)):
        model.threshold = threshold
        xt, yt, xq, yq = data
        adapted, _ = inner_loop.adapt(model, state, xt, yt, cfg.task, steps)
        return adapted, inner_loop.accuracy(model, adapted, xq, yq, tau_final)[0]

    def task_flops(run: Callable[[], object], corrected: bool = True) -> int:
        from torch.utils.flop_counter import FlopCounterMode
        mapping = {torch.ops.aten.convolution_backward: _conv_backward_flop} if corrected else {}
        with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
            run()
        return fc.get_total_flops()

    def task_module(state, threshold: float):
        net.threshold = threshold
        adapted, _ = adapt_module(net, state, x_train, y_train, cfg.task, steps)
        return adapted, accuracy_module(net, adapted, x_query, y_query, tau_final)

    # the module form computes the same adapted state as adapt()
    for state, thr in ((fresh, 0.0), (annealed, 0.01)):
        (a1, acc1), (a2, acc2) = task(state, thr), task_module(state, thr)
        for k in a1["weights"]:
            torch.testing.assert_close(a2["weights"][k], a1["weights"][k], rtol=1e-4, atol=1e-5)
    active = {t: int((m > 0.01).sum()) for t, m in mixture(
        annealed["alphas"], *tau_final, cfg.model.nodes).items()}

    # The per-edge reference beside fresh tasks (their ratio does not drift with the machine's speed), both under
    # glibc's default malloc, as the official code runs. (Not a comparison of mallocs: later rounds of one process
    # run slower than its first, whatever malloc does; benchmarks/allocator.py compares them in fresh processes.)
    reference = None
    if args.reference_repeats > 0:
        refs = reference_tasks(cfg, (x_train, y_train, x_query, y_query))
        reference = _times({"fresh_beside_reference": lambda: task(fresh, 0.0), **refs}, args.reference_repeats, 0)
    kept = keep_freed_memory(keep_mb)  # as the meta-training workers do

    timings = _times({
        "fresh": lambda: task(fresh, 0.0), "fresh_module": lambda: task_module(fresh, 0.0),
        "annealed": lambda: task(annealed, 0.01), "annealed_module": lambda: task_module(annealed, 0.01),
    }, args.repeats, args.warmup)
    times, cpu_times = timings.wall, timings.cpu
    med = {k: statistics.median(v) for k, v in times.items()}

    flops, flops_default = {}, {}
    for name, state, thr in (("fresh", fresh, 0.0), ("annealed", annealed, 0.01)):
        flops[name] = task_flops(lambda: task(state, thr))
        flops_default[name] = task_flops(lambda: task(state, thr), corrected=False)
    mm = matmul_gflops()

    # Where the time goes. (1) The fresh task on one thread: how much the second thread buys. (2) The task on two
    # 4×4 images: every operator still runs, on almost no data, so what remains is the per-operator cost
    # (dispatch, oneDNN primitive set-up, autograd). (3) The share of the FLOPs that conv_1x5_5x1 (a dense,
    # not depthwise-separable, factorised 5×5) takes: the task's FLOPs without that operation.
    tiny_x, tiny_y = torch.rand(2, 1, 4, 4, generator=gen), torch.arange(2)
    tiny = _times({"tiny": lambda: task(fresh, 0.0, data=(tiny_x, tiny_y, tiny_x, tiny_y))},
                  args.repeats, 1).wall["tiny"]
    torch.set_num_threads(1)
    one_thread = _times({"fresh": lambda: task(fresh, 0.0)}, max(1, args.repeats // 2), 1).wall["fresh"]
    torch.set_num_threads(args.threads)
    no_fac_cfg = cfg.override({"model.ops": [o for o in cfg.model.ops if o != "conv_1x5_5x1"]})
    no_fac_net = build_network(no_fac_cfg, 1)
    flops_no_fac = task_flops(lambda: task(init_state(no_fac_cfg, no_fac_net), 0.0, no_fac_net))

    out = {
        "seconds_per_task": med["fresh"],
        "seconds_per_task_annealed": med["annealed"],
        "flops_per_task": flops["fresh"],
        "flops_per_task_annealed": flops["annealed"],
        "gflops_per_second": flops["fresh"] / med["fresh"] / 1e9,
        "gflops_per_second_annealed": flops["annealed"] / med["annealed"] / 1e9,
        "matmul_gflops_per_second": mm,
        "seconds_per_task_module": med["fresh_module"],
        "seconds_per_task_annealed_module": med["annealed_module"],
        "module_vs_functional_call": med["fresh_module"] / med["fresh"],
        "module_vs_functional_call_annealed": med["annealed_module"] / med["annealed"],
        "threads": args.threads,
        "torch_version": torch.__version__,
        "flops_per_task_flopcounter_default": flops_default["fresh"],
        "flops_per_task_annealed_flopcounter_default": flops_default["annealed"],
        "seconds_per_task_1_thread": statistics.median(one_thread),
        "thread_speedup": statistics.median(one_thread) / med["fresh"],
        "seconds_per_task_tiny_input": statistics.median(tiny),  # 2 images of 4×4: per-operator cost
        "flops_share_conv_1x5_5x1": 1.0 - flops_no_fac / flops["fresh"],
        "annealed_active_terms": active,
        "task": {"n_way": 20, "k_shot": 1, "train_images": 20, "query_images": 20, "image_size": 28,
                 "steps": steps, "init_channels": cfg.model.init_channels, "layers": cfg.model.layers,
                 "nodes": cfg.model.nodes, "ops": list(cfg.model.ops),
                 "weights": sum(v.numel() for v in fresh["weights"].values())},
        "repeats": args.repeats, "warmup": args.warmup,
        "seconds_all": times,
        "cpu_seconds_all": cpu_times,  # process CPU time: ≈ threads × wall on an idle machine
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "keep_freed_memory_mb": keep_mb if kept else 0,
        "minor_page_faults_per_task": statistics.median(timings.faults["fresh"]),
        "system_cpu_seconds_per_task": statistics.median(timings.system["fresh"]),
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "load_average_per_round": timings.loads,
        "cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
    }
    if reference:
        m = {k: statistics.median(v) for k, v in reference.wall.items()}
        out["seconds_per_task_beside_reference"] = m["fresh_beside_reference"]
        out["seconds_per_task_reference"] = m["reference"]
        out["seconds_per_task_reference_nhwc"] = m["reference_nhwc"]
        out["speedup_vs_reference"] = m["reference"] / m["fresh_beside_reference"]
        out["speedup_vs_reference_nhwc"] = m["reference_nhwc"] / m["fresh_beside_reference"]
        out["reference_seconds_all"] = reference.wall
        out["reference_load_average_per_round"] = reference.loads
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")

    print(f"torch {torch.__version__}, {args.threads} threads, load average {load_start[0]:.2f} → "
          f"{out['load_average_end'][0]:.2f} ({os.cpu_count()} CPUs)")
    print(f"{'one task (5 steps + query)':<36}{'s/task':>9}{'CPU s':>9}{'GFLOP':>9}{'GFLOP/s':>9}")
    cpu_med = {k: statistics.median(v) for k, v in cpu_times.items()}
    rows = [("fresh α, functional_call", med["fresh"], cpu_med["fresh"], flops["fresh"]),
            ("fresh α, module form", med["fresh_module"], cpu_med["fresh_module"], flops["fresh"]),
            ("annealed α, functional_call", med["annealed"], cpu_med["annealed"], flops["annealed"]),
            ("annealed α, module form", med["annealed_module"], cpu_med["annealed_module"], flops["annealed"])]
    if reference:
        rows += [("fresh α, beside the reference", out["seconds_per_task_beside_reference"], float("nan"),
                  flops["fresh"]),
                 ("per-edge reference (fresh)", out["seconds_per_task_reference"], float("nan"), flops["fresh"]),
                 ("per-edge reference, NHWC (fresh)", out["seconds_per_task_reference_nhwc"], float("nan"),
                  flops["fresh"])]
    for name, sec, cpu, f in rows:
        print(f"{name:<36}{sec:>9.3f}{cpu:>9.2f}{f / 1e9:>9.1f}{f / sec / 1e9:>9.1f}")
    print(f"{'2048² float32 matmul':<36}{'':>9}{'':>9}{'':>9}{mm:>9.1f}")
    if reference:
        print(f"speed-up over the per-edge reference (neighbouring runs, malloc's default): "
              f"{out['speedup_vs_reference']:.2f}× ({out['speedup_vs_reference_nhwc']:.2f}× over it in NHWC)")
    print(f"malloc keeps {out['keep_freed_memory_mb']} MiB of freed memory: {out['minor_page_faults_per_task']:.0f} "
          f"minor page faults, {out['system_cpu_seconds_per_task']:.3f} s system CPU per fresh task")
    print(f"fresh α on 1 thread {out['seconds_per_task_1_thread']:.3f} s ({out['thread_speedup']:.2f}× from "
          f"{args.threads} threads); on 2 images of 4×4 {out['seconds_per_task_tiny_input']:.3f} s (per-operator "
          f"cost); conv_1x5_5x1 is {100 * out['flops_share_conv_1x5_5x1']:.0f}% of the FLOPs")
    print(f"wrote {args.out}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        task(fresh, 0.0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            task(fresh, 0.0)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
