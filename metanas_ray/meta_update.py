"""The meta-learner: REPTILE or first-order MAML on (w_meta, α_meta), applied once per meta-batch.

Each task of a meta-batch contributes one state-shaped tensor dict (:meth:`MetaLearner.contribution`):
REPTILE the adapted parameters (w*, α*), first-order MAML the query-loss gradient at (w*, α*). The
contributions are averaged over the whole meta-batch (summed across workers, divided by the batch size)
and :meth:`MetaLearner.step` applies the update:

    REPTILE:  w_meta ← w_meta + ε_w · (mean w* − w_meta)        α_meta likewise with ε_α
    FOMAML:   w_meta ← w_meta − ε_w · mean ∇_w L_query(w*)       α_meta likewise with ε_α

with plain SGD (REPTILE is then computed as ``lerp``, so ε = 1 lands exactly on the mean) or Adam on those
directions. ε decays linearly to 0 over the run when ``anneal: linear``; during the first ``warmup_steps``
meta-steps only w is meta-learned and α_meta stays as it is.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import MetaConfig
from .inner_loop import query_gradient
from .state import State


class MetaLearner:
    def __init__(self, cfg: MetaConfig, total_steps: int):
        self.cfg = cfg
        self.total_steps = total_steps
        self.optimizer = cfg.optimizer
        self.adam: dict[str, object] = {"t": 0, "m": {}, "v": {}}

    def learning_rates(self, step: int) -> tuple[float, float]:
        """(ε_w, ε_α) at meta-step ``step`` (0-based); ε_α is 0 during warm-up."""
        decay = 1.0 - step / self.total_steps if self.cfg.anneal == "linear" else 1.0
        lr_alpha = 0.0 if step < self.cfg.warmup_steps else self.cfg.lr_alpha * decay
        return self.cfg.lr_w * decay, lr_alpha

    def learns_architecture(self, step: int) -> bool:
        return step >= self.cfg.warmup_steps

    def contribution(self, net: nn.Module, adapted: State, x_query: torch.Tensor, y_query: torch.Tensor,
                     tau: tuple[float, float]) -> State:
        """What one task adds to the meta-batch sum: w*, α* (REPTILE) or ∇L_query(w*, α*) (FOMAML)."""
        if self.cfg.algorithm == "reptile":
            return adapted
        return query_gradient(net, adapted, x_query, y_query, tau)

    @torch.no_grad()
    def step(self, meta: State, mean: State, step: int) -> None:
        """Apply one meta-update to ``meta`` in place, from the meta-batch mean of the contributions."""
        lrs = dict(zip(("weights", "alphas"), self.learning_rates(step)))
        reptile = self.cfg.algorithm == "reptile"
        if self.optimizer == "adam":
            self.adam["t"] = int(self.adam["t"]) + 1
        for part in ("weights", "alphas"):
            lr = lrs[part]
            for k, p in meta[part].items():
                if lr == 0.0:
                    continue
                if self.optimizer == "sgd":
                    if reptile:
                        p.lerp_(mean[part][k].to(p.dtype), lr)
                    else:
                        p.add_(mean[part][k], alpha=-lr)
                else:
                    grad = p - mean[part][k] if reptile else mean[part][k]
                    self._adam(f"{part}/{k}", p, grad, lr)

    def _adam(self, name: str, p: torch.Tensor, grad: torch.Tensor, lr: float,
              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        m = self.adam["m"].setdefault(name, torch.zeros_like(p))
        v = self.adam["v"].setdefault(name, torch.zeros_like(p))
        t = int(self.adam["t"])
        m.lerp_(grad, 1 - betas[0])
        v.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
        m_hat = m / (1 - betas[0] ** t)
        v_hat = v / (1 - betas[1] ** t)
        p.addcdiv_(m_hat, v_hat.sqrt().add_(eps), value=-lr)

    def state_dict(self) -> dict:
        """A snapshot on the CPU: a checkpoint holds copies of Adam's moments, not the live (GPU) tensors."""
        return {"t": int(self.adam["t"]),
                **{key: {k: v.detach().to("cpu", copy=True) for k, v in self.adam[key].items()} for key in "mv"}}

    def load_state_dict(self, d: dict, device: str | torch.device = "cpu") -> None:
        """Restore from :meth:`state_dict` onto ``device``, the meta-parameters' device."""
        self.adam = {"t": int(d["t"]), **{key: {k: v.to(device) for k, v in d[key].items()} for key in "mv"}}
