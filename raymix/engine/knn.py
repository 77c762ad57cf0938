"""Weighted k-nearest-neighbour monitor on frozen features.

This is the evaluation of InstDisc (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric
Instance Discrimination", Sec. 3.4, Eq. 9) that MoCo, DINO and most SSL code bases use as a cheap
training-time monitor: each test sample looks up its ``k`` most cosine-similar train samples, and
each neighbour ``i`` votes for its own label with weight ``exp(s_i / tau)``; the class with the largest
summed vote wins.

Test rows are processed in chunks so that the similarity matrix never exceeds
``chunk_size x N_train`` floats, whatever the number of test rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _normalise(features: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, in float32 (half-precision sums of 384 products lose votes)."""
    return F.normalize(features.float(), p=2.0, dim=1)


def _check_inputs(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    temperature: float,
    chunk_size: int,
) -> None:
    """Raise ``ValueError`` on shapes or hyper-parameters the monitor cannot use."""
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(
            f"features must be 2-D (rows, dim); got train {tuple(train_features.shape)}, "
            f"test {tuple(test_features.shape)}"
        )
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train and test feature dims differ: {train_features.shape[1]} vs {test_features.shape[1]}"
        )
    if train_labels.ndim != 1 or train_labels.shape[0] != train_features.shape[0]:
        raise ValueError(
            f"train_labels must have shape ({train_features.shape[0]},), got {tuple(train_labels.shape)}"
        )
    if train_features.shape[0] == 0:
        raise ValueError("kNN needs at least one train row")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    ks: Sequence[int],
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> dict[int, torch.Tensor]:
    """Predicted class of every test row, for each ``k`` in ``ks`` (Wu et al. 2018, Eq. 9).

    Args:
        train_features: ``(N, D)`` features of the labelled bank, any float dtype, not necessarily
            normalised (they are L2-normalised here).
        train_labels: ``(N,)`` integer labels in ``[0, num_classes)``.
        test_features: ``(M, D)`` features to classify, on the same device as the bank.
        ks: neighbourhood sizes; each is clipped to ``N``. The returned dict is keyed by the
            values as given.
        temperature: ``tau`` in the vote weight ``exp(cos_sim / tau)``.
        num_classes: number of classes; defaults to ``max(train_labels) + 1``.
        chunk_size: number of test rows handled per similarity matrix ``(chunk_size, N)``.

    Returns:
        ``{k: (M,) int64 predicted labels}`` on the device of ``test_features``.
    """
    _check_inputs(train_features, train_labels, test_features, temperature, chunk_size)
    if len(ks) == 0:
        raise ValueError("ks must name at least one k")
    if min(ks) < 1:
        raise ValueError(f"every k must be >= 1, got {list(ks)}")

    device = test_features.device
    n_train = train_features.shape[0]
    labels = train_labels.to(device=device, dtype=torch.long)  # (N,)
    if num_classes is None:
        num_classes = int(labels.max().item()) + 1
    bank_t = _normalise(train_features.to(device)).t().contiguous()  # (D, N)

    # One topk with the largest k serves every smaller k: topk returns values sorted in
    # descending order, so the first k columns are exactly the k nearest neighbours.
    clipped = {k: min(k, n_train) for k in ks}
    k_max = max(clipped.values())

    chunks: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, test_features.shape[0], chunk_size):
        query = _normalise(test_features[start : start + chunk_size])  # (C, D)
        sims = query @ bank_t  # (C, N) cosine similarities
        top_sims, top_idx = sims.topk(k_max, dim=1, largest=True, sorted=True)  # (C, k_max)
        del sims  # release the (C, N) block before the per-k work
        top_labels = labels[top_idx]  # (C, k_max)
        # exp(s / tau) overflows float32 once s / tau > 88 (e.g. tau = 0.01). Dividing every
        # weight of a row by exp(s_max / tau) is a per-row positive factor, so it leaves the
        # argmax of the votes unchanged while keeping every weight in (0, 1].
        weights = torch.exp((top_sims - top_sims[:, :1]) / temperature)  # (C, k_max)
        for k in ks:
            kk = clipped[k]
            votes = torch.zeros(query.shape[0], num_classes, device=device, dtype=torch.float32)  # (C, K)
            votes.scatter_add_(1, top_labels[:, :kk], weights[:, :kk])
            # argmax returns the first maximal index, so exact vote ties go to the smaller label.
            chunks[k].append(votes.argmax(dim=1))  # (C,)

    empty = torch.empty(0, dtype=torch.long, device=device)
    return {k: torch.cat(parts) if parts else empty for k, parts in chunks.items()}


def knn_accuracies(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[int, float]:
    """Top-1 accuracy (a fraction in ``[0, 1]``) of the weighted kNN classifier for each ``k``.

    The number of classes is ``max label + 1`` over train and test labels, so a test label
    absent from the bank is simply never predicted (it counts as an error, not a crash).
    """
    if test_labels.ndim != 1 or test_labels.shape[0] != test_features.shape[0]:
        raise ValueError(
            f"test_labels must have shape ({test_features.shape[0]},), got {tuple(test_labels.shape)}"
        )
    if test_features.shape[0] == 0:
        raise ValueError("kNN accuracy needs at least one test row")
    num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    preds = knn_predict(
        train_features,
        train_labels,
        test_features,
        ks,
        temperature=temperature,
        num_classes=num_classes,
        chunk_size=chunk_size,
    )
    target = test_labels.to(device=test_features.device, dtype=torch.long)  # (M,)
    return {k: (pred == target).float().mean().item() for k, pred in preds.items()}


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy (a fraction in ``[0, 1]``) of the weighted kNN classifier with one ``k``."""
    return knn_accuracies(
        train_features,
        train_labels,
        test_features,
        test_labels,
        ks=(k,),
        temperature=temperature,
        chunk_size=chunk_size,
    )[k]
