"""Class pools, meta-splits and the seeded N-way k-shot task sampler, plus the one-file tensor cache.

A dataset is loaded once into three :class:`ClassPool` s (meta-train / meta-val / meta-test), each a single
uint8 tensor of all its images grouped by class. :class:`TaskSampler` draws tasks from a pool with a
``torch.Generator`` seeded only from ``(seed, split, meta_step, index)``, so a task is the same whichever worker
draws it and in whatever order.

The cache (:func:`cached_splits`) stores the pools as ONE ``torch.save`` file of plain tensors / lists / strings
(read back with ``weights_only=True``), written atomically (tmp file + ``os.replace``), under
``<root>/.metanas_cache/<stem>.pt`` when the data root is writable, else
``$XDG_CACHE_HOME/metanas_ray/<stem>_<hash of resolved root>.pt`` (default ``~/.cache``).

The cache is read memory-mapped (``torch.load(mmap=True)``): the pools' pixels are the file's pages in the
page cache, so the workers on one node hold one copy between them, not one each (the process that builds the
cache maps the file it wrote, too). Nothing copies a pool after loading; a task gathers only its own images.
A file that cannot be mapped (a filesystem without mmap) is read into memory instead. Delete or replace a
cache file, never overwrite it in place: a process mapping a file that shrinks under it dies of SIGBUS.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch

if TYPE_CHECKING:
    from ..config import DataConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
CACHE_VERSION = 1


class DataError(ValueError):
    """Data that is missing, malformed, or too small for the configured tasks."""


def split_label(split: str) -> str:
    """``"val"`` → ``"meta-val"`` (for messages)."""
    return f"meta-{split}"


@dataclass
class ClassPool:
    """All images of one meta-split, grouped by class.

    ``images``: uint8 ``[N, C, H, W]``; ``class_starts``: int64 ``[n_classes + 1]``, the images of class ``c`` are
    ``images[class_starts[c]:class_starts[c + 1]]``; ``class_names``: one name per class.
    """

    images: torch.Tensor
    class_starts: torch.Tensor
    class_names: list[str]

    def __post_init__(self) -> None:
        im, st = self.images, self.class_starts
        if im.dtype != torch.uint8 or im.dim() != 4:
            raise DataError(f"ClassPool.images must be uint8 [N, C, H, W], got {im.dtype} {list(im.shape)}")
        if st.dtype != torch.int64 or st.dim() != 1 or len(st) != len(self.class_names) + 1:
            raise DataError(f"ClassPool.class_starts must be int64 [n_classes + 1], got {st.dtype} {list(st.shape)} "
                            f"for {len(self.class_names)} class names")
        if int(st[0]) != 0 or int(st[-1]) != len(im) or bool((st[1:] < st[:-1]).any()):
            raise DataError("ClassPool.class_starts must rise from 0 to the number of images")

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def counts(self) -> torch.Tensor:
        """int64 ``[n_classes]``: images per class."""
        return self.class_starts[1:] - self.class_starts[:-1]

    @property
    def min_per_class(self) -> int:
        return int(self.counts.min()) if self.n_classes else 0

    def class_images(self, c: int) -> torch.Tensor:
        """uint8 ``[n_c, C, H, W]``: the images of class ``c``."""
        return self.images[int(self.class_starts[c]):int(self.class_starts[c + 1])]

    @staticmethod
    def from_classes(per_class: list[torch.Tensor], names: list[str]) -> "ClassPool":
        """Build a pool from one uint8 ``[n_c, C, H, W]`` tensor per class."""
        counts = torch.tensor([0] + [len(t) for t in per_class], dtype=torch.int64)
        images = torch.cat(per_class) if per_class else torch.zeros(0, 1, 1, 1, dtype=torch.uint8)
        return ClassPool(images.contiguous(), counts.cumsum(0), list(names))


@dataclass
class MetaSplits:
    """The three disjoint class pools of a dataset. ``from_cache`` tells whether it was read from the cache;
    ``split_rule`` says how the loader dealt the classes to the splits where it chose them (a flat folder of
    class folders, see ``image_folder``), for messages and the run directory's ``split.json``."""

    train: ClassPool
    val: ClassPool
    test: ClassPool
    name: str
    channels: int
    image_size: int
    from_cache: bool = field(default=False, compare=False)
    split_rule: str = field(default="", compare=False)

    def pool(self, split: str) -> ClassPool:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return getattr(self, split)

    def summary(self) -> str:
        return ", ".join(f"{split_label(s)} {self.pool(s).n_classes} classes / {len(self.pool(s).images)} images"
                         for s in SPLITS)

    def class_split(self) -> dict[str, Any]:
        """The class names of each split, as the run directory's ``split.json`` holds them:
        ``{"dataset": name, ["split_rule": ...,] "train": [...], "val": [...], "test": [...]}``."""
        rule = {"split_rule": self.split_rule} if self.split_rule else {}
        return {"dataset": self.name, **rule, **{s: list(self.pool(s).class_names) for s in SPLITS}}


