"""Projection and prediction heads of MoCo v3 (Chen, Xie, He 2021, section 4)."""

from __future__ import annotations

from torch import nn


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int,
    last_bn: bool = True,
    batchnorm: bool = True,
) -> nn.Sequential:
    """Linear(no bias) -> BN -> ReLU blocks; the last Linear is followed by BN(affine=False).

    MoCo v3 puts BN after every layer, the output one included, without its affine part.
    ``batchnorm=False`` gives MoCo v2's head instead: Linear (with bias) -> ReLU blocks and a
    plain last Linear (one layer: the single linear layer of the CIFAR MoCo code).
    """
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(d_in, d_out, bias=not batchnorm))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)] if batchnorm else [nn.ReLU(inplace=True)]
        elif last_bn and batchnorm:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)
