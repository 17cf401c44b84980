"""Omniglot on small fakes in the official layout (zips and folders), the cache, errors; and the real copy."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metanas_ray.config import Config, ConfigError, DataConfig
from metanas_ray.data import (DataError, TaskSampler, check_tasks, load_omniglot, load_splits, val_alphabets,
                              with_rotations)
from metanas_ray.data import omniglot as omniglot_module
from test_data_tasks import mapped_file

REAL = Path(__file__).parents[1].parent / "shared/data/omniglot"
BACKGROUND = ["Alpha", "Beta", "Gamma", "Delta"]  # sorted: Alpha, Beta, Delta, Gamma → val: Gamma (the last)
EVALUATION = ["Omega", "Psi"]
CHARS, DRAWINGS = 3, 20


def _write_set(base: Path, name: str, alphabets: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for a in alphabets:
        for c in range(1, CHARS + 1):
            d = base / name / a / f"character{c:02d}"
            d.mkdir(parents=True)
            for k in range(1, DRAWINGS + 1):
                ink = np.zeros((105, 105), dtype=bool)
                y, x = rng.integers(10, 80, size=2)
                ink[y:y + rng.integers(5, 20), x:x + rng.integers(3, 20)] = True
                ink |= rng.random((105, 105)) < 0.02
                Image.fromarray(~ink).save(d / f"{1000 + c:04d}_{k:02d}.png")  # mode "1": black strokes on white


def _zip_dir(folder: Path, dest: Path) -> None:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(folder, folder.name + "/")
        for p in sorted(folder.rglob("*")):
            zf.write(p, str(p.relative_to(folder.parent)) + ("/" if p.is_dir() else ""))


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A folder copy and a zip copy of a 4 + 2 alphabet fake Omniglot (built once per module)."""
    base = tmp_path_factory.mktemp("fake_omniglot")
    folders, zips = base / "folders", base / "zips"
    _write_set(folders, "images_background", BACKGROUND, 0)
    _write_set(folders, "images_evaluation", EVALUATION, 1)
    zips.mkdir()
    for name in omniglot_module.SETS:
        _zip_dir(folders / name, zips / f"{name}.zip")
    return {"folders": folders, "zips": zips}


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _same(a, b) -> None:
    assert (a.name, a.channels, a.image_size) == (b.name, b.channels, b.image_size)
    for split in ("train", "val", "test"):
        pa, pb = a.pool(split), b.pool(split)
        assert torch.equal(pa.images, pb.images) and torch.equal(pa.class_starts, pb.class_starts)
        assert pa.class_names == pb.class_names


def test_val_alphabet_rule() -> None:
    names = [f"A{i:02d}" for i in range(30)]
    assert val_alphabets(names[::-1]) == ["A05", "A11", "A17", "A23", "A29"]
    assert val_alphabets(["d", "b", "c", "a"]) == ["d"]
    assert val_alphabets([f"A{i}" for i in range(7)]) == ["A5"]


def test_zip_and_folders_give_the_same_splits(fake: dict[str, Path], tmp_path: Path) -> None:
    from_zip = load_omniglot(_copy(fake["zips"], tmp_path / "z"), 28, download=False)
    from_dir = load_omniglot(_copy(fake["folders"], tmp_path / "d"), 28, download=False)
    _same(from_zip, from_dir)
    s = from_zip
    assert s.train.n_classes == 3 * CHARS * 4 and s.val.n_classes == 1 * CHARS * 4
    assert s.test.n_classes == 2 * CHARS * 4
    for split in ("train", "val", "test"):
        pool = s.pool(split)
        assert pool.images.shape[1:] == (1, 28, 28) and pool.images.dtype == torch.uint8
        assert pool.counts.tolist() == [DRAWINGS] * pool.n_classes
    assert s.val.class_names[:4] == [f"Gamma/character01/rot{r}" for r in (0, 90, 180, 270)]
    # strokes bright, background 0
    assert float(s.train.images.float().mean()) < 60 and int(s.train.images.max()) > 200


