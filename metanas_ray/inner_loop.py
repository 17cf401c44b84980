"""The task-learner Φ^k of MetaNAS: k first-order DARTS steps on one task's training data.

For j = 0 … k-1, with τ_j annealed from ``tau_*_start`` towards ``tau_*_end`` (soft-pruning):

    L_j   = CE(f(x_train; w_j, α_j, τ_j), y_train)
    w_j+1 = w_j − λ_task · ∇_w L_j
    α_j+1 = α_j − ξ_task · ∇_α L_j          (α here means all architecture tensors: α and β)

Both gradients come from the same loss on the same batch, at the current (w_j, α_j): one backward pass.
The network is evaluated with :func:`torch.func.functional_call` at parameters that are plain tensors,
so a task costs no copy of the model, only of the parameters it adapts. With ``task.bf16`` the forward and
backward passes run under ``torch.autocast(bfloat16)`` (convolutions and matmuls in bf16, e.g. on GPUs); the
parameters, their gradients, the loss and the updates stay float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .config import TaskLearnerConfig
from .genotype import hard_mixture
from .search_space import mixture
from .state import State

if TYPE_CHECKING:
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


def forward(net: nn.Module, params: State, x: torch.Tensor, tau: tuple[float, float] = (1.0, 1.0),
            hard: bool = False, bf16: bool = False) -> torch.Tensor:
    """Float32 logits ``[B, N]`` of the network at ``params`` on images ``x`` ``[B, C, H, W]``
    (computed under bfloat16 autocast with ``bf16``)."""
    nodes = getattr(net, "nodes", 0)
    if getattr(net, "channels_last", False):
        x = x.contiguous(memory_format=torch.channels_last)
    if not params["alphas"]:
        mix = {}
    elif hard:
        mix = hard_mixture(params["alphas"], net.ops, nodes, tau)
    else:
        mix = mixture(params["alphas"], tau[0], tau[1], nodes)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
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


def adapt(net: nn.Module, params: State, x: torch.Tensor, y: torch.Tensor, cfg: TaskLearnerConfig,
          steps: int, learn_arch: bool = True) -> tuple[State, dict[str, float]]:
    """Φ^k: ``steps`` first-order DARTS steps from ``params`` on (x ``[B, C, H, W]``, y ``[B]``).

    Returns the adapted (w*, α*) as a new state (``params`` is not modified) and the last step's
    training loss and accuracy. With ``learn_arch=False`` (meta warm-up) α stays fixed.
    """
    w = {k: v.detach().clone().requires_grad_(True) for k, v in params["weights"].items()}
    a = {k: v.detach().clone().requires_grad_(learn_arch) for k, v in params["alphas"].items()}
    w_list, a_list = list(w.values()), list(a.values()) if learn_arch else []
    temperature = Temperature.from_config(cfg)
    loss = acc = None
    sq: list[torch.Tensor] = []  # Adam's second moments, per task
    batches = _batches(y, cfg.batch_size)
    for step in range(steps):
        batch = None if batches is None else batches[step % len(batches)]
        xb, yb = (x, y) if batch is None else (x[batch], y[batch])
        logits = forward(net, {"weights": w, "alphas": a}, xb, temperature.at(step, steps), bf16=cfg.bf16)
        loss = F.cross_entropy(logits, yb)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the task-learner's loss became {loss.item()} at inner step {step}; "
                f"lower task.lr_w (λ_task={cfg.lr_w}) or task.lr_alpha (ξ_task={cfg.lr_alpha})")
        # soft-pruned terms leave some weights out of the graph: their gradient is zero
        grads = list(torch.autograd.grad(loss, w_list + a_list, allow_unused=True, materialize_grads=True))
        _clip_(grads[:len(w_list)], cfg.grad_clip)
        _clip_(grads[len(w_list):], cfg.grad_clip)
        with torch.no_grad():
            if cfg.optimizer == "adam":  # Adam with β1 = 0, as in REPTILE and the official MetaNAS code
                if not sq:
                    sq = [torch.zeros_like(g) for g in grads]
                torch._foreach_mul_(sq, _BETA2)
                torch._foreach_addcmul_(sq, grads, grads, value=1 - _BETA2)
                denom = torch._foreach_sqrt(torch._foreach_div(sq, 1 - _BETA2 ** (step + 1)))
                torch._foreach_add_(denom, _EPS)
                grads = torch._foreach_div(grads, denom)
            torch._foreach_add_(w_list, grads[:len(w_list)], alpha=-cfg.lr_w)
            if a_list:
                torch._foreach_add_(a_list, grads[len(w_list):], alpha=-cfg.lr_alpha)
        acc = (logits.detach().argmax(-1) == yb).float().mean()
    adapted = {"weights": {k: v.detach() for k, v in w.items()}, "alphas": {k: v.detach() for k, v in a.items()}}
    return adapted, {"loss": float(loss.detach()), "accuracy": float(acc)}


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
             learn_arch: bool = True) -> tuple[State, dict[str, float]]:
    """Adapt on the task's training data and measure the adapted model on its query data."""
    adapted, stats = adapt(net, params, task.x_train, task.y_train, cfg, steps, learn_arch)
    tau = Temperature.from_config(cfg).final
    stats["query_accuracy"], stats["query_loss"] = accuracy(net, adapted, task.x_query, task.y_query, tau,
                                                                bf16=cfg.bf16)
    return adapted, stats

