"""The synthetic dataset: shapes, fixed content, disjoint splits, learnable but not trivial."""
from __future__ import annotations

import logging

import pytest
import torch

from metanas_ray.config import DataConfig
from metanas_ray.data import TaskSampler, check_tasks, load_splits, make_synthetic


def test_shapes_and_determinism() -> None:
    s = make_synthetic(n_classes=40, per_class=12, image_size=28)
    assert (s.name, s.channels, s.image_size) == ("synthetic", 1, 28)
    for split in ("train", "val", "test"):
        pool = s.pool(split)
        assert pool.images.shape == (480, 1, 28, 28) and pool.images.dtype == torch.uint8
        assert pool.n_classes == 40 and pool.min_per_class == 12
    again = make_synthetic(n_classes=40, per_class=12, image_size=28)
    assert torch.equal(s.train.images, again.train.images) and torch.equal(s.test.images, again.test.images)


def test_splits_differ_and_images_vary() -> None:
    s = make_synthetic(n_classes=10, per_class=6, image_size=20)
    assert s.image_size == 20 and s.train.images.shape[-1] == 20
    assert not set(s.train.class_names) & set(s.val.class_names)
    means = {split: s.pool(split).images.float().reshape(10, 6, -1).mean(1) for split in ("train", "val", "test")}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert torch.cdist(means[a], means[b]).min() > 0  # no prototype shared between splits
    imgs = s.train.class_images(0).float()
    assert (imgs - imgs.mean(0)).abs().mean() > 5  # images of a class are not copies
    assert float(s.train.images.float().mean()) > 5  # not blank


def _nearest_centroid_accuracy(split_pool, k: int, tasks: int = 100) -> float:
    sampler = TaskSampler(split_pool, 5, k, 5, seed=0, split="test")
    correct = 0.0
    for i in range(tasks):
        t = sampler.sample(0, i)
        centroids = t.x_train.reshape(5, k, -1).mean(1)
        pred = torch.cdist(t.x_query.reshape(len(t.x_query), -1), centroids).argmin(1)
        correct += float((pred == t.y_query).float().mean())
    return correct / tasks


def test_learnable_but_not_trivial() -> None:
    s = make_synthetic(n_classes=40, per_class=12, image_size=28)
    one_shot = _nearest_centroid_accuracy(s.test, k=1)
    five_shot = _nearest_centroid_accuracy(s.test, k=5)
    assert 0.4 < one_shot < 0.9, one_shot  # well above chance (0.2), but raw pixels do not solve it
    assert five_shot > one_shot


def test_load_splits_dispatch(caplog: pytest.LogCaptureFixture) -> None:
    cfg = DataConfig(dataset="synthetic", n_way=5, k_shot=1, n_query=3, image_size=16,
                     synthetic_classes=8, synthetic_per_class=4)
    with caplog.at_level(logging.INFO, logger="metanas_ray.data"):
        splits = load_splits(cfg)
    assert splits.train.n_classes == 8 and splits.image_size == 16
    assert any("loaded synthetic" in r.getMessage() for r in caplog.records)
    check_tasks(cfg, splits)
