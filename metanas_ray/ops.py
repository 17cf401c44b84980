"""The candidate operations of the search space (MetaNAS's seven, after DARTS).

Every operation maps ``[B, C, H, W]`` to ``[B, C, H/stride, W/stride]``. Batch norm has no affine parameters
and uses the batch's statistics (``track_running_stats=False``), as in DARTS search and MAML-style few-shot
learning, so operations hold no buffers and the network is a pure function of its parameters.
"""
from __future__ import annotations

from typing import Callable

import torch
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
