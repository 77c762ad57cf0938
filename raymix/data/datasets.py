"""Datasets as uint8 image tensors at training resolution.

Small datasets (digits, synthetic, CIFAR, STL-10) are decoded once and held in memory as one
``(N, 3, S, S)`` uint8 tensor (:class:`ImageData`), so batches are plain tensor indexing and all
augmentation happens batched on the training device. Image folders of arbitrary size are decoded
lazily (:class:`raymix.data.folder.FolderData`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import datasets as tv_datasets

from raymix.config import ConfigError, DataConfig
from raymix.data.folder import FolderData

Triple = tuple[float, float, float]

# Published per-channel statistics of the training splits, in [0, 1] units.
CIFAR10_MEAN: Triple = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: Triple = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN: Triple = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: Triple = (0.2673, 0.2564, 0.2762)
STL10_MEAN: Triple = (0.4467, 0.4398, 0.4066)
STL10_STD: Triple = (0.2603, 0.2566, 0.2713)

DOWNLOADABLE = ("cifar10", "cifar100", "stl10")

# Images resized per chunk so a 50k-image upsample never holds a full float copy in memory.
_RESIZE_CHUNK = 1024


@dataclass(frozen=True)
class ImageData:
    """Images held in memory at training resolution."""

    images: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N,) int64
    num_classes: int
    mean: Triple  # per-channel normalisation constants in [0, 1] units
    std: Triple

    def __len__(self) -> int:
        return int(self.images.shape[0])


# ---------------------------------------------------------------- helpers


def resize_uint8(images: torch.Tensor, size: int, antialias: bool) -> torch.Tensor:
    """Bilinearly resize a (N, C, H, W) uint8 tensor to (N, C, size, size), chunk by chunk."""
    if images.shape[-2:] == (size, size):
        return images
    chunks = []
    for start in range(0, images.shape[0], _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK].float()
        chunk = F.interpolate(
            chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias
        )
        chunks.append(chunk.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(chunks) if chunks else images.new_zeros((0, images.shape[1], size, size))


def _gray_stats(images: torch.Tensor) -> tuple[Triple, Triple]:
    """Mean and std (in [0, 1] units) of a uint8 image tensor, the same for all 3 channels."""
    values = images.double() / 255.0
    mean, std = float(values.mean()), float(values.std())
    return (mean, mean, mean), (std, std, std)


def _derived_seed(seed: int, stream: int) -> int:
    """A non-negative 63-bit seed for an independent stream derived from ``seed``."""
    return (seed * 1_000_003 + stream * 7_919 + 12_345) % (2**63)


# ---------------------------------------------------------------- digits


def load_digits_data(cfg: DataConfig) -> tuple[ImageData, ImageData]:
    """sklearn's bundled 8x8 digits, upsampled to ``cfg.image_size`` with a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    pixels = torch.from_numpy(np.asarray(bunch.data, dtype=np.float32))  # (N, 64), values 0..16
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))  # (N,)
    images = (pixels * (255.0 / 16.0)).round().to(torch.uint8).reshape(-1, 1, 8, 8)  # (N, 1, 8, 8)
    images = resize_uint8(images, cfg.image_size, antialias=False)  # (N, 1, S, S)
    images = images.expand(-1, 3, -1, -1).contiguous()  # (N, 3, S, S)

    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=cfg.test_fraction,
        random_state=cfg.split_seed,
        stratify=labels.numpy(),
    )
    train_idx_t = torch.from_numpy(np.sort(train_idx))
    test_idx_t = torch.from_numpy(np.sort(test_idx))
    mean, std = _gray_stats(images[train_idx_t])
    num_classes = int(labels.max()) + 1

    def subset(idx: torch.Tensor) -> ImageData:
        return ImageData(images[idx].contiguous(), labels[idx].contiguous(), num_classes, mean, std)

    return subset(train_idx_t), subset(test_idx_t)


# ---------------------------------------------------------------- synthetic


@dataclass(frozen=True)
class _ClassSignature:
    """Per-class constants of the synthetic images, each a (C,) tensor."""

    lobes: torch.Tensor  # number of star-shape lobes
    shape_angle: torch.Tensor  # rotation of the star shape (radians)
    grating_angle: torch.Tensor  # orientation of the stripes (radians, in [0, pi/2))
    frequency: torch.Tensor  # stripes per image side


