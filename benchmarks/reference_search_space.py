"""The per-edge MetaNAS supernet, as it was before the per-source restructuring: the reference.

A frozen copy of ``metanas_ray/search_space.py`` and ``metanas_ray/ops.py`` (each edge × operation a separate
module), kept to prove the fast supernet computes the same function (``tests/test_search_space_fast.py``) and
to time the speed-up (``benchmarks/inner_loop.py``). :func:`to_fast` maps its parameters onto the fast layout.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from metanas_ray.config import ModelConfig


def bn(channels: int, affine: bool = False) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, affine=affine, track_running_stats=False)


class ReLUConvBN(nn.Sequential):
    """ReLU → Conv(kernel, stride, padding) → BN."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int):
        super().__init__(nn.ReLU(), nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False), bn(c_out))


class FacConv(nn.Sequential):
    """conv_1x5_5x1: ReLU → Conv(1×k) → Conv(k×1) → BN (a factorised k×k convolution)."""

    def __init__(self, c: int, kernel: int, stride: int):
        pad = kernel // 2
        super().__init__(
            nn.ReLU(),
            nn.Conv2d(c, c, (1, kernel), (1, stride), (0, pad), bias=False),
            nn.Conv2d(c, c, (kernel, 1), (stride, 1), (pad, 0), bias=False),
            bn(c),
        )


