"""PatchMix's mixing and soft targets (METHODS.md section 1; Shen et al. 2023, arXiv 2306.12243).

Pure tensor functions. ``patch_mix`` builds mixed images from patches of ``num_mix``
images of the batch; ``patchmix_targets`` gives, for every mixed image, how much of each
gathered key's image it holds (mixed to original) and how many sources it shares with
each mixed key (mixed to mixed).
"""

from __future__ import annotations

import torch


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
    draws the permutation (a CPU generator; the permutation is moved to the images'
    device).
    """
    batch, channels, height, width = images.shape
    if not 2 <= num_mix <= batch:
        raise ValueError(f"num_mix={num_mix} must be between 2 and the batch size {batch}")
    if height % patch_size or width % patch_size:
        raise ValueError(f"patch_size={patch_size} does not divide the {height}x{width} images")
    rows, cols = height // patch_size, width // patch_size
    positions = rows * cols
    order = torch.randperm(positions, generator=generator).to(images.device)
    group = positions // num_mix
    shift = torch.zeros(positions, dtype=torch.long, device=images.device)  # j of each position
    for j in range(1, num_mix):
        shift[order[j * group : (j + 1) * group]] = j
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
