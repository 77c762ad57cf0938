"""Rank, world size, gathers and all-reduces; the identity when torch.distributed is not initialised.

Method math never calls these: the method module gathers and passes gathered tensors and
the rank offset to the pure functions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)  # (W * B, ...)


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    dist.all_reduce(out)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient and keeps this rank's rows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        return _all_gather(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        start = dist.get_rank() * ctx.rows
        return _all_reduce(grad)[start : start + ctx.rows]


class _AllReduceWithGrad(torch.autograd.Function):
    """Sum over ranks forward; the gradient of a sum is the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return _all_reduce(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return _all_reduce(grad)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, rank order; no gradient flows back."""
    return _all_gather(x.detach()) if is_distributed() else x.detach()


@torch.no_grad()
def all_gather_uneven(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``x``, in rank order, on every rank; ``[x]`` in one process.

    Ranks may hold different numbers of rows (dim 0), even none: each pads its rows to the
    longest, all ranks gather, and the padding is cut off again. Every rank must call it,
    with tensors of one dtype and number of dims; the other dims are taken from a rank that
    has rows (a rank without rows may pass e.g. a ``(0, 0)`` tensor).
    """
    if not is_distributed():
        return [x.detach()]
    shape = torch.tensor(x.shape, dtype=torch.int64, device=x.device)  # (ndim,)
    shapes = _all_gather(shape.unsqueeze(0)).tolist()  # (W, ndim)
    rows = [s[0] for s in shapes]
    trailing = next((s[1:] for s in shapes if s[0] > 0), shapes[0][1:])
    padded = x.new_zeros((max(max(rows), 1), *trailing))
    if x.shape[0]:
        padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(parts, padded)
    return [part[:n] for part, n in zip(parts, rows, strict=True)]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank; gradients flow back to each rank's own rows.

    With every rank minimising its share of a loss over the gathered batch (and DDP
    averaging), the gradient equals that of one process on the concatenated batch.
    """
    return _GatherWithGrad.apply(x) if is_distributed() else x


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, differentiable (used by synchronised BatchNorm)."""
    return _AllReduceWithGrad.apply(x) if is_distributed() else x


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a detached value (for logging)."""
    if not is_distributed():
        return x
    return _all_reduce(x.detach()) / dist.get_world_size()


def data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """Wrap for data-parallel training: DDP when distributed, the module itself otherwise.

    BatchNorm layers must already be synchronised (``models.syncbn.convert_batchnorm``).
    Buffers are not re-broadcast from rank 0 at every forward: synchronised BatchNorm keeps
    running statistics equal, and every rank fills its key queue with the same gathered keys.
    Gradients are views of DDP's buckets (no copy in and out of them), and the graph is
    static: every step uses every trainable parameter, each gradient accumulated once per
    backward, so DDP fixes its bucket order after the first step.
    """
    if not is_distributed():
        return module
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(
        module, device_ids=ids, forward_sync_buffers=False, gradient_as_bucket_view=True, static_graph=True
    )