class DilConv(nn.Sequential):
    """ReLU → depthwise k×k (dilated) conv → pointwise 1×1 conv → BN."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, dilation: int):
        super().__init__(
            nn.ReLU(),
            nn.Conv2d(c_in, c_in, kernel, stride, padding, dilation=dilation, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            bn(c_out),
        )


class SepConv(nn.Sequential):
    """Two stacked DilConv(dilation=1): the DARTS separable convolution."""

    def __init__(self, c: int, kernel: int, stride: int, padding: int):
        super().__init__(DilConv(c, c, kernel, stride, padding, 1), DilConv(c, c, kernel, 1, padding, 1))


class PoolBN(nn.Sequential):
    def __init__(self, kind: str, c: int, stride: int):
        pool = (nn.MaxPool2d(3, stride, 1) if kind == "max"
                else nn.AvgPool2d(3, stride, 1, count_include_pad=False))
        super().__init__(pool, bn(c))


class FactorizedReduce(nn.Module):
    """Halve H and W with two offset 1×1 stride-2 convolutions (each c_out/2 channels), then BN."""

    def __init__(self, c_in: int, c_out: int, affine: bool = False):
        super().__init__()
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out // 2, 1, 2, bias=False)
        self.conv2 = nn.Conv2d(c_in, c_out - c_out // 2, 1, 2, bias=False)
        self.bn = bn(c_out, affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        shifted = nn.functional.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]  # same size as x, offset by one pixel
        return self.bn(torch.cat([self.conv1(x), self.conv2(shifted)], dim=1))


class Zero(nn.Module):
    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x if self.stride == 1 else x[:, :, :: self.stride, :: self.stride]) * 0.0


OPS: dict[str, Callable[[int, int], nn.Module]] = {
    "none": lambda c, s: Zero(s),
    "max_pool_3x3": lambda c, s: PoolBN("max", c, s),
    "avg_pool_3x3": lambda c, s: PoolBN("avg", c, s),
    "skip_connect": lambda c, s: nn.Identity() if s == 1 else FactorizedReduce(c, c),
    "conv_1x5_5x1": lambda c, s: FacConv(c, 5, s),
    "conv_3x3": lambda c, s: DilConv(c, c, 3, s, 1, 1),  # MetaNAS's conv_3x3 is depthwise-separable
    "sep_conv_3x3": lambda c, s: SepConv(c, 3, s, 1),
    "sep_conv_5x5": lambda c, s: SepConv(c, 5, s, 2),
    "dil_conv_3x3": lambda c, s: DilConv(c, c, 3, s, 2, 2),
    "dil_conv_5x5": lambda c, s: DilConv(c, c, 5, s, 4, 2),
}



def edges(nodes: int) -> list[tuple[int, int]]:
    """(node j, source i) for every edge, node-major; sources 0, 1 are the cell inputs, 2 + m is node m."""
    return [(j, i) for j in range(nodes) for i in range(j + 2)]


class SearchCell(nn.Module):
    def __init__(self, nodes: int, c_pp: int, c_p: int, c: int, reduction_p: bool, reduction: bool,
                 ops: tuple[str, ...]):
        super().__init__()
        self.reduction = reduction
        self.nodes = nodes
        self.preproc0 = FactorizedReduce(c_pp, c) if reduction_p else ReLUConvBN(c_pp, c, 1, 1, 0)
        self.preproc1 = ReLUConvBN(c_p, c, 1, 1, 0)
        self.edge_list = edges(nodes)
        self.edge_ops = nn.ModuleList(
            nn.ModuleList(OPS[name](c, 2 if reduction and i < 2 else 1) for name in ops)
            for _, i in self.edge_list
        )

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor,
                threshold: float = 0.0) -> torch.Tensor:
        """``weights``: ``[E, O]`` combined edge weights; terms with weight <= threshold are skipped."""
        states = [self.preproc0(s0), self.preproc1(s1)]
        active = (weights > threshold).tolist()
        e = 0
        for j in range(self.nodes):
            node_edges = range(e, e + j + 2)
            if not any(any(active[k]) for k in node_edges):  # all pruned: keep the strongest term
                flat = int(weights[e:e + j + 2].argmax())
                active[e + flat // weights.shape[1]][flat % weights.shape[1]] = True
            node = None
            for k, i in zip(node_edges, range(j + 2)):
                for o, op in enumerate(self.edge_ops[k]):
                    if active[k][o]:
                        term = weights[k, o] * op(states[i])
                        node = term if node is None else node + term
            e += j + 2
            states.append(node)
        return torch.cat(states[2:], dim=1)


class SearchNetwork(nn.Module):
    """Stem → cells (reduction at ``reduction_layers``) → global average pool → linear classifier."""

    def __init__(self, cfg: ModelConfig, in_channels: int, n_classes: int):
        super().__init__()
        c = cfg.init_channels
        c_stem = cfg.stem_multiplier * c
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c_stem, 3, 1, 1, bias=False), bn(c_stem, affine=True))
        self.threshold = cfg.prune_threshold
        self.nodes = cfg.nodes
        self.ops = cfg.ops
        self.cells = nn.ModuleList()
        c_pp, c_p, c_cur = c_stem, c_stem, c
        reduction_p = False
        for layer in range(cfg.layers):
            reduction = layer in cfg.reduction_layers
            if reduction:
                c_cur *= cfg.channel_scale
            self.cells.append(SearchCell(cfg.nodes, c_pp, c_p, c_cur, reduction_p, reduction, cfg.ops))
            reduction_p = reduction
            c_pp, c_p = c_p, c_cur * cfg.nodes
        self.classifier = nn.Linear(c_p, n_classes)

    def forward(self, x: torch.Tensor, mix: dict[str, torch.Tensor]) -> torch.Tensor:
        """``x``: ``[B, C, H, W]``; ``mix``: ``{"normal": [E, O], "reduce": [E, O]}`` → logits ``[B, n_classes]``."""
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, mix["reduce" if cell.reduction else "normal"], self.threshold)
        return self.classifier(s1.mean(dim=(2, 3)))


# ---------------------------------------------------------------------------------------------------------------
# Parameters of this per-edge layout ↔ parameters of the fast, per-source layout (metanas_ray.search_space)
# ---------------------------------------------------------------------------------------------------------------

_PARTS = {  # fast "{op}_{part}" → the per-edge module's parameter path
    "conv_1x5_5x1": {"1x5": "1.weight", "5x1": "2.weight"},
    "conv_3x3": {"dw": "1.weight", "pw": "2.weight"},
    "dil_conv_3x3": {"dw": "1.weight", "pw": "2.weight"},
    "dil_conv_5x5": {"dw": "1.weight", "pw": "2.weight"},
    "sep_conv_3x3": {"dw1": "0.1.weight", "pw1": "0.2.weight", "dw2": "1.1.weight", "pw2": "1.2.weight"},
    "sep_conv_5x5": {"dw1": "0.1.weight", "pw1": "0.2.weight", "dw2": "1.1.weight", "pw2": "1.2.weight"},
    "skip_connect": {"conv1": "conv1.weight", "conv2": "conv2.weight"},
}


def parameter_map(fast: nn.Module) -> dict[str, list[str]]:
    """Each parameter of the fast network → the reference parameters it stacks (along dim 0, in order)."""
    out: dict[str, list[str]] = {}
    for name, _ in fast.named_parameters():
        parts = name.split(".")
        if len(parts) == 5 and parts[0] == "cells" and parts[2] == "sources":
            layer, src, pname = int(parts[1]), int(parts[3]), parts[4]
            cell = fast.cells[layer]
            op = next(o for o in cell.sources[src].ops if pname.startswith(o + "_") and pname[len(o) + 1:] in _PARTS.get(o, {}))
            path = _PARTS[op][pname[len(op) + 1:]]
            o = cell.sources[src].ops.index(op)
            out[name] = [f"cells.{layer}.edge_ops.{k}.{o}.{path}" for k in cell.source_edges[src]]
        else:
            out[name] = [name]
    return out


def to_fast(ref_params: dict[str, torch.Tensor], fast: nn.Module) -> dict[str, torch.Tensor]:
    """Reference parameters (``named_parameters`` of :class:`SearchNetwork` here) → the fast network's."""
    return {name: torch.cat([ref_params[r] for r in refs]) for name, refs in parameter_map(fast).items()}


def to_reference(fast_params: dict[str, torch.Tensor], fast: nn.Module) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_fast` (e.g. for gradients): split each stacked tensor per edge."""
    out = {}
    for name, refs in parameter_map(fast).items():
        for r, part in zip(refs, fast_params[name].chunk(len(refs))):
            out[r] = part
    return out
