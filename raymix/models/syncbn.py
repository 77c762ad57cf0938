"""BatchNorm whose batch statistics span every worker's batch, on any backend.

torch's ``SyncBatchNorm`` runs only on GPUs; :class:`GlobalBatchNorm` does the same with
differentiable all-reduces, so CPU (gloo) workers compute exactly what one process
computes on the concatenated batch. Without it each worker normalises with its own
batch statistics, and a MoCo key encoder whose BN sees its own local batch leaks
information between the samples of that batch (He et al. 2020, section 3.3).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from raymix import dist


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm over (B, C, ...) inputs with statistics all-reduced across workers in training."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (B, C, ...), got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_distributed()):
            return super().forward(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        shape = [1, channels] + [1] * (input.dim() - 2)  # broadcast over (B, C, ...)
        x = input.float()
        count = x.new_full((1,), x.numel() // channels)  # filled on the device: no host copy
        # Two passes (mean, then centred squares), as a single process would compute them.
        sums = dist.all_reduce_sum(torch.cat([x.sum(dims), count]))
        total = sums[-1]
        mean = sums[:channels] / total  # (C,)
        var = dist.all_reduce_sum(((x - mean.view(shape)) ** 2).sum(dims)) / total  # (C,) biased
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                momentum = 0.1 if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * total / (total - 1), momentum)
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(1)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def convert_batchnorm(module: nn.Module, device: torch.device, kind: str = "global") -> nn.Module:
    """Replace every BatchNorm in ``module`` with one synchronised across workers.

    ``kind="global"``: :class:`GlobalBatchNorm` on every device (all-reduces, nothing read
    back to the host). ``kind="torch"``: torch's ``SyncBatchNorm`` on GPUs (fused kernels,
    but it drops empty workers' statistics with boolean masks: three host syncs per layer
    per forward); :class:`GlobalBatchNorm` elsewhere. Parameters are shared with the
    replaced layers, so optimisers and EMA pairs still match.
    """
    if kind == "torch" and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm) and not isinstance(child, GlobalBatchNorm):
            new = GlobalBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_batchnorm(child, device, kind)
    return module
