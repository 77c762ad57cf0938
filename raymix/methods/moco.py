"""MoCo: the two-view contrast on the v3 base (optional queue) or the v2 base.

Symmetric: L = ctr(p1, gather(k2)) + ctr(p2, gather(k1)); asymmetric: ctr(p1, gather(k2)).
ctr is 2 tau CE over the gathered keys and the queue on the v3 base (Chen et al. 2021,
Alg. 1), CE([q.k+, q.queue] / tau) on the v2 base (He et al. 2020, Alg. 1), whose query
is the projection (no predictor). Only the clean keys of the views used as keys are enqueued.
"""

from __future__ import annotations

import torch

from raymix import dist
from raymix.config import Config, MocoConfig
from raymix.methods.base import ContrastiveMethod


class MoCo(ContrastiveMethod):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        assert isinstance(cfg.method, MocoConfig)
        self.symmetric = cfg.method.symmetric

    def forward(
        self, view1: torch.Tensor, view2: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        offset, negatives = self.offset(view1.shape[0]), self.negatives()
        z1, p1 = self.online(view1)
        if not self.symmetric:
            k2 = dist.gather_no_grad(self.keys(view2))  # (N, D)
            loss = self.loss(p1, k2, offset, self.temperature, negatives)
            self.enqueue(k2)
            return loss, {"loss/contrast": loss.detach()}
        z2, p2 = self.online(view2)
        k1 = dist.gather_no_grad(self.key_from(view1, z1))  # (N, D)
        k2 = dist.gather_no_grad(self.key_from(view2, z2))  # (N, D)
        loss_12 = self.loss(p1, k2, offset, self.temperature, negatives)
        loss_21 = self.loss(p2, k1, offset, self.temperature, negatives)
        self.enqueue(torch.cat([k1, k2]))
        loss = loss_12 + loss_21
        return loss, {"loss/contrast": loss.detach()}