def test_splits_are_disjoint_by_class_character_and_alphabet(fake: dict[str, Path], tmp_path: Path) -> None:
    s = load_omniglot(_copy(fake["zips"], tmp_path / "z"), 28, download=False)
    names = {split: s.pool(split).class_names for split in ("train", "val", "test")}
    chars = {split: {n.rsplit("/", 1)[0] for n in v} for split, v in names.items()}
    alphabets = {split: {n.split("/")[0] for n in v} for split, v in names.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(names[a]) & set(names[b])
        assert not chars[a] & chars[b]
        assert not alphabets[a] & alphabets[b]
    assert alphabets["val"] == {"Gamma"} and alphabets["test"] == set(EVALUATION)
    assert all(len(set(v)) == len(v) for v in names.values())


def test_rotations_are_classes(fake: dict[str, Path], tmp_path: Path) -> None:
    s = load_omniglot(_copy(fake["folders"], tmp_path / "d"), 16, download=False)
    assert s.image_size == 16 and s.train.images.shape[-1] == 16
    base = s.train.class_images(0)
    for r in range(1, 4):
        assert s.train.class_names[r].endswith(f"/rot{90 * r}")
        assert torch.equal(s.train.class_images(r), torch.rot90(base, r, dims=(2, 3)))


def test_the_cache_holds_the_rotated_pools_mapped_and_draws_what_rotating_after_loading_drew(
        fake: dict[str, Path], tmp_path: Path) -> None:
    """The pools are read memory-mapped as cached (no per-process rotated copy), and are exactly what rotating
    the characters after loading gave before the cache held the rotations: the same tasks for (seed, step, index)."""
    root = _copy(fake["zips"], tmp_path / "z")
    splits = [load_omniglot(root, 28, download=False) for _ in range(2)]  # the build, then a cache hit
    sources = {n: omniglot_module._scan_zip(root / f"{n}.zip") for n in omniglot_module.SETS}
    before = dict(zip(("train", "val", "test"), map(with_rotations, omniglot_module._split_by_alphabets(sources, 28))))
    cache = str((root / ".metanas_cache" / "omniglot_28.pt").resolve())
    for s in splits:
        for split, old in before.items():
            pool = s.pool(split)
            if Path("/proc/self/maps").is_file():
                assert mapped_file(pool.images) == cache
            assert torch.equal(pool.images, old.images) and pool.class_names == old.class_names
            new_tasks, old_tasks = TaskSampler(pool, 5, 1, 3, 7, split), TaskSampler(old, 5, 1, 3, 7, split)
            for step, index in ((0, 0), (1, 3), (40, 1)):
                a, b = new_tasks.sample(step, index), old_tasks.sample(step, index)
                assert a.classes == b.classes and torch.equal(a.x_train, b.x_train)
                assert torch.equal(a.x_query, b.x_query)


def test_a_cache_written_before_the_rotations_were_cached_is_rebuilt_not_misread(fake: dict[str, Path],
                                                                                tmp_path: Path) -> None:
    root = _copy(fake["zips"], tmp_path / "z")
    s = load_omniglot(root, 28, download=False)
    cache = root / ".metanas_cache" / "omniglot_28.pt"
    new = torch.load(cache, weights_only=True)
    old = {**new, "fingerprint": new["fingerprint"].replace("|" + omniglot_module.CACHE_LAYOUT, ""), "splits": {
        split: {"images": torch.cat([pool.class_images(c) for c in range(0, pool.n_classes, 4)]),
                "class_starts": pool.class_starts[::4].clone(),
                "class_names": [n.rsplit("/", 1)[0] for n in pool.class_names[::4]]}
        for split, pool in ((x, s.pool(x)) for x in ("train", "val", "test"))}}  # the characters, unrotated
    cache.unlink()
    torch.save(old, cache)
    rebuilt = load_omniglot(root, 28, download=False)
    assert not rebuilt.from_cache and load_omniglot(root, 28, download=False).from_cache
    _same(s, rebuilt)


def test_cache_hit_and_rebuild(fake: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _copy(fake["zips"], tmp_path / "z")
    cache = root / ".metanas_cache" / "omniglot_28.pt"
    first = load_omniglot(root, 28, download=False)
    assert not first.from_cache and cache.is_file()
    mtime = cache.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="metanas_ray.data"):
        second = load_omniglot(root, 28, download=False)
    assert second.from_cache and cache.stat().st_mtime_ns == mtime
    assert any("from cache" in r.getMessage() for r in caplog.records)
    _same(first, second)
    # a corrupt cache is rebuilt with a warning (a new file: first and second map the old one, which must not
    # shrink under them)
    cache.unlink()
    cache.write_bytes(b"not a torch file" * 10)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="metanas_ray.data"):
        rebuilt = load_omniglot(root, 28, download=False)
    assert not rebuilt.from_cache
    assert any(r.levelno == logging.WARNING and "corrupt" in r.getMessage() for r in caplog.records)
    _same(first, rebuilt)
    assert load_omniglot(root, 28, download=False).from_cache
    assert not list(cache.parent.glob("*.tmp"))


