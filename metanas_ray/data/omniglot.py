"""Omniglot (Lake et al. 2015) as MetaNAS / MAML use it: 28×28 grayscale, each 90° rotation a class of its own.

Source, under the data root (``data.root`` / ``--data-root``), for each of the two official sets
``images_background`` (30 alphabets, 964 characters) and ``images_evaluation`` (20 alphabets, 659 characters):
the official zip ``<set>.zip`` or the folder it unpacks to, ``<set>/<Alphabet>/characterNN/*.png`` (the zip
wins when both exist; ``<root>/omniglot-py/`` as torchvision lays it out works too). With ``download=True`` a
missing zip is fetched from the official repository and its md5 checked (only for files downloaded here).

Splits (``data.split``), both deterministic, no character in two splits:

``alphabets`` (the default), by whole alphabets:

* meta-test: all evaluation alphabets (659 characters);
* meta-val: ``sorted(background alphabets)[5::6]`` (indices 5, 11, 17, 23, 29: 5 of the 30 alphabets), or the
  last alphabet when there are fewer than 6 (small fakes in tests) — see :func:`val_alphabets`;
* meta-train: the other background alphabets.

``vinyals``, the split of Vinyals et al. 2016 (Matching Networks) as torchmeta's ``use_vinyals_split`` and the
official MetaNAS ``--use_vinyals_split`` give it: 1028 / 172 / 423 characters for meta-train / meta-val /
meta-test, listed in ``omniglot_vinyals.json`` next to this module (from torchmeta 1.8.0's assets, MIT license).
Meta-train holds all background alphabets but 5 plus 236 evaluation characters; meta-val 5 background
alphabets; meta-test the remaining 423 evaluation characters (one alphabet, Gurmukhi, is cut between
meta-train and meta-test). Every listed character must be in the data (else :class:`DataError` naming it).

Each character gives 4 classes, its rotations by 0, 90, 180, 270 degrees (``Alphabet/character01/rot90``); the
rotations of a character always share its split. Classes are ordered by (set, alphabet, character, rotation).

Preprocessing: each 105×105 drawing → grayscale, PIL LANCZOS resize to ``image_size``², inverted so strokes
are bright and the background is 0, uint8. The pools, rotations included (~100 MB at 28²), are cached as one
tensor file per split rule, see :func:`metanas_ray.data.tasks.cache_path` (``<root>/.metanas_cache/omniglot_<size>.pt``
for ``alphabets``, ``omniglot_vinyals_<size>.pt`` for ``vinyals``; under ``$XDG_CACHE_HOME/metanas_ray/`` with a
``_<hash>`` suffix when the root is read-only), and read memory-mapped: the workers of a node share one copy.
(Caches written before the rotations were stored, which held the characters alone, have another fingerprint
and are rebuilt.)

Not torchvision (``benchmarks/data_cache.py`` measured it), one reason each:

* download: ``torchvision.datasets.utils.download_url`` has no timeout and leaves a partial or bad file in place.
* decoding: ``torchvision.io.decode_png`` is slower (≈230 vs ≈190 CPU µs a drawing) and its tensors lack LANCZOS.
* ``datasets.Omniglot``, ``download_and_extract_archive``: they extract 32,460 files; the zips are read as they are.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .tasks import ClassPool, DataError, MetaSplits, cached_splits

log = logging.getLogger(__name__)

SETS = ("images_background", "images_evaluation")
URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{}.zip"
MD5 = {"images_background": "68d2efa1b9178cc56df9314c21c6e718", "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811"}
ROTATIONS = (0, 90, 180, 270)
SPLIT_RULE = "val=sorted(background)[5::6] or last; rot=0,90,180,270"  # part of the cache key
CACHE_LAYOUT = "pools=rotated"  # part of the cache key: the cache holds the rotated pools (before: the characters)
SPLITS_BY = ("alphabets", "vinyals")  # data.split
VINYALS_FILE = Path(__file__).with_name("omniglot_vinyals.json")
DOWNLOAD_TIMEOUT_S = 60.0


def val_alphabets(alphabets: list[str]) -> list[str]:
    """The meta-val alphabets among the background ones: every 6th of the sorted names (indices 5, 11, ...),
    or the last one when there are fewer than 6."""
    names = sorted(alphabets)
    return names[5::6] if len(names) >= 6 else names[-1:]


def vinyals_split(path: Path | None = None) -> dict[str, list[tuple[str, str, str]]]:
    """The Vinyals split: ``{"train" | "val" | "test": [(set, alphabet, character)]}`` read from ``path``
    (default :data:`VINYALS_FILE`); :class:`DataError` if a character is listed twice."""
    path = VINYALS_FILE if path is None else path
    try:
        data = json.loads(path.read_text())
        out = {split: [(s, a, c) for s, alphabets in data[split].items() for a, chars in alphabets.items()
                       for c in chars] for split in ("train", "val", "test")}
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise DataError(f"Omniglot split file {path} is unreadable ({type(e).__name__}: {e}); reinstall "
                        f"metanas_ray") from None
    seen: set[tuple[str, str, str]] = set()
    for entries in out.values():
        for entry in entries:
            if entry in seen:
                raise DataError(f"Omniglot split file {path} lists {'/'.join(entry)} twice")
            seen.add(entry)
    return out


@dataclass
class _Source:
    """One set (background or evaluation) in a zip or a folder: ``chars`` = ``[(alphabet, character, members)]``."""

    path: Path
    is_zip: bool
    chars: list[tuple[str, str, list[str]]]
    fingerprint: str

    def read(self, zf: zipfile.ZipFile | None, member: str) -> bytes:
        return zf.read(member) if zf is not None else (self.path / member).read_bytes()


def _corrupt(path: Path, e: BaseException) -> DataError:
    return DataError(f"Omniglot file {path} is corrupt or truncated ({type(e).__name__}: {e}); delete it and put a "
                     f"good copy there (or let data.download fetch it again)")


def _stat_fingerprint(path: Path) -> str:
    st = path.stat()
    return f"zip:{path.name}:{st.st_size}:{st.st_mtime_ns}"


def _scan_zip(path: Path) -> _Source:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise _corrupt(path, e) from None
    groups: dict[tuple[str, str], list[str]] = {}
    for info in infos:
        parts = info.filename.split("/")
        if (info.is_dir() or len(parts) < 3 or not parts[-1].lower().endswith(".png")
                or any(p.startswith(("__MACOSX", "._")) for p in parts)):
            continue
        groups.setdefault((parts[-3], parts[-2]), []).append(info.filename)
    chars = [(a, c, sorted(m)) for (a, c), m in sorted(groups.items())]
    return _Source(path, True, chars, _stat_fingerprint(path))


def _scan_folder(path: Path) -> _Source:
    chars, digest = [], hashlib.sha1()
    for alphabet in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for char in sorted(p for p in alphabet.iterdir() if p.is_dir()):
            files = sorted((e for e in os.scandir(char)
                            if e.name.lower().endswith(".png") and not e.name.startswith(".")), key=lambda e: e.name)
            if not files:
                raise DataError(f"Omniglot folder {char} has no .png drawings; re-extract {path.name}.zip")
            members = [f"{alphabet.name}/{char.name}/{e.name}" for e in files]
            chars.append((alphabet.name, char.name, members))
            for m, e in zip(members, files):
                st = e.stat()
                digest.update(f"{m}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return _Source(path, False, chars, "dir:" + digest.hexdigest())


def _locate(root: Path, name: str) -> Path | None:
    for base in (root, root / "omniglot-py"):
        if (base / f"{name}.zip").is_file():
            return base / f"{name}.zip"
        if (base / name).is_dir():
            return base / name
    return None


def _where_message(root: Path, missing: list[str]) -> str:
    return (f"Omniglot not found in {root}: missing {' and '.join(m + '.zip' for m in missing)}. Put the official "
            f"images_background.zip and images_evaluation.zip (https://github.com/brendenlake/omniglot/tree/master/"
            f"python), or the folders they unpack to (images_background/<Alphabet>/characterNN/*.png, "
            f"images_evaluation/...), into {root}, or point --data-root (data.root) at a folder that has them")


def _download(root: Path, name: str, missing: list[str]) -> Path:
    """Fetch ``<name>.zip`` into ``root`` (tmp file, md5 check, rename). Raises :class:`DataError` on failure,
    leaving no partial file and none of the folders it created for the download."""
    url, dest = URL.format(name), root / f"{name}.zip"
    where = _where_message(root, missing)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    md5 = hashlib.md5()
    created = [p for p in (root, *root.parents) if not p.exists()]  # deepest first
    log.info("downloading %s to %s", url, dest)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp, open(tmp, "wb") as f:
            while chunk := resp.read(1 << 20):
                md5.update(chunk)
                f.write(chunk)
        if md5.hexdigest() == MD5[name]:
            os.replace(tmp, dest)
            return dest
        error = f"downloaded {url} has md5 {md5.hexdigest()}, expected {MD5[name]}"
    except (urllib.error.URLError, OSError, ValueError) as e:  # URLError, timeouts, refused writes, bad URL
        error = f"downloading {url} failed ({type(e).__name__}: {e})"
    finally:
        tmp.unlink(missing_ok=True)
    for p in created:  # an empty folder would pass for the dataset's place later (and mislead)
        try:
            p.rmdir()
        except OSError:
            break
    raise DataError(f"{where}; {error}")


def _decode(data: bytes, size: int) -> np.ndarray:
    """PNG bytes → uint8 ``[size, size]``, strokes bright, background 0."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.LANCZOS)
        return 255 - np.asarray(im, dtype=np.uint8)