@dataclass
class Task:
    """One N-way k-shot task, pixels as float32 in [0, 1], grouped by label.

    ``x_train`` ``[N*k, C, H, W]`` with ``y_train`` ``[N*k]`` = ``0,..,0,1,..,N-1`` (k each); ``x_query``
    ``[N*q, C, H, W]`` with ``y_query`` ``[N*q]`` likewise; ``classes[label]`` is the pool class index of that label.
    ``seed``: the task's own seed (:func:`task_seed`); :meth:`generator` draws the task-learner's randomness from it
    (minibatches, drop-path), so that it too depends only on (seed, split, meta-step, index).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor
    classes: list[int]
    seed: int = 0

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Task":
        return Task(self.x_train.to(device, non_blocking=non_blocking),
                    self.y_train.to(device, non_blocking=non_blocking),
                    self.x_query.to(device, non_blocking=non_blocking),
                    self.y_query.to(device, non_blocking=non_blocking), list(self.classes), self.seed)

    def generator(self) -> torch.Generator:
        """A CPU generator for the task-learner, independent of the stream that drew the task's images."""
        return torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, 1]).generate_state(1)[0]))


def task_seed(seed: int, split: str, meta_step: int, index: int) -> int:
    """A 63-bit generator seed that depends only on ``(seed, split, meta_step, index)``."""
    if meta_step < 0 or index < 0:
        raise ValueError(f"meta_step and index must be >= 0, got {meta_step}, {index}")
    state = np.random.SeedSequence([seed % 2**64, _SPLIT_CODE[split], meta_step, index]).generate_state(2)
    return ((int(state[0]) << 32) | int(state[1])) & (2**63 - 1)


class TaskSampler:
    """Draws N-way k-shot tasks with ``n_query`` queries per class (disjoint from the shots) from one pool."""

    def __init__(self, pool: ClassPool, n_way: int, k_shot: int, n_query: int, seed: int, split: str,
                 dataset: str = "the dataset", shots_key: str = "data.k_shot") -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        where = f"the {split_label(split)} split of {dataset}"
        if n_way > pool.n_classes:
            raise DataError(f"data.n_way={n_way} but {where} has only {pool.n_classes} classes")
        need = k_shot + n_query
        if need > pool.min_per_class:
            worst = int(pool.counts.argmin())
            raise DataError(f"{shots_key} + data.n_query = {need} but some class of {where} has only "
                            f"{pool.min_per_class} images (e.g. '{pool.class_names[worst]}')")
        self.pool, self.n_way, self.k_shot, self.n_query = pool, n_way, k_shot, n_query
        self.seed, self.split = seed, split

    def sample(self, meta_step: int, index: int) -> Task:
        """The task ``index`` of meta-step ``meta_step`` (identical for identical arguments, anywhere)."""
        seed = task_seed(self.seed, self.split, meta_step, index)
        g = torch.Generator().manual_seed(seed)
        pool, n, k, q = self.pool, self.n_way, self.k_shot, self.n_query
        classes = torch.randperm(pool.n_classes, generator=g)[:n]  # random order = random labels
        starts, counts = pool.class_starts[classes], pool.counts[classes]
        picks = torch.stack([starts[i] + torch.randperm(int(counts[i]), generator=g)[:k + q] for i in range(n)])
        x = pool.images[picks.reshape(-1)].float().div_(255).reshape(n, k + q, *pool.images.shape[1:])
        shape = pool.images.shape[1:]
        return Task(
            x_train=x[:, :k].reshape(n * k, *shape).contiguous(),
            y_train=torch.arange(n).repeat_interleave(k),
            x_query=x[:, k:].reshape(n * q, *shape).contiguous(),
            y_query=torch.arange(n).repeat_interleave(q),
            classes=classes.tolist(),
            seed=seed,
        )


def check_tasks(cfg: DataConfig, splits: MetaSplits, seed: int = 0) -> dict[str, TaskSampler]:
    """The meta-train/val/test samplers for ``cfg`` (seeded with ``seed``, the run seed), raising
    :class:`DataError` when a split cannot give ``data.n_way``-way ``k + data.n_query`` tasks. Meta-training
    tasks have ``data.train_shots`` shots (0: ``data.k_shot``), the others ``data.k_shot``. Where the loader chose
    the split (``splits.split_rule``, a flat folder), the error ends with how it did."""
    train_shots = cfg.train_shots or cfg.k_shot
    try:
        return {s: TaskSampler(splits.pool(s), cfg.n_way, train_shots if s == "train" else cfg.k_shot, cfg.n_query,
                               seed, s, splits.name,
                               "data.train_shots" if s == "train" and cfg.train_shots else "data.k_shot")
                for s in SPLITS}
    except DataError as e:
        if not splits.split_rule:
            raise
        raise DataError(f"{e} ({splits.split_rule})") from None