def test_changed_source_invalidates_cache(fake: dict[str, Path], tmp_path: Path) -> None:
    root = _copy(fake["folders"], tmp_path / "d")
    load_omniglot(root, 28, download=False)
    extra = root / "images_evaluation" / "Omega" / "character01" / "1001_21.png"
    shutil.copy(extra.with_name("1001_01.png"), extra)
    s = load_omniglot(root, 28, download=False)
    assert not s.from_cache and s.test.class_starts[1] == DRAWINGS + 1


def test_read_only_root_caches_under_xdg(fake: dict[str, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    root = _copy(fake["zips"], tmp_path / "ro")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root.chmod(0o555)
    try:
        load_omniglot(root, 28, download=False)
        assert not (root / ".metanas_cache").exists()
        files = list((tmp_path / "xdg" / "metanas_ray").glob("omniglot_28_*.pt"))
        assert len(files) == 1
        assert load_omniglot(root, 28, download=False).from_cache
    finally:
        root.chmod(0o755)


def test_missing_without_download(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_omniglot(tmp_path / "nothing", 28, download=False)
    msg = str(e.value)
    assert str(tmp_path / "nothing") in msg and "images_background.zip" in msg and "images_evaluation.zip" in msg
    assert "--data-root" in msg


def test_missing_one_set(fake: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "half"
    shutil.copytree(fake["folders"] / "images_background", root / "images_background")
    with pytest.raises(DataError, match="missing images_evaluation.zip"):
        load_omniglot(root, 28, download=False)


def test_download_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root = tmp_path / "omniglot"
    with pytest.raises(DataError) as e:
        load_omniglot(root, 28, download=True)
    msg = str(e.value)
    assert "downloading https://raw.githubusercontent.com/brendenlake/omniglot" in msg and "no network" in msg
    assert str(root) in msg and "images_background.zip" in msg and "images_evaluation.zip" in msg
    assert not root.exists()  # no partial files, and not the folder it made for them


def _serve(files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    urls: list[str] = []

    def fake_urlopen(url: str, timeout: float | None = None):
        assert timeout is not None
        urls.append(url)
        return io.BytesIO(files[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return urls


def test_download_checks_md5(fake: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {f"{n}.zip": (fake["zips"] / f"{n}.zip").read_bytes() for n in omniglot_module.SETS}
    urls = _serve(files, monkeypatch)
    root = tmp_path / "dl"
    with pytest.raises(DataError, match="images_background.zip has md5 .* expected 68d2efa1b9178cc56df9314c21c6e718"):
        load_omniglot(root, 28, download=True)  # the fakes are not the official files
    assert not (root / "images_background.zip").exists() and not root.exists()
    monkeypatch.setattr(omniglot_module, "MD5", {n[:-4]: hashlib.md5(b).hexdigest() for n, b in files.items()})
    s = load_omniglot(root, 28, download=True)
    assert len(urls) == 3 and s.test.n_classes == 2 * CHARS * 4
    assert (root / "images_evaluation.zip").read_bytes() == files["images_evaluation.zip"]
    _same(s, load_omniglot(_copy(fake["zips"], tmp_path / "z"), 28, download=False))


def test_truncated_zip(fake: dict[str, Path], tmp_path: Path) -> None:
    root = _copy(fake["zips"], tmp_path / "z")
    bad = root / "images_evaluation.zip"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(DataError, match=r"images_evaluation\.zip is corrupt or truncated"):
        load_omniglot(root, 28, download=False)


def test_corrupt_zip_member(fake: dict[str, Path], tmp_path: Path) -> None:
    root = _copy(fake["zips"], tmp_path / "z")
    bad = root / "images_background.zip"
    data = bytearray(bad.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 200):
        data[i] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"images_background\.zip is corrupt or truncated"):
        load_omniglot(root, 28, download=False)


def test_task_checks_and_load_splits(fake: dict[str, Path], tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    root = _copy(fake["zips"], tmp_path / "z")
    cfg = DataConfig(dataset="omniglot", root=str(root), download=False, n_way=5, k_shot=1, n_query=5)
    with caplog.at_level(logging.INFO, logger="metanas_ray.data"):
        splits = load_splits(cfg)
        load_splits(cfg)
    messages = [r.getMessage() for r in caplog.records if r.name == "metanas_ray.data"]
    assert "cache miss" in messages[0] and "cache hit" in messages[1]
    check_tasks(cfg, splits)
    with pytest.raises(DataError, match=r"data\.n_way=13 but the meta-val split of omniglot has only 12 classes"):
        check_tasks(DataConfig(dataset="omniglot", n_way=13), splits)
    with pytest.raises(DataError, match=r"data\.k_shot \+ data\.n_query = 21 .* only 20 images"):
        check_tasks(DataConfig(dataset="omniglot", n_way=5, k_shot=1, n_query=20), splits)


@pytest.mark.slow
@pytest.mark.timeout(120)  # building the cache takes ~10 s here, reading it back ~1 s
@pytest.mark.skipif(not REAL.is_dir(), reason=f"no real Omniglot copy at {REAL}")
def test_real_omniglot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    before = sorted(os.listdir(REAL))
    s = load_omniglot(REAL, 28, download=False)
    cached = load_omniglot(REAL, 28, download=False)
    assert not s.from_cache and cached.from_cache
    assert torch.equal(s.test.images, cached.test.images)
    assert sorted(os.listdir(REAL)) == before  # nothing written into the read-only copy
    assert s.train.n_classes + s.val.n_classes == 964 * 4 and s.test.n_classes == 659 * 4
    assert len({n.split("/")[0] for n in s.val.class_names}) == 5
    assert len({n.split("/")[0] for n in s.train.class_names}) == 25
    for split in ("train", "val", "test"):
        pool = s.pool(split)
        assert pool.counts.unique().tolist() == [20]
        assert pool.images.shape[1:] == (1, 28, 28)
        assert torch.equal(pool.images, cached.pool(split).images)
    chars = [{n.rsplit("/", 1)[0] for n in s.pool(x).class_names} for x in ("train", "val", "test")]
    assert not (chars[0] & chars[1] or chars[0] & chars[2] or chars[1] & chars[2])


# ---------------------------------------------------------------- data.split: vinyals

def _split_file(tmp_path: Path, lists: dict[str, dict[str, dict[str, list[str]]]]) -> Path:
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"source": "test", **lists}))
    return path


SMALL_VINYALS = {  # on the fake: Alpha, Beta, Delta, Gamma (background); Omega, Psi (evaluation); character01..03
    "train": {"images_background": {"Alpha": ["character01", "character02"], "Beta": ["character03"]},
              "images_evaluation": {"Omega": ["character01"]}},
    "val": {"images_background": {"Gamma": ["character01", "character02", "character03"]}},
    "test": {"images_evaluation": {"Omega": ["character02", "character03"], "Psi": ["character01"]}},
}


def test_vinyals_file_lists_1028_172_423_characters_in_disjoint_splits() -> None:
    data = json.loads(omniglot_module.VINYALS_FILE.read_text())
    assert "torchmeta 1.8.0" in data["source"] and "MIT" in data["source"] and "Vinyals" in data["source"]
    lists = omniglot_module.vinyals_split()
    assert {s: len(v) for s, v in lists.items()} == {"train": 1028, "val": 172, "test": 423}
    by_set = {s: {n: sum(e[0] == n for e in v) for n in omniglot_module.SETS} for s, v in lists.items()}
    assert by_set == {"train": {"images_background": 792, "images_evaluation": 236},
                      "val": {"images_background": 172, "images_evaluation": 0},
                      "test": {"images_background": 0, "images_evaluation": 423}}
    assert len({e for v in lists.values() for e in v}) == 1028 + 172 + 423 == 964 + 659


def test_vinyals_split_puts_each_listed_character_with_its_4_rotations_in_its_split(
        fake: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(omniglot_module, "VINYALS_FILE", _split_file(tmp_path, SMALL_VINYALS))
    root = _copy(fake["zips"], tmp_path / "z")
    s = load_omniglot(root, 28, download=False, split="vinyals")
    for split, sets in SMALL_VINYALS.items():  # (set, alphabet, character) order, rotations innermost
        expected = [f"{a}/{c}/rot{r}" for n in omniglot_module.SETS for a, chars in sorted(sets.get(n, {}).items())
                    for c in chars for r in omniglot_module.ROTATIONS]
        assert s.pool(split).class_names == expected
        assert s.pool(split).counts.tolist() == [DRAWINGS] * len(expected)
    by_alphabets = load_omniglot(root, 28, download=False)  # the same character's images under either split
    a = by_alphabets.test.class_names.index("Omega/character01/rot0")
    assert torch.equal(s.train.class_images(s.train.class_names.index("Omega/character01/rot0")),
                       by_alphabets.test.class_images(a))
    i = s.test.class_names.index("Psi/character01/rot0")
    for r in range(1, 4):
        assert torch.equal(s.test.class_images(i + r), torch.rot90(s.test.class_images(i), r, dims=(2, 3)))


def test_alphabets_and_vinyals_splits_have_separate_caches_keyed_by_the_lists(
        fake: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(omniglot_module, "VINYALS_FILE", _split_file(tmp_path, SMALL_VINYALS))
    root = _copy(fake["folders"], tmp_path / "d")
    cfg = DataConfig(dataset="omniglot", root=str(root), download=False, n_way=2, split="vinyals")
    vinyals, alphabets = load_splits(cfg), load_omniglot(root, 28, download=False)
    assert vinyals.val.n_classes == 3 * 4 and alphabets.val.n_classes == CHARS * 4
    assert load_splits(cfg).from_cache and load_omniglot(root, 28, download=False).from_cache
    assert sorted(p.name for p in (root / ".metanas_cache").glob("*.pt")) == ["omniglot_28.pt",
                                                                             "omniglot_vinyals_28.pt"]
    moved = {**SMALL_VINYALS, "val": {"images_background": {"Gamma": ["character01", "character02"]}}}
    monkeypatch.setattr(omniglot_module, "VINYALS_FILE", _split_file(tmp_path, moved))
    rebuilt = load_splits(cfg)
    assert not rebuilt.from_cache and rebuilt.val.n_classes == 2 * 4


def test_vinyals_split_names_a_listed_character_missing_from_the_data(
        fake: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lists = {**SMALL_VINYALS, "test": {"images_evaluation": {"Omega": ["character02", "character09"],
                                                             "Xi": ["character01"]}}}
    monkeypatch.setattr(omniglot_module, "VINYALS_FILE", _split_file(tmp_path, lists))
    root = _copy(fake["zips"], tmp_path / "z")
    with pytest.raises(DataError, match=r"character images_evaluation/Omega/character09 and 1 more of the vinyals "
                                        r"split \(data\.split: vinyals\) not found in "):
        load_omniglot(root, 28, download=False, split="vinyals")
    assert not (root / ".metanas_cache" / "omniglot_vinyals_28.pt").exists()


def test_vinyals_split_file_listing_a_character_twice_is_an_error(tmp_path: Path) -> None:
    twice = {**SMALL_VINYALS, "val": {"images_background": {"Alpha": ["character01"]}}}
    with pytest.raises(DataError, match="lists images_background/Alpha/character01 twice"):
        omniglot_module.vinyals_split(_split_file(tmp_path, twice))


def test_unknown_split_name_is_rejected(fake: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.split must be 'alphabets' or 'vinyals' for Omniglot, got 'lake'"):
        load_omniglot(tmp_path / "nothing", 28, download=True, split="lake")  # before looking for (or fetching) data
    assert not (tmp_path / "nothing").exists()
    with pytest.raises(ConfigError, match=r"data\.split"):
        Config().override({"data.split": "lake"})


@pytest.mark.slow
@pytest.mark.skipif(not REAL.is_dir(), reason=f"no real Omniglot copy at {REAL}")
def test_real_omniglot_vinyals_split_has_1028_172_423_characters(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    before = sorted(os.listdir(REAL))
    s = load_omniglot(REAL, 28, download=False, split="vinyals")
    assert sorted(os.listdir(REAL)) == before
    assert [p.name for p in (tmp_path / "xdg" / "metanas_ray").glob("*.pt")][0].startswith("omniglot_vinyals_28_")
    chars = {x: {n.rsplit("/", 1)[0] for n in s.pool(x).class_names} for x in ("train", "val", "test")}
    assert {x: len(v) for x, v in chars.items()} == {"train": 1028, "val": 172, "test": 423}
    assert {x: s.pool(x).n_classes for x in chars} == {"train": 4 * 1028, "val": 4 * 172, "test": 4 * 423}
    assert not (chars["train"] & chars["val"] or chars["train"] & chars["test"] or chars["val"] & chars["test"])
    assert all(s.pool(x).counts.unique().tolist() == [20] for x in chars)
