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
from metanas_ray.data import DataError, check_tasks, load_image_folder, load_miniimagenet, load_splits

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
