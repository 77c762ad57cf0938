"""Optimiser construction and the per-step learning-rate and weight-decay schedules."""

from __future__ import annotations

import torch
from torch import nn

from raymix.config import OptimConfig
from raymix.schedules import cosine_schedule

# Parameters named like these never get weight decay (ViT position embedding, CLS token).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token")


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups: weights with decay; norms, biases and embeddings without (``decay`` flag)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or any(key in name for key in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "decay": True}, {"params": no_decay, "decay": False, "weight_decay": 0.0}]


def scaled_lr(cfg: OptimConfig, batch_size: int) -> float:
    """Peak learning rate: the linear scaling rule lr * batch / 256 (Goyal et al. 2017) or lr."""
    return cfg.lr * batch_size / 256 if cfg.lr_scaling == "linear" else cfg.lr


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model)
    # Fused kernels on the GPU (one launch for all parameters); foreach elsewhere.
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, **fast)
    return torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay, **fast
    )


class Schedules:
    """Sets lr (warm-up + cosine) and weight decay (cosine to ``weight_decay_end``) per step."""

    def __init__(self, cfg: OptimConfig, batch_size: int, steps_per_epoch: int, epochs: int) -> None:
        self.peak_lr = scaled_lr(cfg, batch_size)
        self.min_lr = cfg.min_lr
        self.total = steps_per_epoch * epochs
        self.warmup = round(cfg.warmup_epochs * steps_per_epoch)
        self.wd = cfg.weight_decay
        self.wd_end = cfg.weight_decay if cfg.weight_decay_end is None else cfg.weight_decay_end

    def lr(self, step: int) -> float:
        return cosine_schedule(step, self.total, self.peak_lr, self.min_lr, warmup_steps=self.warmup)

    def weight_decay(self, step: int) -> float:
        return cosine_schedule(step, self.total, self.wd, self.wd_end)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr, wd = self.lr(step), self.weight_decay(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
            if group.get("decay", True):
                group["weight_decay"] = wd
        return lr