def _class_signatures(num_classes: int) -> _ClassSignature:
    """Deterministic, well-spread class constants (low-discrepancy sequences, no randomness).

    Grating angles live in [0, pi/2) so a horizontal flip (angle -> -angle) never turns one class's
    stripes into another's; the star shape and the stripe frequency add two more cues.
    """
    c = torch.arange(num_classes, dtype=torch.float32)
    golden = (math.sqrt(5.0) - 1.0) / 2.0
    lobes = 2.0 + (c % 5)
    # Classes sharing a lobe count are rotated against each other by a fraction of the lobe period.
    shape_angle = torch.frac(torch.div(c, 5, rounding_mode="floor") * golden) * (2 * math.pi) / lobes
    grating_angle = torch.frac(c * golden) * (math.pi / 2)
    frequency = 2.0 + 3.0 * torch.frac(c * 0.7548776662 + 0.3)
    return _ClassSignature(lobes, shape_angle, grating_angle, frequency)


def synthetic_images(
    count: int, num_classes: int, image_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` labelled procedural images: (images (N, 3, S, S) uint8, labels (N,) int64).

    Each image is a coloured star-shaped blob filled with oriented stripes over a darker background.
    The class fixes the number of lobes and rotation of the star and the angle and frequency of the
    stripes; each image draws its own stripe phase, colours, position offset, size and pixel noise.
    Classes are balanced (counts differ by at most one).
    """
    gen = torch.Generator().manual_seed(seed)
    sig = _class_signatures(num_classes)
    labels = (torch.arange(count) % num_classes)[torch.randperm(count, generator=gen)]  # (N,)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, *shape, generator=gen)

    phase = uniform(0.0, 2 * math.pi)  # (N,)
    offset = uniform(-0.08, 0.08, 2)  # (N, 2) blob centre in [-1, 1] image coordinates
    radius = uniform(0.5, 0.6)  # (N,)
    foreground = uniform(0.55, 1.0, 3)  # (N, 3)
    background = uniform(0.0, 0.35, 3)  # (N, 3)

    # Pixel-centre coordinates in [-1, 1]; y grows downwards like image rows.
    axis = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size * 2 - 1  # (S,)
    x = axis.view(1, 1, -1) - offset[:, 0, None, None]  # (N, 1, S) -> broadcast below
    y = axis.view(1, -1, 1) - offset[:, 1, None, None]  # (N, S, 1)
    x, y = torch.broadcast_tensors(x, y)  # (N, S, S) each

    def per_image(values: torch.Tensor) -> torch.Tensor:
        return values[labels].view(-1, 1, 1)  # (N, 1, 1)

    # The work below is in-place where possible: at 2000 x 32 x 32 the cost is memory traffic.
    # Star outline: the radius oscillates with the polar angle; a soft edge keeps small sizes smooth.
    rho = torch.hypot(x, y)  # (N, S, S)
    wave = torch.atan2(y, x).sub_(per_image(sig.shape_angle)).mul_(per_image(sig.lobes)).cos_()
    r = radius.view(-1, 1, 1)
    outline = wave.mul_(0.35 * r).add_(r)
    edge = 2.0 / image_size  # about one pixel
    mask = outline.sub_(rho).mul_(1.0 / edge).sigmoid_().unsqueeze(1)  # (N, 1, S, S)

    angle = per_image(sig.grating_angle)
    along = (x * torch.cos(angle)).addcmul_(y, torch.sin(angle))  # (N, S, S) position across the stripes
    # shade = 0.35 + 0.65 * (0.5 + 0.5 * cos(pi * f * along + phase)), stripes between 35% and 100%.
    shade = along.mul_(math.pi * per_image(sig.frequency)).add_(phase.view(-1, 1, 1)).cos_()
    shade = shade.mul_(0.325).add_(0.675).unsqueeze(1)  # (N, 1, S, S)

    bg = background.view(-1, 3, 1, 1)
    images = (foreground.view(-1, 3, 1, 1) * shade).sub_(bg).mul_(mask).add_(bg)  # (N, 3, S, S)
    # Luminance noise shared by the channels: cheaper than per-channel noise, same visual effect.
    images.add_(torch.randn(count, 1, image_size, image_size, generator=gen).mul_(0.04))
    images = images.mul_(255.0).add_(0.5).clamp_(0.0, 255.0).to(torch.uint8)  # +0.5 then truncate: round
    return images, labels.to(torch.int64)


def load_synthetic_data(cfg: DataConfig) -> tuple[ImageData, ImageData]:
    """Train and test synthetic sets from two seeds derived from ``cfg.split_seed``."""
    size, classes = cfg.image_size, cfg.synthetic_classes
    train_images, train_labels = synthetic_images(
        cfg.synthetic_train_size, classes, size, _derived_seed(cfg.split_seed, 1)
    )
    test_images, test_labels = synthetic_images(
        cfg.synthetic_test_size, classes, size, _derived_seed(cfg.split_seed, 2)
    )
    mean, std = _channel_stats(train_images)
    return (
        ImageData(train_images, train_labels, classes, mean, std),
        ImageData(test_images, test_labels, classes, mean, std),
    )


def _channel_stats(images: torch.Tensor) -> tuple[Triple, Triple]:
    """Per-channel mean and std (in [0, 1] units) of a (N, 3, H, W) uint8 tensor."""
    values = images.double().div_(255.0).transpose(0, 1).reshape(3, -1)  # (3, N*H*W)
    mean, std = values.mean(dim=1).tolist(), values.std(dim=1).tolist()
    return (mean[0], mean[1], mean[2]), (std[0], std[1], std[2])


# ---------------------------------------------------------------- torchvision datasets


def _check_root(cfg: DataConfig) -> Path:
    """The dataset root as a Path, or a ConfigError naming ``data.root``."""
    hint = f"; data.download=true fetches {cfg.name} into it" if cfg.name in DOWNLOADABLE else ""
    if not cfg.root:
        raise ConfigError(f"data.root is required for data.name={cfg.name!r}{hint}")
    root = Path(cfg.root).expanduser()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"data.root={cfg.root!r} is not a directory{hint}")
    if not root.exists():
        if cfg.download and cfg.name in DOWNLOADABLE:
            root.mkdir(parents=True, exist_ok=True)  # torchvision downloads into it
        else:
            raise ConfigError(f"data.root={cfg.root!r} does not exist{hint}")
    return root


def _open_torchvision(cfg: DataConfig, factory: Callable[[], Any]) -> Any:
    """Build a torchvision dataset, turning its 'not found' RuntimeError into a ConfigError."""
    try:
        return factory()
    except RuntimeError as exc:
        raise ConfigError(
            f"{cfg.name} files not found in data.root={cfg.root!r} and data.download=false; "
            f"set data.download=true to fetch them ({exc})"
        ) from None


def _cifar(cfg: DataConfig, root: Path, hundred: bool) -> tuple[ImageData, ImageData]:
    cls = tv_datasets.CIFAR100 if hundred else tv_datasets.CIFAR10
    mean, std = (CIFAR100_MEAN, CIFAR100_STD) if hundred else (CIFAR10_MEAN, CIFAR10_STD)
    num_classes = 100 if hundred else 10

    def split(train: bool) -> ImageData:
        ds = _open_torchvision(cfg, lambda: cls(root=str(root), train=train, download=cfg.download))
        images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)  # (N,)
        return ImageData(resize_uint8(images, cfg.image_size, antialias=True), labels, num_classes, mean, std)

    return split(True), split(False)


def _stl10(cfg: DataConfig, root: Path) -> tuple[ImageData, ImageData]:
    """STL-10's labelled splits: "train" (5000 images) and "test" (8000); the unlabelled 100k are not used."""

    def split(name: str) -> ImageData:
        ds = _open_torchvision(
            cfg, lambda: tv_datasets.STL10(root=str(root), split=name, download=cfg.download)
        )
        images = torch.from_numpy(np.asarray(ds.data)).contiguous()  # (N, 3, 96, 96), already channel-first
        labels = torch.as_tensor(np.asarray(ds.labels), dtype=torch.int64)  # (N,)
        return ImageData(
            resize_uint8(images, cfg.image_size, antialias=True), labels, 10, STL10_MEAN, STL10_STD
        )

    return split("train"), split("test")


def _imagefolder(cfg: DataConfig, root: Path) -> tuple[FolderData, FolderData]:
    missing = [name for name in ("train", "val") if not (root / name).is_dir()]
    if missing:
        raise ConfigError(
            f"data.root={cfg.root!r} must contain train/ and val/ subfolders in ImageFolder layout "
            f"(missing: {', '.join(m + '/' for m in missing)})"
        )
    fraction, draft = cfg.eval_crop_fraction, cfg.decode == "cpu"
    train = FolderData(root / "train", cfg.image_size, eval_fraction=fraction, draft=draft)
    test = FolderData(
        root / "val", cfg.image_size, class_to_idx=train.class_to_idx, eval_fraction=fraction, draft=draft
    )
    return train, test


def build_datasets(cfg: DataConfig) -> tuple[ImageData | FolderData, ImageData | FolderData]:
    """The (train, test) datasets described by ``cfg``; nothing is downloaded unless data.download."""
    if cfg.name == "digits":
        return load_digits_data(cfg)
    if cfg.name == "synthetic":
        return load_synthetic_data(cfg)
    root = _check_root(cfg)
    if cfg.name in ("cifar10", "cifar100"):
        return _cifar(cfg, root, hundred=cfg.name == "cifar100")
    if cfg.name == "stl10":
        return _stl10(cfg, root)
    if cfg.name == "imagefolder":
        return _imagefolder(cfg, root)
    raise ConfigError(f"data.name: unknown dataset {cfg.name!r}")  # unreachable: the config validates it