# ---------------------------------------------------------------- cache

def _writable(path: Path) -> bool:
    """Writable by us AND not marked read-only (no write bit at all), which also holds back root."""
    try:
        return os.access(path, os.W_OK | os.X_OK) and bool(path.stat().st_mode & 0o222)
    except OSError:
        return False


def cache_path(root: str | Path, stem: str) -> Path:
    """``<root>/.metanas_cache/<stem>.pt`` if ``root`` is writable (and has a write bit), else
    ``$XDG_CACHE_HOME/metanas_ray/<stem>_<hash>.pt`` (``~/.cache`` by default)."""
    root = Path(root).expanduser().resolve()
    local = root / ".metanas_cache"
    if _writable(root) and (not local.exists() or _writable(local)):
        return local / f"{stem}.pt"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:12]
    return base / "metanas_ray" / f"{stem}_{digest}.pt"


def _pack(splits: MetaSplits, fingerprint: str) -> dict[str, Any]:
    return {
        "version": CACHE_VERSION, "fingerprint": fingerprint, "name": splits.name,
        "channels": splits.channels, "image_size": splits.image_size,
        "splits": {s: {"images": splits.pool(s).images, "class_starts": splits.pool(s).class_starts,
                       "class_names": list(splits.pool(s).class_names)} for s in SPLITS},
    }


def _unpack(obj: Any) -> MetaSplits:
    pools = {s: ClassPool(obj["splits"][s]["images"], obj["splits"][s]["class_starts"],
                          list(obj["splits"][s]["class_names"])) for s in SPLITS}
    return MetaSplits(pools["train"], pools["val"], pools["test"], str(obj["name"]), int(obj["channels"]),
                      int(obj["image_size"]), from_cache=True)


def _load_mapped(path: Path) -> Any:
    """``torch.load`` the cache memory-mapped (its tensors are the file's pages, shared by the processes of a
    node); read into memory where mapping fails (e.g. a filesystem without mmap). Raises if both fail."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a corrupt file fails below too, and is rebuilt by the caller
        obj = torch.load(path, map_location="cpu", weights_only=True)
        log.info("cache %s could not be memory-mapped (%s: %s); read into memory, one copy per process", path,
                 type(e).__name__, e)
        return obj


def _try_load(path: Path, fingerprint: str) -> MetaSplits | None:
    if not path.is_file():
        return None
    try:
        obj = _load_mapped(path)
        if not isinstance(obj, dict) or obj.get("version") != CACHE_VERSION:
            raise DataError(f"unexpected content (version {obj.get('version') if isinstance(obj, dict) else '?'})")
        if obj.get("fingerprint") != fingerprint:
            log.info("cache %s was built from other source files or by another version; rebuilding", path)
            return None
        return _unpack(obj)
    except Exception as e:  # noqa: BLE001 - any unreadable cache is rebuilt
        log.warning("cache file %s is corrupt (%s: %s); rebuilding it", path, type(e).__name__, e)
        return None


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a tmp file next to ``path``, then ``os.replace`` (readers never see a half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Best-effort inter-process lock so that concurrent workers build a cache once (no-op where unavailable).

    The lock file (and the cache folder, when this made it and it stayed empty) is removed afterwards, so that a
    failed load leaves nothing in the data root. A process still waiting on the removed file then builds too; the
    cache is re-read first and written atomically, so that costs time at worst, never a wrong cache."""
    made_dir = not path.parent.exists()
    lock = path.with_name(path.name + ".lock")
    try:
        import fcntl
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
        if made_dir:
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # only if empty


def cached_splits(root: str | Path, stem: str, fingerprint: str, build: Callable[[], MetaSplits]) -> MetaSplits:
    """Read the cache of ``root`` for ``stem`` if it matches ``fingerprint``, else ``build()`` and write it.

    The pools returned map the cache file (module docstring), also right after a build. A corrupt cache file is
    rebuilt (with a warning); a cache that cannot be written only logs a warning (the built pools are returned).
    """
    path = cache_path(root, stem)
    splits = _try_load(path, fingerprint)
    if splits is not None:
        log.info("loaded %s from cache %s", stem, path)
        return splits
    with _build_lock(path):
        splits = _try_load(path, fingerprint)  # another process may have built it meanwhile
        if splits is not None:
            return splits
        splits = build()
        try:
            save_atomic(_pack(splits, fingerprint), path)
            log.info("wrote cache %s", path)
            # map the file just written, as every later load does: its pages are then shared with the other
            # processes of this node, and the memory of the build is freed
            splits = _try_load(path, fingerprint) or splits
        except OSError as e:
            log.warning("could not write cache %s (%s); the data will be rebuilt next time", path, e)
    splits.from_cache = False
    return splits
