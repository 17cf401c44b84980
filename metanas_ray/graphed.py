"""The task-learner Φ^k with no host synchronisation inside a step, each step a CUDA-graph replay (task.cuda_graph).

On a GPU a task of :func:`~.inner_loop.adapt` launches tens of thousands of small kernels, and the host cannot run
ahead of them: every soft-pruning decision (``SearchCell.forward`` reads ``(weights > θ).tolist()``) waits for the
queue to drain. Here an inner step is a function of device tensors only,

    (w, α, v) ← step(w, α, v; x_j, y_j, τ_j, m_j, c_j)      the task-learner equation of ``inner_loop``, in place

with τ_j = (τ_α, τ_β) of step j, m_j its drop-path masks and c_j = (1 − β2^t_w, 1 − β2^t_α) Adam's bias corrections
as tensors, and every supernet term computed, the soft-pruned ones at weight 0 (:func:`~.search_space.soft_pruned`:
the same function and gradients as skipping them). A task's minibatch indices and drop-path masks are drawn up front
from its generator, in ``adapt``'s order, and copied to the device once; its losses are checked once, after the last
step (``inner_loop._check_losses``). So one captured step serves every step of every task with the same shapes.

On a CUDA device the step is captured once per (whether α adapts, input shapes) with :class:`torch.cuda.CUDAGraph`
on parameters held in static buffers (:class:`Replays`), into which each task's start values are copied; a step is
then one replay. On another device ``task.cuda_graph`` runs ``inner_loop.adapt`` (skipping pruned terms is faster on
a CPU) and says so once in the log; where capture fails, the same host-sync-free steps run eagerly, said once too.
Meta-training, meta-validation and meta-test use it, and ``batched`` captures its vmapped step of T tasks the same way.
``tests/test_graphed.py`` checks on the CPU that the steps read nothing back (they run on the meta device, whose
tensors hold no values) and give ``adapt``'s results; ``tests/test_cuda.py`` checks the replays against eager on a GPU.

Supported: the supernet, Conv4 and found networks; SGD and Adam (moments reset or kept), clipping, both weight
decays, both minibatch samplings, drop-path, every τ schedule, ``arch_steps`` and ``hold_tau``, bf16 autocast.
"""
from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import inner_loop
from .config import TaskLearnerConfig
from .inner_loop import (_BETA2, _EPS, Moments, Temperature, _batch, _batches, _check_losses, _clip_,
                         adapt as eager_adapt, forward)
from .state import State

if TYPE_CHECKING:
    from .data import Task


def say_once(message: str) -> None:
    """Log ``message`` at INFO once per process (``inner_loop.log_once``)."""
    inner_loop.log_once(message, message, logging.INFO, __name__)


@contextmanager
def all_terms(net: nn.Module) -> Iterator[None]:
    """The supernet computes every term (the pruned ones at weight 0) for the duration: no decision read back."""
    saved = getattr(net, "all_terms", None)
    if saved is not None:
        net.all_terms = True
    try:
        yield
    finally:
        if saved is not None:
            net.all_terms = saved


@dataclass
class Plan:
    """What a task's k steps need, decided and drawn before the first: per step whether α adapts, τ_j and Adam's
    bias corrections c_j (``schedule`` ``[k, 4]``: τ_α, τ_β, c_w, c_α), the minibatch indices (None: all of D_train)
    and the drop-path masks; and the Adam step counts after the last step."""

    arch: list[bool]
    schedule: torch.Tensor
    index: list[torch.Tensor | None]
    drops: list[dict[str, torch.Tensor]]
    t_end: dict[str, int] = field(default_factory=dict)


