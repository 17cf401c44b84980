"""The task-learner Φ^k applied to T tasks at once: one kernel launch per operation for all of a worker's tasks.

:func:`~.inner_loop.adapt` runs Φ^k on one task; a worker with T tasks of a meta-batch launches each of its kernels
T times. Here the T tasks' parameters are stacked on a leading task dimension,

    w = [w_1 … w_T],  α = [α_1 … α_T]       (every w_i, α_i a copy of (w_meta, α_meta) at j = 0)

and every inner step j = 0 … k-1 is one call, vmapped over tasks (``torch.func.vmap`` of ``torch.func.grad_and_value``
of the loss at ``torch.func.functional_call``, as PyTorch's functorch ``maml-omniglot-transforms.py`` example):

    L_i,j    = CE(f(x_i,j; w_i,j, α_i,j, τ_j), y_i,j)                           for all i at once
    w_i,j+1  = w_i,j − λ_task · clip(∇_w L_i,j)                                 (clip: norm over task i's grads)
    α_i,j+1  = α_i,j − ξ_task · (clip(∇_α L_i,j) + δ_α · α_i,j)

(with ``task.optimizer: adam`` the clipped, decayed gradients pass through Adam with β1 = 0 as in ``adapt``, one
second-moment v_i per task, all starting from the same moments). τ_j, the steps that adapt α, and the Adam step
counts are the same for every task; what differs per task — the minibatch indices x_i,j ⊂ D_train of T_i and the
drop-path masks — is drawn beforehand from each task's own generator, in the order ``adapt`` draws it (indices, then
masks, step by step), and stacked. So task i's (w*_i, α*_i) and statistics are ``adapt``'s for T_i to float
tolerance (``tests/test_batched.py``); the activations run NCHW (vmap cannot ask a tensor for another layout), and
its losses are checked per task (``inner_loop._check_losses``) after the last step.

Supported: Conv4 and the supernet, SGD and Adam (``task.adam_moments`` reset or kept), ``task.grad_clip``,
``task.weight_decay``, ``task.alpha_weight_decay``, ``task.batch_size`` with either ``task.batch_sampling``,
``task.drop_path``, every τ schedule, ``task.warmup_tau`` and the meta warm-up (α frozen).

Cost: the point is a GPU, where a task is bound by launching its kernels (``state.place``); there one launch serves
T tasks. Not yet measured on a GPU. On the CPU it is slower, not faster (NCHW instead of oneDNN's NHWC, and vmap's
convolutions as grouped ones): 5 tasks of ``quick.yaml``'s supernet on synthetic 28×28 images, one thread, took
about 1.3× the per-task time, Conv4 about 1.1× (a loaded 2-core machine); keep ``task.batched: false`` on CPUs.
Meta-validation and meta-test, the query accuracy and the meta-learner's contributions stay per task.

Soft-pruning (``model.prune_threshold`` > 0) is decided per task and per step from that task's mixture weights; the
per-task forward skips the pruned terms (reading ``(weights > threshold).tolist()``), which a vmapped function cannot
do. Here every term is computed and the pruned ones weigh 0 (``SearchNetwork.all_terms``,
:func:`~.search_space.soft_pruned`, decided on the device per task): the same function and gradients.

Refused (:class:`~.config.ConfigError` naming the key), because they are not batched here:

* ``model.kind: genotype``: the found network is not batched (not tested under vmap).
* ``task.bf16``: autocast under vmap is not tested here.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad_and_value, vmap

from .config import ConfigError, TaskLearnerConfig
from . import graphed
from .inner_loop import _BETA2, _EPS, Moments, Temperature, _check_losses, accuracy, forward
from .state import State, in_layout

if TYPE_CHECKING:
    from .data import Task


def check_batchable(net: nn.Module, cfg: TaskLearnerConfig) -> None:
    """Raise :class:`ConfigError` naming the key of what the batched task-learner does not support."""
    if not isinstance(net, nn.Module) or type(net).__name__ not in ("Conv4", "SearchNetwork"):
        raise ConfigError(f"task.batched supports model.kind: supernet or conv4, not the network {type(net).__name__}")
    if cfg.bf16:
        raise ConfigError("task.batched does not support task.bf16 (set one of them to false)")


@contextmanager
def _vmappable(net: nn.Module) -> Iterator[None]:
    """The network's forward without data-dependent decisions or layout queries, for the duration."""
    saved = getattr(net, "channels_last", False), getattr(net, "all_terms", None)
    net.channels_last = False
    if saved[1] is not None:
        net.all_terms = True
    try:
        yield
    finally:
        net.channels_last = saved[0]
        if saved[1] is not None:
            net.all_terms = saved[1]


