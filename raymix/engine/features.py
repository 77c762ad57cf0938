"""What evaluation extracts features of, and putting sharded features back in dataset order.

Every rank encodes its own shard of an evaluation set (the strided ``rank::world_size``
indices of an ordered :class:`~raymix.data.BatchLoader` without ``drop_last``);
:func:`unshard` puts the gathered shards back in dataset order. ``eval.knn_train_subset``
bounds the cost of the kNN bank and of the linear probe's training set:
:func:`stratified_subset` picks a fixed, class-stratified subset of the training images
before any is decoded, and :func:`subset_view` restricts a dataset to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from raymix.data import ImageData

# Decorrelates the subset's draws from other streams seeded with training.seed.
_SUBSET_STREAM = 7_777_777


def stratified_subset(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Sorted, unique int64 indices of ``size`` rows of ``labels``, stratified by class.

    Each class gets its proportional share ``size * n_c / N`` rounded down, and the rows
    left over go to the classes with the largest remainders (ties: the smaller label), so
    every class count is within one of proportional and the total is exactly ``size``.
    Within a class the rows are the first of a permutation seeded by ``seed``: the same
    subset for the same labels and seed. ``size >= N`` gives every row.
    """
    labels = labels.reshape(-1).cpu()
    n = labels.shape[0]
    if size < 0:
        raise ValueError(f"a subset size must be >= 0, got {size}")
    if size >= n:
        return torch.arange(n)
    classes, counts = torch.unique(labels, sorted=True, return_counts=True)  # (C,), (C,)
    scaled = counts * size  # exact integer arithmetic: quota_c = scaled_c / n
    quotas = torch.div(scaled, n, rounding_mode="floor")  # (C,)
    remainders = scaled - quotas * n
    # Largest remainders first; a stable sort keeps the smaller label first among ties.
    order = torch.sort(-remainders, stable=True).indices
    quotas[order[: size - int(quotas.sum())]] += 1
    generator = torch.Generator().manual_seed(seed * 1_000_003 + _SUBSET_STREAM)
    chosen = []
    for label, quota in zip(classes.tolist(), quotas.tolist(), strict=True):
        rows = torch.nonzero(labels == label).flatten()  # (n_c,) ascending
        chosen.append(rows[torch.randperm(rows.shape[0], generator=generator)[:quota]])
    return torch.sort(torch.cat(chosen)).values


class SubsetData(torch.utils.data.Dataset):
    """The rows ``indices`` of a map-style dataset, with its ``labels``, ``mean``, ``std`` and
    ``num_classes``; items are decoded by the dataset itself, only when asked for."""

    def __init__(self, data: Any, indices: torch.Tensor) -> None:
        self.data = data
        self.indices = indices.to(torch.int64)  # (n,)
        self.labels = data.labels[self.indices]  # (n,) int64
        self.mean, self.std, self.num_classes = data.mean, data.std, data.num_classes

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, index: int) -> Any:
        return self.data[int(self.indices[index])]


def subset_view(data: Any, indices: torch.Tensor) -> Any:
    """``data`` restricted to ``indices``: an :class:`ImageData` of those images (a copy), or
    a :class:`SubsetData` that decodes them lazily."""
    if isinstance(data, ImageData):
        return ImageData(
            data.images[indices].contiguous(), data.labels[indices].contiguous(), data.num_classes,
            data.mean, data.std,
        )  # fmt: skip
    return SubsetData(data, indices)


def unshard(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rows of every rank's strided shard (rank ``r`` holds rows ``r::world_size``) in dataset
    order: what one process would have produced."""
    world = len(parts)
    total = sum(int(part.shape[0]) for part in parts)
    if world == 1:
        return parts[0]
    for rank, part in enumerate(parts):
        if part.shape[0] != len(range(rank, total, world)):
            raise ValueError(f"rank {rank} holds {part.shape[0]} rows, not its strided share of {total}")
    out = parts[0].new_empty((total, *parts[0].shape[1:]))
    for rank, part in enumerate(parts):
        out[rank::world] = part
    return out
