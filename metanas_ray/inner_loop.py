"""The task-learner Φ^k of MetaNAS: k first-order DARTS steps on one task's training data.

For j = 0 … k-1, with τ_j annealed from ``tau_*_start`` towards ``tau_*_end`` (soft-pruning):

    L_j   = CE(f(x_train; w_j, α_j, τ_j), y_train)
    w_j+1 = w_j − λ_task · ∇_w L_j
    α_j+1 = α_j − ξ_task · (∇_α L_j + δ_α · α_j)      (α here means all architecture tensors: α and β)

Both gradients come from the same loss on the same batch, at the current (w_j, α_j): one backward pass.
The network is evaluated with :func:`torch.func.functional_call` at parameters that are plain tensors,
so a task costs no copy of the model, only of the parameters it adapts. With ``task.bf16`` the forward and
backward passes run under ``torch.autocast(bfloat16)`` (convolutions and matmuls in bf16, e.g. on GPUs); the
parameters, their gradients, the loss and the updates stay float32.

Options that reproduce the official code (``tune_configs/omniglot_20way_1shot.yaml`` uses them):

* ``task.optimizer: adam`` replaces the two SGD steps by Adam with β1 = 0 (second moments v only), and
  ``task.adam_moments: kept`` carries v from task to task (:class:`Moments`) instead of starting every task at 0;
* ``task.alpha_weight_decay`` δ_α: the L2 term above (Adam's ``weight_decay`` in the official code);
* ``task.batch_sampling: random``: each step trains on ``batch_size`` images drawn with replacement from D_train;
* ``task.drop_path`` p: drop-path in meta-training tasks (each network's ``drop_path_masks``);
* ``arch_steps`` (Algorithm 3 as the official meta-test runs it): α and τ adapt during the first ``arch_steps``
  steps only, then w alone at the final τ; ``hold_tau`` keeps τ at its start (the official warm-up).

The randomness of a task (its minibatches and drop-path masks) comes from the task's own generator
(:meth:`~.data.Task.generator`), so a task's result does not depend on the worker that runs it.
"""
from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .config import TaskLearnerConfig
from .genotype import hard_mixture
from .search_space import mixture
from .state import State, clone

if TYPE_CHECKING:
    from .config import Config
    from .data import Task


_BETA2, _EPS = 0.999, 1e-8


class NonFiniteLossError(FloatingPointError):
    """The task-learner's loss became NaN or infinite."""


@dataclass(frozen=True)
class Temperature:
    """τ_α and τ_β at an inner step: annealed from start to end over ``steps`` steps."""

    alpha_start: float
    alpha_end: float
    beta_start: float
    beta_end: float
    schedule: str = "exponential"

    @classmethod
    def from_config(cls, cfg: TaskLearnerConfig) -> "Temperature":
        return cls(cfg.tau_alpha_start, cfg.tau_alpha_end, cfg.tau_beta_start, cfg.tau_beta_end, cfg.tau_schedule)

    @staticmethod
    def _anneal(start: float, end: float, frac: float, schedule: str) -> float:
        if schedule == "constant":
            return start
        if schedule == "linear":
            return start + (end - start) * frac
        return start * (end / start) ** frac

    def at(self, step: int, steps: int) -> tuple[float, float]:
        frac = step / (steps - 1) if steps > 1 else 1.0
        return (self._anneal(self.alpha_start, self.alpha_end, frac, self.schedule),
                self._anneal(self.beta_start, self.beta_end, frac, self.schedule))

    @property
    def final(self) -> tuple[float, float]:
        return (self.alpha_end if self.schedule != "constant" else self.alpha_start,
                self.beta_end if self.schedule != "constant" else self.beta_start)

    @property
    def start(self) -> tuple[float, float]:
        return self.alpha_start, self.beta_start

    def schedule_for(self, steps: int, arch_steps: int | None = None,
                     hold: bool = False) -> tuple[list[tuple[float, float]], tuple[float, float]]:
        """(τ at each of ``steps`` steps, τ of the query): annealed over the first ``arch_steps`` steps (None:
        all) and final after them; held at the start values with ``hold`` or ``arch_steps == 0``."""
        n = steps if arch_steps is None else arch_steps
        if hold or n == 0:
            return [self.start] * steps, self.start
        return [self.at(min(j, n - 1), n) for j in range(steps)], self.final


