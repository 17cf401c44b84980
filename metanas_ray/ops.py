"""The candidate operations of the search space (MetaNAS's seven, after DARTS).

Every operation maps ``[B, C, H, W]`` to ``[B, C, H/stride, W/stride]``. Batch norm has no affine parameters
and uses the batch's statistics (``track_running_stats=False``), as in DARTS search and MAML-style few-shot
learning, so operations hold no buffers and the network is a pure function of its parameters.

``OPS`` holds the operations one edge at a time (the definitions, and the cells' preprocessing). The supernet
itself evaluates them with :class:`EdgeOps`: every operation on all the edges that leave one state at once,
each parametric operation as one set of kernels on weights stacked over those edges.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


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


# ---------------------------------------------------------------------------------------------------------------
# All edges leaving one state, at once.
#
# An edge's operation o(x) depends on the edge only through its weights, so the m edges leaving a state share
# every parameter-free part: ReLU(x) once, max/avg pool + BN once (BN without affine parameters, on batch
# statistics: the same for every edge), the identity. A parametric operation is run for all its m edges as
# one convolution per stage on weights stacked along the output channels, edge-major (edge e owns output
# channels e·C … (e+1)·C), followed by one BN over the m·C channels:
#
#   conv_1x5_5x1   Conv(C → m·C, 1×5) → Conv(m·C → m·C, 5×1, groups=m) → BN
#   DilConv        depthwise k×k on x once per edge → Conv(m·C → m·C, 1×1, groups=m) → BN
#   SepConv        DilConv, then ReLU → depthwise (groups=m·C) → Conv(1×1, groups=m) → BN
#   FactorizedReduce   Conv(C → m·C/2, 1×1, stride 2) on x and on x shifted by a pixel → BN
#
# The parameter count is that of m separate edges (a grouped/stacked conv has exactly their weights) and
# PyTorch's default initialisation per edge is unchanged (the fan-in of each stacked weight is an edge's).
# The edge's mixture weight is folded into the last BN as its per-channel scale (w·BN(z) = BN(z; γ = w)).
# ---------------------------------------------------------------------------------------------------------------

_DIL = {  # depthwise-separable: (kernel, padding, dilation)
    "conv_3x3": (3, 1, 1), "dil_conv_3x3": (3, 2, 2), "dil_conv_5x5": (5, 4, 2),
}
_SEP = {"sep_conv_3x3": (3, 1), "sep_conv_5x5": (5, 2)}  # kernel, padding
_SHARED = ("max_pool_3x3", "avg_pool_3x3")


def _bn(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """BatchNorm2d(affine=False, track_running_stats=False) on batch statistics, times ``scale`` per channel."""
    return F.batch_norm(x, None, None, scale, None, True, 0.0, 1e-5)


def _depthwise(x: torch.Tensor, w: torch.Tensor, copies: int, stride: int, padding: int,
               dilation: int) -> torch.Tensor:
    """Depthwise conv of ``copies`` stacked edges: ``x`` ``[B, C·n, H, W]`` (``copies`` = 1) or the shared
    input ``[B, C, H, W]`` used by every edge (``copies`` = n); ``w`` ``[n·C, 1, k, k]``."""
    if copies == 1:
        return F.conv2d(x, w, None, stride, padding, dilation, w.shape[0])
    c = x.shape[1]
    # one depthwise conv per edge on the shared input (C channels: oneDNN's fast depthwise path), then
    # concatenated along the channels for the grouped 1×1 conv
    return torch.cat([F.conv2d(x, w[e * c:(e + 1) * c], None, stride, padding, dilation, c)
                      for e in range(copies)], dim=1)


class EdgeOps(nn.Module):
    """The operations ``ops`` on the ``m`` edges that leave one state (stride ``stride``, ``c`` channels).

    Weights ``{op}_{part}`` are stacked over the edges along dim 0 (edge-major, ``rows`` rows per edge)."""

    def __init__(self, c: int, stride: int, m: int, ops: tuple[str, ...]):
        super().__init__()
        unknown = [o for o in ops if o not in OPS]
        if unknown:
            raise ValueError(f"unknown operations {unknown}; known: {', '.join(OPS)}")
        self.c, self.stride, self.m, self.ops = c, stride, m, tuple(ops)
        self.shapes: dict[str, tuple[int, ...]] = {}  # parameter name → one edge's shape
        for name in ops:
            if name == "conv_1x5_5x1":
                self._add(name, "1x5", (c, c, 1, 5))
                self._add(name, "5x1", (c, c, 5, 1))
            elif name in _DIL:
                k = _DIL[name][0]
                self._add(name, "dw", (c, 1, k, k))
                self._add(name, "pw", (c, c, 1, 1))
            elif name in _SEP:
                k = _SEP[name][0]
                for half in ("1", "2"):
                    self._add(name, "dw" + half, (c, 1, k, k))
                    self._add(name, "pw" + half, (c, c, 1, 1))
            elif name == "skip_connect" and stride != 1:
                self._add(name, "conv1", (c // 2, c, 1, 1))
                self._add(name, "conv2", (c - c // 2, c, 1, 1))
        self.reset_parameters()

    def _add(self, op: str, part: str, shape: tuple[int, ...]) -> None:
        name = f"{op}_{part}"
        self.shapes[name] = shape
        self.register_parameter(name, nn.Parameter(torch.empty(self.m * shape[0], *shape[1:])))

    def reset_parameters(self) -> None:
        for p in self.parameters():  # nn.Conv2d's default, per edge (the fan-in of a stacked weight is an edge's)
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def _rows(self, name: str, sel: list[int]) -> torch.Tensor:
        """The stacked weight ``name`` of the edges ``sel`` (local indices, ascending)."""
        w = getattr(self, name)
        r = self.shapes[name][0]
        if len(sel) == self.m:
            return w
        if sel[-1] - sel[0] == len(sel) - 1:  # a contiguous run: a view
            return w.narrow(0, sel[0] * r, len(sel) * r)
        return torch.cat([w.narrow(0, e * r, r) for e in sel])

    def forward(self, x: torch.Tensor, weights: torch.Tensor,
                active: list[list[bool]]) -> list[list[tuple[torch.Tensor, torch.Tensor | None]]]:
        """``x``: the source state; ``weights`` ``[m, O]`` its edges' mixture weights; ``active[e][o]``: which
        terms to compute. Returns per edge the terms ``(out, scale)``: the edge's output is Σ scale·out
        (``scale`` None: already scaled). "none" contributes no term."""
        c, s, m = self.c, self.stride, self.m
        terms: list[list[tuple[torch.Tensor, torch.Tensor | None]]] = [[] for _ in range(m)]
        relu = None
        for o, name in enumerate(self.ops):
            sel = [e for e in range(m) if active[e][o]]
            if not sel or name == "none":
                continue
            if name in _SHARED or (name == "skip_connect" and s == 1):
                if name == "skip_connect":
                    out = x
                elif name == "max_pool_3x3":
                    out = _bn(F.max_pool2d(x, 3, s, 1))
                else:
                    out = _bn(F.avg_pool2d(x, 3, s, 1, count_include_pad=False))
                for e in sel:
                    terms[e].append((out, weights[e, o]))
                continue
            if relu is None:
                relu = F.relu(x)
            n = len(sel)
            scale = (weights[:, o] if n == m else weights[sel, o]).repeat_interleave(c)
            if name == "conv_1x5_5x1":
                y = F.conv2d(relu, self._rows(f"{name}_1x5", sel), None, (1, s), (0, 2))
                y = F.conv2d(y, self._rows(f"{name}_5x1", sel), None, (s, 1), (2, 0), 1, n)
            elif name in _DIL:
                k, pad, dil = _DIL[name]
                y = _depthwise(relu, self._rows(f"{name}_dw", sel), n, s, pad, dil)
                y = F.conv2d(y, self._rows(f"{name}_pw", sel), None, 1, 0, 1, n)
            elif name in _SEP:
                k, pad = _SEP[name]
                y = _depthwise(relu, self._rows(f"{name}_dw1", sel), n, s, pad, 1)
                y = _bn(F.conv2d(y, self._rows(f"{name}_pw1", sel), None, 1, 0, 1, n))
                y = _depthwise(F.relu(y), self._rows(f"{name}_dw2", sel), 1, 1, pad, 1)
                y = F.conv2d(y, self._rows(f"{name}_pw2", sel), None, 1, 0, 1, n)
            else:  # skip_connect at stride 2: FactorizedReduce per edge
                shifted = F.pad(relu, (0, 1, 0, 1))[:, :, 1:, 1:]
                a = F.conv2d(relu, self._rows(f"{name}_conv1", sel), None, 2)
                b = F.conv2d(shifted, self._rows(f"{name}_conv2", sel), None, 2)
                fmt = (torch.channels_last if relu.dim() == 4 and not relu.is_contiguous()
                       and relu.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
                y = torch.cat([a.unflatten(1, (n, c // 2)), b.unflatten(1, (n, c - c // 2))], dim=2)
                y = y.flatten(1, 2).contiguous(memory_format=fmt)
            y = _bn(y, scale)
            for p, e in enumerate(sel):
                terms[e].append((y[:, p * c:(p + 1) * c], None))
        return terms