def plan(net: nn.Module, y: torch.Tensor, cfg: TaskLearnerConfig, steps: int, learn_arch: bool,
         arch_steps: int | None, hold_tau: bool, size: int, drop_path: float,
         generator: torch.Generator | None, moments: Moments | None, has_alphas: bool = True) -> Plan:
    """The :class:`Plan` of one task, its random draws in ``adapt``'s order (indices, then masks, step by step),
    moved to ``y``'s device once; Adam's step counts advance as ``adapt``'s do (α's only in steps that adapt α)."""
    if drop_path > 0 and generator is None:
        raise ValueError("drop-path needs the task's generator")
    taus, _ = Temperature.from_config(cfg).schedule_for(steps, arch_steps, hold_tau)
    batches = _batches(y, size)
    t = dict(moments.t) if moments is not None else {"weights": 0, "alphas": 0}
    arch, rows, index, drops = [], [], [], []
    for step in range(steps):
        batch = _batch(y, step, size, cfg.batch_sampling, batches, generator)
        index.append(None if batch is None else batch.to(y.device))
        n = len(y) if batch is None else len(batch)
        drops.append(net.drop_path_masks(n, drop_path, generator, y.device) if drop_path > 0 else {})
        a = learn_arch and (arch_steps is None or step < arch_steps)
        arch.append(a)
        t["weights"] += 1
        t["alphas"] += 1 if a and has_alphas else 0
        rows.append([*taus[step], 1 - _BETA2 ** t["weights"], 1 - _BETA2 ** max(t["alphas"], 1)])
    return Plan(arch, torch.tensor(rows, dtype=torch.float32).to(y.device), index, drops, t)