@dataclass
class Moments:
    """The task-learner's Adam state: second moments ``v`` (β1 = 0, so no first moments) shaped like the
    state, and the step count ``t`` of each part (w and α step separately, as two optimizers do).

    With ``task.adam_moments: kept`` every task of a meta-batch starts from the same moments and the next
    meta-batch from their mean over its tasks. (The official code carries one Adam state through its tasks one
    after another; the mean over a meta-batch is what that becomes when the tasks run side by side, and it keeps
    the result independent of the number of workers.)"""

    v: State
    t: dict[str, int]

    @staticmethod
    def zeros(params: State) -> "Moments":
        return Moments({p: {k: torch.zeros_like(v) for k, v in d.items()} for p, d in params.items()},
                       {p: 0 for p in params})

    def copy(self, device: torch.device | str | None = None) -> "Moments":
        return Moments(clone(self.v, device), dict(self.t))

    def advanced(self, mean_v: State, steps: int, learned_arch: bool) -> "Moments":
        """The next meta-batch's moments: ``mean_v``, the mean over this meta-batch's tasks, with the step counts
        advanced by ``steps`` (its tasks' steps, as one optimizer stepping through them would count; α's only
        when it was learned)."""
        return Moments(clone(mean_v),
                       {p: n + (steps if p == "weights" or learned_arch else 0) for p, n in self.t.items()})

    def state_dict(self) -> dict:
        return {"v": self.copy("cpu").v, "t": dict(self.t)}

    @staticmethod
    def from_state_dict(d: dict, device: torch.device | str = "cpu") -> "Moments":
        return Moments(d["v"], {p: int(n) for p, n in d["t"].items()}).copy(device)

    @staticmethod
    def of_checkpoint(payload: dict, device: torch.device | str = "cpu") -> "Moments | None":
        """The meta-learned moments a checkpoint carries (``task.adam_moments: kept``), or None."""
        d = payload.get("task_optimizer")
        return Moments.from_state_dict(d, device) if d is not None else None


def mixture_of(net: nn.Module, params: State, tau: tuple[float, float], hard: bool = False) -> dict[str, torch.Tensor]:
    """The supernet's mixture weights at ``params``' α, β and ``tau`` (soft-pruned as the network says, or hard-pruned
    to the derived genotype); {} for a network without α (Conv4)."""
    if not params["alphas"]:
        return {}
    nodes = getattr(net, "nodes", 0)
    if hard:
        return hard_mixture(params["alphas"], net.ops, nodes, tau)
    return mixture(params["alphas"], tau[0], tau[1], nodes, getattr(net, "prune_rule", "product"),
                   getattr(net, "threshold", 0.0))


