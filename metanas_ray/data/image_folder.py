"""Folder-of-class-folders datasets (``data.dataset: folder``) and miniImageNet (``data.dataset: miniimagenet``).

``folder``: ``<root>/{train,val,test}/<class>/*.{png,jpg,jpeg}``; 3 channels if any image is colour, else 1.

``miniimagenet`` (always RGB, 3 channels), either of its two usual layouts:

* Ravi & Larochelle: ``<root>/images/*.jpg`` plus ``<root>/train.csv``, ``val.csv``, ``test.csv`` with the header
  ``filename,label`` (the csv wins when both layouts are present);
* folders: ``<root>/{train,val,test}/<class>/*.jpg`` as for ``folder``.

Each split's classes are sorted by name and their images by file name. Every image is resized once to
``image_size``² (PIL LANCZOS, no aspect-preserving crop) and the result cached as one tensor file
(``<root>/.metanas_cache/<dataset>_<size>.pt``, see :func:`metanas_ray.data.tasks.cache_path`).
A class in two splits, an empty class, a bad csv or a missing / unreadable image raises :class:`DataError`.
"""
from __future__ import annotations

import csv
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .tasks import SPLITS, ClassPool, DataError, MetaSplits, cached_splits, split_label

log = logging.getLogger(__name__)

EXTENSIONS = (".png", ".jpg", ".jpeg")
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "F"}

Classes = list[tuple[str, list[Path]]]  # [(class name, image files)] of one split


def _scan_split(split_dir: Path) -> Classes:
    if not split_dir.is_dir():
        raise DataError(f"missing folder {split_dir} (expected {split_dir}/<class>/*.jpg|png)")
    classes = []
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in EXTENSIONS and not f.name.startswith("."))
        if not files:
            raise DataError(f"class folder {d} has no .png/.jpg/.jpeg images")
        classes.append((d.name, files))
    if not classes:
        raise DataError(f"folder {split_dir} has no class folders (expected {split_dir}/<class>/*.jpg|png)")
    return classes


def _read_csv(path: Path, images: Path) -> Classes:
    """A Ravi–Larochelle split file (``filename,label``) → classes of image paths under ``images``."""
    if not path.is_file():
        raise DataError(f"missing miniImageNet split file {path} (header 'filename,label')")
    groups: dict[str, list[Path]] = {}
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if header[:2] != ["filename", "label"]:
                raise DataError(f"miniImageNet split file {path} must start with the header 'filename,label', "
                                f"got {','.join(header) or 'an empty file'}")
            for line, row in enumerate(reader, start=2):
                if not row or not "".join(row).strip():
                    continue
                if len(row) < 2 or not row[0].strip() or not row[1].strip():
                    raise DataError(f"miniImageNet split file {path} line {line}: expected 'filename,label', "
                                    f"got {','.join(row)!r}")
                groups.setdefault(row[1].strip(), []).append(images / row[0].strip())
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read miniImageNet split file {path} ({type(e).__name__}: {e})") from None
    if not groups:
        raise DataError(f"miniImageNet split file {path} lists no images")
    return [(label, sorted(files)) for label, files in sorted(groups.items())]


def _check_disjoint(splits: dict[str, Classes], where: Path) -> None:
    seen: dict[str, str] = {}
    for split, classes in splits.items():
        for name, _ in classes:
            if name in seen:
                raise DataError(f"class '{name}' is in both the {split_label(seen[name])} and the "
                                f"{split_label(split)} split of {where}; a class may be in one split only")
            seen[name] = split


def _fingerprint(splits: dict[str, Classes], extra: bytes = b"", stat: bool = True) -> str:
    digest = hashlib.sha1(extra)
    for split, classes in splits.items():
        for name, files in classes:
            for f in files:
                st = f.stat() if stat else None
                digest.update(f"{split}/{name}/{f.name}:{st.st_size if st else ''}:"
                              f"{st.st_mtime_ns if st else ''}\n".encode())
    return digest.hexdigest()


def _decode(path: Path, size: int) -> tuple[np.ndarray, bool]:
    """An image file → (uint8 ``[size, size, 3]``, whether it was grayscale)."""
    try:
        with Image.open(path) as im:
            gray = im.mode in _GRAY_MODES
            im.draft("RGB", (size, size))  # JPEG: decode at reduced scale (>= size), much faster
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.LANCZOS)
            return np.asarray(im, dtype=np.uint8), gray
    except FileNotFoundError:
        raise DataError(f"missing image {path}") from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"cannot read image {path} ({type(e).__name__}: {e})") from None


def _build(splits: dict[str, Classes], size: int, name: str, force_rgb: bool) -> MetaSplits:
    log.info("building the %s %d×%d cache (%d images)", name, size, size,
             sum(len(f) for c in splits.values() for _, f in c))
    pools, any_colour = {}, False
    for split, classes in splits.items():
        files = [f for _, fs in classes for f in fs]
        out = np.empty((len(files), size, size, 3), dtype=np.uint8)
        for i, f in enumerate(files):
            out[i], gray = _decode(f, size)
            any_colour |= not gray
        starts = torch.tensor([0] + [len(fs) for _, fs in classes], dtype=torch.int64).cumsum(0)
        pools[split] = (torch.from_numpy(out).permute(0, 3, 1, 2), starts, [c for c, _ in classes])
    channels = 3 if force_rgb or any_colour else 1
    built = {s: ClassPool(im[:, :channels].contiguous(), st, names) for s, (im, st, names) in pools.items()}
    return MetaSplits(built["train"], built["val"], built["test"], name, channels, size)


def load_image_folder(root: str | Path, image_size: int = 84, name: str = "folder",
                      force_rgb: bool = False) -> MetaSplits:
    """``<root>/{train,val,test}/<class>/*.{png,jpg,jpeg}`` → meta-splits (cached)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root {root} is not a folder (expected {root}/train|val|test/<class>/*.jpg|png; "
                        f"point --data-root at it)")
    splits = {s: _scan_split(root / s) for s in SPLITS}
    _check_disjoint(splits, root)
    return cached_splits(root, f"{name}_{image_size}", "dir:" + _fingerprint(splits),
                         lambda: _build(splits, image_size, name, force_rgb))


def load_miniimagenet(root: str | Path, image_size: int = 84) -> MetaSplits:
    """miniImageNet from ``images/`` + ``train|val|test.csv`` or from ``train|val|test/<class>/`` folders."""
    root = Path(root).expanduser()
    if (root / "train.csv").is_file():
        images = root / "images"
        if not images.is_dir():
            raise DataError(f"miniImageNet: {root / 'train.csv'} found but no image folder {images} "
                            f"(expected {images}/*.jpg)")
        splits = {s: _read_csv(root / f"{s}.csv", images) for s in SPLITS}
        _check_disjoint(splits, root)
        csv_bytes = b"".join((root / f"{s}.csv").read_bytes() for s in SPLITS)
        fingerprint = "csv:" + _fingerprint(splits, csv_bytes, stat=False)
        return cached_splits(root, f"miniimagenet_{image_size}", fingerprint,
                             lambda: _build(splits, image_size, "miniimagenet", force_rgb=True))
    if (root / "train").is_dir():
        return load_image_folder(root, image_size, name="miniimagenet", force_rgb=True)
    raise DataError(f"miniImageNet not found in {root}: expected {root}/images/*.jpg with train.csv, val.csv, "
                    f"test.csv (header 'filename,label'), or {root}/train|val|test/<class>/*.jpg; "
                    f"point --data-root (data.root) at it")