def make_step(net: nn.Module, cfg: TaskLearnerConfig, arch: bool) -> Callable:
    """One inner step, in place on ``w``, ``a`` (and Adam's ``v``), reading no value back to the host:
    ``step(w, a, v, xb, yb, row, drop) -> (loss, accuracy)`` as 0-d tensors, ``row`` the step's row of
    :attr:`Plan.schedule`. The arithmetic is ``inner_loop.adapt``'s loop body with τ and c as tensors."""
    adam = cfg.optimizer == "adam"

    def direction(v: dict[str, torch.Tensor], names: list[str], grads: list[torch.Tensor],
                  correction: torch.Tensor) -> list[torch.Tensor]:
        sq = [v[k] for k in names]
        torch._foreach_mul_(sq, _BETA2)
        torch._foreach_addcmul_(sq, grads, grads, value=1 - _BETA2)
        denom = torch._foreach_sqrt([s / correction for s in sq])
        torch._foreach_add_(denom, _EPS)
        return torch._foreach_div(grads, denom)

    def step(w: dict, a: dict, v: dict, xb: torch.Tensor, yb: torch.Tensor, row: torch.Tensor,
             drop: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        w_list, a_list = list(w.values()), list(a.values()) if arch else []
        logits = forward(net, {"weights": w, "alphas": a}, xb, (row[0], row[1]), bf16=cfg.bf16, drop=drop or None)
        loss = F.cross_entropy(logits, yb)
        grads = list(torch.autograd.grad(loss, w_list + a_list, allow_unused=True, materialize_grads=True))
        g_w, g_a = grads[:len(w_list)], grads[len(w_list):]
        _clip_(g_w, cfg.grad_clip)
        _clip_(g_a, cfg.grad_clip)
        with torch.no_grad():
            if a_list and cfg.alpha_weight_decay > 0:
                torch._foreach_add_(g_a, a_list, alpha=cfg.alpha_weight_decay)
            if cfg.weight_decay > 0:
                torch._foreach_add_(g_w, w_list, alpha=cfg.weight_decay)
            if adam:
                g_w = direction(v["weights"], list(w), g_w, row[2])
                if a_list:
                    g_a = direction(v["alphas"], list(a), g_a, row[3])
            torch._foreach_add_(w_list, g_w, alpha=-cfg.lr_w)
            if a_list:
                torch._foreach_add_(a_list, g_a, alpha=-cfg.lr_alpha)
        return loss.detach(), (logits.detach().argmax(-1) == yb).float().mean()

    return step


Step = Callable[[dict, dict, dict, torch.Tensor, torch.Tensor, torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor]]
Inputs = list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


def run_steps(make: Callable[[bool], Step], w: dict, a: dict, v: dict, inputs: Inputs, p: Plan,
              replays: "Replays | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step j = 0 … k-1 on ``inputs[j]`` = (x_j, y_j, m_j), in place on (w, α, v): eagerly by ``make(α adapts)``'s
    step, or as ``replays``' graph replays (then w, α, v are its static buffers, loaded). Returns the k losses
    (stacked on dim 0) and the last step's accuracy, on the device: nothing is read back."""
    eager = {arch: make(arch) for arch in set(p.arch)} if replays is None else {}
    losses, acc = [], None
    for j, (xb, yb, drop) in enumerate(inputs):
        if replays is None:
            loss, acc = eager[p.arch[j]](w, a, v, xb, yb, p.schedule[j], drop)
        else:
            loss, acc = replays.step(p.arch[j], xb, yb, p.schedule[j], drop)
        losses.append(loss)
    return torch.stack(losses), acc


class Replays:
    """Steps captured on static buffers (w, α, v): one :class:`torch.cuda.CUDAGraph` per (whether α adapts, input
    shapes), each captured from ``make(α adapts)``'s step on its first use. :meth:`prepare` captures what a task
    needs (its warm-up runs change the buffers), then :meth:`load` sets the buffers to the task's start values and
    :meth:`step` replays: the step's inputs and schedule row are copied into the graph's static inputs."""

    def __init__(self, make: Callable[[bool], Step], w: dict, a: dict, v: dict):
        self.make, self.w, self.a, self.v = make, w, a, v
        self.row = torch.ones(4, device=next(iter(w.values())).device)  # τ_α, τ_β, c_w, c_α of the step
        self.graphs: dict[tuple, tuple] = {}

    @staticmethod
    def _key(arch: bool, xb: torch.Tensor, yb: torch.Tensor, drop: dict[str, torch.Tensor]) -> tuple:
        return arch, tuple(xb.shape), xb.dtype, tuple(yb.shape), tuple((k, tuple(t.shape)) for k, t in drop.items())

    def prepare(self, arch: list[bool], inputs: Inputs) -> None:
        for a, (xb, yb, drop) in zip(arch, inputs):
            key = self._key(a, xb, yb, drop)
            if key in self.graphs:
                continue
            static = xb.clone(), yb.clone(), {k: t.clone() for k, t in drop.items()}
            step = self.make(a)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: cuDNN and cuBLAS choose their kernels and allocate
                for _ in range(3):
                    step(self.w, self.a, self.v, static[0], static[1], self.row, static[2])
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step(self.w, self.a, self.v, static[0], static[1], self.row, static[2])
            self.graphs[key] = (graph, *static, out)

    def load(self, w: dict, a: dict, v: dict) -> None:
        with torch.no_grad():
            for mine, theirs in ((self.w, w), (self.a, a), *((self.v[p], v[p]) for p in self.v)):
                for k, t in theirs.items():
                    mine[k].copy_(t)

    def step(self, arch: bool, xb: torch.Tensor, yb: torch.Tensor, row: torch.Tensor,
             drop: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        graph, sxb, syb, sdrop, (loss, acc) = self.graphs[self._key(arch, xb, yb, drop)]
        sxb.copy_(xb)
        syb.copy_(yb)
        for k, t in drop.items():
            sdrop[k].copy_(t)
        self.row.copy_(row)
        graph.replay()
        return loss.clone(), acc.clone()  # (the next replay of this graph overwrites its outputs)


_replays: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_failed: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # networks whose capture failed: eager from then on
last_failure: str | None = None  # the latest capture failure (benchmarks.cuda reports it)


def replays_for(net: nn.Module, key: tuple, build: Callable[[], Replays]) -> Replays:
    """The network's :class:`Replays` under ``key`` (what the captured step depends on), built on first use."""
    key = (key, getattr(net, "threshold", None), getattr(net, "prune_rule", None),
           getattr(net, "channels_last", None))
    per_net = _replays.setdefault(net, {})
    if key not in per_net:
        per_net[key] = build()
    return per_net[key]


def try_capture(net: nn.Module, capture: bool | None, get: Callable[[], Replays], arch: list[bool],
                inputs: Inputs) -> Replays | None:
    """The replays with every graph of ``inputs`` captured; None (eager steps) where ``capture`` is False, or None
    and the capture failed (now or before: said once). ``capture`` True raises the failure instead."""
    if capture is False or (capture is None and net in _failed):
        return None
    try:
        replays = get()
        replays.prepare(arch, inputs)
        return replays
    except Exception as e:  # noqa: BLE001 - whatever stops a capture, the eager steps compute the same
        if capture:
            raise
        global last_failure
        last_failure = f"{type(e).__name__}: {e}"
        _failed.add(net)
        _replays.pop(net, None)
        say_once(f"task.cuda_graph: capture failed ({type(e).__name__}: {e}); the inner steps run eagerly")
        return None


def shapes(state: State) -> tuple:
    return tuple((p, k, tuple(t.shape), t.dtype) for p, d in state.items() for k, t in d.items())


def adapt(net: nn.Module, params: State, x: torch.Tensor, y: torch.Tensor, cfg: TaskLearnerConfig,
          steps: int, learn_arch: bool = True, *, arch_steps: int | None = None, hold_tau: bool = False,
          batch_size: int | None = None, drop_path: float = 0.0, generator: torch.Generator | None = None,
          moments: Moments | None = None, capture: bool | None = None) -> tuple[State, dict[str, float]]:
    """:func:`~.inner_loop.adapt` (same arguments, same results to float tolerance), each step a CUDA-graph replay.

    ``capture`` None: replay on a CUDA device, ``inner_loop.adapt`` on others (said once in the log); where capture
    fails, the host-sync-free steps run eagerly (said once). False: those eager steps (what a graph holds: for
    tests). True: capture, or raise.

        >>> adapted, stats = graphed.adapt(net, state, task.x_train, task.y_train, cfg.task, steps=5)
    """
    if capture is None and x.device.type != "cuda":
        say_once(f"task.cuda_graph: no CUDA device ({x.device.type}): the inner steps run eagerly")
        return eager_adapt(net, params, x, y, cfg, steps, learn_arch, arch_steps=arch_steps, hold_tau=hold_tau,
                           batch_size=batch_size, drop_path=drop_path, generator=generator, moments=moments)
    if cfg.optimizer == "adam" and moments is None:
        moments = Moments.zeros(params)
    v_start = moments.v if cfg.optimizer == "adam" else {}
    size = cfg.batch_size if batch_size is None else batch_size
    p = plan(net, y, cfg, steps, learn_arch, arch_steps, hold_tau, size, drop_path, generator, moments,
             has_alphas=bool(params["alphas"]))
    inputs = [(x, y, d) if i is None else (x[i], y[i], d) for i, d in zip(p.index, p.drops)]

    def make(arch: bool) -> Step:
        return make_step(net, cfg, arch)

    def copies(state: dict, grad: bool) -> dict:
        return {k: t.detach().clone().requires_grad_(grad) for k, t in state.items()}

    def build() -> Replays:
        return Replays(make, copies(params["weights"], True), copies(params["alphas"], True),
                       {part: copies(d, False) for part, d in v_start.items()})

    with all_terms(net):
        replays = try_capture(net, capture, lambda: replays_for(net, ("task", cfg, shapes(params)), build),
                              p.arch, inputs)
        if replays is not None:
            replays.load(params["weights"], params["alphas"], v_start)
            w, a, v = replays.w, replays.a, replays.v
        else:
            w, a = copies(params["weights"], True), copies(params["alphas"], True)
            v = {part: copies(d, False) for part, d in v_start.items()}
        losses, acc = run_steps(make, w, a, v, inputs, p, replays)
    values = losses.tolist()  # the one read-back of the task
    _check_losses(values, x, cfg)
    if moments is not None:
        for part, d in v.items():
            for k, s in d.items():
                moments.v[part][k].copy_(s)
        moments.t.update(p.t_end)
    own = (lambda t: t.detach().clone()) if replays is not None else (lambda t: t.detach())  # (eager: fresh already)
    adapted = {"weights": {k: own(t) for k, t in w.items()}, "alphas": {k: own(t) for k, t in a.items()}}
    return adapted, {"loss": values[-1], "accuracy": float(acc)}


def run_task(net: nn.Module, params: State, task: "Task", cfg: TaskLearnerConfig, steps: int,
             learn_arch: bool = True, *, hold_tau: bool = False,
             moments: Moments | None = None) -> tuple[State, dict[str, float]]:
    """:func:`~.inner_loop.run_task` with the steps replayed (:func:`adapt`)."""
    return inner_loop.run_task(net, params, task, cfg, steps, learn_arch, hold_tau=hold_tau, moments=moments,
                               adapt_with=adapt)
