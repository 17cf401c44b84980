"""TaskSampler: task structure, seeding / determinism, and the early size checks; the memory-mapped cache."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metanas_ray.config import DataConfig
from metanas_ray.data import (ClassPool, DataError, MetaSplits, TaskSampler, cache_path, check_tasks,
                              make_synthetic, task_seed)
from metanas_ray.data.tasks import cached_splits

N_CLASSES, PER_CLASS = 10, 8


def _pool(n_classes: int = N_CLASSES, per_class: int = PER_CLASS) -> ClassPool:
    """Image i (of class i // per_class) carries its id in pixel [0, 0, 0] and its class in [0, 0, 1]."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_classes * per_class, 1, 6, 6), generator=g, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n_classes * per_class, dtype=torch.uint8)
    images[:, 0, 0, 1] = torch.arange(n_classes).repeat_interleave(per_class).to(torch.uint8)
    return ClassPool(images, torch.arange(n_classes + 1) * per_class, [f"c{i}" for i in range(n_classes)])


def _ids(x: torch.Tensor) -> list[int]:
    return (x[:, 0, 0, 0] * 255).round().long().tolist()


@pytest.mark.parametrize("n,k,q", [(5, 1, 5), (3, 2, 6), (10, 4, 4)])
def test_task_structure(n: int, k: int, q: int) -> None:
    pool = _pool()
    sampler = TaskSampler(pool, n, k, q, seed=3, split="train")
    for index in range(20):
        t = sampler.sample(meta_step=7, index=index)
        assert t.x_train.shape == (n * k, 1, 6, 6) and t.x_query.shape == (n * q, 1, 6, 6)
        assert t.x_train.dtype == torch.float32 and t.y_train.dtype == torch.int64
        assert 0.0 <= float(t.x_train.min()) and float(t.x_query.max()) <= 1.0
        assert len(set(t.classes)) == n and all(0 <= c < N_CLASSES for c in t.classes)
        assert torch.equal(t.y_train.bincount(minlength=n), torch.full((n,), k))
        assert torch.equal(t.y_query.bincount(minlength=n), torch.full((n,), q))
        assert sorted(set(t.y_train.tolist())) == list(range(n))
        shots, queries = _ids(t.x_train), _ids(t.x_query)
        assert not set(shots) & set(queries), "an image is both a shot and a query"
        assert len(set(shots)) == n * k and len(set(queries)) == n * q
        # each image belongs to the pool class its label stands for
        for x, y in ((t.x_train, t.y_train), (t.x_query, t.y_query)):
            cls = (x[:, 0, 0, 1] * 255).round().long()
            assert torch.equal(cls, torch.tensor(t.classes)[y])


def test_determinism_and_order_independence() -> None:
    pool = _pool()
    a = TaskSampler(pool, 5, 1, 3, seed=11, split="train")
    b = TaskSampler(pool, 5, 1, 3, seed=11, split="train")
    first = a.sample(4, 2)
    for i in range(6):  # draw others in between, in another order, from another object
        b.sample(9, i)
    again = b.sample(4, 2)
    for f in ("x_train", "y_train", "x_query", "y_query"):
        assert torch.equal(getattr(first, f), getattr(again, f))
    assert first.classes == again.classes
    assert a.sample(4, 3).classes != first.classes or not torch.equal(a.sample(4, 3).x_train, first.x_train)
    others = [a.sample(4, i) for i in range(8)] + [a.sample(5, 2)]
    assert sum(torch.equal(o.x_train, first.x_train) for o in others) == 1  # only index 2 itself
    assert not torch.equal(TaskSampler(pool, 5, 1, 3, 12, "train").sample(4, 2).x_train, first.x_train)
    assert not torch.equal(TaskSampler(pool, 5, 1, 3, 11, "val").sample(4, 2).x_train, first.x_train)


def test_task_seed() -> None:
    seeds = {task_seed(0, s, m, i) for s in ("train", "val", "test") for m in range(5) for i in range(5)}
    assert len(seeds) == 75 and all(0 <= s < 2**63 for s in seeds)
    assert task_seed(-1, "train", 0, 0) == task_seed(-1, "train", 0, 0)
    with pytest.raises(ValueError):
        task_seed(0, "train", -1, 0)


def test_label_order_is_random() -> None:
    sampler = TaskSampler(_pool(), 5, 1, 1, seed=0, split="train")
    orders = [sampler.sample(0, i).classes for i in range(20)]
    assert any(o != sorted(o) for o in orders)


def test_to_device() -> None:
    t = TaskSampler(_pool(), 2, 1, 1, 0, "test").sample(0, 0).to("cpu")
    assert t.x_train.device.type == "cpu" and t.classes


def test_size_checks_name_the_key() -> None:
    pool = _pool(n_classes=4, per_class=6)
    with pytest.raises(DataError, match=r"data\.n_way=5 but the meta-val split of toy has only 4 classes"):
        TaskSampler(pool, 5, 1, 1, 0, "val", dataset="toy")
    with pytest.raises(DataError, match=r"data\.k_shot \+ data\.n_query = 7 but some class of the meta-train split"):
        TaskSampler(pool, 2, 2, 5, 0, "train")
    TaskSampler(pool, 4, 1, 5, 0, "train")  # exactly enough


def test_check_tasks() -> None:
    splits = make_synthetic(n_classes=6, per_class=5, image_size=16)
    samplers = check_tasks(DataConfig(dataset="synthetic", n_way=6, k_shot=1, n_query=4), splits)
    assert set(samplers) == {"train", "val", "test"}
    with pytest.raises(DataError, match=r"data\.n_way=7 .*meta-train split of synthetic has only 6 classes"):
        check_tasks(DataConfig(dataset="synthetic", n_way=7), splits)
    with pytest.raises(DataError, match=r"data\.k_shot \+ data\.n_query = 6 .*only 5 images"):
        check_tasks(DataConfig(dataset="synthetic", n_way=2, k_shot=1, n_query=5), splits)
    # one small split is enough to fail
    small = MetaSplits(splits.train, ClassPool(splits.val.images[:10], torch.tensor([0, 5, 10]), ["a", "b"]),
                       splits.test, "synthetic", 1, 16)
    with pytest.raises(DataError, match="meta-val"):
        check_tasks(DataConfig(dataset="synthetic", n_way=3, k_shot=1, n_query=1), small)


def test_class_pool_validation() -> None:
    pool = _pool(3, 4)
    assert pool.n_classes == 3 and pool.min_per_class == 4 and pool.class_images(1).shape[0] == 4
    with pytest.raises(DataError):
        ClassPool(pool.images, torch.tensor([0, 4, 8]), pool.class_names)  # too few starts
    with pytest.raises(DataError):
        ClassPool(pool.images.float(), pool.class_starts, pool.class_names)


def mapped_file(t: torch.Tensor) -> str | None:
    """The file whose memory map holds ``t``'s data (Linux ``/proc/self/maps``), or None (anonymous memory)."""
    ptr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(a, 16) for a in fields[0].split("-"))
        if start <= ptr < end:
            return fields[5] if len(fields) == 6 and fields[5].startswith("/") else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc/self/maps")
