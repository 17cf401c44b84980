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
    """conv_1x5_5x1: ReLU → Conv(1×k) → Conv(k×1) → BN (a factorised k×k convolution).

    At stride 2 each factor strides along its own axis, so the k×1 conv sees every row. (The official MetaNAS
    code strides the 1×k conv in both axes, which drops every other row before the k×1 conv reads them.)"""

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


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    try:
        return (torch.channels_last if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
                else torch.contiguous_format)
    except RuntimeError:  # inside torch.func.vmap (batched.py) only the default layout can be asked for: NCHW
        return torch.contiguous_format


def factorized_halves(r: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                      even: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FactorizedReduce's two halves of ``r`` ``[B, C, H, W]``: 1×1 convs (weights ``w1``, ``w2``) at stride 2 of
    ``r`` and of ``r`` shifted by one pixel (zero beyond the edge), each ``[B, ·, ⌈H/2⌉, ⌈W/2⌉]``.

    Computed as stride-1 convs of dense subsampled copies (r's even pixels, or ``even`` if already made; its odd
    pixels, zero-padded to ⌈H/2⌉ × ⌈W/2⌉): the same sums. The stride-2 form's weight gradient in NHWC corrupts
    the heap on the CPU for some shapes (torch 2.14.1, e.g. 5 images of 4 channels at 12×12; see
    ``tests/test_ops.py``)."""
    fmt = _memory_format(r)
    h, w = (r.shape[-2] + 1) // 2, (r.shape[-1] + 1) // 2
    odd = r[:, :, 1::2, 1::2]
    if odd.shape[-2:] != (h, w):
        odd = F.pad(odd, (0, w - odd.shape[-1], 0, h - odd.shape[-2]))
    if even is None:
        even = r[:, :, ::2, ::2].contiguous(memory_format=fmt)
    return F.conv2d(even, w1), F.conv2d(odd.contiguous(memory_format=fmt), w2)


class FactorizedReduce(nn.Module):
    """Halve H and W with two offset 1×1 stride-2 convolutions (each c_out/2 channels), then BN."""

    def __init__(self, c_in: int, c_out: int, affine: bool = False):
        super().__init__()
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out // 2, 1, 2, bias=False)
        self.conv2 = nn.Conv2d(c_in, c_out - c_out // 2, 1, 2, bias=False)
        self.bn = bn(c_out, affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.cat(factorized_halves(self.relu(x), self.conv1.weight, self.conv2.weight), dim=1))


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
# statistics: the same for every edge), the identity. A parametric operation runs for all its m edges as one
# convolution per stage on weights stacked along the output channels, edge-major (edge e owns output channels
# e·C … (e+1)·C), and one BN over the m·C channels:
#
#   conv_1x5_5x1      Conv(C → m·C, 1×5) → Conv(m·C → m·C, 5×1, groups=m) → BN
#   DilConv           depthwise k×k of ReLU(x) per edge, concatenated → Conv(m·C → m·C, 1×1, groups=m) → BN
#   SepConv           DilConv, then ReLU → depthwise (groups=m·C) → Conv(1×1, groups=m) → BN
#   FactorizedReduce  Conv(C → m·C/2, 1×1, stride 2) on ReLU(x) and on it shifted by a pixel → BN
#
# The parameter count is that of m separate edges (a stacked or grouped conv holds exactly their weights), and
# PyTorch's default initialisation is unchanged per edge (the fan-in of a stacked weight is one edge's).
# An edge's mixture weight is folded into the last BN as its per-channel scale: w·BN(z) = BN(z; γ = w).
#
# Measured choices (oneDNN on an AVX-512 CPU, NHWC, 20×28×28 images, 28 channels): the first depthwise stage
# runs once per edge on the shared C-channel input (repeating the input m times and one m·C-channel conv was
# slower); a dilated stride-2 depthwise conv runs as an undilated stride-1 conv on the input subsampled by 2
# (the same sums; oneDNN's dilated depthwise backward is a slow generic kernel: ~10× faster this way).
# ---------------------------------------------------------------------------------------------------------------

_DIL = {"conv_3x3": (3, 1, 1), "dil_conv_3x3": (3, 2, 2), "dil_conv_5x5": (5, 4, 2)}  # kernel, padding, dilation
_SEP = {"sep_conv_3x3": (3, 1), "sep_conv_5x5": (5, 2)}  # kernel, padding


def _bn(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """BatchNorm2d(affine=False, track_running_stats=False) on batch statistics, times ``scale`` per channel."""
    return F.batch_norm(x, None, None, scale, None, True, 0.0, 1e-5)


class EdgeOps(nn.Module):
    """The operations ``ops`` on the ``m`` edges that leave one state (stride ``stride``, ``c`` channels).

    Parameter ``{op}_{part}`` is the edges' weights of that part stacked along dim 0, edge-major; ``shapes``
    gives one edge's shape of each."""

    def __init__(self, c: int, stride: int, m: int, ops: tuple[str, ...]):
        super().__init__()
        unknown = [o for o in ops if o not in OPS]
        if unknown:
            raise ValueError(f"unknown operations {unknown}; known: {', '.join(OPS)}")
        self.c, self.stride, self.m, self.ops = c, stride, m, tuple(ops)
        self.shapes: dict[str, tuple[int, ...]] = {}
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
        self.shapes[f"{op}_{part}"] = shape
        self.register_parameter(f"{op}_{part}", nn.Parameter(torch.empty(self.m * shape[0], *shape[1:])))

    def reset_parameters(self) -> None:
        for p in self.parameters():  # nn.Conv2d's default (the fan-in of a stacked weight is one edge's)
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def _rows(self, name: str, sel: list[int]) -> torch.Tensor:
        """The stacked weight ``name`` restricted to the edges ``sel`` (local indices, ascending)."""
        w = getattr(self, name)
        if len(sel) == self.m:
            return w
        r = self.shapes[name][0]
        if sel[-1] - sel[0] == len(sel) - 1:  # a contiguous run: a view
            return w.narrow(0, sel[0] * r, len(sel) * r)
        return torch.cat([w.narrow(0, e * r, r) for e in sel])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, active: list[list[bool]],
                drop: torch.Tensor | None = None) -> list[list[tuple[torch.Tensor, torch.Tensor | None]]]:
        """The terms of the edges leaving ``x``.

        ``weights`` ``[m, O]``: these edges' mixture weights; ``active[e][o]``: whether term (e, o) is computed;
        ``drop`` ``[B, m, O]``: per-image drop-path multipliers of every term but the identity (None: none).
        Returns per edge a list of ``(out, scale)``: the edge's output is Σ scale·out (``scale`` None: already
        scaled; a ``[B, 1, 1, 1]`` scale with drop-path). "none" contributes no term."""
        c, s, m = self.c, self.stride, self.m
        terms: list[list[tuple[torch.Tensor, torch.Tensor | None]]] = [[] for _ in range(m)]
        cache: dict[str, torch.Tensor] = {}

        def relu() -> torch.Tensor:
            if "relu" not in cache:
                cache["relu"] = F.relu(x)
            return cache["relu"]

        def subsampled() -> torch.Tensor:
            """Every s-th pixel of ReLU(x), dense."""
            if "sub" not in cache:
                r = relu()
                cache["sub"] = r[:, :, ::s, ::s].contiguous(memory_format=_memory_format(r))
            return cache["sub"]

        def depthwise_first(w: torch.Tensor, n: int, pad: int, dil: int) -> torch.Tensor:
            """Depthwise conv of the shared ReLU(x) with each of the n edges' kernels, concatenated."""
            inp, stride = relu(), s
            if s > 1 and dil == s and pad % s == 0:  # dilation = stride: an undilated conv of every s-th pixel
                inp, stride, pad, dil = subsampled(), 1, pad // s, 1
            outs = [F.conv2d(inp, w[e * c:(e + 1) * c], None, stride, pad, dil, c) for e in range(n)]
            return outs[0] if n == 1 else torch.cat(outs, dim=1)

        for o, name in enumerate(self.ops):
            sel = [e for e in range(m) if active[e][o]]
            if not sel or name == "none":
                continue
            if name in ("max_pool_3x3", "avg_pool_3x3") or (name == "skip_connect" and s == 1):
                if name == "skip_connect":
                    out = x
                elif name == "max_pool_3x3":
                    out = _bn(F.max_pool2d(x, 3, s, 1))
                else:
                    out = _bn(F.avg_pool2d(x, 3, s, 1, count_include_pad=False))
                identity = name == "skip_connect"
                for e in sel:
                    w = weights[e, o] if drop is None or identity else weights[e, o] * drop[:, e, o, None, None, None]
                    terms[e].append((out, w))
                continue
            n = len(sel)
            if name == "conv_1x5_5x1":
                y = F.conv2d(relu(), self._rows(f"{name}_1x5", sel), None, (1, s), (0, 2))
                y = F.conv2d(y, self._rows(f"{name}_5x1", sel), None, (s, 1), (2, 0), 1, n)
            elif name in _DIL:
                _, pad, dil = _DIL[name]
                y = depthwise_first(self._rows(f"{name}_dw", sel), n, pad, dil)
                y = F.conv2d(y, self._rows(f"{name}_pw", sel), None, 1, 0, 1, n)
            elif name in _SEP:
                pad = _SEP[name][1]
                y = depthwise_first(self._rows(f"{name}_dw1", sel), n, pad, 1)
                y = _bn(F.conv2d(y, self._rows(f"{name}_pw1", sel), None, 1, 0, 1, n))
                y = F.conv2d(F.relu(y), self._rows(f"{name}_dw2", sel), None, 1, pad, 1, n * c)
                y = F.conv2d(y, self._rows(f"{name}_pw2", sel), None, 1, 0, 1, n)
            else:  # skip_connect at stride 2: FactorizedReduce
                r = relu()
                a, b = factorized_halves(r, self._rows(f"{name}_conv1", sel), self._rows(f"{name}_conv2", sel),
                                         subsampled())
                # per edge: its c//2 channels of a, then its c - c//2 channels of b
                y = torch.cat([a.unflatten(1, (n, c // 2)), b.unflatten(1, (n, c - c // 2))], dim=2)
                y = y.flatten(1, 2).contiguous(memory_format=_memory_format(r))
            scale = (weights[:, o] if n == m else weights[sel, o]).repeat_interleave(c)
            y = _bn(y, scale)
            if drop is not None:
                y = y * (drop[:, :, o] if n == m else drop[:, sel, o]).repeat_interleave(c, dim=1)[:, :, None, None]
            # split, not sliced: its backward is one concatenation, not a zero-filled copy per edge
            for e, out in zip(sel, y.split(c, dim=1)):
                terms[e].append((out, None))
        return terms
