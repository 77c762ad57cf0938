"""Image folders: two crops from the full image, seeded per (seed, epoch, index), bad files survived."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raymix.config import AugmentConfig, ConfigError
from raymix.data.augment import TwoViewAugment
from raymix.data.folder import (
    BadImageWarning,
    CropSpec,
    FolderData,
    crop_rng,
    decode_crops,
    draft_factor,
    random_resized_box,
)
from raymix.data.loader import BatchLoader

SPEC = CropSpec((0.2, 1.0), (3 / 4, 4 / 3), views=2, seed=3)


def _textured(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth RGB image (H, W, 3) uint8 whose colour encodes the position."""
    yy, xx = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    r = 255 * xx / max(1, width - 1)
    g = 255 * yy / max(1, height - 1)
    b = np.full_like(r, rng.integers(0, 256))
    return np.stack([r, g, b], -1).round().astype(np.uint8)


def _folder(root: Path, sizes: list[tuple[int, int]], classes: int = 2) -> Path:
    for i, (w, h) in enumerate(sizes):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_textured(w, h, i)).save(folder / f"{i:03d}.jpg", quality=95)
    return root


def test_random_resized_box_follows_scale_and_ratio() -> None:
    areas, ratios = [], []
    for index in range(300):
        left, top, w, h = random_resized_box(400, 300, crop_rng(0, 0, index), (0.2, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left and left + w <= 400 and 0 <= top and top + h <= 300
        areas.append(w * h / (400 * 300))
        ratios.append(w / h)
    # Rounding the sides to pixels moves the area and ratio by well under 2%.
    assert 0.2 * 0.98 <= min(areas) and max(areas) <= 1.0
    assert 0.75 * 0.98 <= min(ratios) and max(ratios) <= 4 / 3 * 1.02
    assert max(areas) - min(areas) > 0.6  # the whole scale range is used


def test_random_resized_box_falls_back_to_the_centred_largest_box() -> None:
    # No 0.9+ area box with ratio in [3/4, 4/3] fits a 1000 x 10 strip: the centred 13 x 10 box.
    box = random_resized_box(1000, 10, crop_rng(0, 0, 0), (0.9, 1.0), (3 / 4, 4 / 3))
    assert box == ((1000 - 13) // 2, 0, 13, 10)


def test_crops_depend_only_on_seed_epoch_and_index(tmp_path: Path) -> None:
    data = FolderData(_folder(tmp_path, [(120, 90), (90, 130), (100, 100)]), 32)
    a, label = data.train_item(1, 4, SPEC)
    b, _ = data.train_item(1, 4, SPEC)
    assert a.shape == (2, 3, 32, 32) and a.dtype == torch.uint8 and label == 0  # c0/002.jpg
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # the two views are different crops
    assert not torch.equal(a, data.train_item(1, 5, SPEC)[0])  # a new epoch, new crops
    assert not torch.equal(a, data.train_item(1, 4, CropSpec(SPEC.scale, SPEC.ratio, 2, seed=4))[0])


def test_views_are_cut_from_the_whole_image(tmp_path: Path) -> None:
    """A wide image: crops reach its far left and right, outside the centre square."""
    data = FolderData(_folder(tmp_path, [(400, 100)], classes=1), 16)
    spec = CropSpec((0.05, 0.1), (3 / 4, 4 / 3), views=2, seed=0)
    red = torch.stack([data.train_item(0, epoch, spec)[0][:, 0].float().mean((1, 2)) for epoch in range(40)])
    # Red grows left to right (0..255); the centre 100 px square spans red 96..159.
    assert red.min() < 60 and red.max() > 195


def test_draft_decoding_matches_full_decoding(tmp_path: Path) -> None:
    """JPEG draft mode (DCT scaling) changes the pixels by little and only when the crop allows."""
    path = _folder(tmp_path, [(480, 360)], classes=1) / "c0" / "000.jpg"
    boxes = [(40.0, 30.0, 320.0, 300.0), (0.0, 0.0, 480.0, 360.0)]
    assert draft_factor(boxes, 64) == 4 and draft_factor(boxes, 200) == 1
    fast, _ = decode_crops(path, 64, lambda w, h: boxes, draft=True)
    full, _ = decode_crops(path, 64, lambda w, h: boxes, draft=False)
    assert (fast.float() - full.float()).abs().mean() < 2.0


def _write_bad_files(train: Path) -> None:
    (train / "c0").mkdir(parents=True)
    (train / "c1").mkdir()
    (train / "empty").mkdir()
    Image.fromarray(_textured(50, 40, 0)).save(train / "c0" / "a_good.jpg")
    (train / "c0" / "b_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    whole = (train / "c0" / "a_good.jpg").read_bytes()
    (train / "c0" / "c_truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (train / "c0" / "notes.txt").write_text("not an image")
    Image.fromarray(_textured(50, 40, 1)[..., 0]).save(train / "c1" / "gray.jpg")
    Image.fromarray(_textured(50, 40, 2)).convert("CMYK").save(train / "c1" / "cmyk.jpg")
    rgba = Image.fromarray(np.dstack([_textured(40, 50, 3), np.full((50, 40), 90, np.uint8)]))
    rgba.save(train / "c1" / "alpha.png")
    Image.fromarray(_textured(40, 50, 4)).convert("P").save(train / "c1" / "palette.png", transparency=0)


def test_bad_files_are_named_and_survived(tmp_path: Path) -> None:
    _write_bad_files(tmp_path)
    with pytest.warns(BadImageWarning) as scan:
        data = FolderData(tmp_path, 16)
    messages = " ".join(str(w.message) for w in scan)
    assert "notes.txt" in messages and "empty" in messages
    assert data.num_classes == 3 and len(data) == 7  # the empty class keeps its label
    names = [data.path(i).name for i in range(len(data))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [data.train_item(i, 0, SPEC) for i in range(len(data))]
    bad = [str(w.message) for w in caught if issubclass(w.category, BadImageWarning)]
    assert len(bad) == 2 and "b_corrupt.jpg" in bad[0] and "c_truncated.jpg" in bad[1]
    for views, _ in items:
        assert views.shape == (2, 3, 16, 16) and views.dtype == torch.uint8
    # A bad file is replaced by the next decodable image, with that image's label.
    assert names.index("b_corrupt.jpg") == 1 and items[1][1] == 1
    gray = items[names.index("gray.jpg")][0]
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    # Each file is reported once per process.
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        data.train_item(1, 1, SPEC)
    assert not [w for w in again if issubclass(w.category, BadImageWarning)]


def test_a_folder_without_images_is_refused(tmp_path: Path) -> None:
    (tmp_path / "c0").mkdir()
    (tmp_path / "c0" / "readme.md").write_text("x")
    with pytest.warns(BadImageWarning), pytest.raises(ConfigError, match=r"no images found.*extensions"):
        FolderData(tmp_path, 16)


def test_persistent_loader_matches_in_process_decoding(tmp_path: Path) -> None:
    data = FolderData(_folder(tmp_path, [(60 + 7 * i, 50 + 5 * i) for i in range(10)]), 24)
    inline = BatchLoader(data, 4, shuffle=True, drop_last=True, seed=1, crops=SPEC)
    workers = BatchLoader(data, 4, shuffle=True, drop_last=True, seed=1, crops=SPEC, num_workers=2)
    for epoch in range(2):
        inline.set_epoch(epoch)
        workers.set_epoch(epoch)
        a, b = list(inline), list(workers)
        assert len(a) == len(b) == 2
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert xa.shape == (4, 2, 3, 24, 24)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        if epoch == 0:
            first = workers._loader
            pids = {w.pid for w in first._iterator._workers}  # type: ignore[union-attr]
    assert workers._loader is first  # one DataLoader for the run, workers kept alive
    assert {w.pid for w in first._iterator._workers} == pids  # type: ignore[union-attr]
    # Each rank's images are the crops the single-process run makes of the same index.
    rank1 = BatchLoader(data, 2, shuffle=True, drop_last=True, seed=1, crops=SPEC, rank=1, world_size=2)
    rank1.set_epoch(1)
    images, _ = next(iter(rank1))
    first_index = int(rank1.indices()[0])
    assert torch.equal(images[0], data.train_item(first_index, 1, SPEC)[0])


def test_device_decoding_matches_cpu_decoding(tmp_path: Path) -> None:
    data = FolderData(_folder(tmp_path, [(70 + 9 * i, 60 + 4 * i) for i in range(6)]), 24, draft=False)
    cpu = BatchLoader(data, 3, shuffle=True, drop_last=True, crops=SPEC)
    device = BatchLoader(data, 3, shuffle=True, drop_last=True, crops=SPEC, decode="device")
    for (xa, ya), (xb, yb) in zip(cpu, device, strict=True):
        assert xb.shape == xa.shape and torch.equal(ya, yb)
        # Different JPEG decoders and resize kernels, same boxes: pixels agree closely.
        assert (xa.float() - xb.float()).abs().mean() < 3.0


def test_augment_takes_precut_views() -> None:
    """(B, V, 3, S, S) crops skip the resized crop: with colour off, views are the crops, flipped."""
    images = torch.randint(0, 256, (4, 2, 3, 8, 8), dtype=torch.uint8)
    cfg = AugmentConfig(
        flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.0, 0.0), solarize_prob=(0.0, 0.0)
    )
    augment = TwoViewAugment(cfg, 8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    views = augment(images, torch.Generator().manual_seed(0))
    for v in range(2):
        assert torch.equal(views[v], images[:, v].float() / 255.0)
    flipped = TwoViewAugment(cfg.model_copy(update={"flip_prob": 1.0}), 8, (0.0,) * 3, (1.0,) * 3)
    (one,) = flipped(images, torch.Generator().manual_seed(0), views=1)
    assert torch.equal(one, images[:, 0].flip(-1).float() / 255.0)
    assert math.isclose(float(views[0].max()), float(images[:, 0].max()) / 255.0)
