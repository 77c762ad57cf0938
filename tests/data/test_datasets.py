"""Datasets: digits and synthetic content, torchvision error paths, image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raymix.config import ConfigError, DataConfig
from raymix.data import FolderData, ImageData, build_datasets
from raymix.data.datasets import synthetic_images


def _data(cfg: DataConfig) -> tuple[ImageData, ImageData]:
    train, test = build_datasets(cfg)
    assert isinstance(train, ImageData) and isinstance(test, ImageData)
    return train, test


@pytest.fixture(scope="module")
def digits() -> tuple[ImageData, ImageData]:
    return _data(DataConfig(name="digits", image_size=16))


def test_digits_shapes_and_labels(digits: tuple[ImageData, ImageData]) -> None:
    train, test = digits
    assert len(train) + len(test) == 1797
    assert len(test) == pytest.approx(0.25 * 1797, abs=1)
    for split in (train, test):
        assert split.images.shape == (len(split), 3, 16, 16)
        assert split.images.dtype == torch.uint8
        assert split.labels.dtype == torch.int64
        assert split.labels.min() == 0 and split.labels.max() == 9
        assert split.num_classes == 10
        # Grayscale source: the three channels are copies.
        assert torch.equal(split.images[:, 0], split.images[:, 2])
    # Digits are dark strokes on black: some pixels reach full intensity, the mean is low.
    assert train.images.max() == 255
    assert 0.05 < train.mean[0] < 0.5 and train.mean[0] == train.mean[1] == train.mean[2]
    assert 0.05 < train.std[0] < 0.5


def test_digits_split_is_stratified_and_fixed(digits: tuple[ImageData, ImageData]) -> None:
    train, test = digits
    train_counts = torch.bincount(train.labels, minlength=10).double()
    test_counts = torch.bincount(test.labels, minlength=10).double()
    # Per class, the test share matches the overall share to within one image.
    expected_test = (train_counts + test_counts) * len(test) / (len(train) + len(test))
    assert (test_counts - expected_test).abs().max() <= 1.0

    again_train, _ = _data(DataConfig(name="digits", image_size=16))
    assert torch.equal(again_train.images, train.images) and torch.equal(again_train.labels, train.labels)
    other_train, _ = _data(DataConfig(name="digits", image_size=16, split_seed=1))
    assert not torch.equal(other_train.labels, train.labels)


def test_digits_at_native_size_are_the_originals() -> None:
    from sklearn.datasets import load_digits

    train, test = _data(DataConfig(name="digits", image_size=8))
    native = np.round(load_digits().data * 255 / 16).astype(np.uint8).reshape(-1, 8, 8)
    originals = {image.tobytes() for image in native}
    split_images = torch.cat([train.images, test.images])[:, 0].numpy()  # (N, 8, 8)
    assert {image.tobytes() for image in split_images} == originals


def _synthetic(seed: int = 0, size: int = 16) -> tuple[ImageData, ImageData]:
    cfg = DataConfig(
        name="synthetic",
        image_size=size,
        split_seed=seed,
        synthetic_train_size=400,
        synthetic_test_size=101,
        synthetic_classes=4,
    )
    return _data(cfg)


def test_synthetic_sizes_balance_and_determinism() -> None:
    train, test = _synthetic(seed=3)
    assert train.images.shape == (400, 3, 16, 16) and test.images.shape == (101, 3, 16, 16)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.num_classes == 4
    assert torch.bincount(train.labels).tolist() == [100, 100, 100, 100]
    counts = torch.bincount(test.labels)
    assert counts.max() - counts.min() <= 1
    again, _ = _synthetic(seed=3)
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    other, _ = _synthetic(seed=4)
    assert not torch.equal(other.images, train.images)
    # Train and test come from different streams.
    assert not torch.equal(train.images[:101], test.images)
    assert all(0.0 < m < 1.0 for m in train.mean) and all(0.0 < s < 1.0 for s in train.std)


def test_synthetic_any_size() -> None:
    images, labels = synthetic_images(10, 3, 40, seed=0)
    assert images.shape == (10, 3, 40, 40) and labels.shape == (10,)


def test_synthetic_classes_are_separable() -> None:
    train, test = _synthetic(seed=0, size=24)
    x_train = train.images.float().flatten(1) / 255  # (N, 3*S*S)
    x_test = test.images.float().flatten(1) / 255
    centroids = torch.stack([x_train[train.labels == c].mean(0) for c in range(train.num_classes)])
    predicted = torch.cdist(x_test, centroids).argmin(dim=1)
    accuracy = (predicted == test.labels).float().mean().item()
    assert accuracy > 0.5


def _no_download(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make any torchvision download attempt a recorded failure."""
    calls: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        calls.append(str(args))
        raise AssertionError("a download was attempted")

    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.stl10 as stl10

    monkeypatch.setattr(cifar, "download_and_extract_archive", refuse)
    monkeypatch.setattr(stl10, "download_and_extract_archive", refuse)
    return calls


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10"])
def test_missing_root_names_data_root(name: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.root") as info:
        build_datasets(DataConfig(name=name, root=str(tmp_path / "nowhere")))
    assert "data.download=true" in str(info.value)
    with pytest.raises(ConfigError, match="data.root"):
        build_datasets(DataConfig(name=name))


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10"])
def test_empty_root_without_download_names_data_download(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _no_download(monkeypatch)
    with pytest.raises(ConfigError, match="data.download") as info:
        build_datasets(DataConfig(name=name, root=str(tmp_path)))
    assert "data.root" in str(info.value)
    assert calls == []
    assert list(tmp_path.iterdir()) == []


def test_root_that_is_a_file(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        build_datasets(DataConfig(name="cifar10", root=str(file)))


def _write_pngs(folder: Path, sizes: list[tuple[int, int]], colour: tuple[int, int, int]) -> None:
    folder.mkdir(parents=True)
    for i, (width, height) in enumerate(sizes):
        Image.new("RGB", (width, height), colour).save(folder / f"{i}.png")


@pytest.fixture()
def image_root(tmp_path: Path) -> Path:
    _write_pngs(tmp_path / "train" / "cat", [(20, 13), (9, 31), (16, 16)], (255, 0, 0))
    _write_pngs(tmp_path / "train" / "dog", [(40, 17), (12, 12)], (0, 0, 255))
    _write_pngs(tmp_path / "val" / "dog", [(11, 23)], (0, 0, 255))
    Image.new("L", (15, 10), 128).save(tmp_path / "val" / "dog" / "gray.png")  # grayscale -> 3 channels
    return tmp_path


def test_imagefolder_shapes_and_labels(image_root: Path) -> None:
    train, val = build_datasets(DataConfig(name="imagefolder", root=str(image_root), image_size=8))
    assert isinstance(train, FolderData) and isinstance(val, FolderData)
    assert len(train) == 5 and len(val) == 2
    assert train.num_classes == 2 and val.num_classes == 2  # val lacks 'cat' but keeps train's labels
    labels = [train[i][1] for i in range(len(train))]
    assert labels == [0, 0, 0, 1, 1]
    assert train.labels.tolist() == labels
    assert [val[i][1] for i in range(len(val))] == [1, 1]
    image, _ = train[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8
    assert image[0].min() == 255 and image[2].max() == 0  # red stays red through resize and crop
    gray = [val[i][0] for i in range(len(val))][1]
    assert gray.shape == (3, 8, 8) and torch.equal(gray[0], gray[1])
    assert train.mean == pytest.approx((0.485, 0.456, 0.406))


@pytest.mark.parametrize("missing", ["train", "val"])
def test_imagefolder_requires_train_and_val(image_root: Path, missing: str) -> None:
    import shutil

    shutil.rmtree(image_root / missing)
    with pytest.raises(ConfigError, match=f"data.root.*{missing}/"):
        build_datasets(DataConfig(name="imagefolder", root=str(image_root)))


def test_imagefolder_unknown_val_class(image_root: Path) -> None:
    _write_pngs(image_root / "val" / "bird", [(8, 8)], (0, 255, 0))
    with pytest.raises(ConfigError, match="bird"):
        build_datasets(DataConfig(name="imagefolder", root=str(image_root)))
