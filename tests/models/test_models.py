import pytest
import torch
from torch import nn

from raymix.config import BackboneConfig
from raymix.models import build_backbone, ema_update, feature_dim, mlp, momentum_copy


@pytest.mark.parametrize(
    "name, size, patch, dim",
    [("vit_micro", 16, 4, 96), ("vit_tiny", 32, 2, 192), ("vit_small", 32, 8, 384), ("resnet18", 32, 4, 512)],
)
def test_backbone_feature_shapes(name, size, patch, dim):
    model = build_backbone(BackboneConfig(name=name, patch_size=patch), size)
    assert feature_dim(model) == dim
    assert model(torch.randn(2, 3, size, size)).shape == (2, dim)


def test_vit_overrides_and_patch_grid():
    model = build_backbone(
        BackboneConfig(name="vit_micro", patch_size=2, embed_dim=64, depth=2, num_heads=2), 16
    )
    assert feature_dim(model) == 64
    assert len(model.blocks) == 2
    assert model.patch_embed.grid_size == (8, 8)


def test_resnet_cifar_stem_keeps_resolution():
    cifar = build_backbone(BackboneConfig(name="resnet18", cifar_stem=True), 32)
    imagenet = build_backbone(BackboneConfig(name="resnet18", cifar_stem=False), 32)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    assert cifar.forward_features(x).shape[-1] == 4  # 32 / 8
    assert imagenet.forward_features(x).shape[-1] == 1  # 32 / 32


def test_mlp_layout():
    head = mlp(10, 32, 8, num_layers=3)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    norms = [m for m in head if isinstance(m, nn.BatchNorm1d)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 32), (32, 32), (32, 8)]
    assert all(m.bias is None for m in linears)
    assert len(norms) == 3 and norms[-1].affine is False and norms[0].affine is True
    assert isinstance(head[-1], nn.BatchNorm1d)


def test_ema_update_formula_and_frozen_copy():
    source = nn.Linear(3, 2)
    target = momentum_copy(source)
    assert all(not p.requires_grad for p in target.parameters())
    old = target.weight.clone()
    with torch.no_grad():
        source.weight.add_(1.0)
    ema_update(target, source, momentum=0.9)
    torch.testing.assert_close(target.weight, 0.9 * old + 0.1 * source.weight)
    ema_update(target, source, momentum=0.0)
    torch.testing.assert_close(target.weight, source.weight)
