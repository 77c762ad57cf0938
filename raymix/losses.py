"""Contrastive losses shared by the methods. Pure tensor functions: no distributed calls.

Callers pass keys already gathered over workers and the offset ``rank * B`` of their own
rows, so one process and several give the same numbers. Similarities, logits and the
softmax are computed in float32 even under bf16 autocast (:func:`fp32`): a bf16 logit
of 1/tau = 10 has a resolution of 0.06.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fp32(like: torch.Tensor) -> torch.autocast:
    """A region where autocast leaves float32 alone (on ``like``'s device type)."""
    return torch.autocast(like.device.type, enabled=False)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean_b sum_n -targets[b, n] * log_softmax(logits)[b, n].

    logits, targets: (B, N). Rows of ``targets`` need not sum to one (SNCLR's sum to 2).
    """
    with fp32(logits):
        return -(targets.float() * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


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
    with fp32(query):
        q = F.normalize(query.float(), dim=1)
        k = F.normalize(keys.float(), dim=1)
        logits = q @ k.T  # (B, N)
        if negatives is not None and negatives.numel():
            logits = torch.cat([logits, q @ F.normalize(negatives.float(), dim=1).T], dim=1)  # (B, N + M)
        labels = torch.arange(q.shape[0], device=q.device) + offset
        return 2.0 * temperature * F.cross_entropy(logits / temperature, labels)


def moco_v2_loss(
    query: torch.Tensor,
    keys: torch.Tensor,
    offset: int,
    temperature: float,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoCo v2's contrastive loss CE([q . k+, q . queue] / tau, 0) (He et al. 2020, Alg. 1).

    The base of the released Un-Mix code: each query's only positive is its own view's key
    (row offset + b of the gathered ``keys``, (N, D)); its negatives are the (M, D) queue
    alone, with no in-batch negatives and no 2 tau factor. query: (B, D) local rows. All
    inputs are L2-normalised here. Without negatives the loss is 0 for every input.
    """
    with fp32(query):
        q = F.normalize(query.float(), dim=1)
        k = F.normalize(keys[offset : offset + q.shape[0]].float(), dim=1)
        positive = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
        if negatives is not None and negatives.numel():
            logits = torch.cat([positive, q @ F.normalize(negatives.float(), dim=1).T], dim=1)  # (B, 1 + M)
        else:
            logits = positive
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits / temperature, labels)


def soft_contrast(
    query: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Soft-target contrast: mean_b sum_n -targets[b, n] * log_softmax(q k^T / tau)[b, n].

    query: (B, D) local rows; keys: (N, D) gathered over workers; targets: (B, N). Plain
    cross-entropy with no 2 tau factor (PatchMix, METHODS.md section 1). Inputs are
    L2-normalised here.
    """
    with fp32(query):
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
    with fp32(features):
        return _supcon(features, labels, temperature, base_temperature, anchors)


def _supcon(
    features: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    base_temperature: float,
    anchors: slice | None,
) -> torch.Tensor:
    """:func:`supcon_loss` in float32, with arithmetic masks only (nothing read back to the host)."""
    batch, views, _ = features.shape
    device = features.device
    z = F.normalize(features.float(), dim=-1).transpose(0, 1).reshape(views * batch, -1)  # row v * B + i
    ids = (labels.to(device) if labels is not None else torch.arange(batch, device=device)).repeat(views)
    start, stop, _ = (anchors or slice(None)).indices(batch)
    # Anchor rows v * B + i for every view v and image i in [start, stop), in row order.
    rows = (
        torch.arange(views, device=device)[:, None] * batch + torch.arange(start, stop, device=device)
    ).flatten()
    columns = torch.arange(views * batch, device=device)
    logits = z[rows] @ z.T / temperature  # (A, V * B)
    self_pair = rows[:, None] == columns[None, :]
    logits = logits.masked_fill(self_pair, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = ((ids[rows][:, None] == ids[None, :]) & ~self_pair).float()
    count = positive.sum(dim=1)
    kept = torch.where(positive > 0, log_prob, torch.zeros_like(log_prob))  # no -inf * 0
    mean_log_prob = kept.sum(dim=1) / count.clamp_min(1)
    has_positive = (count > 0).float()
    # Mean over anchors with a positive; 0 (with a zero gradient) when none has one.
    loss = -(mean_log_prob * has_positive).sum() / has_positive.sum().clamp_min(1)
    return (temperature / base_temperature) * loss
