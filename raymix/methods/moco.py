"""MoCo v3: the symmetric two-view contrast, with an optional MoCo v2 queue.

L = ctr(p1, gather(k2)) + ctr(p2, gather(k1)), ctr = 2 tau CE (Chen et al. 2021, Alg. 1).
"""

from __future__ import annotations

import torch

from raymix import dist
from raymix.methods.base import ContrastiveMethod


class MoCo(ContrastiveMethod):
    def forward(
        self, view1: torch.Tensor, view2: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z1, p1 = self.online(view1)
        z2, p2 = self.online(view2)
        k1 = dist.gather_no_grad(self.key_from(view1, z1))  # (N, D)
        k2 = dist.gather_no_grad(self.key_from(view2, z2))  # (N, D)
        offset, negatives = self.offset(view1.shape[0]), self.negatives()
        loss_12 = self.loss(p1, k2, offset, self.temperature, negatives)
        loss_21 = self.loss(p2, k1, offset, self.temperature, negatives)
        self.enqueue(torch.cat([k1, k2]))
        loss = loss_12 + loss_21
        return loss, {"loss/contrast": loss.detach()}
