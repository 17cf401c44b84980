"""Folder-of-class-folders datasets (``data.dataset: folder``) and miniImageNet (``data.dataset: miniimagenet``).

``folder``, either layout:

* split: ``<root>/{train,val,test}/<class>/<images>``, the splits as given (used whenever ``<root>`` holds any
  of ``train``, ``val``, ``test``);
* flat: ``<root>/<class>/<images>``, a user's folder as it is. Its classes are dealt to meta-train / meta-val /
  meta-test by :func:`split_classes`: ordered by the SHA-256 of their names (a shuffle that depends on the class
  names alone, not on ``run.seed``, so every run and ``evaluate`` see the same meta-test classes on any
  machine), then cut into ``data.split_fractions`` of them (default 0.64 / 0.16 / 0.20, miniImageNet's
  64 / 16 / 20; largest remainder). Each run writes the result into its run directory (``split.json``).

3 channels if any image is colour, else 1.

``miniimagenet`` (always RGB, 3 channels), either of its two usual layouts:

* Ravi & Larochelle: ``<root>/images/*.jpg`` plus ``<root>/train.csv``, ``val.csv``, ``test.csv`` with the header
  ``filename,label`` (the csv wins when both layouts are present);
* folders: ``<root>/{train,val,test}/<class>/*.jpg`` as for ``folder``.

Images: every format Pillow reads (PNG, JPEG, BMP, GIF, TIFF, WebP, ...; the first frame of an animation),
greyscale or colour (16-bit greyscale scaled to 8 bits), any size. A file whose extension is none of Pillow's
readable formats is opened to see whether Pillow identifies it; one it cannot identify (a README, a ``.csv``) is
skipped with one warning naming it. A file with an image extension that does not decode, or an identified image
that does not, is a corrupt image: :class:`DataError` naming it. Hidden files (``.*``) are ignored.

Each split's classes are sorted by name and their images by file name. Every image is resized once to
``image_size``² (PIL LANCZOS, no aspect-preserving crop) and the result cached as one tensor file
(``<root>/.metanas_cache/<dataset>_<size>.pt``, for a flat folder ``folder_<size>_split_<fractions>.pt``, see
:func:`metanas_ray.data.tasks.cache_path`). A class in two splits, an empty class, a bad csv or a missing /
unreadable image raises :class:`DataError`; so does a split too small for the tasks, naming the fractions that
made it (:func:`metanas_ray.data.tasks.check_tasks`).
"""
from __future__ import annotations

import csv
import hashlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .tasks import SPLITS, ClassPool, DataError, MetaSplits, cached_splits, split_label

log = logging.getLogger(__name__)

SPLIT_FRACTIONS = (0.64, 0.16, 0.20)  # data.split_fractions' default: meta-train / meta-val / meta-test
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}

Classes = list[tuple[str, list[Path]]]  # [(class name, image files)] of one split


def _image_extensions() -> frozenset[str]:
    """The file extensions of every format Pillow can open (``.png``, ``.jpg``, ``.webp``, ``.tif``, ...)."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _is_image(path: Path, extensions: frozenset[str]) -> bool:
    """Whether ``path`` is an image: an image extension, or content that Pillow identifies."""
    if path.suffix.lower() in extensions:
        return True  # decoded later; one that does not decode is a corrupt image
    try:
        with Image.open(path):
            return True
    except UnidentifiedImageError:
        return False
    except (OSError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}: {e})") from None


def _scan_classes(folder: Path, expected: str) -> Classes:
    """The class folders of ``folder`` with their image files, both sorted by name; a file that is not an image
    is skipped with a warning, a class folder without images is an error."""
    if not folder.is_dir():
        raise DataError(f"missing folder {folder} (expected {expected})")
    extensions, classes = _image_extensions(), []
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = []
        for f in sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")):
            if _is_image(f, extensions):
                files.append(f)
            else:
                log.warning("skipping %s: not an image Pillow can read", f)
        if not files:
            raise DataError(f"class folder {d} has no images (none of its files is one Pillow can read)")
        classes.append((d.name, files))
    if not classes:
        raise DataError(f"folder {folder} has no class folders (expected {expected})")
    return classes


def _apportion(n: int, fractions: Sequence[float]) -> list[int]:
    """``n`` split in proportion to ``fractions`` (normalised): ⌊f·n⌋ each, the rest one by one to the largest
    remainders (ties: the earlier split). 100 classes at 0.64 / 0.16 / 0.20 → 64 / 16 / 20; 10 → 6 / 2 / 2."""
    exact = [f * n / sum(fractions) for f in fractions]
    counts = [math.floor(x + 1e-9) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))[:max(0, n - sum(counts))]:
        counts[i] += 1
    return counts


def split_classes(classes: Classes, fractions: Sequence[float] = SPLIT_FRACTIONS) -> dict[str, Classes]:
    """Deal the classes of a flat folder to meta-train / meta-val / meta-test, deterministically.

    The classes are ordered by the SHA-256 of their names (a shuffle that depends on the names alone: the same
    on every machine and every library version), the first ``fractions[0]`` of them (:func:`_apportion`) go to
    meta-train, the next ``fractions[1]`` to meta-val, the rest to meta-test; each split is sorted by name.
    """
    if len(fractions) != len(SPLITS):
        raise DataError(f"data.split_fractions needs {len(SPLITS)} fractions (train, val, test), got {list(fractions)}")
    order = sorted(classes, key=lambda c: (hashlib.sha256(c[0].encode()).hexdigest(), c[0]))
    out, start = {}, 0
    for split, count in zip(SPLITS, _apportion(len(order), fractions)):
        out[split] = sorted(order[start:start + count], key=lambda c: c[0])
        start += count
    return out


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


def _to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit greyscale (modes ``I;16*``, ``I``, ``F``) → 8-bit ``L`` (``convert("RGB")`` would clip at 255):
    ``I;16*`` ÷ 257, ``I`` too when a value passes 255, ``F`` × 255 when all lie in [0, 1]. Others unchanged."""
    if not (im.mode in ("I", "F") or im.mode.startswith("I;16")):
        return im
    a = np.asarray(im, dtype=np.float64)
    top = a.max(initial=0.0)
    sixteen = im.mode.startswith("I;16") or (im.mode == "I" and top > 255)
    scale = 255.0 / 65535.0 if sixteen else (255.0 if im.mode == "F" and top <= 1.0 else 1.0)
    return Image.fromarray(np.clip(a * scale, 0, 255).round().astype(np.uint8), "L")


