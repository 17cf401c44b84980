"""The data layer: datasets as three disjoint class pools and seeded N-way k-shot tasks drawn from them.

    splits = load_splits(cfg.data)            # MetaSplits (cached after the first load)
    samplers = check_tasks(cfg.data, splits)  # fails early if a split is too small for the tasks
    task = TaskSampler(splits.train, n, k, q, seed, "train").sample(meta_step, index)
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from .image_folder import load_image_folder, load_miniimagenet, split_classes
from .omniglot import load_omniglot, val_alphabets, with_rotations
from .synthetic import make_synthetic
from .tasks import (SPLITS, ClassPool, DataError, MetaSplits, Task, TaskSampler, cache_path, check_tasks,
                    task_seed)

if TYPE_CHECKING:
    from ..config import DataConfig

log = logging.getLogger(__name__)

__all__ = [
    "SPLITS", "ClassPool", "DataError", "MetaSplits", "Task", "TaskSampler", "cache_path", "check_tasks",
    "load_image_folder", "load_miniimagenet", "load_omniglot", "load_splits", "make_synthetic", "split_classes",
    "task_seed", "val_alphabets", "with_rotations",
]


def load_splits(cfg: DataConfig) -> MetaSplits:
    """Load the meta-splits of ``cfg.dataset``: omniglot | miniimagenet | folder | synthetic (logs time, cache hit)."""
    start = time.perf_counter()
    if cfg.dataset == "omniglot":
        splits = load_omniglot(cfg.root, cfg.image_size, cfg.download, cfg.split)
    elif cfg.dataset == "miniimagenet":
        splits = load_miniimagenet(cfg.root, cfg.image_size)
    elif cfg.dataset == "folder":
        splits = load_image_folder(cfg.root, cfg.image_size, split_fractions=cfg.split_fractions)
    elif cfg.dataset == "synthetic":
        splits = make_synthetic(cfg.synthetic_classes, cfg.synthetic_per_class, cfg.image_size)
    else:
        raise DataError(f"data.dataset must be omniglot, miniimagenet, folder or synthetic, got '{cfg.dataset}'")
    how = "generated" if cfg.dataset == "synthetic" else ("cache hit" if splits.from_cache else "cache miss, built")
    log.info("loaded %s %d×%d×%d in %.2f s (%s): %s", splits.name, splits.channels, splits.image_size,
             splits.image_size, time.perf_counter() - start, how, splits.summary())
    return splits
