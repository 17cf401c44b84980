"""A tiny file-free dataset for tests and smoke runs (``data.dataset: synthetic``).

Each split has ``synthetic_classes`` classes of ``synthetic_per_class`` 1-channel ``image_size``² images. A class
is a fixed random prototype — two strokes and a blob — drawn from a generator seeded by (a constant, split,
class) only, so it never depends on the run seed and the splits share no class. Each image renders the
prototype with a random shift of up to ±2.5 px (at 28 px), small per-part jitter, a random brightness and
Gaussian pixel noise: a small convnet learns it in ~100 steps, raw-pixel nearest neighbour does not solve it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .tasks import SPLITS, ClassPool, MetaSplits

SEED = 20_200_311  # fixed: the data is the same for every run seed
_PARTS = 3  # strokes 0, 1 and a blob


def _generator(*key: int) -> torch.Generator:
    state = np.random.SeedSequence([SEED, *key]).generate_state(2)
    return torch.Generator().manual_seed(((int(state[0]) << 32) | int(state[1])) & (2**63 - 1))


def _params(split_code: int, c: int, per_class: int, s: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Part start points ``a``, end points ``b`` ``[per_class, P, 2]`` and widths ``[P]`` of class ``c``'s images,
    plus per-image brightness ``[per_class]``."""
    g = _generator(split_code, c)
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    a = (6 + 16 * u(_PARTS, 2)) * s  # the prototype: a stroke from a to b, the last part a blob (b == a)
    angle, length = 2 * math.pi * u(_PARTS), (6 + 8 * u(_PARTS)) * s
    b = a + torch.stack([angle.cos(), angle.sin()], 1) * length[:, None]
    b[-1] = a[-1]
    width = torch.tensor([0.9, 0.9, 1.8]) * s * (0.8 + 0.4 * u(_PARTS))
    g_img = _generator(split_code, c, 1)  # each image: shift, per-part jitter, brightness
    move = (torch.rand(per_class, 1, 2, generator=g_img) * 5 - 2.5) * s
    move = move + torch.randn(per_class, _PARTS, 2, generator=g_img) * 0.7 * s
    bright = 0.7 + 0.3 * torch.rand(per_class, generator=g_img)
    return torch.stack([a + move, b + move]), width.expand(per_class, -1), bright


def _render_split(split_code: int, n_classes: int, per_class: int, size: int) -> torch.Tensor:
    """uint8 ``[n_classes * per_class, 1, size, size]``, grouped by class."""
    s = size / 28.0
    params = [_params(split_code, c, per_class, s) for c in range(n_classes)]
    ends = torch.cat([p[0] for p in params], 1)[..., None, None]  # [2, n, P, 2, 1, 1]
    width = torch.cat([p[1] for p in params])[..., None, None]  # [n, P, 1, 1]
    bright = torch.cat([p[2] for p in params])[:, None, None]  # [n, 1, 1]
    ax, ay, bx, by = ends[0, :, :, 0], ends[0, :, :, 1], ends[1, :, :, 0], ends[1, :, :, 1]  # [n, P, 1, 1]
    coords = torch.arange(size, dtype=torch.float32)
    px, py = coords[None, None, None, :], coords[None, None, :, None]
    dx, dy = bx - ax, by - ay
    t = (((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy).clamp_min(1e-6)).clamp(0, 1)  # [n, P, H, W]
    d2 = (px - ax - t * dx).square() + (py - ay - t * dy).square()
    ink = torch.exp(-d2 / (2 * width * width))
    img = torch.maximum(torch.maximum(ink[:, 0], ink[:, 1]), ink[:, 2]) * bright  # [n, H, W]
    noise = torch.randn(img.shape, generator=_generator(split_code, n_classes, per_class, size))
    img = img + 0.08 * noise
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)[:, None]


def make_synthetic(n_classes: int = 40, per_class: int = 12, image_size: int = 28) -> MetaSplits:
    """The synthetic meta-splits (``n_classes`` classes × ``per_class`` images per split)."""
    pools = {}
    starts = torch.arange(n_classes + 1, dtype=torch.int64) * per_class
    for code, split in enumerate(SPLITS):
        images = _render_split(code, n_classes, per_class, image_size)
        pools[split] = ClassPool(images, starts.clone(), [f"{split}/class{c:03d}" for c in range(n_classes)])
    return MetaSplits(pools["train"], pools["val"], pools["test"], "synthetic", 1, image_size)
