"""PatchMix's mixing and targets against METHODS.md section 1."""

from __future__ import annotations

import pytest
import torch

from raymix.methods.patchmix import patch_mix, patchmix_targets, smooth


def coded_images(batch: int, rows: int, cols: int, patch: int) -> torch.Tensor:
    """Every pixel of patch (r, c) of image b holds b * 1000 + r * cols + c (all channels)."""
    code = torch.arange(batch)[:, None, None] * 1000 + torch.arange(rows * cols).reshape(1, rows, cols)
    pixels = code.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)
    return pixels[:, None].expand(batch, 3, rows * patch, cols * patch).float().contiguous()


@pytest.mark.parametrize(
    "num_mix, batch, rows, cols", [(2, 4, 4, 4), (3, 5, 4, 4), (4, 4, 3, 5), (3, 3, 2, 2)]
)
def test_patch_mix_is_exact(num_mix, batch, rows, cols):
    patch = 2
    images = coded_images(batch, rows, cols, patch)
    mixed, source = patch_mix(images, num_mix, patch, torch.Generator().manual_seed(0))
    assert mixed.shape == images.shape and source.shape == (batch, rows, cols) and source.dtype == torch.long
    code = mixed[:, 0, ::patch, ::patch].long()  # one pixel per patch
    # Each patch keeps its position and comes from the image ``source`` names.
    assert torch.equal(code % 1000, torch.arange(rows * cols).reshape(1, rows, cols).expand_as(code))
    assert torch.equal(code // 1000, source)
    assert torch.equal(mixed, mixed[:, :1].expand_as(mixed))  # whole patches, every channel
    # Partners (b + j) mod B; the same position groups for every image of the batch.
    shift = (source - torch.arange(batch)[:, None, None]) % batch
    assert torch.equal(shift, shift[:1].expand_as(shift))
    counts = torch.bincount(shift[0].flatten(), minlength=num_mix)
    group = rows * cols // num_mix
    assert counts[1:num_mix].tolist() == [group] * (num_mix - 1)  # equal groups for j >= 1 ...
    assert counts[0] == rows * cols - (num_mix - 1) * group  # ... and group 0 plus the leftovers
    assert counts[num_mix:].sum() == 0


def test_patch_mix_draws_one_permutation_from_the_generator():
    images = coded_images(4, 4, 4, 2)
    a, _ = patch_mix(images, 2, 2, torch.Generator().manual_seed(1))
    b, _ = patch_mix(images, 2, 2, torch.Generator().manual_seed(1))
    c, _ = patch_mix(images, 2, 2, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("num_mix, batch, patch", [(1, 4, 2), (5, 4, 2), (2, 4, 3)])
def test_patch_mix_refuses_bad_arguments(num_mix, batch, patch):
    with pytest.raises(ValueError, match="num_mix|patch_size"):
        patch_mix(coded_images(batch, 4, 4, 2), num_mix, patch)


def test_targets_closed_forms_m2():
    to_orig, to_mixed = patchmix_targets(4, 2)
    assert torch.allclose(
        to_orig,
        torch.tensor([[0.5, 0.5, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0.5, 0.5], [0.5, 0, 0, 0.5]]),
    )
    assert torch.allclose(
        to_mixed,
        torch.tensor(
            [
                [0.5, 0.25, 0, 0.25],
                [0.25, 0.5, 0.25, 0],
                [0, 0.25, 0.5, 0.25],
                [0.25, 0, 0.25, 0.5],
            ]
        ),
    )


@pytest.mark.parametrize("num_mix", [2, 3, 4])
def test_targets_against_the_formula_with_a_rank_offset(num_mix):
    batch, world = 8, 3
    for rank in range(world):
        to_orig, to_mixed = patchmix_targets(batch, num_mix, rank=rank, world_size=world)
        assert to_orig.shape == to_mixed.shape == (batch, batch * world)
        offset = rank * batch
        for b in range(batch):
            for n in range(batch * world):
                local = n - offset
                own = 0 <= local < batch
                j = (local - b) % batch
                expect_orig = 1 / num_mix if own and j < num_mix else 0.0
                d = min(j, batch - j)  # |d| on the ring; batch > 2m - 1 here: no wrap-around
                expect_mixed = (num_mix - d) / num_mix**2 if own and d < num_mix else 0.0
                assert to_orig[b, n].item() == pytest.approx(expect_orig)
                assert to_mixed[b, n].item() == pytest.approx(expect_mixed)
        assert torch.allclose(to_orig.sum(1), torch.ones(batch))
        assert torch.allclose(to_mixed.sum(1), torch.ones(batch))


def test_targets_add_up_where_the_ring_wraps():
    _, to_mixed = patchmix_targets(3, 3)  # d = -2..2 on a ring of 3: d = 2 meets d = -1
    assert torch.allclose(to_mixed, torch.full((3, 3), 1 / 3))


def test_smoothing():
    targets = torch.eye(4)
    assert torch.allclose(smooth(targets, 0.1), 0.9 * targets + 0.025)
    assert torch.allclose(smooth(targets, 0.1).sum(1), torch.ones(4))
