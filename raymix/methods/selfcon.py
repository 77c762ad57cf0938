"""SelfCon (METHODS.md section 4; Bae, Kim et al., AAAI 2023, arXiv 2106.15499).

Single-view contrast between the backbone's output and sub-networks attached at
intermediate layers: every image gives V = exits + 1 embeddings, and SupCon over them
pulls together the same image's embeddings (SelfCon-SU, ``use_labels: false``) or, by
default, every embedding of the same class. The one supervised method: the trainer
passes it the labels. ``method.views: 2`` adds a second augmented view (SelfCon-M); with
no exit it is SupCon (Khosla et al. 2020), the base SelfCon is compared with.
"""

from __future__ import annotations

import torch
from torch import nn

from raymix import dist
from raymix.config import Config, ConfigError, SelfconConfig, exit_flags
from raymix.losses import supcon_loss
from raymix.methods.base import Method
from raymix.models import build_backbone, feature_dim, mlp
from raymix.models.multiexit import ExitEncoder, MultiExit


def head(width: int, out_dim: int) -> nn.Module:
    """A 2-layer projection head: Linear -> BN -> ReLU -> Linear."""
    return mlp(width, width, out_dim, num_layers=2, last_bn=False)


class SelfCon(Method):
    """Backbone + sub-networks at ``method.exits``, a head per output, SupCon over all outputs.

    No stop-gradient: each exit's loss also trains the shared trunk below it. Under several
    workers the embeddings are gathered with gradient (and the labels without), so the
    loss contrasts the global batch; each worker averages over its own anchors.
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        method = cfg.method
        assert isinstance(method, SelfconConfig)
        # One view (SelfCon); two: SelfCon-M, or SupCon (Khosla et al. 2020) without exits.
        self.num_views = method.views
        self.uses_labels = method.use_labels
        self.temperature: float = method.temperature
        self.loss = supcon_loss
        self.backbone = build_backbone(cfg.backbone, cfg.data.image_size)
        self.multi: MultiExit = MultiExit(self.backbone, exit_flags(cfg), method.exit_size)
        width = feature_dim(self.backbone)
        self.heads: nn.ModuleList = nn.ModuleList(
            head(width, cfg.head.out_dim) for _ in range(len(self.multi.points) + 1)
        )

    def check_data(self, train_images_per_worker: int, num_classes: int) -> None:
        if self.uses_labels and num_classes < 2:
            raise ConfigError(
                f"method.use_labels=true needs a labelled dataset, but the training data has "
                f"{num_classes} class; use method.use_labels=false (SelfCon-SU)"
            )

    def compile_targets(self) -> list[nn.Module]:
        """The trunk with its exits and the heads (training), and the backbone (evaluation)."""
        return [self.multi, self.backbone, *self.heads]

    def probe_encoders(self) -> dict[str, nn.Module]:
        """The backbone, then each exit's sub-network ('exit2': after the second stage)."""
        encoders: dict[str, nn.Module] = {"backbone": self.backbone}
        for index, point in enumerate(self.multi.points):
            encoders[f"exit{point + 1}"] = ExitEncoder(self.multi, index)
        return encoders

    def forward(
        self, view1: torch.Tensor, view2: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """SupCon over the outputs of view 1 (single view: the trainer augments no second one),
        and of view 2 when ``method.views=2``: rows [view 1's outputs, view 2's outputs]."""
        views = [view1] if self.num_views == 1 or view2 is None else [view1, view2]
        embeddings = [h(z) for view in views for h, z in zip(self.heads, self.multi(view), strict=True)]
        features = torch.stack(embeddings, dim=1)  # (B, V, D)
        batch = features.shape[0]
        gathered = dist.gather_with_grad(features)  # (N, V, D)
        gathered_labels = None
        if self.uses_labels:
            if labels is None:
                raise ValueError("SelfCon with method.use_labels=true needs the batch's labels")
            gathered_labels = dist.gather_no_grad(labels)
        offset = self.offset(batch)
        anchors = slice(offset, offset + batch)
        loss = self.loss(gathered, gathered_labels, self.temperature, anchors=anchors)
        return loss, {"loss/supcon": loss.detach()}
