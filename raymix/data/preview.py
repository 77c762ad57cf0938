"""A picture of the training pipeline: a few training images beside their two augmented views.

``raymix preview CONFIG`` draws one row per image: the training image as stored (an image
folder's full image, letterboxed), then view 1 and view 2 after every augmentation, exactly as
:class:`raymix.data.augment.TwoViewAugment` makes them for a training step and mapped back to
[0, 255] with the dataset's mean and std. Both views are drawn even for methods that train on one.

Everything is deterministic: the images are the first of epoch 0's shuffled order (the order the
trainer uses, from ``training.seed``), an image folder's crops are epoch 0's crops of those images,
and the augmentation generator is seeded as rank 0's is in training. The work runs on the CPU
(``data.decode=device`` decodes with another JPEG decoder during training: same crop boxes,
pixels that differ slightly).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from raymix.config import Config, ConfigError
from raymix.data.augment import TwoViewAugment
from raymix.data.datasets import ImageData, build_datasets
from raymix.data.folder import CropSpec, FolderData
from raymix.data.loader import epoch_order

#: Smallest side of a grid cell in pixels: smaller images are enlarged by a whole factor (nearest).
MIN_CELL = 96
#: Width of the lines between cells, and their grey level.
PAD = 2
PAD_VALUE = 128
#: Columns of the grid: the original and the two views.
COLUMNS = ("original", "view 1", "view 2")


@dataclass(frozen=True)
class PreviewRows:
    """The images of a preview, every tensor uint8 (n, 3, cell, cell)."""

    indices: list[int]  # positions in the training set
    labels: list[int]
    originals: torch.Tensor
    view1: torch.Tensor
    view2: torch.Tensor


def cell_size(image_size: int) -> int:
    """Side of a grid cell: ``image_size`` times the smallest whole factor reaching MIN_CELL."""
    return image_size * max(1, math.ceil(MIN_CELL / image_size))


def grid_shape(rows: int, image_size: int) -> tuple[int, int]:
    """(height, width) in pixels of the preview of ``rows`` images of side ``image_size``."""
    cell = cell_size(image_size)
    return rows * cell + (rows + 1) * PAD, len(COLUMNS) * cell + (len(COLUMNS) + 1) * PAD


def preview_indices(size: int, count: int, seed: int) -> list[int]:
    """The first ``count`` images of epoch 0's shuffled order (all of them when fewer)."""
    return [int(i) for i in epoch_order(size, True, seed, 0)[:count]]


def _enlarge(images: torch.Tensor, cell: int) -> torch.Tensor:
    """(n, 3, S, S) -> (n, 3, cell, cell) by repeating pixels (``cell`` is a multiple of S)."""
    factor = cell // images.shape[-1]
    return images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def _to_uint8(views: torch.Tensor, augment: TwoViewAugment) -> torch.Tensor:
    """Normalised float views (n, 3, S, S) back to uint8 pixels with the dataset's mean and std."""
    mean, std = augment.stats(views.device)
    return (views * std + mean).mul(255.0).round().clamp(0.0, 255.0).to(torch.uint8)


def _letterbox(data: FolderData, index: int, cell: int) -> torch.Tensor:
    """Image ``index`` of a folder whole, fitted into a black ``cell`` square: (3, cell, cell) uint8.

    A file PIL cannot read is drawn as the folder's evaluation item (which warns and takes the next
    decodable image, as the training crops do)."""
    try:
        with Image.open(data.path(index)) as image:
            rgb = image.convert("RGB")
    except Exception:  # a bad file: the dataset's own fallback (and warning) below
        item, _ = data[index]  # (3, S, S)
        return _enlarge(item.unsqueeze(0), cell)[0]
    width, height = rgb.size
    scale = cell / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    canvas = Image.new("RGB", (cell, cell))
    canvas.paste(rgb.resize(size, Image.Resampling.BICUBIC), ((cell - size[0]) // 2, (cell - size[1]) // 2))
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)


def preview_rows(
    cfg: Config,
    count: int = 8,
    seed: int | None = None,
    data: ImageData | FolderData | None = None,
) -> PreviewRows:
    """The originals and both augmented views of ``count`` training images of ``cfg``.

    ``seed``: default ``training.seed``; it picks the images (epoch 0's order), an image folder's
    crops and the augmentation. ``data``: the training set when the caller has it already.
    """
    if count < 1:
        raise ConfigError(f"--count {count}: must be at least 1")
    seed = cfg.training.seed if seed is None else seed
    train = data if data is not None else build_datasets(cfg.data)[0]
    size, cell = cfg.data.image_size, cell_size(cfg.data.image_size)
    indices = preview_indices(len(train), count, seed)
    augment = TwoViewAugment(cfg.augment, size, train.mean, train.std)
    generator = torch.Generator().manual_seed(seed * 1000 + 1)  # rank 0's augmentation seed
    if isinstance(train, FolderData):
        crops = CropSpec(cfg.augment.crop_scale, cfg.augment.crop_ratio, 2, seed)
        items = [train.train_item(i, 0, crops) for i in indices]
        batch = torch.stack([views for views, _ in items])  # (n, 2, 3, S, S)
        labels = [label for _, label in items]
        originals = torch.stack([_letterbox(train, i, cell) for i in indices])
    else:
        batch = train.images[indices]  # (n, 3, S, S)
        labels = [int(label) for label in train.labels[indices]]
        originals = _enlarge(batch, cell)
    view1, view2 = augment(batch, generator, views=2)
    return PreviewRows(
        indices=indices,
        labels=labels,
        originals=originals,
        view1=_enlarge(_to_uint8(view1, augment), cell),
        view2=_enlarge(_to_uint8(view2, augment), cell),
    )


def make_grid(rows: PreviewRows) -> torch.Tensor:
    """(3, H, W) uint8: one row per image (original, view 1, view 2), cells parted by grey lines."""
    count, cell = rows.originals.shape[0], rows.originals.shape[-1]
    height = count * cell + (count + 1) * PAD
    width = len(COLUMNS) * cell + (len(COLUMNS) + 1) * PAD
    grid = torch.full((3, height, width), PAD_VALUE, dtype=torch.uint8)
    for r in range(count):
        top = PAD + r * (cell + PAD)
        for c, images in enumerate((rows.originals, rows.view1, rows.view2)):
            left = PAD + c * (cell + PAD)
            grid[:, top : top + cell, left : left + cell] = images[r]
    return grid


def preview_grid(
    cfg: Config,
    count: int = 8,
    seed: int | None = None,
    data: ImageData | FolderData | None = None,
) -> torch.Tensor:
    """The preview of :func:`preview_rows` as one (3, H, W) uint8 image (see :func:`grid_shape`)."""
    return make_grid(preview_rows(cfg, count, seed, data))


def write_png(grid: torch.Tensor, path: str | Path) -> Path:
    """Write a (3, H, W) uint8 image to ``path`` as PNG, atomically; the folder is created.

    The file is written next to ``path`` under a temporary name and renamed: ``path`` is either
    the complete new image or untouched."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy())
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            image.save(handle, format="PNG")
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return out
