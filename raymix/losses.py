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
