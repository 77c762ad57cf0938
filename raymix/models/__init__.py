"""Backbones (timm), MoCo v3 heads and the momentum encoder."""

from raymix.models.backbones import build_backbone, feature_dim
from raymix.models.ema import ema_update, momentum_copy
from raymix.models.heads import mlp

__all__ = ["build_backbone", "ema_update", "feature_dim", "mlp", "momentum_copy"]