def test_cached_pools_map_the_cache_file_and_draw_the_same_tasks(tmp_path: Path) -> None:
    """The cache is read memory-mapped (the workers of a node share its pages), after a build as on a hit, and
    tasks drawn from the mapped pools are those drawn from the pools in memory."""
    built = make_synthetic(n_classes=6, per_class=5, image_size=8)
    first = cached_splits(tmp_path, "toy", "fp", lambda: built)
    again = cached_splits(tmp_path, "toy", "fp", lambda: pytest.fail("rebuilt"))
    path = str(cache_path(tmp_path, "toy"))
    assert not first.from_cache and again.from_cache
    for splits in (first, again):
        for split in ("train", "val", "test"):
            pool, ref = splits.pool(split), built.pool(split)
            assert mapped_file(pool.images) == path and mapped_file(ref.images) is None
            assert torch.equal(pool.images, ref.images) and torch.equal(pool.class_starts, ref.class_starts)
            a, b = TaskSampler(pool, 3, 1, 2, 5, split), TaskSampler(ref, 3, 1, 2, 5, split)
            for step, index in ((0, 0), (3, 1), (7, 2)):
                ta, tb = a.sample(step, index), b.sample(step, index)
                assert ta.classes == tb.classes and torch.equal(ta.x_train, tb.x_train)
                assert torch.equal(ta.x_query, tb.x_query)


def test_a_cache_that_cannot_be_mapped_is_read_into_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    built = make_synthetic(n_classes=3, per_class=4, image_size=8)
    cached_splits(tmp_path, "toy", "fp", lambda: built)
    load = torch.load

    def no_mmap(*args, mmap=None, **kwargs):  # a filesystem without mmap
        if mmap:
            raise RuntimeError("mmap not supported")
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", no_mmap)
    with caplog.at_level("INFO", logger="metanas_ray.data"):
        again = cached_splits(tmp_path, "toy", "fp", lambda: pytest.fail("rebuilt"))
    assert again.from_cache and torch.equal(again.test.images, built.test.images)
    assert any("could not be memory-mapped" in r.getMessage() for r in caplog.records)
