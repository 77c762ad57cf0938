"""BatchLoader: epoch order, sharding across ranks, batch counts and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from raymix.config import ConfigError
from raymix.data import BatchLoader, FolderData, ImageData


def _data(n: int) -> ImageData:
    """Image i is filled with the value i % 256 and labelled i, so batches reveal their indices."""
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    return ImageData(images, torch.arange(n), n, (0.5,) * 3, (0.25,) * 3)


def _indices(loader: BatchLoader) -> list[int]:
    out: list[int] = []
    for images, labels in loader:
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert images.shape[1:] == (3, 4, 4) and images.shape[0] == labels.shape[0]
        assert torch.equal(images[:, 0, 0, 0], (labels % 256).to(torch.uint8))  # images follow labels
        out.extend(labels.tolist())
    return out


def test_every_index_once_without_drop_last() -> None:
    loader = BatchLoader(_data(23), 5, shuffle=True, drop_last=False, seed=1)
    seen = _indices(loader)
    assert sorted(seen) == list(range(23))
    assert len(loader) == 5
    sizes = [len(labels) for _, labels in loader]
    assert sizes == [5, 5, 5, 5, 3]


def test_ordered_without_shuffle() -> None:
    loader = BatchLoader(_data(10), 4, shuffle=False, drop_last=False)
    assert _indices(loader) == list(range(10))


def test_epoch_order_depends_only_on_seed_and_epoch() -> None:
    data = _data(50)
    loader = BatchLoader(data, 10, shuffle=True, drop_last=True, seed=3)
    loader.set_epoch(0)
    first = _indices(loader)
    assert _indices(loader) == first  # re-iterating the same epoch repeats it
    loader.set_epoch(1)
    second = _indices(loader)
    assert second != first and sorted(second) == sorted(first)

    resumed = BatchLoader(data, 10, shuffle=True, drop_last=True, seed=3)
    resumed.set_epoch(1)
    assert _indices(resumed) == second
    other_seed = BatchLoader(data, 10, shuffle=True, drop_last=True, seed=4)
    other_seed.set_epoch(1)
    assert _indices(other_seed) != second


def test_two_ranks_get_disjoint_equal_shards() -> None:
    data = _data(47)
    shards = []
    for rank in range(2):
        loader = BatchLoader(data, 4, shuffle=True, drop_last=True, seed=5, rank=rank, world_size=2)
        loader.set_epoch(2)
        assert len(loader) == 5  # 47 // (2 * 4) = 5 batches of 4 per rank
        shards.append(_indices(loader))
    assert len(shards[0]) == len(shards[1]) == 20
    assert not set(shards[0]) & set(shards[1])
    # Together they are the first 40 indices of the shared epoch permutation.
    single = BatchLoader(data, 1, shuffle=True, drop_last=False, seed=5)
    single.set_epoch(2)
    assert set(shards[0]) | set(shards[1]) == set(_indices(single)[:40])


def test_ranks_without_drop_last_cover_everything_once() -> None:
    data = _data(11)
    seen = []
    for rank in range(3):
        seen.extend(_indices(BatchLoader(data, 2, shuffle=True, drop_last=False, rank=rank, world_size=3)))
    assert sorted(seen) == list(range(11))


@pytest.mark.parametrize(("n", "batch", "world", "expected"), [(10, 3, 1, 3), (12, 3, 1, 4), (25, 3, 2, 4)])
def test_drop_last_lengths(n: int, batch: int, world: int, expected: int) -> None:
    for rank in range(world):
        loader = BatchLoader(_data(n), batch, shuffle=True, drop_last=True, rank=rank, world_size=world)
        assert len(loader) == expected
        assert [len(labels) for _, labels in loader] == [batch] * expected


@pytest.mark.parametrize(("n", "rank", "expected"), [(10, 0, 2), (10, 1, 2), (11, 0, 2), (7, 1, 1)])
def test_len_without_drop_last(n: int, rank: int, expected: int) -> None:
    loader = BatchLoader(_data(n), 3, shuffle=False, drop_last=False, rank=rank, world_size=2)
    assert len(loader) == expected == len(list(loader))


def test_batch_larger_than_dataset_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"training\.batch_size.*\b5\b"):
        BatchLoader(_data(10), 6, shuffle=True, drop_last=True, world_size=2)
    # Without drop_last the single partial batch is fine.
    loader = BatchLoader(_data(10), 16, shuffle=True, drop_last=False)
    assert len(loader) == 1


def test_folder_data_batches(tmp_path: Path) -> None:
    for label, name in enumerate(["a", "b"]):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (10 + i, 7), (80 * label, 0, 0)).save(tmp_path / name / f"{i}.png")
    data = FolderData(tmp_path, 6)
    loader = BatchLoader(data, 4, shuffle=True, drop_last=False, seed=0)
    batches = list(loader)
    assert [len(labels) for _, labels in batches] == [4, 2]
    labels = torch.cat([labels for _, labels in batches])
    images = torch.cat([images for images, _ in batches])
    assert images.shape == (6, 3, 6, 6) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    # Same order as the in-memory path for the same (seed, epoch).
    assert labels.tolist() == [data.labels[i].item() for i in loader.indices()]
    assert torch.equal(images[:, 0, 0, 0], (labels * 80).to(torch.uint8))
