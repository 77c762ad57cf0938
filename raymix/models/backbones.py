"""Backbone factory: the one place that calls ``timm.create_model``.

ViTs take ``img_size`` and ``patch_size`` from the config (CIFAR: 32 px, patch 2) and
return the CLS token after the final norm; ResNets optionally get the CIFAR stem (a 3x3
stride-1 convolution and no max-pool) and return the globally pooled feature.
"""

from __future__ import annotations

import timm
from torch import nn

from raymix.config import VIT_SIZES, BackboneConfig


def build_backbone(cfg: BackboneConfig, image_size: int) -> nn.Module:
    """A randomly initialised backbone whose ``forward`` returns (B, num_features) features.

    The module carries ``num_features`` (the feature width) like every timm model.
    """
    if cfg.name in VIT_SIZES:
        arch, dim, depth, heads = VIT_SIZES[cfg.name]
        return timm.create_model(
            arch,
            pretrained=False,
            num_classes=0,
            global_pool="token",
            img_size=image_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.embed_dim or dim,
            depth=cfg.depth or depth,
            num_heads=cfg.num_heads or heads,
            drop_path_rate=cfg.drop_path,
        )
    model = timm.create_model(cfg.name, pretrained=False, num_classes=0, drop_path_rate=cfg.drop_path)
    if cfg.cifar_stem:
        # Small images lose too much resolution to a 7x7 stride-2 stem plus max-pool.
        stem = model.conv1
        assert isinstance(stem, nn.Conv2d)
        width = stem.out_channels
        model.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def feature_dim(backbone: nn.Module) -> int:
    return int(backbone.num_features)  # type: ignore[arg-type]
