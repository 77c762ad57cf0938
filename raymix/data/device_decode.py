"""Training crops decoded on the training device (``data.decode=device``).

Loader processes only read each JPEG's bytes and header and draw its crop boxes (the same boxes as
the CPU path: they depend on ``(seed, epoch, index)`` only). The batch's JPEGs are then decoded
together by ``torchvision.io.decode_jpeg`` on the device (nvJPEG on CUDA), and every box is cut
and resized there. Files the device decoder does not take (not JPEG, CMYK, or one it rejects) are
decoded on the CPU by the ordinary path, with its bad-file handling.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from raymix.data.folder import Box, CropSpec, FolderData, TrainCrops, view_boxes

# JPEG colour modes nvJPEG decodes to RGB.
DEVICE_MODES = ("RGB", "L")


@dataclass
class RawItem:
    """One training image as the loader hands it over: JPEG bytes and boxes, or CPU crops."""

    index: int
    label: int
    epoch: int
    data: torch.Tensor | None = None  # (n,) uint8 JPEG file bytes
    boxes: list[Box] | None = None
    crops: torch.Tensor | None = None  # (V, 3, S, S) uint8, decoded on the CPU


class RawTrainCrops(TrainCrops):
    """Keyed by ``(index, epoch)`` like :class:`raymix.data.folder.TrainCrops`; yields RawItems."""

    def __getitem__(self, key: tuple[int, int]) -> RawItem:  # type: ignore[override]
        index, epoch = key
        label = int(self.folder.labels[index])
        path = self.folder.path(index)
        try:
            with Image.open(path) as image:
                width, height = image.size
                usable = image.format == "JPEG" and image.mode in DEVICE_MODES
            if usable:
                boxes = view_boxes(width, height, self.crops, epoch, index)
                data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
                return RawItem(index, label, epoch, data=data, boxes=boxes)
        except Exception:  # an unreadable header: the CPU path reports it and substitutes
            pass
        crops, label = self.folder.train_item(index, epoch, self.crops)
        return RawItem(index, label, epoch, crops=crops)


def collate_raw(items: list[RawItem]) -> list[RawItem]:
    return items


def _cut(image: torch.Tensor, box: Box, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size) float: the box's pixels, antialiased bilinear resize."""
    left, top, w, h = (int(round(v)) for v in box)
    patch = image[:, top : top + h, left : left + w].unsqueeze(0).float()
    return F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def decode_batch(
    items: list[RawItem], folder: FolderData, crops: CropSpec, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (B, V, 3, S, S), int64 labels (B,)) on ``device`` from a batch of RawItems."""
    from torchvision.io import ImageReadMode, decode_jpeg

    size = folder.image_size
    jpeg = [i for i, item in enumerate(items) if item.data is not None]
    decoded: dict[int, torch.Tensor] = {}
    if jpeg:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's deprecation notice
            try:
                images = decode_jpeg([items[i].data for i in jpeg], mode=ImageReadMode.RGB, device=device)
                decoded = dict(zip(jpeg, images, strict=True))
            except RuntimeError:  # one bad file fails the whole batch: retry one by one
                for i in jpeg:
                    try:
                        decoded[i] = decode_jpeg(items[i].data, mode=ImageReadMode.RGB, device=device)
                    except RuntimeError:
                        pass
    views: list[torch.Tensor] = []
    labels: list[int] = []
    for i, item in enumerate(items):
        if i in decoded and item.boxes is not None:
            cut = torch.stack([_cut(decoded[i], box, size) for box in item.boxes])
            views.append(cut.round_().clamp_(0, 255).to(torch.uint8))
            labels.append(item.label)
            continue
        if item.crops is None:  # the device rejected it: decode on the CPU (warns, substitutes)
            item.crops, item.label = folder.train_item(item.index, item.epoch, crops)
        views.append(item.crops.to(device))
        labels.append(item.label)
    return torch.stack(views), torch.tensor(labels, dtype=torch.int64).to(device)
