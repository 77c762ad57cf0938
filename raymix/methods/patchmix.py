"""PatchMix (METHODS.md section 1; Shen et al. 2023, arXiv 2306.12243).

``patch_mix`` builds mixed images from patches of ``num_mix`` images of the batch;
``patchmix_targets`` gives, for every mixed image, how much of each gathered key's image
it holds (mixed to original) and how many sources it shares with each mixed key (mixed to
mixed). Both are pure tensor functions; :class:`PatchMix` is the method that trains with
them.
"""

from __future__ import annotations

import torch

from raymix import dist
from raymix.config import Config, PatchMixConfig
from raymix.losses import soft_contrast
from raymix.methods.base import MixingMethod


def patch_mix(
    images: torch.Tensor, num_mix: int, patch_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix patches of ``num_mix`` images into each image of the batch.

    One random permutation of the T patch positions for the whole batch; its first
    ``T // num_mix * num_mix`` entries cut into ``num_mix`` equal groups G_0..G_{m-1};
    mixed image b takes the patches at positions G_j from image ``(b + j) mod B``, each at
    its own position; leftover positions keep image b.

    images: (B, C, H, W). Returns ``mixed`` (B, C, H, W) and ``source`` (B, H/p, W/p), the
    batch index of the image each patch of each mixed image came from. ``generator``
    draws the permutation, best on the images' device (a generator elsewhere draws there
    and the permutation is copied over).
    """
    batch, channels, height, width = images.shape
    if not 2 <= num_mix <= batch:
        raise ValueError(f"num_mix={num_mix} must be between 2 and the batch size {batch}")
    if height % patch_size or width % patch_size:
        raise ValueError(f"patch_size={patch_size} does not divide the {height}x{width} images")
    rows, cols = height // patch_size, width // patch_size
    positions = rows * cols
    where = images.device if generator is None else generator.device
    order = torch.randperm(positions, generator=generator, device=where).to(images.device)
    group = positions // num_mix
    shift = torch.zeros(positions, dtype=torch.long, device=images.device)  # j of each position
    # Positions order[j * group : (j + 1) * group] take j, for j = 1 .. num_mix - 1.
    shift[order[group : num_mix * group]] = (
        torch.arange(group, num_mix * group, device=images.device) // group
    )
    index = torch.arange(batch, device=images.device)
    source = (index[:, None] + shift[None, :]) % batch  # (B, T)

    # (B, C, H, W) -> (B, T, C * p * p): patch t is row t // cols, column t % cols.
    p = patch_size
    patches = images.reshape(batch, channels, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(batch, positions, channels * p * p)
    mixed = patches[source, torch.arange(positions, device=images.device)[None, :]]
    mixed = mixed.reshape(batch, rows, cols, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return mixed.reshape(batch, channels, height, width), source.reshape(batch, rows, cols)


def patchmix_targets(
    batch_size: int, num_mix: int, rank: int = 0, world_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed_to_orig, mixed_to_mixed), each (batch_size, batch_size * world_size).

    Columns index the keys gathered over workers; this rank's keys start at
    ``o = rank * batch_size``. Mixed image b holds 1/m of images (b + j) mod B, j < m:
    ``mixed_to_orig[b, o + (b + j) mod B] = 1/m``. Mixed images b and b + d share m - |d|
    sources of weight 1/m each: ``mixed_to_mixed[b, o + (b + d) mod B] = (m - |d|) / m^2``
    for |d| < m. Indices that wrap onto each other (2m - 1 > B) add up. Rows sum to one.
    """
    m, batch = num_mix, batch_size
    offset = rank * batch
    rows = torch.arange(batch)
    to_orig = torch.zeros(batch, batch * world_size)
    to_mixed = torch.zeros(batch, batch * world_size)
    for j in range(m):
        to_orig.index_put_(
            (rows, offset + (rows + j) % batch), torch.full((batch,), 1.0 / m), accumulate=True
        )
    for d in range(-(m - 1), m):
        weight = torch.full((batch,), (m - abs(d)) / m**2)
        to_mixed.index_put_((rows, offset + (rows + d) % batch), weight, accumulate=True)
    return to_orig, to_mixed


