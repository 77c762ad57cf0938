"""MoCo v3: the symmetric two-view contrast, with an optional MoCo v2 queue.

L = ctr(p1, gather(k2)) + ctr(p2, gather(k1)), ctr = 2 tau CE (Chen et al. 2021, Alg. 1).
"""

from __future__ import annotations

import torch

from raymix import dist
from raymix.losses import info_nce
from raymix.methods.base import ContrastiveMethod


class MoCo(ContrastiveMethod):
    def forward(
        self, view1: torch.Tensor, view2: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _, p1 = self.online(view1)
        _, p2 = self.online(view2)
        k1 = dist.gather_no_grad(self.keys(view1))  # (N, D)
        k2 = dist.gather_no_grad(self.keys(view2))  # (N, D)
        offset, negatives = self.offset(view1.shape[0]), self.negatives()
        loss_12 = info_nce(p1, k2, offset, self.temperature, negatives)
        loss_21 = info_nce(p2, k1, offset, self.temperature, negatives)
        self.enqueue(torch.cat([k1, k2]))
        loss = loss_12 + loss_21
        return loss, {"loss/contrast": loss.detach()}
