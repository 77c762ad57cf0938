"""Batches of uint8 images and labels, shuffled per epoch and sharded across data-parallel workers.

The epoch order depends only on ``(seed, epoch)``: every rank computes the same permutation and takes
its own share, and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import torch

from raymix.config import ConfigError
from raymix.data.datasets import ImageData
from raymix.data.device_decode import RawTrainCrops, collate_raw, decode_batch
from raymix.data.folder import CropSpec, FolderData, TrainCrops

Batch = tuple[torch.Tensor, torch.Tensor]


def epoch_order(size: int, shuffle: bool, seed: int, epoch: int) -> torch.Tensor:
    """The (size,) int64 order of one epoch: a seeded CPU permutation, or 0..size-1."""
    if not shuffle:
        return torch.arange(size)
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(size, generator=generator)


def shard_indices(
    order: torch.Tensor, batch_size: int, rank: int, world_size: int, drop_last: bool
) -> torch.Tensor:
    """This rank's share of ``order``: strided ``rank::world_size``.

    With ``drop_last`` the order is first trimmed to a multiple of ``world_size * batch_size``, so
    every rank gets the same number of full batches. Without it every index appears on exactly one
    rank and shard lengths may differ by one.
    """
    if drop_last:
        step = world_size * batch_size
        order = order[: len(order) // step * step]
    return order[rank::world_size]


class _EpochBatches:
    """A DataLoader batch sampler reading its loader's current epoch at each iteration, so the
    DataLoader (and its persistent processes) is built once per run, not once per epoch."""

    def __init__(self, loader: BatchLoader) -> None:
        # A weak reference: a dropped BatchLoader frees its DataLoader (and ends its processes)
        # at once instead of waiting for the garbage collector to break a cycle.
        self._loader = weakref.ref(loader)

    @property
    def loader(self) -> BatchLoader:
        loader = self._loader()
        if loader is None:
            raise RuntimeError("the BatchLoader of this sampler no longer exists")
        return loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[list[Any]]:
        loader = self.loader
        epoch = loader.epoch
        keyed = loader.crops is not None
        for idx in loader._batches():
            yield [(i, epoch) for i in idx.tolist()] if keyed else idx.tolist()


class BatchLoader:
    """Shuffled (or ordered) batches of (uint8 images, int64 labels) on `device`, sharded across workers.

    ``batch_size`` is the per-worker batch. In-memory :class:`ImageData` is indexed a batch at a
    time. A :class:`FolderData` is decoded by one torch DataLoader kept for the whole run (persistent
    processes, ``prefetch`` batches ahead each). With ``crops`` its batches are training views,
    ``(b, views, 3, S, S)``: each image's RandomResizedCrops of the full image (see
    :mod:`raymix.data.folder`), decoded on the CPU or, with ``decode="device"``, on ``device``.
    Without it they are evaluation images ``(b, 3, S, S)``; any dataset of ``(image, label)``
    items with ``labels`` is decoded the same way. ``persistent=False``: the decoding processes
    end with each pass (a one-off pass such as an evaluation).
    """

    def __init__(
        self,
        data: ImageData | FolderData,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        num_workers: int = 0,
        prefetch: int = 2,
        crops: CropSpec | None = None,
        decode: str = "cpu",
        persistent: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"training.batch_size must give at least 1 image per worker, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        per_rank = len(data) // world_size
        if drop_last and per_rank < batch_size:
            raise ConfigError(
                f"training.batch_size: a per-worker batch of {batch_size} is larger than the {per_rank} "
                f"training images available per worker ({len(data)} images over {world_size} workers)"
            )
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.num_workers = num_workers
        self.prefetch = prefetch
        self.crops = crops if isinstance(data, FolderData) else None
        self.decode = decode
        self.persistent = persistent
        self.epoch = 0
        self._loader: torch.utils.data.DataLoader[Any] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` for the next iteration."""
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        """This rank's image indices for the current epoch, in iteration order."""
        order = epoch_order(len(self.data), self.shuffle, self.seed, self.epoch)
        return shard_indices(order, self.batch_size, self.rank, self.world_size, self.drop_last)

    def _shard_length(self) -> int:
        size = len(self.data)
        if self.drop_last:
            step = self.world_size * self.batch_size
            return size // step * self.batch_size
        return len(range(self.rank, size, self.world_size))

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        length = self._shard_length()
        if self.drop_last:
            return length // self.batch_size
        return -(-length // self.batch_size)  # ceil

    def _batches(self) -> list[torch.Tensor]:
        # With drop_last the shard is a multiple of batch_size, so no partial batch is left.
        return list(torch.split(self.indices(), self.batch_size))

    def _to_device(self, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        if self.device.type == "cuda":
            # Pinned host memory lets the copy run asynchronously with the compute already queued.
            if not images.is_pinned():
                images, labels = images.pin_memory(), labels.pin_memory()
            return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        return images.to(self.device), labels.to(self.device)

    def _dataloader(self) -> torch.utils.data.DataLoader[Any]:
        """The run's DataLoader over the folder, built at the first iteration."""
        if self._loader is None:
            dataset: torch.utils.data.Dataset[Any] = self.data  # type: ignore[assignment]
            collate = None
            if self.crops is not None:
                assert isinstance(self.data, FolderData)
                raw = self.decode == "device"
                dataset = RawTrainCrops(self.data, self.crops) if raw else TrainCrops(self.data, self.crops)
                collate = collate_raw if raw else None
            workers = self.num_workers
            self._loader = torch.utils.data.DataLoader(
                dataset,
                batch_sampler=_EpochBatches(self),
                num_workers=workers,
                collate_fn=collate,
                pin_memory=self.device.type == "cuda" and not (self.crops and self.decode == "device"),
                persistent_workers=self.persistent and workers > 0,
                prefetch_factor=self.prefetch if workers > 0 else None,
            )
        return self._loader

    def __iter__(self) -> Iterator[Batch]:
        """Yield (images (b, 3, S, S) or (b, views, 3, S, S) uint8, labels (b,) int64) on ``device``."""
        if isinstance(self.data, ImageData):
            for idx in self._batches():
                yield self._to_device(self.data.images[idx], self.data.labels[idx])
            return
        for batch in self._dataloader():
            if self.crops is not None and self.decode == "device":
                yield decode_batch(batch, self.data, self.crops, self.device)
            else:
                images, labels = batch
                yield self._to_device(images, labels.to(torch.int64))
