"""Folder-of-class-folders datasets and miniImageNet (csv and folder layouts) on tiny fakes."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metanas_ray.config import DataConfig
from metanas_ray.data import (DataError, check_tasks, load_image_folder, load_miniimagenet, load_splits,
                              split_classes)

CLASSES = {"train": ["n01", "n02", "n03"], "val": ["n04", "n05"], "test": ["n06", "n07"]}
PER_CLASS = 4


def _image(rng: np.random.Generator, colour: bool, size: tuple[int, int] = (30, 24)) -> Image.Image:
    shape = (size[1], size[0], 3) if colour else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


def _make_folder(root: Path, colour: bool, ext: str = ".png", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, classes in CLASSES.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(PER_CLASS):
                _image(rng, colour).save(root / split / c / f"{c}_{i:02d}{ext}")
    return root


def _make_mini_csv(root: Path, seed: int = 0) -> Path:
    """Ravi–Larochelle layout: images/*.jpg + train.csv, val.csv, test.csv."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    for split, classes in CLASSES.items():
        rows = ["filename,label"]
        for c in classes:
            for i in range(PER_CLASS):
                name = f"{c}{i:08d}.jpg"
                _image(rng, colour=True, size=(50, 40)).save(root / "images" / name, quality=90)
                rows.append(f"{name},{c}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def _csv_to_folders(csv_root: Path, root: Path) -> Path:
    for split in CLASSES:
        for line in (csv_root / f"{split}.csv").read_text().splitlines()[1:]:
            name, label = line.split(",")
            (root / split / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(csv_root / "images" / name, root / split / label / name)
    return root


def _check(s, channels: int, size: int) -> None:
    assert s.channels == channels and s.image_size == size
    for split, classes in CLASSES.items():
        pool = s.pool(split)
        assert pool.class_names == classes
        assert pool.images.shape == (len(classes) * PER_CLASS, channels, size, size)
        assert pool.images.dtype == torch.uint8 and pool.counts.tolist() == [PER_CLASS] * len(classes)


def test_gray_folder(tmp_path: Path) -> None:
    s = load_image_folder(_make_folder(tmp_path / "gray", colour=False), image_size=12)
    _check(s, channels=1, size=12)
    assert s.name == "folder" and not s.from_cache


def test_colour_detected_and_cached(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _make_folder(tmp_path / "mixed", colour=False)
    Image.new("RGB", (10, 10), (200, 10, 10)).save(root / "val/n05/red.png")
    s = load_image_folder(root, image_size=10)
    assert s.channels == 3 and s.val.counts.tolist() == [PER_CLASS, PER_CLASS + 1]
    red = s.val.class_images(1)[-1]  # "red.png" sorts after "n05_*.png"
    assert red[0].float().mean() > 150 and red[1].float().mean() < 50
    gray = s.train.images[0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])
    assert (root / ".metanas_cache" / "folder_10.pt").is_file()
    with caplog.at_level(logging.INFO, logger="metanas_ray.data"):
        again = load_splits(DataConfig(dataset="folder", root=str(root), image_size=10))
    assert again.from_cache and torch.equal(again.val.images, s.val.images)
    assert any("cache hit" in r.getMessage() for r in caplog.records)


def test_miniimagenet_csv_and_folder_forms_agree(tmp_path: Path) -> None:
    csv_root = _make_mini_csv(tmp_path / "csv")
    from_csv = load_miniimagenet(csv_root, image_size=16)
    _check(from_csv, channels=3, size=16)
    assert from_csv.name == "miniimagenet"
    assert (csv_root / ".metanas_cache" / "miniimagenet_16.pt").is_file()
    from_dirs = load_miniimagenet(_csv_to_folders(csv_root, tmp_path / "dirs"), image_size=16)
    _check(from_dirs, channels=3, size=16)
    for split in CLASSES:
        assert torch.equal(from_csv.pool(split).images, from_dirs.pool(split).images)
    cfg = DataConfig(dataset="miniimagenet", root=str(csv_root), image_size=16, n_way=2, k_shot=1, n_query=3)
    splits = load_splits(cfg)
    assert splits.from_cache
    check_tasks(cfg, splits)


def test_miniimagenet_gray_jpeg_still_rgb(tmp_path: Path) -> None:
    root = _make_mini_csv(tmp_path / "csv")
    for f in (root / "images").iterdir():  # every image grayscale: miniImageNet stays 3-channel
        Image.open(f).convert("L").save(f)
    s = load_miniimagenet(root, image_size=8)
    assert s.channels == 3 and torch.equal(s.train.images[0, 0], s.train.images[0, 2])


def test_bad_csv_header(tmp_path: Path) -> None:
    root = _make_mini_csv(tmp_path / "csv")
    (root / "val.csv").write_text("file;class\nx.jpg;n04\n")
    with pytest.raises(DataError, match=r"val\.csv must start with the header 'filename,label'"):
        load_miniimagenet(root, 16)


def test_bad_csv_row(tmp_path: Path) -> None:
    root = _make_mini_csv(tmp_path / "csv")
    with open(root / "test.csv", "a") as f:
        f.write("lonely.jpg\n")
    with pytest.raises(DataError, match=r"test\.csv line \d+"):
        load_miniimagenet(root, 16)


def test_missing_csv_and_missing_image(tmp_path: Path) -> None:
    root = _make_mini_csv(tmp_path / "csv")
    (root / "test.csv").unlink()
    with pytest.raises(DataError, match=r"test\.csv"):
        load_miniimagenet(root, 16)
    root = _make_mini_csv(tmp_path / "csv2")
    victim = (root / "images").glob("n06*.jpg").__next__()
    victim.unlink()
    with pytest.raises(DataError, match=f"missing image .*{victim.name}"):
        load_miniimagenet(root, 16)


def test_corrupt_image(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "f", colour=True, ext=".jpg")
    (root / "test/n07/n07_01.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"n07_01\.jpg"):
        load_image_folder(root, 16)


def test_empty_class_and_missing_split(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "f", colour=False)
    (root / "train" / "empty").mkdir()
    with pytest.raises(DataError, match=r"train/empty has no"):
        load_image_folder(root, 16)
    shutil.rmtree(root / "train" / "empty")
    shutil.rmtree(root / "test")
    with pytest.raises(DataError, match=r"missing folder .*test"):
        load_image_folder(root, 16)


def test_class_in_two_splits(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "f", colour=False)
    shutil.copytree(root / "train" / "n01", root / "test" / "n01")
    with pytest.raises(DataError, match="class 'n01' is in both the meta-train and the meta-test split"):
        load_image_folder(root, 16)


def test_miniimagenet_not_found(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"miniImageNet not found in .*train\.csv.*--data-root"):
        load_miniimagenet(tmp_path, 84)


# ------------------------------------------------------------------ a flat folder of class folders
def _make_flat(root: Path, n_classes: int, per_class: int = PER_CLASS, seed: int = 0) -> Path:
    """``<root>/<class>/*.png``: no train/val/test folders, greyscale and colour, sizes that differ."""
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        (root / f"class_{c:03d}").mkdir(parents=True)
        for i in range(per_class):
            size = (20 + 3 * i, 24 + c % 5)
            _image(rng, colour=(c + i) % 3 == 0, size=size).save(root / f"class_{c:03d}" / f"{i:02d}.png")
    return root


@pytest.mark.parametrize("n, counts", [(100, [64, 16, 20]), (10, [6, 2, 2]), (25, [16, 4, 5]), (3, [2, 0, 1])])
def test_split_classes_cuts_by_the_default_fractions(n: int, counts: list[int]) -> None:
    from metanas_ray.data.image_folder import SPLIT_FRACTIONS
    classes = [(f"c{i}", [Path(f"c{i}.png")]) for i in range(n)]
    splits = split_classes(classes, SPLIT_FRACTIONS)
    assert [len(splits[s]) for s in ("train", "val", "test")] == counts
    names = [name for s in ("train", "val", "test") for name, _ in splits[s]]
    assert sorted(names) == sorted(c for c, _ in classes)  # every class in exactly one split
    for s in splits.values():
        assert [name for name, _ in s] == sorted(name for name, _ in s)


def test_split_classes_depends_on_the_names_alone() -> None:
    classes = [(f"n{i:04d}", [Path("x.png")]) for i in range(40)]
    a = split_classes(classes)
    assert split_classes(list(reversed(classes))) == a  # not on the order they are listed in
    assert [name for name, _ in a["test"]] != [f"n{i:04d}" for i in range(32, 40)]  # shuffled, not cut in order
    assert split_classes(classes, (0.5, 0.25, 0.25))["train"] != a["train"]
    from metanas_ray.config import DataConfig as DC
    from metanas_ray.data.image_folder import SPLIT_FRACTIONS
    assert DC().split_fractions == SPLIT_FRACTIONS  # the loader's default is the config's


def test_flat_folder_is_split_cached_per_fractions_and_checked(tmp_path: Path) -> None:
    root = _make_flat(tmp_path / "flat", 10)
    s = load_image_folder(root, image_size=12)
    assert [s.pool(x).n_classes for x in ("train", "val", "test")] == [6, 2, 2]
    assert s.channels == 3 and s.train.images.shape[1:] == (3, 12, 12) and not s.from_cache
    assert "data.split_fractions=[0.64, 0.16, 0.2]" in s.split_rule and "6 / 2 / 2 classes" in s.split_rule
    record = s.class_split()
    assert record["dataset"] == "folder" and record["split_rule"] == s.split_rule
    assert sorted(record["train"] + record["val"] + record["test"]) == [f"class_{c:03d}" for c in range(10)]
    assert (root / ".metanas_cache" / "folder_12_split_0.64_0.16_0.2.pt").is_file()
    cfg = DataConfig(dataset="folder", root=str(root), image_size=12, n_way=2, k_shot=1, n_query=3)
    again = load_splits(cfg)
    assert again.from_cache and again.split_rule == s.split_rule and torch.equal(again.test.images, s.test.images)
    check_tasks(cfg, again)
    other = load_splits(DataConfig(dataset="folder", root=str(root), image_size=12, split_fractions=(0.4, 0.3, 0.3)))
    assert not other.from_cache and [other.pool(x).n_classes for x in ("train", "val", "test")] == [4, 3, 3]
    assert (root / ".metanas_cache" / "folder_12_split_0.4_0.3_0.3.pt").is_file()  # a cache of its own
    assert load_image_folder(root, image_size=12).from_cache  # the first split's cache is still there


def test_a_split_too_small_for_the_tasks_names_the_split_and_the_fractions(tmp_path: Path) -> None:
    root = _make_flat(tmp_path / "flat", 10)
    cfg = DataConfig(dataset="folder", root=str(root), image_size=12, n_way=3, k_shot=1, n_query=2)
    with pytest.raises(DataError, match=r"data\.n_way=3 but the meta-val split of folder has only 2 classes "
                                        r"\(data\.split_fractions=\[0\.64, 0\.16, 0\.2\] dealt the 10 class folders"):
        check_tasks(cfg, load_splits(cfg))
    cfg = DataConfig(dataset="folder", root=str(root), image_size=12, n_way=2, k_shot=2, n_query=3)
    with pytest.raises(DataError, match=r"data\.k_shot \+ data\.n_query = 5 but some class of the meta-train split "
                                        r"of folder has only 4 images \(e\.g\. 'class_\d+'\)"):
        check_tasks(cfg, load_splits(cfg))


def test_every_image_format_pillow_reads_and_files_that_are_not_images(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    root = _make_flat(tmp_path / "flat", 5)
    rng = np.random.default_rng(1)
    for i, ext in enumerate((".bmp", ".gif", ".tiff", ".webp", ".JPG", ".tga")):
        _image(rng, colour=True, size=(9 + i, 31)).save(root / "class_000" / f"more{ext}")
    deep = (np.arange(30 * 20, dtype=np.uint16).reshape(20, 30) * 100)  # 16-bit greyscale, up to 59,900
    Image.fromarray(deep).save(root / "class_001" / "deep.png")
    _image(rng, colour=False).save(root / "class_002" / "no_extension", format="PNG")
    (root / "class_003" / "README.txt").write_text("where these came from\n")
    (root / "class_004" / "labels.csv").write_text("a,b\n")
    (root / "class_004" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    with caplog.at_level(logging.WARNING, logger="metanas_ray.data"):
        s = load_image_folder(root, image_size=8, split_fractions=(0.4, 0.2, 0.4))
    skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(skipped) == 2 and all("not an image Pillow can read" in m for m in skipped)
    assert any("README.txt" in m for m in skipped) and any("labels.csv" in m for m in skipped)
    counts = {name: int(n) for x in ("train", "val", "test")
              for name, n in zip(s.pool(x).class_names, s.pool(x).counts)}
    assert counts == {"class_000": PER_CLASS + 6, "class_001": PER_CLASS + 1, "class_002": PER_CLASS + 1,
                      "class_003": PER_CLASS, "class_004": PER_CLASS}
    where = next(x for x in ("train", "val", "test") if "class_001" in s.pool(x).class_names)
    pool = s.pool(where)
    deep_image = pool.class_images(pool.class_names.index("class_001"))[-1]  # "deep.png" sorts last
    assert 100 < int(deep_image.max()) <= 255 and int(deep_image.max()) > int(deep_image.min())  # scaled, not clipped


def test_a_corrupt_image_is_an_error_naming_it(tmp_path: Path) -> None:
    root = _make_flat(tmp_path / "flat", 5)
    whole = (root / "class_002" / "01.png").read_bytes()
    (root / "class_002" / "01.png").write_bytes(whole[:len(whole) // 2])  # identified, but cut off
    with pytest.raises(DataError, match=r"cannot read image .*class_002/01\.png"):
        load_image_folder(root, 8)
    (root / "class_002" / "01.png").write_bytes(b"not a png at all")  # an image extension that does not decode
    with pytest.raises(DataError, match=r"class_002/01\.png"):
        load_image_folder(root, 8)


def test_a_root_without_class_folders(tmp_path: Path) -> None:
    (tmp_path / "loose").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "loose" / "a.png")
    with pytest.raises(DataError, match=r"folder .*loose has no class folders \(expected .*loose/<class>/<images> "
                                        r"or .*loose/train\|val\|test/<class>/<images>\)"):
        load_image_folder(tmp_path / "loose", 8)
    root = _make_flat(tmp_path / "flat", 4)
    (root / "class_001" / "notes.txt").write_text("x")
    for f in (root / "class_001").glob("*.png"):
        f.unlink()
    with pytest.raises(DataError, match=r"class_001 has no images"):
        load_image_folder(root, 8)
