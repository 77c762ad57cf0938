"""What evaluation encodes: the stratified kNN bank subset, dataset views, unsharding."""

from __future__ import annotations

import pytest
import torch

from raymix.config import load_config
from raymix.data import BatchLoader, ImageData
from raymix.engine.features import SubsetData, stratified_subset, subset_view, unshard
from raymix.engine.knn import knn_accuracies
from raymix.engine.trainer import Trainer

TINY = [
    "data.name=synthetic", "data.image_size=16", "data.synthetic_train_size=64",
    "data.synthetic_test_size=16", "backbone.patch_size=8", "backbone.depth=1",
    "head.hidden_dim=32", "head.out_dim=16", "training.batch_size=32", "training.progress=false",
    "eval.knn_k=[3,50]",
]  # fmt: skip


def _imbalanced_labels() -> torch.Tensor:
    """1000 rows of 7 classes of very different sizes, shuffled."""
    counts = [400, 250, 150, 100, 60, 37, 3]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]


@pytest.mark.parametrize("size", [1, 10, 99, 333, 999])
def test_stratified_subset_is_exact_proportional_sorted_and_unique(size):
    labels = _imbalanced_labels()
    indices = stratified_subset(labels, size, seed=0)
    assert indices.dtype == torch.int64 and indices.shape == (size,)
    assert torch.equal(indices, torch.sort(indices).values) and len(set(indices.tolist())) == size
    for label in range(7):
        share = size * int((labels == label).sum()) / len(labels)
        got = int((labels[indices] == label).sum())
        assert share - 1 < got < share + 1, (label, got, share)


def test_stratified_subset_depends_on_the_seed_only():
    labels = _imbalanced_labels()
    assert torch.equal(stratified_subset(labels, 100, seed=3), stratified_subset(labels.clone(), 100, seed=3))
    assert not torch.equal(stratified_subset(labels, 100, seed=3), stratified_subset(labels, 100, seed=4))
    assert torch.equal(stratified_subset(labels, 1000, seed=3), torch.arange(1000))  # not smaller: all
    assert torch.equal(stratified_subset(labels, 5000, seed=3), torch.arange(1000))


def test_subset_views_keep_labels_and_normalisation():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8, generator=gen)
    data = ImageData(images, torch.arange(10) % 3, 3, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    idx = torch.tensor([1, 4, 5, 9])
    view = subset_view(data, idx)
    assert isinstance(view, ImageData) and len(view) == 4
    assert torch.equal(view.images, images[idx]) and torch.equal(view.labels, data.labels[idx])
    assert (view.mean, view.std, view.num_classes) == (data.mean, data.std, 3)

    class Items(torch.utils.data.Dataset):  # what a folder dataset offers
        labels, mean, std, num_classes = data.labels, data.mean, data.std, 3

        def __len__(self):
            return 10

        def __getitem__(self, i):
            return images[i], int(data.labels[i])

    lazy = subset_view(Items(), idx)
    assert isinstance(lazy, SubsetData) and len(lazy) == 4
    assert torch.equal(lazy.labels, data.labels[idx]) and (lazy.mean, lazy.std, lazy.num_classes) == (
        data.mean, data.std, 3,
    )  # fmt: skip
    batch = next(iter(torch.utils.data.DataLoader(lazy, batch_size=4)))
    assert torch.equal(batch[0], images[idx]) and torch.equal(batch[1], data.labels[idx])


@pytest.mark.parametrize("size", [0, 1, 6, 7])
def test_unshard_puts_the_loader_shards_back_in_dataset_order(size):
    world = 3
    rows = torch.arange(size * 2, dtype=torch.float32).view(size, 2)
    data = ImageData(
        torch.zeros(size, 3, 1, 1, dtype=torch.uint8), torch.zeros(size).long(), 1, (0,) * 3, (1,) * 3
    )
    shards = [
        rows[BatchLoader(data, 2, shuffle=False, drop_last=False, rank=r, world_size=world).indices()]
        for r in range(world)
    ]
    assert torch.equal(unshard(shards), rows)
    if size > 1:
        with pytest.raises(ValueError, match="strided share"):
            unshard([rows, rows[:0], rows[:0]])


def test_the_subset_is_the_knn_bank_and_the_linear_probe_set():
    cfg = load_config(None, [*TINY, "eval.knn_train_subset=20", "eval.linear_epochs=2"])
    trainer = Trainer(cfg)
    indices = stratified_subset(trainer.train_data.labels, 20, cfg.training.seed)
    bank = trainer.eval_train_data
    assert len(bank) == 20 and torch.equal(bank.labels, trainer.train_data.labels[indices])
    assert trainer.eval_train_data is bank  # chosen once per run

    train_x, train_y = trainer.features(trainer.train_data)
    test_x, test_y = trainer.features(trainer.test_data)
    torch.testing.assert_close(trainer.features(bank)[0], train_x[indices], rtol=1e-5, atol=1e-5)
    accs = knn_accuracies(train_x[indices], train_y[indices], test_x, test_y, ks=(3, 50))
    full = knn_accuracies(train_x, train_y, test_x, test_y, ks=(3, 50))
    metrics = trainer.evaluate(linear=True)
    assert metrics["knn_top1_k3"] == pytest.approx(accs[3]) and metrics["knn_top1_k50"] == pytest.approx(
        accs[50]
    )
    # k=50 over a bank of 20 is the whole bank: it differs from k=50 over all 64 rows.
    assert accs[50] != full[50] or accs[3] != full[3]
    assert {"linear_top1_best", "linear_top1_last"} <= metrics.keys()
    expected = trainer.linear_metrics(train_x[indices], train_y[indices], test_x, test_y)
    assert metrics["linear_top1_last"] == pytest.approx(expected["linear_top1_last"])


def test_without_a_subset_the_bank_is_the_training_set():
    trainer = Trainer(load_config(None, [*TINY, "eval.knn_train_subset=64"]))
    assert trainer.eval_train_data is trainer.train_data