def _clip(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """``inner_loop._clip_`` out of place (per task under vmap: the norm over that task's gradients)."""
    if max_norm > 0 and grads:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        return [g * scale for g in grads]
    return grads


def _adam(v: list[torch.Tensor], grads: list[torch.Tensor],
          correction: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``inner_loop._adam_direction`` out of place: (direction, new v), ``correction`` = 1 − β2^t of this step."""
    v = [torch.addcmul(s * _BETA2, g, g, value=1 - _BETA2) for s, g in zip(v, grads)]
    return [g / (torch.sqrt(s / correction) + _EPS) for g, s in zip(grads, v)], v


def adapt_tasks(net: nn.Module, params: State, xs: list[torch.Tensor], ys: list[torch.Tensor],
                cfg: TaskLearnerConfig, steps: int, learn_arch: bool = True, *, arch_steps: int | None = None,
                hold_tau: bool = False, batch_size: int | None = None, drop_path: float = 0.0,
                generators: list[torch.Generator] | None = None, moments: Moments | None = None,
                capture: bool | None = False) -> tuple[list[State], list[dict[str, float]], list[Moments] | None]:
    """Φ^k on T tasks (D_train of task i: ``xs[i]`` ``[B, C, H, W]``, ``ys[i]`` ``[B]``, the same shapes for all) at
    once, from the same ``params``: per task what :func:`~.inner_loop.adapt` returns, with ``generators[i]`` its
    generator and every task starting from a copy of ``moments`` (Adam; None: zeros). Returns the adapted states,
    the statistics and (Adam) each task's final moments, in task order; ``params`` and ``moments`` are not modified.
    Raises the first task's (in order) :class:`~.inner_loop.NonFiniteLossError`. ``capture`` (``task.cuda_graph``):
    each vmapped step a CUDA-graph replay, as in :func:`~.graphed.adapt` (None: on a CUDA device; False: never)."""
    check_batchable(net, cfg)
    n_tasks = len(xs)
    if drop_path > 0 and generators is None:
        raise ValueError("drop-path needs the tasks' generators")
    gens = generators if generators is not None else [None] * n_tasks
    device = xs[0].device
    if capture is None and device.type != "cuda":
        graphed.say_once(f"task.cuda_graph: no CUDA device ({device.type}): the batched inner steps run eagerly")
        capture = False
    size = cfg.batch_size if batch_size is None else batch_size
    adam = cfg.optimizer == "adam"
    start = moments if moments is not None else (Moments.zeros(params) if adam else None)
    # per task its minibatch indices and drop-path masks, drawn as adapt draws them (graphed.plan: same generator,
    # same order); τ, the steps that adapt α and Adam's step counts are the same for every task
    plans = [graphed.plan(net, y, cfg, steps, learn_arch, arch_steps, hold_tau, size, drop_path, g, start,
                          has_alphas=bool(params["alphas"])) for y, g in zip(ys, gens)]
    p = plans[0]
    x_all, y_all = torch.stack(xs), torch.stack(ys)  # [T, B, ...]
    rows = torch.arange(n_tasks, device=device)[:, None]
    whole = torch.arange(len(ys[0]), device=device)
    inputs = []  # per step: the T minibatches [T, b, ...] (a step's size is the same across tasks) and masks
    for j in range(steps):
        idx = torch.stack([whole if q.index[j] is None else q.index[j] for q in plans])
        inputs.append((x_all[rows, idx], y_all[rows, idx], {k: torch.stack([q.drops[j][k] for q in plans])
                                                             for k in p.drops[j]}))

    v0 = start.v if adam else {}

    def stacked() -> tuple[dict, dict, dict]:  # (w, α, v) of the start, one copy per task on a leading dim
        def grow(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: t.detach().unsqueeze(0).expand(n_tasks, *t.shape).contiguous() for k, t in d.items()}
        return grow(params["weights"]), grow(params["alphas"]), {part: grow(d) for part, d in v0.items()}

    def make(arch: bool) -> graphed.Step:
        return _vmapped_step(net, cfg, arch and bool(params["alphas"]))

    with _vmappable(net):
        key = ("tasks", cfg, n_tasks, graphed.shapes(params))
        replays = graphed.try_capture(net, capture, lambda: graphed.replays_for(
            net, key, lambda: graphed.Replays(make, *stacked())), p.arch, inputs)
        if replays is not None:
            replays.load(params["weights"], params["alphas"], v0)  # (copied into every task's row: broadcast)
            w, a, v = replays.w, replays.a, replays.v
        else:
            w, a, v = stacked()
        losses, accs = graphed.run_steps(make, w, a, v, inputs, p, replays)
    values = losses.t().tolist()  # [T, steps], read once
    for i in range(n_tasks):
        _check_losses(values[i], xs[i], cfg)
    layout = getattr(net, "channels_last", False)
    own = (lambda t: t.clone()) if replays is not None else (lambda t: t)  # (not views of the static buffers)
    adapted = [{"weights": in_layout({k: own(x[i]) for k, x in w.items()}, layout),
                "alphas": {k: x[i].clone() for k, x in a.items()}} for i in range(n_tasks)]
    final_acc = accs.tolist()
    stats = [{"loss": values[i][-1], "accuracy": final_acc[i]} for i in range(n_tasks)]
    out_moments = None
    if adam:
        out_moments = [Moments({part: {k: x[i].clone() for k, x in d.items()} for part, d in v.items()},
                               dict(p.t_end)) for i in range(n_tasks)]
    return adapted, stats, out_moments


def _vmapped_step(net: nn.Module, cfg: TaskLearnerConfig, arch: bool) -> graphed.Step:
    """One inner step of T tasks, in place on the stacked (w, α, v): :func:`_step` vmapped over tasks, its results
    copied back (so that a CUDA graph of it can be replayed on the same buffers)."""

    def step(w: dict, a: dict, v: dict, xb: torch.Tensor, yb: torch.Tensor, row: torch.Tensor,
             drop: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        w2, a2, v2, loss, acc = vmap(_step(net, cfg, row, arch))(w, a, v, xb, yb, drop)
        with torch.no_grad():
            for mine, new in ((w, w2), *(((a, a2),) if arch else ()), *((v[p], v2[p]) for p in v)):
                for k, t in new.items():
                    mine[k].copy_(t)
        return loss, acc

    return step


def _step(net: nn.Module, cfg: TaskLearnerConfig, row: torch.Tensor, arch: bool):
    """One inner step of one task, as a function of (w, α, Adam's v, minibatch, drop-path masks): ``adapt``'s loop
    body, out of place, to be vmapped over tasks; ``row`` = (τ_α, τ_β, 1 − β2^t_w, 1 − β2^t_α) of the step
    (:attr:`~.graphed.Plan.schedule`)."""

    def loss_fn(w, a, xb, yb, drop):
        logits = forward(net, {"weights": w, "alphas": a}, xb, (row[0], row[1]), drop=drop or None)
        return F.cross_entropy(logits, yb), logits

    def one(w, a, v, xb, yb, drop):
        grads, (loss, logits) = grad_and_value(loss_fn, argnums=(0, 1) if arch else 0, has_aux=True)(
            w, a, xb, yb, drop)
        g_w, g_a = (grads if arch else (grads, {}))
        g_w = _clip([g_w[k] for k in w], cfg.grad_clip)
        g_a = _clip([g_a[k] for k in a], cfg.grad_clip) if arch else []
        w_list, a_list = list(w.values()), list(a.values()) if arch else []
        if a_list and cfg.alpha_weight_decay > 0:
            g_a = [torch.add(g, x, alpha=cfg.alpha_weight_decay) for g, x in zip(g_a, a_list)]
        if cfg.weight_decay > 0:
            g_w = [torch.add(g, x, alpha=cfg.weight_decay) for g, x in zip(g_w, w_list)]
        v = dict(v)
        if cfg.optimizer == "adam":
            g_w, v_w = _adam([v["weights"][k] for k in w], g_w, row[2])
            v["weights"] = dict(zip(w, v_w))
            if a_list:
                g_a, v_a = _adam([v["alphas"][k] for k in a], g_a, row[3])
                v["alphas"] = dict(zip(a, v_a))
        w = {k: torch.add(x, g, alpha=-cfg.lr_w) for (k, x), g in zip(w.items(), g_w)}
        if a_list:
            a = {k: torch.add(x, g, alpha=-cfg.lr_alpha) for (k, x), g in zip(a.items(), g_a)}
        acc = (logits.detach().argmax(-1) == yb).float().mean()
        return w, a, v, loss.detach(), acc

    return one


def run_tasks(net: nn.Module, params: State, tasks: list["Task"], cfg: TaskLearnerConfig, steps: int,
              learn_arch: bool = True, *, hold_tau: bool = False, moments: Moments | None = None,
              capture: bool | None = False) -> tuple[list[State], list[dict[str, float]], list[Moments] | None]:
    """:func:`~.inner_loop.run_task` for several meta-training tasks at once: :func:`adapt_tasks` on their training
    data (``task.drop_path`` from each task's own generator), then each adapted model on its query data."""
    adapted, stats, out_moments = adapt_tasks(
        net, params, [task.x_train for task in tasks], [task.y_train for task in tasks], cfg, steps, learn_arch,
        hold_tau=hold_tau, drop_path=cfg.drop_path, generators=[task.generator() for task in tasks], moments=moments,
        capture=capture)
    _, tau = Temperature.from_config(cfg).schedule_for(steps, None, hold_tau)
    for task, state, s in zip(tasks, adapted, stats):
        s["query_accuracy"], s["query_loss"] = accuracy(net, state, task.x_query, task.y_query, tau, bf16=cfg.bf16)
    return adapted, stats, out_moments
