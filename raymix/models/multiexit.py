"""A backbone with sub-networks attached at intermediate layers ("exits"), for SelfCon.

Attachment points: after layer1, layer2 and layer3 of a ResNet; after every block but the
last of a ViT. A sub-network turns the trunk's features at its point into a feature of
the backbone's final width:

- ``fc``: global average pooling (over positions or tokens) and one Linear layer;
- ``same``: an unshared copy of the layers that follow the point, then the backbone's pooling;
- ``small``: the same with half the blocks of each following stage (at least one).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import nn

ExitSize = Literal["fc", "small", "same"]


def is_vit(backbone: Any) -> bool:
    return hasattr(backbone, "blocks") and hasattr(backbone, "patch_embed")


def stages(backbone: Any) -> list[nn.Module]:
    """The trunk's sequential stages: ResNet layer1..layer4, or a ViT's blocks."""
    if is_vit(backbone):
        return list(backbone.blocks)
    return [backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]


def num_exit_points(backbone: nn.Module) -> int:
    return len(stages(backbone)) - 1


def _halved(stage: nn.Module) -> nn.Module:
    """A ResNet stage with the first half of its blocks (at least one); a ViT block as is."""
    if isinstance(stage, nn.Sequential) and len(stage) > 1:
        return nn.Sequential(*list(stage)[: max(1, len(stage) // 2)])
    return stage


class SubNetwork(nn.Module):
    """The exit at ``point``: trunk features there -> (B, width) features."""

    def __init__(self, backbone: Any, point: int, size: ExitSize) -> None:
        super().__init__()
        self.vit = is_vit(backbone)
        width = int(backbone.num_features)
        self.size = size
        if size == "fc":
            channels = width if self.vit else _stage_channels(backbone, point)
            self.norm: nn.Module = nn.LayerNorm(channels) if self.vit else nn.Identity()
            self.fc = nn.Linear(channels, width)
            return
        following = stages(backbone)[point + 1 :]
        if self.vit and size == "small":
            following = following[: max(1, len(following) // 2)]
        elif size == "small":
            following = [_halved(stage) for stage in following]
        self.layers = copy.deepcopy(nn.Sequential(*following))
        self.final_norm: nn.Module = copy.deepcopy(backbone.norm) if self.vit else nn.Identity()
        self.pool = _Pool(backbone)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.size == "fc":
            pooled = h.mean(dim=1) if self.vit else h.mean(dim=(2, 3))  # tokens or positions
            return self.fc(self.norm(pooled))
        return self.pool(self.final_norm(self.layers(h)))


class _Pool(nn.Module):
    """The backbone's own pooling (CLS token / global average), without holding the backbone."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.vit = is_vit(backbone)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, 0] if self.vit else h.mean(dim=(2, 3))


def _stage_channels(backbone: Any, point: int) -> int:
    """Output channels of ResNet stage ``point`` (0: layer1)."""
    return int(backbone.feature_info[point + 1]["num_chs"])  # feature_info: act1, layer1, ..., layer4


class MultiExit(nn.Module):
    """``forward(x)`` -> [backbone feature, feature of each selected exit], each (B, width)."""

    def __init__(self, backbone: Any, exits: list[bool], size: ExitSize) -> None:
        super().__init__()
        if len(exits) != num_exit_points(backbone):
            raise ValueError(f"{len(exits)} exit flags for {num_exit_points(backbone)} attachment points")
        self.backbone = backbone
        self.points = [i for i, on in enumerate(exits) if on]
        self.subnets = nn.ModuleList(SubNetwork(backbone, point, size) for point in self.points)

    def trunk(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(output of every stage, the backbone's final pooled feature)."""
        b: Any = self.backbone
        if is_vit(b):
            h = b.norm_pre(b.patch_drop(b._pos_embed(b.patch_embed(x))))
        else:
            h = b.maxpool(b.act1(b.bn1(b.conv1(x))))
        outputs = []
        for stage in stages(b):
            h = stage(h)
            outputs.append(h)
        if is_vit(b):
            h = b.norm(h)
        return outputs, b.forward_head(h, pre_logits=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs, final = self.trunk(x)
        return [final, *(net(outputs[p]) for p, net in zip(self.points, self.subnets, strict=True))]

    def exit_features(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """The features of the ``index``-th selected exit alone."""
        outputs, _ = self.trunk(x)
        return self.subnets[index](outputs[self.points[index]])


class ExitEncoder(nn.Module):
    """One exit of a :class:`MultiExit` as an encoder (for the linear probe)."""

    def __init__(self, multi: MultiExit, index: int) -> None:
        super().__init__()
        self.multi, self.index = multi, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.multi.exit_features(x, self.index)
