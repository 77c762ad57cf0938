"""Image folders (``root/<class>/<image>``) decoded lazily, at the size each crop needs.

Training takes the standard two-crop recipe: each view's RandomResizedCrop is drawn on the whole
decoded image and resized to ``image_size`` (flip and the colour augmentations follow batched on
the training device). The crop boxes of an image depend only on ``(seed, epoch, index)``, so a
run's views do not depend on loader processes, ranks or batch boundaries, and a resumed run sees
exactly the crops it would have seen.

JPEGs are decoded at reduced size where the crops allow it (PIL's draft mode lets libjpeg scale
by 1/2, 1/4 or 1/8 while decoding, never below the resolution a crop is resized to). Evaluation
items are the usual resize-then-centre-crop.

A file that cannot be decoded is reported once (a :class:`BadImageWarning` naming it) and replaced
by the next decodable image of the folder, so an epoch never dies on a bad file. Grayscale, CMYK,
palette and alpha images are converted to RGB.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from raymix.config import ConfigError

Triple = tuple[float, float, float]
Box = tuple[float, float, float, float]  # left, top, width, height in pixels of the full image
BoxesFn = Callable[[int, int], list[Box]]  # (width, height) of an image -> its crop boxes

IMAGENET_MEAN: Triple = (0.485, 0.456, 0.406)
IMAGENET_STD: Triple = (0.229, 0.224, 0.225)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Attempts at a box that fits before the centre fallback (as torchvision's RandomResizedCrop).
CROP_ATTEMPTS = 10
# libjpeg's DCT scaling factors available to PIL's draft mode.
DRAFT_FACTORS = (8, 4, 2)


class BadImageWarning(UserWarning):
    """A file of an image folder was skipped or could not be decoded."""


@dataclass(frozen=True)
class CropSpec:
    """How training crops are drawn: RandomResizedCrop's scale and ratio, views per image, seed."""

    scale: tuple[float, float]
    ratio: tuple[float, float]
    views: int
    seed: int


# ---------------------------------------------------------------- scanning


