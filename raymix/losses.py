"""Contrastive losses shared by the methods. Pure tensor functions: no distributed calls.

Callers pass keys already gathered over workers and the offset ``rank * B`` of their own
rows, so one process and several give the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean_b sum_n -targets[b, n] * log_softmax(logits)[b, n].

    logits, targets: (B, N). Rows of ``targets`` need not sum to one (SNCLR's sum to 2).
    """
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def info_nce(
    query: torch.Tensor,
    keys: torch.Tensor,
    offset: int,
    temperature: float,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoCo v3's contrastive loss 2 * tau * CE(q k^T / tau, offset + arange(B)).

    Chen, Xie, He 2021 (arXiv 2104.02057), Algorithm 1. query: (B, D) local rows;
    keys: (N, D) gathered over workers, where row offset + b is the positive of query b;
    negatives: optional (M, D) queue of past keys (MoCo v2, He et al. 2020) appended as
    extra columns. All inputs are L2-normalised here.
    """
    q = F.normalize(query.float(), dim=1)
    k = F.normalize(keys.float(), dim=1)
    logits = q @ k.T  # (B, N)
    if negatives is not None and negatives.numel():
        logits = torch.cat([logits, q @ F.normalize(negatives.float(), dim=1).T], dim=1)  # (B, N + M)
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return 2.0 * temperature * F.cross_entropy(logits / temperature, labels)


def soft_contrast(
    query: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Soft-target contrast: mean_b sum_n -targets[b, n] * log_softmax(q k^T / tau)[b, n].

    query: (B, D) local rows; keys: (N, D) gathered over workers; targets: (B, N). Plain
    cross-entropy with no 2 tau factor (PatchMix, METHODS.md section 1). Inputs are
    L2-normalised here.
    """
    q = F.normalize(query.float(), dim=1)
    k = F.normalize(keys.float(), dim=1)
    return soft_cross_entropy(q @ k.T / temperature, targets)


def supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 0.1,
    base_temperature: float = 0.07,
    *,
    anchors: slice | None = None,
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) over V embeddings of B images.

    features: (B, V, D), L2-normalised here. Every one of the V * B rows is an anchor
    (or only the rows of the images in ``anchors``, a slice of the batch: a worker's own
    images among gathered ones). Positives of an anchor: every other row with its label,
    or, with ``labels=None``, the same image's other rows. The anchor's own row is left
    out of both the positives and the denominator:

        L = (tau / base_tau) * mean_a [ -(1/|P(a)|) sum_{p in P(a)} log softmax_{n != a}(z_a . z_n / tau)_p ]

    Anchors without a positive are left out of the mean; with none at all the loss is 0.
    """
    batch, views, _ = features.shape
    z = F.normalize(features.float(), dim=-1).transpose(0, 1).reshape(views * batch, -1)  # row v * B + i
    ids = (labels.to(z.device) if labels is not None else torch.arange(batch, device=z.device)).repeat(views)
    rows = torch.arange(views * batch, device=z.device)
    images = rows % batch
    if anchors is not None:
        start, stop, _ = anchors.indices(batch)
        rows = rows[(images >= start) & (images < stop)]
    logits = z[rows] @ z.T / temperature  # (A, V * B)
    self_pair = rows[:, None] == torch.arange(views * batch, device=z.device)[None, :]
    logits = logits.masked_fill(self_pair, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (ids[rows][:, None] == ids[None, :]) & ~self_pair
    count = positive.sum(dim=1)
    mean_log_prob = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(dim=1) / count.clamp_min(
        1
    )
    has_positive = count > 0
    if not has_positive.any():
        return logits.new_zeros(()) + 0.0 * z.sum()
    return -(temperature / base_temperature) * mean_log_prob[has_positive].mean()
