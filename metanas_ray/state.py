"""Model state as data: ``{"weights": {name: tensor}, "alphas": {name: tensor}}``.

The network module only supplies the forward computation; the parameters it is evaluated at travel as
plain dicts of tensors between the driver, the workers, the meta-learner and the checkpoints. For the
conv4 baseline ``alphas`` is empty.
"""
from __future__ import annotations

import torch
from torch import nn

from .baseline import Conv4
from .config import Config
from .search_space import SearchNetwork, init_alphas

State = dict[str, dict[str, torch.Tensor]]


def build_network(cfg: Config, in_channels: int) -> nn.Module:
    """The forward computation for ``cfg.model.kind`` with an N-way (``cfg.data.n_way``) classifier."""
    m = cfg.model
    if m.kind == "conv4":
        net = Conv4(in_channels, cfg.data.n_way, m.conv4_channels, cfg.data.image_size)
    elif m.kind == "genotype":
        from .genotype_net import GenotypeNetwork, load_genotype
        net = GenotypeNetwork(m, load_genotype(m.genotype), in_channels, cfg.data.n_way)
    else:
        net = SearchNetwork(m, in_channels, cfg.data.n_way)
    net.channels_last = m.channels_last  # forward() then feeds NHWC images
    return net


def init_state(cfg: Config, net: nn.Module) -> State:
    """Initial (w_meta, α_meta), a function of ``cfg.run.seed`` only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        for module in net.modules():
            if hasattr(module, "reset_parameters") and module is not net:
                module.reset_parameters()
        weights = in_layout({k: v.detach().clone() for k, v in net.named_parameters()}, cfg.model.channels_last)
    g = torch.Generator().manual_seed(cfg.run.seed + 1)
    alphas = init_alphas(cfg.model, g) if cfg.model.kind == "supernet" else {}
    return {"weights": weights, "alphas": alphas}


def keys(state: State) -> list[tuple[str, str]]:
    return [(part, k) for part in ("weights", "alphas") for k in state[part]]


def flatten(state: State) -> torch.Tensor:
    """All tensors of ``state`` in a fixed order as one 1-D vector (for one collective per meta-step)."""
    return torch.cat([state[p][k].reshape(-1) for p, k in keys(state)])


def unflatten(vector: torch.Tensor, like: State) -> State:
    out: State = {"weights": {}, "alphas": {}}
    offset = 0
    for p, k in keys(like):
        n = like[p][k].numel()
        out[p][k] = vector[offset:offset + n].view_as(like[p][k])
        offset += n
    return out


def clone(state: State, device: torch.device | str | None = None) -> State:
    """A detached copy of ``state`` on ``device`` (default: each tensor's own), one copy per tensor."""
    return {p: {k: v.detach().to(device or v.device, copy=True) for k, v in d.items()} for p, d in state.items()}


def in_layout(tensors: dict[str, torch.Tensor], channels_last: bool) -> dict[str, torch.Tensor]:
    """``tensors``, contiguous, their 4-D (convolution) weights NHWC when ``channels_last``: oneDNN's fast path on
    the CPU (measured: >10×)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {k: v.contiguous(memory_format=fmt if v.dim() == 4 else torch.contiguous_format)
            for k, v in tensors.items()}


def place(net: nn.Module, state: State, device: torch.device | str) -> State:
    """Move ``net`` to ``device``; return a copy of ``state`` there, its conv weights in the network's layout.

    NHWC (``model.channels_last``) is for the CPU, where oneDNN's NHWC kernels are the fast ones. On a GPU the
    network runs NCHW: a task there is bound by launching its ~32,000 kernels, not by their arithmetic (kernel
    time 18% of the wall time on an H100, ``python -m benchmarks.cuda``), so the layout buys nothing, and NCHW
    is the layout whose gradients and task-learner updates matched the CPU's on an H100 (within 7.5e-6 and 1.2e-4
    relative, in one diagnostic run; ``tests/test_cuda.py`` checks them wherever a GPU is present)."""
    device = torch.device(device)
    net.to(device)
    if device.type != "cpu":
        net.channels_last = False
    channels_last = getattr(net, "channels_last", False)
    return {p: in_layout(d, channels_last) for p, d in clone(state, device).items()}


def count(state: State, part: str = "weights") -> int:
    return sum(v.numel() for v in state[part].values())
