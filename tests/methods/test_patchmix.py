"""PatchMix's mixing, targets, loss and config against METHODS.md section 1."""

from __future__ import annotations

import pytest
import torch

from raymix.config import ConfigError, load_config
from raymix.methods import build_method
from raymix.methods.base import step_draws
from raymix.methods.patchmix import patch_mix, patchmix_targets, smooth

TINY = [
    "method.name=patchmix",
    "data.image_size=16",
    "backbone.patch_size=4",
    "backbone.depth=1",
    "head.hidden_dim=32",
    "head.out_dim=16",
]


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


# ---------------------------------------------------------------- the loss


def make(*overrides: str):
    torch.manual_seed(0)
    return build_method(load_config(None, [*TINY, *overrides]))


def views(batch: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 16, 16, generator=g), torch.randn(batch, 3, 16, 16, generator=g)


def step_mixes(x1, x2, num_mix, patch, seed=0, step=0):
    """The mixes of one training step: the device generator of (seed, step)."""
    g = step_draws(seed, step, x1.device).device
    return patch_mix(x1, num_mix, patch, g)[0], patch_mix(x2, num_mix, patch, g)[0]


def reference_loss(method, x1, x2, mix1, mix2, m, w, tau, eps_oo, eps_mixed, world=1, mixed2=True):
    """L of METHODS.md section 1 by loops: ``world`` groups of B rows, each mixed within itself.

    ``mixed2=False``: view 2 was not mixed, Y_mo and Y_mm are the identity (released code)."""
    f = lambda x: method.predictor(method.projector(method.backbone(x)))  # noqa: E731
    if method.key_backbone is None:
        g = lambda x: method.projector(method.backbone(x))  # noqa: E731
    else:
        g = lambda x: method.key_projector(method.key_backbone(x))  # noqa: E731
    q_orig, q_mix = f(x1), f(mix2)
    with torch.no_grad():
        k_orig1, k_orig2, k_mix1 = g(x1), g(x2), g(mix1)
    n_keys, batch = x1.shape[0], x1.shape[0] // world

    def term(queries, keys, target):
        total = 0.0
        for row in range(n_keys):
            q = queries[row] / queries[row].norm()
            logits = [q @ (keys[n] / keys[n].norm()) / tau for n in range(n_keys)]
            log_z = torch.logsumexp(torch.stack(logits), dim=0)
            total = total - sum(target(row, n) * (logits[n] - log_z) for n in range(n_keys))
        return total / n_keys

    def ring(row, n):
        """(same worker, forward distance from row's image to key n's image on the ring)."""
        return row // batch == n // batch, (n % batch - row % batch) % batch

    def y_oo(row, n):
        return (1 - eps_oo) * float(row == n) + eps_oo / n_keys

    def y_mo(row, n):
        if not mixed2:
            return (1 - eps_mixed) * float(row == n) + eps_mixed / n_keys
        same, j = ring(row, n)
        return (1 - eps_mixed) * (1 / m if same and j < m else 0.0) + eps_mixed / n_keys

    def y_mm(row, n):
        if not mixed2:
            return (1 - eps_mixed) * float(row == n) + eps_mixed / n_keys
        same, j = ring(row, n)
        share = sum((m - abs(d)) / m**2 for d in range(-(m - 1), m) if same and d % batch == j)
        return (1 - eps_mixed) * share + eps_mixed / n_keys

    return term(q_orig, k_orig2, y_oo) + w * term(q_mix, k_orig1, y_mo) + w * term(q_mix, k_mix1, y_mm)


@pytest.mark.parametrize(
    "extra, m, w, tau, eps_oo, eps_mixed",
    [
        ([], 2, 0.5, 0.2, 0.1, 0.0),  # the defaults: no momentum encoder
        (["method.mix_num=3", "method.mixed_weight=1.0", "method.temperature=0.3",
          "method.smoothing_oo=0", "method.smoothing_mixed=0.2", "method.momentum=0.99"],
         3, 1.0, 0.3, 0.0, 0.2),
        (["method.mix_num=4", "method.mix_patch_size=8"], 4, 0.5, 0.2, 0.1, 0.0),
    ],
)  # fmt: skip
def test_loss_matches_the_slow_reference(extra, m, w, tau, eps_oo, eps_mixed):
    method = make(*extra)
    x1, x2 = views()
    loss, logs = method(x1, x2)
    mix1, mix2 = step_mixes(x1, x2, m, method.patch_size)
    expected = reference_loss(method, x1, x2, mix1, mix2, m, w, tau, eps_oo, eps_mixed)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    terms = logs["loss/orig_orig"] + w * (logs["loss/mixed_orig"] + logs["loss/mixed_mixed"])
    torch.testing.assert_close(terms, loss.detach())


