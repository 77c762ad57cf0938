"""Exponential moving average of weights: the momentum (key) encoder of MoCo / BYOL."""

from __future__ import annotations

import copy

import torch
from torch import nn


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy that only :func:`ema_update` changes."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * source, for every parameter (fused).

    Buffers (BatchNorm statistics) are not copied: the key encoder keeps the statistics
    of its own forward passes, as in MoCo v3.
    """
    targets: list[torch.Tensor] = list(target.parameters())
    sources: list[torch.Tensor] = [p.detach() for p in source.parameters()]
    torch._foreach_lerp_(targets, sources, 1.0 - momentum)