def forward(net: nn.Module, params: State, x: torch.Tensor, tau: tuple[float, float] = (1.0, 1.0),
            hard: bool = False, bf16: bool = False, drop: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Float32 logits ``[B, N]`` of the network at ``params`` on images ``x`` ``[B, C, H, W]``
    (computed under bfloat16 autocast with ``bf16``; ``drop``: drop-path masks of the supernet's cells)."""
    if getattr(net, "channels_last", False):
        x = x.contiguous(memory_format=torch.channels_last)
    mix = mixture_of(net, params, tau, hard)
    if drop:
        mix = {**mix, **drop}
    # (no weight-cast cache: each weight is cast once per forward anyway, and a CUDA graph cannot capture one)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, cache_enabled=False) if bf16 else nullcontext():
        logits = functional_call(net, params["weights"], (x, mix))
    return logits.float()


def _clip_(grads: list[torch.Tensor], max_norm: float) -> None:
    if max_norm > 0 and grads:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, scale)


def _batches(y: torch.Tensor, size: int) -> list[torch.Tensor] | None:
    """Minibatches of ``size`` that cycle through D_train class-balanced (shot-major order), or None for all."""
    if size <= 0 or size >= len(y):
        return None
    n_way = int(y.max()) + 1
    order = torch.arange(len(y)).view(n_way, -1).t().reshape(-1)  # shot 0 of every class, then shot 1, ...
    return [order[i:i + size] for i in range(0, len(order), size)]


def _batch(y: torch.Tensor, step: int, size: int, sampling: str, batches: list[torch.Tensor] | None,
           generator: torch.Generator | None) -> torch.Tensor | None:
    """The indices of step ``step``'s minibatch (None: all of D_train)."""
    if sampling == "random" and 0 < size != len(y):  # with replacement, as torch's RandomSampler in the official
        if generator is None:
            raise ValueError("task.batch_sampling: random needs the task's generator")
        return torch.randint(len(y), (size,), generator=generator).to(y.device)
    return None if batches is None else batches[step % len(batches)]


def adapt(net: nn.Module, params: State, x: torch.Tensor, y: torch.Tensor, cfg: TaskLearnerConfig,
          steps: int, learn_arch: bool = True, *, arch_steps: int | None = None, hold_tau: bool = False,
          batch_size: int | None = None, drop_path: float = 0.0, generator: torch.Generator | None = None,
          moments: Moments | None = None) -> tuple[State, dict[str, float]]:
    """Φ^k: ``steps`` first-order DARTS steps from ``params`` on (x ``[B, C, H, W]``, y ``[B]``).

    Returns the adapted (w*, α*) as a new state (``params`` is not modified) and the last step's training loss
    and accuracy. α adapts in the first ``arch_steps`` steps (None: all; ``learn_arch=False``: none, the meta
    warm-up), τ follows :meth:`Temperature.schedule_for`. ``batch_size`` overrides ``cfg.batch_size``;
    ``drop_path`` > 0 draws drop-path masks from ``generator``, which also draws random minibatches. With Adam,
    ``moments`` is the state to start from and is updated in place (None: fresh zeros, discarded).

        >>> adapted, stats = adapt(net, state, task.x_train, task.y_train, cfg.task, steps=5)
    """
    w = {k: v.detach().clone().requires_grad_(True) for k, v in params["weights"].items()}
    a = {k: v.detach().clone().requires_grad_(learn_arch) for k, v in params["alphas"].items()}
    taus, _ = Temperature.from_config(cfg).schedule_for(steps, arch_steps, hold_tau)
    size = cfg.batch_size if batch_size is None else batch_size
    batches = _batches(y, size)
    if drop_path > 0 and generator is None:
        raise ValueError("drop-path needs the task's generator")
    if cfg.optimizer == "adam" and moments is None:
        moments = Moments.zeros(params)
    loss = acc = None
    losses = torch.empty(steps, device=x.device)
    for step in range(steps):
        batch = _batch(y, step, size, cfg.batch_sampling, batches, generator)
        xb, yb = (x, y) if batch is None else (x[batch], y[batch])
        arch = learn_arch and (arch_steps is None or step < arch_steps)
        w_list, a_list = list(w.values()), list(a.values()) if arch else []
        # each network draws masks of its own shape (the supernet's per operation, the found network's per edge)
        drop = net.drop_path_masks(len(yb), drop_path, generator, x.device) if drop_path > 0 else None
        logits = forward(net, {"weights": w, "alphas": a}, xb, taus[step], bf16=cfg.bf16, drop=drop)
        loss = F.cross_entropy(logits, yb)
        losses[step] = loss.detach()  # read once, after the last step: no host synchronisation per step
        # soft-pruned terms leave some weights out of the graph: their gradient is zero
        grads = list(torch.autograd.grad(loss, w_list + a_list, allow_unused=True, materialize_grads=True))
        g_w, g_a = grads[:len(w_list)], grads[len(w_list):]
        _clip_(g_w, cfg.grad_clip)
        _clip_(g_a, cfg.grad_clip)
        with torch.no_grad():
            if a_list and cfg.alpha_weight_decay > 0:  # L2 on α, β (Adam's weight_decay, as the official code)
                torch._foreach_add_(g_a, a_list, alpha=cfg.alpha_weight_decay)
            if cfg.weight_decay > 0:  # L2 on w, likewise
                torch._foreach_add_(g_w, w_list, alpha=cfg.weight_decay)
            if cfg.optimizer == "adam":  # Adam with β1 = 0, as in REPTILE and the official MetaNAS code
                g_w = _adam_direction(moments, "weights", list(w), g_w)
                if a_list:
                    g_a = _adam_direction(moments, "alphas", list(a), g_a)
            torch._foreach_add_(w_list, g_w, alpha=-cfg.lr_w)
            if a_list:
                torch._foreach_add_(a_list, g_a, alpha=-cfg.lr_alpha)
        acc = (logits.detach().argmax(-1) == yb).float().mean()
    _check_losses(losses.tolist(), x, cfg)
    adapted = {"weights": {k: v.detach() for k, v in w.items()}, "alphas": {k: v.detach() for k, v in a.items()}}
    return adapted, {"loss": float(loss.detach()), "accuracy": float(acc)}


def _check_losses(values: list[float], x: torch.Tensor, cfg: TaskLearnerConfig) -> None:
    """After a task's inner steps, their training losses in order: the first non-finite one is an error naming
    its cause (the images, the meta-parameters before step 0, or λ_task / ξ_task); a loss that grew 100-fold
    within the task warns once. Checked once per task, so that a step needs no host synchronisation (a GPU runs
    ahead); a task whose loss turned non-finite computes its remaining steps on NaN first, and is then refused."""
    for step, value in enumerate(values):
        if not math.isfinite(value):
            if step == 0 and not torch.isfinite(x).all():
                raise NonFiniteLossError(f"the task's images hold NaN or infinite values (loss {value})")
            if step == 0:  # no inner update yet: the meta-parameters it started from are the cause
                raise NonFiniteLossError(
                    f"the task-learner's loss is {value} before its first step: the meta-parameters blew up; "
                    f"lower meta.lr_w or meta.lr_alpha")
            raise NonFiniteLossError(
                f"the task-learner's loss became {value} at inner step {step}; "
                f"lower task.lr_w (λ_task={cfg.lr_w}) or task.lr_alpha (ξ_task={cfg.lr_alpha})")
    first = values[0] if values else 0.0
    for step, value in enumerate(values[1:], 1):
        if value > 100 * max(first, 1e-3):
            _warn_diverging(f"the task-learner's loss grew from {first:.3g} to {value:.3g} within one task (inner "
                            f"step {step}): it diverges; lower task.lr_w (λ_task={cfg.lr_w})")
            break


_warned: set[str] = set()


def log_once(key: str, message: str, level: int = logging.WARNING, logger: str = __name__) -> None:
    """Log ``message`` the first time ``key`` is seen in this process (a state that would repeat every task)."""
    if key not in _warned:
        _warned.add(key)
        logging.getLogger(logger).log(level, message)


def _warn_diverging(message: str) -> None:
    """Log a diverging task-learner once per process (it would repeat for every task)."""
    log_once("diverging", message)


def _adam_direction(moments: Moments, part: str, names: list[str], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """g / (√(v / (1 − β2^t)) + ε) after v ← β2·v + (1 − β2)·g², in place on ``moments`` (β1 = 0)."""
    sq = [moments.v[part][k] for k in names]
    moments.t[part] += 1
    torch._foreach_mul_(sq, _BETA2)
    torch._foreach_addcmul_(sq, grads, grads, value=1 - _BETA2)
    denom = torch._foreach_sqrt(torch._foreach_div(sq, 1 - _BETA2 ** moments.t[part]))
    torch._foreach_add_(denom, _EPS)
    return torch._foreach_div(grads, denom)


@torch.no_grad()
def accuracy(net: nn.Module, params: State, x: torch.Tensor, y: torch.Tensor, tau: tuple[float, float],
             hard: bool = False, bf16: bool = False) -> tuple[float, float]:
    """(accuracy, loss) of the network at ``params`` on a query set."""
    logits = forward(net, params, x, tau, hard, bf16)
    return float((logits.argmax(-1) == y).float().mean()), float(F.cross_entropy(logits, y))


def query_gradient(net: nn.Module, params: State, x: torch.Tensor, y: torch.Tensor,
                   tau: tuple[float, float]) -> State:
    """∇ of the query loss at the adapted parameters: first-order MAML's meta-gradient for one task."""
    p = {part: {k: v.detach().requires_grad_(True) for k, v in d.items()} for part, d in params.items()}
    loss = F.cross_entropy(forward(net, p, x, tau), y)
    flat = [v for d in p.values() for v in d.values()]
    grads = iter(torch.autograd.grad(loss, flat, allow_unused=True, materialize_grads=True))
    return {part: {k: next(grads) for k in d} for part, d in p.items()}


def run_task(net: nn.Module, params: State, task: "Task", cfg: TaskLearnerConfig, steps: int,
             learn_arch: bool = True, *, hold_tau: bool = False, moments: Moments | None = None,
             adapt_with=None) -> tuple[State, dict[str, float]]:
    """A meta-training task: adapt on its training data (with ``task.drop_path``, from its own generator) and
    measure the adapted model on its query data. ``adapt_with``: another :func:`adapt` (``graphed.adapt``)."""
    adapted, stats = (adapt_with or adapt)(net, params, task.x_train, task.y_train, cfg, steps, learn_arch,
                                           hold_tau=hold_tau, drop_path=cfg.drop_path, generator=task.generator(),
                                           moments=moments)
    _, tau = Temperature.from_config(cfg).schedule_for(steps, None, hold_tau)
    stats["query_accuracy"], stats["query_loss"] = accuracy(net, adapted, task.x_query, task.y_query, tau,
                                                                bf16=cfg.bf16)
    return adapted, stats


def eval_task_config(cfg: "Config") -> TaskLearnerConfig:
    """The task-learner of meta-validation and meta-test: ``task.*`` with ``eval.tau_end`` and ``eval.batch_size``
    in place of the training values where they are set."""
    t, e = cfg.task, cfg.eval
    if e.tau_end > 0:
        t = replace(t, tau_alpha_end=e.tau_end, tau_beta_end=e.tau_end)
    if e.batch_size > 0:
        t = replace(t, batch_size=e.batch_size)
    return t