def test_gradients_reach_the_online_branch_only():
    method = make("method.momentum=0.99")
    method(*views())[0].backward()
    assert all(p.grad is None for p in method.key_backbone.parameters())
    assert all(p.grad is None for p in method.key_projector.parameters())
    assert method.predictor[0].weight.grad is not None
    assert method.backbone.patch_embed.proj.weight.grad.abs().sum() > 0


def test_without_momentum_the_keys_of_x1_are_the_online_projections():
    """g(x1) reuses f's projector output under no_grad: changing how g runs changes nothing."""
    method = make()
    x1, x2 = views()
    mixes = step_mixes(x1, x2, 2, 4)
    targets = method.targets(6, x1.device)
    loss, _ = method.contrast(x1, x2, mixes, targets)
    calls = []
    method.keys = lambda x: calls.append(x) or method.projector(method.backbone(x)).detach()
    again, _ = method.contrast(x1, x2, mixes, targets)
    torch.testing.assert_close(loss, again)
    assert len(calls) == 2  # g(x2) and g(mix1); x1 is not encoded a second time


def test_mix_prob_zero_keeps_all_three_terms_with_identity_targets():
    """The released code passes an unmixed view as itself with one-hot targets and keeps the
    mixed terms (issue #21; raymix used to drop both mixed terms)."""
    method = make("method.mix_prob=0", "method.smoothing_mixed=0.2")
    x1, x2 = views()
    loss, logs = method(x1, x2)
    assert set(logs) == {"loss/orig_orig", "loss/mixed_orig", "loss/mixed_mixed"}
    expected = reference_loss(method, x1, x2, x1, x2, 2, 0.5, 0.2, 0.1, 0.2, mixed2=False)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss, logs["loss/orig_orig"])


def test_targets_of_an_unmixed_view_2_are_the_smoothed_identity():
    method = make("method.smoothing_mixed=0.2")
    y_oo, y_mo, y_mm = method.targets(4, torch.device("cpu"), mixed2=False)
    hand = torch.full((4, 4), 0.05) + 0.8 * torch.eye(4)  # (1 - 0.2) * I + 0.2 / 4
    torch.testing.assert_close(y_mo, hand)
    torch.testing.assert_close(y_mm, hand)
    torch.testing.assert_close(y_oo, torch.full((4, 4), 0.025) + 0.9 * torch.eye(4))  # smoothing_oo 0.1
    _, y_mo, y_mm = method.targets(4, torch.device("cpu"))  # view 2 mixed: the m = 2 forms
    torch.testing.assert_close(y_mo, 0.8 * patchmix_targets(4, 2)[0] + 0.05)
    torch.testing.assert_close(y_mm, 0.8 * patchmix_targets(4, 2)[1] + 0.05)


