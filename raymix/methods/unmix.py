"""Un-Mix (METHODS.md section 2; Shen et al., AAAI 2022, arXiv 2003.05438).

Each step mixes view 1 with itself in reverse batch order, globally (mixup) or in a box
(CutMix), with one ratio lambda ~ Beta(beta, beta). The mixture's queries contrast with
the clean keys, weighted by how much of each image they hold. ``sample_unmix`` and
``unmix_images`` are pure; :class:`UnMix` is the method that trains with them.
"""

from __future__ import annotations

import math
import random
from typing import Literal

import torch

from raymix import dist
from raymix.config import Config, UnmixConfig
from raymix.methods.base import MixingMethod

Mode = Literal["global", "region"]


def sample_unmix(beta: float, prob_global: float, rng: random.Random) -> tuple[Mode, float]:
    """One step's (mode, lambda): r ~ U(0, 1) picks "global" when r < prob_global, else
    "region"; lambda ~ Beta(beta, beta), one value for the whole batch. Drawn on the host
    from ``rng`` (the step's :class:`~raymix.methods.base.StepDraws` ``host``)."""
    r = rng.random()
    lam = rng.betavariate(beta, beta)
    return ("global" if r < prob_global else "region"), lam


def region_box(height: int, width: int, lam: float, rng: random.Random) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the CutMix box of the released Un-Mix code: sides
    ``cut = floor(sqrt(1 - lam) * side)``, spanning ``[c - cut // 2, c + cut // 2)`` around a
    uniformly drawn pixel ``c`` (one pixel short of ``cut`` when it is odd), clipped to the image."""
    ratio = math.sqrt(1.0 - lam)
    box_h, box_w = int(height * ratio), int(width * ratio)
    cy, cx = rng.randrange(height), rng.randrange(width)
    top, bottom = cy - box_h // 2, cy + box_h // 2
    left, right = cx - box_w // 2, cx + box_w // 2
    return max(top, 0), min(bottom, height), max(left, 0), min(right, width)


def unmix_images(
    images: torch.Tensor, lam: float, mode: Mode, rng: random.Random | None = None
) -> tuple[torch.Tensor, float]:
    """Mix each image with its partner in the reversed batch (image i with image B - 1 - i).

    "global": ``lam * x + (1 - lam) * x.flip(0)``, and lambda is returned as given.
    "region": x with the box of :func:`region_box` (drawn from ``rng``) filled from
    ``x.flip(0)``; the returned lambda is the share of x left, ``1 - box area / image area``.
    images: (B, C, H, W); returns the mixed batch of the same shape and the effective lambda.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam={lam} must lie in [0, 1]")
    reversed_batch = images.flip(0)
    if mode == "global":
        return lam * images + (1.0 - lam) * reversed_batch, lam
    if mode != "region":
        raise ValueError(f"mode={mode!r}; allowed: 'global', 'region'")
    height, width = images.shape[-2:]
    top, bottom, left, right = region_box(height, width, lam, rng or random.Random())
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = reversed_batch[..., top:bottom, left:right]
    return mixed, 1.0 - (bottom - top) * (right - left) / (height * width)


class UnMix(MixingMethod):
    """Un-Mix on the MoCo family's base: v3 (with or without a queue) or v2 (``method.base``).

    Asymmetric: ``l(q1, k2) + lam * l(qm, k2) + (1 - lam) * l(qmf, k2)``; symmetric adds
    the same with q2 and k1. l is the base contrast (v3: 2 tau CE, queue negatives appended;
    v2: CE against the own key and the queue, the projection as query);
    qm are the online embeddings of the mixture of view 1, qmf = qm reversed (the mixture
    with the roles of the two images swapped, without a second pass). Only clean keys are
    enqueued. lambda, the mode and the box come from the step's generator, the same on
    every worker; each worker mixes its own batch.
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        method = cfg.method
        assert isinstance(method, UnmixConfig)
        self.prob_global = method.prob_global
        self.beta = method.beta
        self.symmetric = method.symmetric

    def forward(
        self, view1: torch.Tensor, view2: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rng = self.step_draws(view1.device).host
        mode, lam = sample_unmix(self.beta, self.prob_global, rng)
        mixed, lam = unmix_images(view1, lam, mode, rng)
        loss, logs = self.contrast(view1, view2, mixed, lam)
        # Filled on the device from host numbers: no copy, no sync.
        logs["unmix/lambda"] = view1.new_full((), lam, dtype=torch.float32)
        logs["unmix/global"] = view1.new_full((), float(mode == "global"), dtype=torch.float32)
        return loss, logs

    def contrast(
        self,
        view1: torch.Tensor,
        view2: torch.Tensor,
        mixed: torch.Tensor,
        lam: float,
        partner: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of given views, the mixture of view 1 and its effective lambda.

        ``partner[i]`` is the row mixed into row i (default: the reversed batch, B - 1 - i);
        the swapped mixture's queries are ``q_mix[partner]``.
        """
        offset, negatives, tau = self.offset(view1.shape[0]), self.negatives(), self.temperature
        z1, q1 = self.online(view1)
        _, q_mix = self.online(mixed)
        q_flip = q_mix.flip(0) if partner is None else q_mix[partner]
        if self.symmetric:
            z2, q2 = self.online(view2)
            k2 = dist.gather_no_grad(self.key_from(view2, z2))
            k1 = dist.gather_no_grad(self.key_from(view1, z1))
            pairs, clean_keys = [(q1, k2), (q2, k1)], [k1, k2]  # the order MoCo enqueues them in
        else:
            k2 = dist.gather_no_grad(self.keys(view2))
            pairs, clean_keys = [(q1, k2)], [k2]
        clean = mixed_loss = q1.new_zeros((), dtype=torch.float32)
        for q, k in pairs:
            clean = clean + self.loss(q, k, offset, tau, negatives)
            mixed_loss = mixed_loss + lam * self.loss(q_mix, k, offset, tau, negatives)
            mixed_loss = mixed_loss + (1.0 - lam) * self.loss(q_flip, k, offset, tau, negatives)
        self.enqueue(torch.cat(clean_keys))
        logs = {"loss/clean": clean.detach(), "loss/mixed": mixed_loss.detach()}
        return clean + mixed_loss, logs