def smooth(targets: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Label smoothing over the N columns: (1 - epsilon) * Y + epsilon / N."""
    return (1.0 - epsilon) * targets + epsilon / targets.shape[1]


class PatchMix(MixingMethod):
    """PatchMix on the MoCo v3 base (METHODS.md section 1).

    Each step: f(x1), g(x2), g(x1), g(mix1), f(mix2); g(x1) is the online projection of
    x1 under no_grad (no extra pass) when there is no momentum encoder. The loss is
    ``l(f(x1), g(x2), Y_oo) + w * l(f(mix2), g(x1), Y_mo) + w * l(f(mix2), g(mix1), Y_mm)``
    with soft targets over the keys gathered from every worker. Each view is mixed with
    probability ``mix_prob``, decided separately (view 1 first); an unmixed view passes as
    its original images, and all three terms always stay. Y_mo and Y_mm follow x̃²: when it
    is not mixed they are the identity (smoothed as the mixed targets), as in the released
    code. Each worker mixes its own batch; the permutations and the mix-or-not draws come
    from the step's draws, the same on every worker.
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        method = cfg.method
        assert isinstance(method, PatchMixConfig)
        self.num_mix = method.mix_num
        self.mix_prob = method.mix_prob
        self.mixed_weight = method.mixed_weight
        self.smoothing_oo = method.smoothing_oo
        self.smoothing_mixed = method.smoothing_mixed
        self.patch_size = method.mix_patch_size or cfg.backbone.patch_size
        self.loss = soft_contrast
        self._targets: dict[tuple[int, int, int, str], tuple[torch.Tensor, ...]] = {}

    # -- mixing and targets

    def draw_mixes(
        self, view1: torch.Tensor, view2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[bool, bool]]:
        """This step's (mix1, mix2, (mixed1, mixed2)).

        Each view is mixed with probability ``mix_prob``: two host draws, view 1's then
        view 2's (no device work). A view that is not mixed is returned as it is; the
        permutations of the mixed views come from the device generator, view 1's first.
        """
        draws = self.step_draws(view1.device)
        mixed = (draws.host.random() < self.mix_prob, draws.host.random() < self.mix_prob)
        mix1 = patch_mix(view1, self.num_mix, self.patch_size, draws.device)[0] if mixed[0] else view1
        mix2 = patch_mix(view2, self.num_mix, self.patch_size, draws.device)[0] if mixed[1] else view2
        return mix1, mix2, mixed

    def targets(
        self, batch: int, device: torch.device, mixed2: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Smoothed (Y_oo, Y_mo, Y_mm) of this worker's rows, each (B, B * world_size).

        ``mixed2``: whether view 2 was mixed. If not, Y_mo and Y_mm are the identity
        smoothed with ``smoothing_mixed`` (the released code's targets of an unmixed view).
        """
        rank, world = dist.rank(), dist.world_size()
        key = (batch, rank, world, str(device))
        if key not in self._targets:
            identity = torch.zeros(batch, batch * world)
            identity[torch.arange(batch), rank * batch + torch.arange(batch)] = 1.0
            to_orig, to_mixed = patchmix_targets(batch, self.num_mix, rank, world)
            self._targets[key] = (
                smooth(identity, self.smoothing_oo).to(device),
                smooth(to_orig, self.smoothing_mixed).to(device),
                smooth(to_mixed, self.smoothing_mixed).to(device),
                smooth(identity, self.smoothing_mixed).to(device),
            )
        y_oo, y_mo, y_mm, y_unmixed = self._targets[key]
        return (y_oo, y_mo, y_mm) if mixed2 else (y_oo, y_unmixed, y_unmixed)

    # -- loss

    def forward(
        self, view1: torch.Tensor, view2: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mix1, mix2, (_, mixed2) = self.draw_mixes(view1, view2)
        targets = self.targets(view1.shape[0], view1.device, mixed2)
        return self.contrast(view1, view2, (mix1, mix2), targets)

    def contrast(
        self,
        view1: torch.Tensor,
        view2: torch.Tensor,
        mixes: tuple[torch.Tensor, torch.Tensor],
        targets: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of given views, mixes (a view itself where it was not mixed) and targets."""
        y_oo, y_mo, y_mm = targets
        tau = self.temperature
        z1, p1 = self.online(view1)
        k2 = dist.gather_no_grad(self.keys(view2))
        loss_oo = self.loss(p1, k2, y_oo, tau)
        logs = {"loss/orig_orig": loss_oo.detach()}
        mix1, mix2 = mixes
        k1 = dist.gather_no_grad(self.key_from(view1, z1))
        k_mix = dist.gather_no_grad(self.keys(mix1))
        _, p_mix = self.online(mix2)
        loss_mo = self.loss(p_mix, k1, y_mo, tau)
        loss_mm = self.loss(p_mix, k_mix, y_mm, tau)
        logs["loss/mixed_orig"] = loss_mo.detach()
        logs["loss/mixed_mixed"] = loss_mm.detach()
        return loss_oo + self.mixed_weight * (loss_mo + loss_mm), logs