@pytest.mark.parametrize("mixed", [(True, False), (False, True)])
def test_each_view_decides_to_mix_on_its_own(mixed):
    """Host draws u1 (view 1) then u2 (view 2) of the step; view v mixes iff u_v < mix_prob.
    Y_mo and Y_mm follow view 2 (the released code keeps the targets of its second call)."""
    us = {}
    for step in range(50):
        rng = step_draws(0, step).host
        u1, u2 = rng.random(), rng.random()
        if (u1 < u2) == mixed[0]:
            us = {"step": step, "prob": (u1 + u2) / 2}
            break
    method = make(f"method.mix_prob={us['prob']}", "method.smoothing_mixed=0.2")
    method.mix_step = us["step"]
    x1, x2 = views()
    mix1, mix2, flags = method.draw_mixes(x1, x2)
    assert flags == mixed
    g = step_draws(0, us["step"]).device  # the mixed view takes the first permutation
    expect1 = patch_mix(x1, 2, 4, g)[0] if mixed[0] else x1
    expect2 = patch_mix(x2, 2, 4, g)[0] if mixed[1] else x2
    assert torch.equal(mix1, expect1) and torch.equal(mix2, expect2)
    method.mix_step = us["step"]
    loss, logs = method(x1, x2)
    assert set(logs) == {"loss/orig_orig", "loss/mixed_orig", "loss/mixed_mixed"}
    expected = reference_loss(method, x1, x2, expect1, expect2, 2, 0.5, 0.2, 0.1, 0.2, mixed2=mixed[1])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_every_step_draws_new_mixes_and_the_step_resumes_from_the_state_dict():
    method = make("method.mix_prob=0.5")
    x1, x2 = views()
    draws = [method.draw_mixes(x1, x2) for _ in range(12)]
    flags = [d[2] for d in draws]
    for view in (0, 1):  # both outcomes of each view's coin within 12 steps (seed 0)
        assert 0 < sum(f[view] for f in flags) < 12
    assert any(f[0] != f[1] for f in flags)  # the views decide separately
    for mix1, mix2, (mixed1, mixed2) in draws:  # an unmixed view is passed as itself
        assert torch.equal(mix1, x1) != mixed1 and torch.equal(mix2, x2) != mixed2
    first, second = [d for d in draws if d[2][0]][:2]
    assert not torch.equal(first[0], second[0])
    assert method.mix_step == 12
    state = method.state_dict()
    resumed = make("method.mix_prob=0.5")
    resumed.load_state_dict(state)
    assert resumed.mix_step == 12
    nxt, again = method.draw_mixes(x1, x2), resumed.draw_mixes(x1, x2)
    assert nxt[2] == again[2]
    assert torch.equal(nxt[0], again[0]) and torch.equal(nxt[1], again[1])
    method.eval()
    method.draw_mixes(x1, x2)
    assert method.mix_step == 13  # evaluation does not advance the step


def test_views_are_mixed_with_independent_permutations_and_the_same_m():
    method = make("method.mix_num=3")
    x = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 3, 16, 16).contiguous()
    mix1, mix2, _ = method.draw_mixes(x, x)
    assert not torch.equal(mix1, mix2)  # other positions ...
    for mixed in (mix1, mix2):  # ... the same partners b, b + 1, b + 2
        for b in range(6):
            assert set(mixed[b, 0].unique().long().tolist()) == {b, (b + 1) % 6, (b + 2) % 6}


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method.mix_num=1"], "method.mix_num"),
        (["training.batch_size=8", "scaling.num_workers=2", "method.mix_num=5"],
         "method.mix_num=5 exceeds the per-worker batch of 4"),
        (["method.mix_patch_size=6"], "method.mix_patch_size=6 must be a multiple of backbone.patch_size=4"),
        (["method.mix_patch_size=8", "method.mix_num=4"], None),
        (["method.mix_patch_size=8", "method.mix_num=5"], "method.mix_num=5 exceeds the 4 patch positions"),
        (["backbone.patch_size=5"], "backbone.patch_size=5 does not divide data.image_size=16"),
        (["backbone.name=resnet18"], "backbone.name=resnet18 has no patch grid"),
        (["method.queue_size=256"], "unknown key 'method.queue_size'"),
        (["method.mix_prob=1.5"], "method.mix_prob"),
        (["method.smoothing_oo=-0.1"], "method.smoothing_oo"),
    ],
)  # fmt: skip
def test_bad_options_name_the_option(overrides, message):
    if message is None:
        load_config(None, [*TINY, *overrides])
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, [*TINY, *overrides])


def test_defaults_follow_the_released_code():
    method = load_config(None, ["method.name=patchmix"]).method
    assert (method.mix_num, method.mix_prob, method.mixed_weight) == (2, 1.0, 0.5)
    assert (method.smoothing_oo, method.smoothing_mixed, method.momentum) == (0.1, 0.0, None)
    assert method.temperature == 0.2


# ---------------------------------------------------------------- training


def test_short_digits_run_beats_initialisation(digits_run):
    # 8 epochs: in 4 (warm-up 2, then the cosine to 0) PatchMix's mixed targets only bring
    # the kNN back to its initial value (0.43 -> 0.34 -> 0.43); by 8 it is at 0.64.
    _, result, history = digits_run("method.name=patchmix", "training.epochs=8")
    assert result["knn_top1"] > result["knn_top1_init"] + 0.05, result
    assert '"loss/mixed_mixed"' in history and '"loss/orig_orig"' in history