def _decode(path: Path, size: int) -> tuple[np.ndarray, bool]:
    """An image file → (uint8 ``[size, size, 3]``, whether it was grayscale)."""
    try:
        with Image.open(path) as im:
            gray = im.mode in _GRAY_MODES
            im.draft("RGB", (size, size))  # JPEG: decode at reduced scale (>= size), much faster
            im = _to_8bit(im).convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.LANCZOS)
            return np.asarray(im, dtype=np.uint8), gray
    except FileNotFoundError:
        raise DataError(f"missing image {path}") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}, a corrupt image? ({type(e).__name__}: {e})") from None


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


def load_image_folder(root: str | Path, image_size: int = 84, name: str = "folder", force_rgb: bool = False,
                      split_fractions: Sequence[float] = SPLIT_FRACTIONS) -> MetaSplits:
    """``<root>/{train,val,test}/<class>/<images>``, or a flat ``<root>/<class>/<images>`` dealt to the splits
    by ``split_fractions`` (:func:`split_classes`) → meta-splits (cached)."""
    root = Path(root).expanduser()
    layouts = f"{root}/<class>/<images> or {root}/train|val|test/<class>/<images>"
    if not root.is_dir():
        raise DataError(f"data.root {root} is not a folder (expected {layouts}; point --data-root at it)")
    if any((root / s).is_dir() for s in SPLITS):
        splits = {s: _scan_classes(root / s, f"{root / s}/<class>/<images>; a flat {root}/<class>/ folder may "
                                             f"have no class named train, val or test") for s in SPLITS}
        _check_disjoint(splits, root)
        return cached_splits(root, f"{name}_{image_size}", "dir:" + _fingerprint(splits),
                             lambda: _build(splits, image_size, name, force_rgb))
    classes = _scan_classes(root, layouts)
    splits = split_classes(classes, split_fractions)
    fractions = [float(f) for f in split_fractions]
    tag = "_".join(f"{f:g}" for f in fractions)
    loaded = cached_splits(root, f"{name}_{image_size}_split_{tag}", f"flat:{fractions}:" + _fingerprint(splits),
                           lambda: _build(splits, image_size, name, force_rgb))
    loaded.split_rule = (f"data.split_fractions={fractions} dealt the {len(classes)} class folders of {root} "
                         f"to meta-train / meta-val / meta-test: "
                         f"{' / '.join(str(len(splits[s])) for s in SPLITS)} classes")
    log.info("%s", loaded.split_rule)
    return loaded


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
    if any((root / s).is_dir() for s in SPLITS):
        return load_image_folder(root, image_size, name="miniimagenet", force_rgb=True)
    raise DataError(f"miniImageNet not found in {root}: expected {root}/images/*.jpg with train.csv, val.csv, "
                    f"test.csv (header 'filename,label'), or {root}/train|val|test/<class>/*.jpg; "
                    f"point --data-root (data.root) at it")