def scan_folder(
    root: Path, class_to_idx: dict[str, int] | None = None
) -> tuple[list[str], list[int], dict[str, int]]:
    """Files (relative to ``root``), labels and the class map of an ImageFolder-layout folder.

    Classes are the sorted subfolders (or ``class_to_idx``, for a val split that must share the
    train split's labels). Files without an image extension are skipped with one warning; an empty
    class folder keeps its label (so splits stay aligned) and is named in a warning.
    """
    if not root.is_dir():
        raise ConfigError(f"data.root: {str(root)!r} is not a directory")
    present = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if class_to_idx is None:
        class_to_idx = {name: i for i, name in enumerate(present)}
    else:
        unknown = sorted(set(present) - set(class_to_idx))
        if unknown:
            raise ConfigError(
                f"data.root: class folders {unknown} in {str(root)!r} do not exist in the train/ split"
            )
    files: list[str] = []
    labels: list[int] = []
    skipped: list[str] = []
    empty: list[str] = []
    for name in present:
        found = 0
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            for filename in sorted(filenames):
                rel = os.path.relpath(os.path.join(dirpath, filename), root)
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(rel)
                    labels.append(class_to_idx[name])
                    found += 1
                elif not filename.startswith("."):
                    skipped.append(rel)
        if not found:
            empty.append(name)
    if skipped:
        warnings.warn(
            f"{str(root)!r}: skipped {len(skipped)} file(s) without an image extension "
            f"({', '.join(IMAGE_EXTENSIONS)}), e.g. {skipped[0]!r}",
            BadImageWarning,
            stacklevel=2,
        )
    if empty:
        warnings.warn(
            f"{str(root)!r}: class folder(s) {empty} hold no images; their labels are kept",
            BadImageWarning,
            stacklevel=2,
        )
    if not files:
        raise ConfigError(
            f"data.root: no images found in {str(root)!r} (expected <class>/<image> files with one of "
            f"the extensions {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files, labels, class_to_idx


# ---------------------------------------------------------------- crop boxes


def crop_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one image's crops in one epoch: a function of its arguments only."""
    return np.random.default_rng([seed, epoch, index])


def random_resized_box(
    width: int, height: int, rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> Box:
    """A RandomResizedCrop box of a ``width`` x ``height`` image, as torchvision draws it.

    The area is U(scale) of the image's, the log aspect ratio U(log ratio); a box that does not fit
    is redrawn up to CROP_ATTEMPTS times, then the centred largest box within ``ratio`` is taken.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    draws = rng.random((CROP_ATTEMPTS, 2))
    positions = rng.random(2)
    for u_area, u_ratio in draws:
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_low + (log_high - log_low) * u_ratio)
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = math.floor(positions[0] * (width - w + 1))
            top = math.floor(positions[1] * (height - h + 1))
            return float(left), float(top), float(w), float(h)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return float((width - w) // 2), float((height - h) // 2), float(w), float(h)


def view_boxes(width: int, height: int, crops: CropSpec, epoch: int, index: int) -> list[Box]:
    """The boxes of image ``index``'s training views in ``epoch`` (one per view)."""
    rng = crop_rng(crops.seed, epoch, index)
    return [random_resized_box(width, height, rng, crops.scale, crops.ratio) for _ in range(crops.views)]


def centre_box(width: int, height: int, size: int, fraction: float) -> Box:
    """The box that resize-shorter-side-to ``size / fraction`` then centre-crop ``size`` keeps."""
    side = min(width, height) * fraction
    return (width - side) / 2, (height - side) / 2, side, side


def draft_factor(boxes: list[Box], size: int) -> int:
    """The largest JPEG scaling factor (1, 2, 4 or 8) keeping every box at least ``size`` pixels."""
    smallest = min(min(box[2], box[3]) for box in boxes)
    for factor in DRAFT_FACTORS:
        if smallest / factor >= size:
            return factor
    return 1


# ---------------------------------------------------------------- decoding


def _rgb(image: Image.Image) -> Image.Image:
    """RGB pixels of any PIL mode; transparent areas are composited on black (as dropping alpha)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def decode_crops(
    path: str | Path, size: int, boxes_of: BoxesFn, *, draft: bool = True
) -> tuple[torch.Tensor, list[Box]]:
    """Decode ``path`` and cut each box of ``boxes_of(width, height)``, resized to ``size``.

    Returns (uint8 (V, 3, size, size), the boxes in full-image pixels). JPEGs are decoded at the
    largest reduction that keeps every box at least ``size`` pixels on its shorter side.
    """
    with Image.open(path) as image:
        width, height = image.size
        boxes = boxes_of(width, height)
        factor = draft_factor(boxes, size) if draft and image.format == "JPEG" else 1
        if factor > 1:
            image.draft("RGB", (-(-width // factor), -(-height // factor)))
        sx, sy = image.size[0] / width, image.size[1] / height
        pixels = _rgb(image)
        crops = [
            pixels.resize(
                (size, size),
                Image.Resampling.BILINEAR,
                box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy),
            )
            for left, top, w, h in boxes
        ]
    stacked = np.stack([np.asarray(crop) for crop in crops])  # (V, S, S, 3)
    # A channels-first view, not a copy: batching copies it into place.
    return torch.from_numpy(stacked).permute(0, 3, 1, 2), boxes


class FolderData(torch.utils.data.Dataset):
    """A lazily decoded image folder (torchvision ImageFolder layout: ``root/<class>/<image>``).

    ``data[i]`` is the evaluation item ``(uint8 (3, S, S), label)``: the shorter side resized to
    ``S / eval_fraction`` and the centre S x S kept. ``data.train_item(i, epoch, crops)`` is the
    training item: ``crops.views`` RandomResizedCrops of the full image. Normalisation constants
    are ImageNet's.
    """

    mean: Triple = IMAGENET_MEAN
    std: Triple = IMAGENET_STD

    def __init__(
        self,
        root: str | Path,
        image_size: int,
        class_to_idx: dict[str, int] | None = None,
        *,
        eval_fraction: float = 0.875,
        draft: bool = True,
    ) -> None:
        self.root = Path(root)
        files, labels, self.class_to_idx = scan_folder(self.root, class_to_idx)
        # Fixed-width bytes: loader processes share the pages instead of copying a list of str.
        self._files = np.array([name.encode() for name in files])
        self.image_size = image_size
        self.eval_fraction = eval_fraction
        self.draft = draft
        self.num_classes = len(self.class_to_idx)
        self.labels = torch.tensor(labels, dtype=torch.int64)  # (N,) known without decoding
        self._reported: set[int] = set()

    def __len__(self) -> int:
        return len(self._files)

    def path(self, index: int) -> Path:
        return self.root / self._files[index].decode()

    def _decode(self, index: int, boxes_of: BoxesFn) -> tuple[torch.Tensor, int]:
        """Crops of image ``index``, or of the next decodable image after it (warned once)."""
        for offset in range(len(self)):
            current = (index + offset) % len(self)
            try:
                crops, _ = decode_crops(self.path(current), self.image_size, boxes_of, draft=self.draft)
                return crops, int(self.labels[current])
            except Exception as exc:  # any decoder error: a bad file must not end the epoch
                self.report_bad(current, exc)
        raise RuntimeError(f"data.root: no image of {str(self.root)!r} can be decoded")

    def report_bad(self, index: int, exc: BaseException) -> None:
        """Warn once per file and process that ``index`` is replaced by the next image."""
        if index not in self._reported:
            self._reported.add(index)
            warnings.warn(
                f"cannot decode {str(self.path(index))!r} ({type(exc).__name__}: {exc}); "
                "using the next image of the folder in its place",
                BadImageWarning,
                stacklevel=2,
            )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        size, fraction = self.image_size, self.eval_fraction
        crops, label = self._decode(index, lambda w, h: [centre_box(w, h, size, fraction)])
        return crops[0], label

    def train_item(self, index: int, epoch: int, crops: CropSpec) -> tuple[torch.Tensor, int]:
        """(uint8 (views, 3, S, S), label): the training views of image ``index`` in ``epoch``."""
        return self._decode(index, lambda width, height: view_boxes(width, height, crops, epoch, index))


class TrainCrops(torch.utils.data.Dataset):
    """Training items of a :class:`FolderData` keyed by ``(index, epoch)`` for a DataLoader."""

    def __init__(self, folder: FolderData, crops: CropSpec) -> None:
        self.folder = folder
        self.crops = crops

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key
        return self.folder.train_item(index, epoch, self.crops)
