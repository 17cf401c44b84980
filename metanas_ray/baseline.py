"""The standard 4-layer convolutional network of MAML/REPTILE, the baseline meta-learned in the same pipeline.

Four blocks of Conv3×3(``channels``) → BN → ReLU → MaxPool2, then a linear classifier. It has no architecture:
``forward`` takes (and ignores) the same ``mix`` argument as the supernet, so one inner loop serves both.
"""
from __future__ import annotations

import torch
from torch import nn

from .ops import bn


class Conv4(nn.Module):
    def __init__(self, in_channels: int, n_classes: int, channels: int = 64):
        super().__init__()
        blocks, c = [], in_channels
        for _ in range(4):
            blocks += [nn.Conv2d(c, channels, 3, 1, 1), bn(channels, affine=True), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
            c = channels
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(channels, n_classes)

    def forward(self, x: torch.Tensor, mix: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``x``: ``[B, C, H, W]`` → logits ``[B, n_classes]``."""
        return self.classifier(self.features(x).mean(dim=(2, 3)))
