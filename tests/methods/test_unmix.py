"""Un-Mix's sampling, mixing, loss and config against METHODS.md section 2."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from raymix.config import ConfigError, load_config
from raymix.methods import build_method
from raymix.methods.base import step_draws
from raymix.methods.unmix import region_box, sample_unmix, unmix_images

TINY = [
    "method.name=unmix",
    "data.image_size=16",
    "backbone.patch_size=4",
    "backbone.depth=1",
    "head.hidden_dim=32",
    "head.out_dim=16",
]


def coded(batch: int, size: int = 12) -> torch.Tensor:
    """Pixel (y, x) of image b holds b * 1000 + y * size + x in every channel."""
    code = torch.arange(batch)[:, None, None] * 1000 + torch.arange(size * size).view(1, size, size)
    return code[:, None].expand(batch, 3, size, size).float().contiguous()


# ---------------------------------------------------------------- sampling and mixing


def test_sampling_is_seeded_and_follows_prob_global_and_beta():
    draws = [sample_unmix(1.0, 0.5, random.Random(s)) for s in range(2000)]
    assert draws[:5] == [sample_unmix(1.0, 0.5, random.Random(s)) for s in range(5)]
    share_global = sum(mode == "global" for mode, _ in draws) / len(draws)
    assert share_global == pytest.approx(0.5, abs=0.04)
    lams = torch.tensor([lam for _, lam in draws])
    assert lams.min() >= 0 and lams.max() <= 1
    assert lams.mean().item() == pytest.approx(0.5, abs=0.02)  # Beta(1, 1) is uniform ...
    assert lams.var().item() == pytest.approx(1 / 12, abs=0.01)  # ... with variance 1/12
    # Beta(0.2, 0.2) puts most of its mass near 0 and 1; Beta(5, 5) near 1/2.
    u_shaped = torch.tensor([sample_unmix(0.2, 0.5, random.Random(s))[1] for s in range(500)])
    peaked = torch.tensor([sample_unmix(5.0, 0.5, random.Random(s))[1] for s in range(500)])
    assert ((u_shaped < 0.1) | (u_shaped > 0.9)).float().mean() > 0.5
    assert ((peaked > 0.3) & (peaked < 0.7)).float().mean() > 0.75
    assert {sample_unmix(1.0, 0.0, random.Random(s))[0] for s in range(50)} == {"region"}
    assert {sample_unmix(1.0, 1.0, random.Random(s))[0] for s in range(50)} == {"global"}


def test_global_mixing_is_exact():
    images = torch.randn(5, 3, 6, 6)
    mixed, lam = unmix_images(images, 0.3, "global")
    assert lam == 0.3
    for i in range(5):
        torch.testing.assert_close(mixed[i], 0.3 * images[i] + 0.7 * images[4 - i])


def test_region_mixing_fills_a_clipped_box_from_the_reversed_batch():
    batch, size = 4, 12
    images = coded(batch, size)
    clipped = 0
    for seed in range(60):
        lam = [0.19, 0.5, 0.84][seed % 3]
        mixed, lam_eff = unmix_images(images, lam, "region", random.Random(seed))
        inside = mixed[:, 0] // 1000 != images[:, 0] // 1000  # (B, H, W) pixels from another image
        box = inside[0]
        assert all(torch.equal(inside[b], box) for b in range(batch))  # one box for the batch
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        height, width = len(rows), len(cols)
        if height:  # a rectangle: every pixel between its first and last row and column
            assert box.sum().item() == height * width
            assert torch.equal(rows, torch.arange(rows[0], rows[0] + height))
            assert torch.equal(cols, torch.arange(cols[0], cols[0] + width))
        # Inside from image B - 1 - b at the same pixel, outside untouched.
        expected = torch.where(inside[:, None], images.flip(0), images)
        assert torch.equal(mixed, expected)
        assert lam_eff == pytest.approx(1 - height * width / size**2)
        side = int(size * math.sqrt(1 - lam))
        assert height <= side and width <= side
        clipped += (height, width) != (side, side)
    assert clipped > 0  # some boxes ran over a border and were cut


def test_region_box_is_clipped_at_the_borders():
    # A box of side 9 on a 10-pixel image can't fit around most centres.
    boxes = [region_box(10, 10, 1 - 0.81, random.Random(s)) for s in range(30)]
    for top, bottom, left, right in boxes:
        assert 0 <= top < bottom <= 10 and 0 <= left < right <= 10
        assert bottom - top <= 9 and right - left <= 9
    assert any(b[0] == 0 for b in boxes) and any(b[1] == 10 for b in boxes)


def test_region_box_follows_the_released_rand_bbox():
    """[c - cut // 2, c + cut // 2): an odd cut loses a pixel, an even one keeps its size."""
    for lam, cut in ((1 - (7 / 32) ** 2, 7), (1 - (8 / 32) ** 2, 8)):
        assert int(32 * math.sqrt(1 - lam)) == cut
        for seed in range(20):
            cy, cx = (lambda r: (r.randrange(32), r.randrange(32)))(random.Random(seed))
            box = region_box(32, 32, lam, random.Random(seed))
            expected = (
                max(cy - cut // 2, 0),
                min(cy + cut // 2, 32),
                max(cx - cut // 2, 0),
                min(cx + cut // 2, 32),
            )
            assert box == expected
            if cut // 2 <= cy < 32 - cut // 2:  # not clipped: the side is 2 * (cut // 2)
                assert box[1] - box[0] == 2 * (cut // 2)


def test_bad_mixing_arguments():
    with pytest.raises(ValueError, match="mode"):
        unmix_images(torch.zeros(2, 3, 4, 4), 0.5, "cutout")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lam"):
        unmix_images(torch.zeros(2, 3, 4, 4), 1.5, "global")


# ---------------------------------------------------------------- the loss


def make(*overrides: str):
    torch.manual_seed(0)
    return build_method(load_config(None, [*TINY, *overrides]))


def views(batch: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, 16, 16, generator=g), torch.randn(batch, 3, 16, 16, generator=g)


def step_mix(view1, beta=1.0, prob_global=0.5, seed=0, step=0):
    rng = step_draws(seed, step).host
    mode, lam = sample_unmix(beta, prob_global, rng)
    return (*unmix_images(view1, lam, mode, rng), mode)


def base_contrast(q, k, tau, negatives):
    """2 tau CE with the positive of row b at column b, written out row by row."""
    total = 0.0
    keys = torch.cat([k, negatives]) if negatives is not None else k
    for b in range(q.shape[0]):
        logits = torch.stack([F.cosine_similarity(q[b], keys[n], dim=0) for n in range(keys.shape[0])]) / tau
        total = total - (logits[b] - torch.logsumexp(logits, 0))
    return 2 * tau * total / q.shape[0]


def reference_loss(method, x1, x2, mixed, lam, symmetric, tau):
    negatives = method.queue.clone() if method.queue.shape[0] else None
    f = lambda x: method.online(x)[1]  # noqa: E731
    q1, q2, q_mix = f(x1), f(x2), f(mixed)
    q_swap = torch.stack([q_mix[q_mix.shape[0] - 1 - i] for i in range(q_mix.shape[0])])
    k1, k2 = method.keys(x1), method.keys(x2)
    loss = base_contrast(q1, k2, tau, negatives)
    loss = loss + lam * base_contrast(q_mix, k2, tau, negatives)
    loss = loss + (1 - lam) * base_contrast(q_swap, k2, tau, negatives)
    if symmetric:
        loss = loss + base_contrast(q2, k1, tau, negatives)
        loss = loss + lam * base_contrast(q_mix, k1, tau, negatives)
        loss = loss + (1 - lam) * base_contrast(q_swap, k1, tau, negatives)
    return loss


@pytest.mark.parametrize(
    "extra, symmetric, tau",
    [
        ([], True, 0.2),
        (["method.symmetric=false", "method.queue_size=12", "method.temperature=0.1"], False, 0.1),
        (["method.prob_global=0", "method.queue_size=12", "method.momentum=null"], True, 0.2),
        (["method.prob_global=1", "method.beta=0.3"], True, 0.2),
    ],
)
def test_loss_matches_the_slow_reference(extra, symmetric, tau):
    method = make(*extra)
    x1, x2 = views()
    prob = 0.0 if "method.prob_global=0" in extra else 1.0 if "method.prob_global=1" in extra else 0.5
    beta = 0.3 if "method.beta=0.3" in extra else 1.0
    mixed, lam, mode = step_mix(x1, beta=beta, prob_global=prob)
    expected = reference_loss(method, x1, x2, mixed, lam, symmetric, tau)
    loss, logs = method(x1, x2)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["loss/clean"] + logs["loss/mixed"], loss.detach())
    assert logs["unmix/lambda"].item() == pytest.approx(lam)
    assert logs["unmix/global"].item() == float(mode == "global")


def released_v2_loss(method, x1, x2, mixed, lam, symmetric):
    """The released Un-Mix CIFAR ``contrastive_loss``, written out: normalised projections
    as queries, logits [q.k, q.queue] / tau, CE to column 0, the mixture's flip its reversal."""
    tau, queue = method.temperature, F.normalize(method.queue.clone(), dim=1)

    def ce(q, k):
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / tau
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))

    project = lambda x: method.projector(method.backbone(x))  # noqa: E731
    q_mix = project(mixed)
    q_flip = torch.flip(q_mix, (0,))
    k1, k2 = method.keys(x1), method.keys(x2)
    loss = ce(project(x1), k2) + lam * ce(q_mix, k2) + (1 - lam) * ce(q_flip, k2)
    if symmetric:
        loss = loss + ce(project(x2), k1) + lam * ce(q_mix, k1) + (1 - lam) * ce(q_flip, k1)
    return loss


@pytest.mark.parametrize("symmetric", [True, False])
def test_v2_base_computes_the_released_loss(symmetric):
    method = make(
        "method.base=v2", "method.queue_size=24", "head.norm=none", "head.projector_layers=1",
        f"method.symmetric={str(symmetric).lower()}",
    )  # fmt: skip
    x1, x2 = views()
    mixed, lam, _ = step_mix(x1)
    expected = released_v2_loss(method, x1, x2, mixed, lam, symmetric)
    loss, _ = method(x1, x2)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_only_clean_keys_enter_the_queue():
    for symmetric in (True, False):
        method = make("method.queue_size=24", f"method.symmetric={str(symmetric).lower()}")
        x1, x2 = views()
        k1, k2 = method.keys(x1), method.keys(x2)
        method(x1, x2)
        clean = torch.cat([k1, k2]) if symmetric else k2
        assert method.queue_ptr.item() == clean.shape[0]
        torch.testing.assert_close(method.queue[: clean.shape[0]], F.normalize(clean, dim=1))


def test_a_mixture_of_an_image_with_itself_changes_nothing():
    """lam = 1 (nothing of the partner): the mixed terms are the clean terms of view 1."""
    method = make("method.symmetric=false")
    x1, x2 = views()
    loss, logs = method.contrast(x1, x2, x1, 1.0)
    torch.testing.assert_close(logs["loss/mixed"], logs["loss/clean"])


def test_gradients_reach_the_online_branch_only_and_the_step_advances():
    method = make()
    loss, _ = method(*views())
    loss.backward()
    assert all(p.grad is None for p in method.key_backbone.parameters())
    assert method.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert method.mix_step == 1 and method.state_dict()["_extra_state"] == {"mix_step": 1}


def test_resnet_trains_with_shuffled_key_batchnorm():
    method = make("backbone.name=resnet18", "backbone.key_bn_groups=2", "method.queue_size=24")
    assert method.key_bn_groups == 2
    loss, logs = method(*views())
    loss.backward()
    assert torch.isfinite(loss) and method.queue_ptr.item() == 12


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method.beta=0"], "method.beta"),
        (["method.beta=-1"], "method.beta"),
        (["method.prob_global=1.5"], "method.prob_global"),
        (["method.prob_global=-0.1"], "method.prob_global"),
        (["training.batch_size=2", "scaling.num_workers=2"], "per-worker batch .*is 1 image"),
        (["training.batch_size=1"], "training.batch_size"),
        (["backbone.name=resnet18", "training.batch_size=8", "backbone.key_bn_groups=5"],
         "backbone.key_bn_groups=5 leaves fewer than 2 images"),
        (["method.mix_num=2"], "unknown key 'method.mix_num'"),
    ],
)  # fmt: skip
def test_bad_options_name_the_option(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*TINY, *overrides])


def test_defaults_follow_the_paper():
    method = load_config(None, ["method.name=unmix"]).method
    assert (method.prob_global, method.beta, method.symmetric, method.queue_size) == (0.5, 1.0, True, 0)


# ---------------------------------------------------------------- training


def test_short_digits_run_beats_initialisation(digits_run):
    _, result, history = digits_run("method.name=unmix", "training.epochs=4")
    assert result["knn_top1"] > result["knn_top1_init"] + 0.05, result
    assert '"loss/mixed"' in history and '"unmix/lambda"' in history