def _read_chars(parts: list[tuple[_Source, list[tuple[str, str, list[str]]]]], size: int) -> ClassPool:
    """Decode the drawings of the characters of each ``(source, chars)`` part, in order, into a pool of unrotated
    characters (``Alphabet/characterNN``)."""
    chars = [c for _, cs in parts for c in cs]
    out = np.empty((sum(len(m) for _, _, m in chars), 1, size, size), dtype=np.uint8)
    i = 0
    for src, cs in parts:
        member = ""
        try:
            with zipfile.ZipFile(src.path) if src.is_zip else contextlib.nullcontext() as zf:
                for _, _, members in cs:
                    for member in members:
                        out[i, 0] = _decode(src.read(zf, member), size)
                        i += 1
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, UnidentifiedImageError) as e:
            raise _corrupt(src.path if src.is_zip else src.path / member, e) from None
    counts = torch.tensor([0] + [len(m) for _, _, m in chars]).cumsum(0)
    return ClassPool(torch.from_numpy(out), counts, [f"{a}/{c}" for a, c, _ in chars])


def with_rotations(pool: ClassPool) -> ClassPool:
    """Each class of ``pool`` → 4 classes, rotated by 0/90/180/270 degrees (ordered class-major)."""
    if pool.n_classes == 0:
        return pool
    n_rot = len(ROTATIONS)
    counts = pool.counts
    new_starts = torch.cat([torch.zeros(1, dtype=torch.int64), counts.repeat_interleave(n_rot).cumsum(0)])
    cls = torch.arange(pool.n_classes).repeat_interleave(counts)  # class of each image
    pos = torch.arange(len(pool.images)) - pool.class_starts[cls]  # its position within the class
    out = torch.empty((n_rot * len(pool.images), *pool.images.shape[1:]), dtype=torch.uint8)
    images = pool.images.numpy()
    for r, degrees in enumerate(ROTATIONS):  # numpy: rotates uint8 several times faster than torch here
        rotated = torch.from_numpy(np.ascontiguousarray(np.rot90(images, degrees // 90, axes=(2, 3))))
        out.index_copy_(0, new_starts[cls * n_rot + r] + pos, rotated)
    names = [f"{name}/rot{d}" for name in pool.class_names for d in ROTATIONS]
    return ClassPool(out, new_starts, names)


def _split_by_alphabets(sources: dict[str, _Source], size: int) -> tuple[ClassPool, ClassPool, ClassPool]:
    bg, ev = sources["images_background"], sources["images_evaluation"]
    alphabets = sorted({a for a, _, _ in bg.chars})
    if len(alphabets) < 2:
        raise DataError(f"Omniglot {bg.path} has {len(alphabets)} alphabet(s); need at least 2 for meta-train "
                        f"and meta-val")
    val = set(val_alphabets(alphabets))
    log.info("building the Omniglot %d×%d cache from %s and %s (alphabets split, meta-val alphabets: %s)", size,
             size, bg.path, ev.path, ", ".join(sorted(val)))
    return (_read_chars([(bg, [c for c in bg.chars if c[0] not in val])], size),
            _read_chars([(bg, [c for c in bg.chars if c[0] in val])], size),
            _read_chars([(ev, ev.chars)], size))


def _split_by_vinyals(sources: dict[str, _Source], lists: dict[str, list[tuple[str, str, str]]],
                      size: int) -> tuple[ClassPool, ClassPool, ClassPool]:
    where = {(name, a, c): split for split, entries in lists.items() for name, a, c in entries}
    present = {(name, a, c) for name, src in sources.items() for a, c, _ in src.chars}
    missing = ["/".join(e) for entries in lists.values() for e in entries if e not in present]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(f"Omniglot character {missing[0]}{more} of the vinyals split (data.split: vinyals) "
                        f"not found in {sources['images_background'].path.parent}; the split needs the complete "
                        f"official images_background and images_evaluation sets")
    unused = len(present) - len(where)
    log.info("building the Omniglot %d×%d cache from %s and %s (vinyals split%s)", size, size,
             sources["images_background"].path, sources["images_evaluation"].path,
             f"; {unused} characters of the data are in none of its lists" if unused else "")
    train, val, test = (_read_chars([(src, [c for c in src.chars if where.get((name, c[0], c[1])) == split])
                                     for name, src in sources.items()], size) for split in ("train", "val", "test"))
    return train, val, test


def load_omniglot(root: str | Path, image_size: int = 28, download: bool = True,
                  split: str = "alphabets") -> MetaSplits:
    """Load (building the cache on first use) Omniglot's meta-train / meta-val / meta-test splits, split by
    ``split`` (``data.split``): ``alphabets`` | ``vinyals``."""
    if split not in SPLITS_BY:
        raise DataError(f"data.split must be 'alphabets' or 'vinyals' for Omniglot, got '{split}'")
    lists = vinyals_split() if split == "vinyals" else None
    root = Path(root).expanduser()
    found = {name: _locate(root, name) for name in SETS}
    missing = [name for name, p in found.items() if p is None]
    if missing and not download:
        raise DataError(_where_message(root, missing) + " (data.download is false)")
    for name in missing:
        found[name] = _download(root, name, missing)
    # cheap fingerprints: a zip's size and mtime (its listing is read only to build), a folder's file listing
    folders = {name: _scan_folder(path) for name, path in found.items() if path.suffix != ".zip"}
    fingerprint = "|".join(folders[n].fingerprint if n in folders else _stat_fingerprint(found[n]) for n in SETS)
    if lists is None:
        stem, rule = f"omniglot_{image_size}", SPLIT_RULE
    else:
        digest = hashlib.sha1(json.dumps(lists, sort_keys=True).encode()).hexdigest()[:12]
        stem, rule = f"omniglot_vinyals_{image_size}", f"vinyals:{digest}; rot=0,90,180,270"

    def build() -> MetaSplits:
        sources = {n: folders[n] if n in folders else _scan_zip(found[n]) for n in SETS}
        for name, src in sources.items():
            if not src.chars:
                raise DataError(f"Omniglot {src.path} holds no drawings (expected {name}/<Alphabet>/characterNN/*.png)")
        chars = (_split_by_alphabets(sources, image_size) if lists is None
                 else _split_by_vinyals(sources, lists, image_size))
        train, val, test = (with_rotations(pool) for pool in chars)  # cached rotated: mapped as is, no copy
        return MetaSplits(train=train, val=val, test=test, name="omniglot", channels=1, image_size=image_size)

    return cached_splits(root, stem, f"{fingerprint}|split={rule}|{CACHE_LAYOUT}", build)
