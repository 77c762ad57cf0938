"""Rank, world size and all-gathers; the identity when torch.distributed is not initialised.

Method math never calls these: the method module gathers and passes gathered tensors and
the rank offset to the pure functions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, rank order; no gradient flows back."""
    if not is_distributed():
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)  # (W * B, ...)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank; gradients flow back to each rank's own slice.

    The backward of the autograd all-gather sums the gradients of every rank's copy, so a
    loss averaged over the global batch gets the same gradient as one process would.
    """
    if not is_distributed():
        return x
    return torch.cat(dist_fn.all_gather(x.contiguous()))  # (W * B, ...)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return x
    out = x.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()
