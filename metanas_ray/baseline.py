"""The 4-layer convolutional network of MAML/REPTILE (Finn et al. 2017), the baseline meta-learned in this pipeline.

Four blocks of Conv3×3(``channels``, padding 1) → BN → ReLU → MaxPool 2×2 (floor), then flatten and one linear
layer: ``channels · s²`` features with s = ⌊image_size / 16⌋ after the four halvings (28 → 14 → 7 → 3 → 1: 64
features at 28×28; 84 → 42 → 21 → 10 → 5: 1600 at 84×84). BN normalises with batch statistics (no running
averages), as MAML. It has no architecture: ``forward`` takes (and ignores) the same ``mix`` argument as the
supernet, so one inner loop serves both.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ConfigError
from .ops import bn

BLOCKS = 4


def feature_size(image_size: int) -> int:
    """s after ``BLOCKS`` floor-halvings of ``image_size`` (0: the map vanishes)."""
    for _ in range(BLOCKS):
        image_size //= 2
    return image_size


class Conv4(nn.Module):
    def __init__(self, in_channels: int, n_classes: int, channels: int = 64, image_size: int = 28):
        s = feature_size(image_size)
        if s < 1:
            raise ConfigError(f"data.image_size {image_size} is too small for model.kind: conv4: its 4 max-pools "
                             f"halve {image_size}×{image_size} to 0×0; use data.image_size >= {2 ** BLOCKS}")
        super().__init__()
        blocks, c = [], in_channels
        for _ in range(BLOCKS):
            blocks += [nn.Conv2d(c, channels, 3, 1, 1), bn(channels, affine=True), nn.ReLU(), nn.MaxPool2d(2)]
            c = channels
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(channels * s * s, n_classes)

    def forward(self, x: torch.Tensor, mix: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``x``: ``[B, C, H, W]`` → logits ``[B, n_classes]``."""
        return self.classifier(self.features(x).flatten(1))
