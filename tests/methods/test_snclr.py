"""SNCLR's weights, targets, loss, memory bank and config against METHODS.md section 3."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raymix.cli import main
from raymix.config import ConfigError, load_config
from raymix.engine.trainer import Trainer
from raymix.methods import build_method
from raymix.methods.snclr import bank_topk, snclr_loss, snclr_targets, soft_neighbor_weights

TINY = [
    "method.name=snclr",
    "method.bank_size=40",
    "method.num_neighbors=4",
    "data.image_size=16",
    "backbone.patch_size=4",
    "backbone.depth=1",
    "head.hidden_dim=32",
    "head.out_dim=16",
]


# ---------------------------------------------------------------- pure functions


def test_weights_closed_form_and_scale_invariance():
    anchor = torch.tensor([[2.0, 0.0]])
    neighbors = torch.tensor([[[3.0, 0.0], [-1.0, 0.0], [0.0, 5.0]]])  # cosines 1, -1, 0
    expected = torch.tensor([[math.e, 1 / math.e, 1.0]]) / (math.e + 1 / math.e + 1.0)
    torch.testing.assert_close(soft_neighbor_weights(anchor, neighbors), expected)
    g = torch.Generator().manual_seed(0)
    a, n = torch.randn(5, 8, generator=g), torch.randn(5, 3, 8, generator=g)
    w = soft_neighbor_weights(a, n)
    torch.testing.assert_close(w.sum(1), torch.ones(5))
    torch.testing.assert_close(soft_neighbor_weights(4 * a, 0.5 * n), w)


def test_targets_put_one_on_the_key_and_the_weights_on_the_neighbours():
    weights = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    got = snclr_targets(weights, offset=2, num_candidates=4 * 3)  # rank 1 of 2, B = 2, K = 2
    expected = torch.zeros(2, 12)
    expected[0, 6:9] = torch.tensor([1.0, 0.7, 0.3])  # sample 2's block: columns 6..8
    expected[1, 9:12] = torch.tensor([1.0, 0.4, 0.6])
    torch.testing.assert_close(got, expected)
    assert torch.allclose(got.sum(1), torch.full((2,), 2.0))  # mass 2


def reference_loss(query, candidates, weights, offset, tau):
    """2 tau mean_b[-log P(k_b) - sum_j w_bj log P(n_bj)], by loops over rows and columns."""
    k = weights.shape[1]
    total = 0.0
    for b in range(query.shape[0]):
        logits = torch.stack([F.cosine_similarity(query[b], c, dim=0) / tau for c in candidates])
        log_p = logits - torch.logsumexp(logits, 0)
        start = (offset + b) * (k + 1)
        total = total - log_p[start] - sum(weights[b, j] * log_p[start + 1 + j] for j in range(k))
    return 2 * tau * total / query.shape[0]


def test_loss_matches_the_slow_reference_in_one_process_and_with_a_rank_offset():
    g = torch.Generator().manual_seed(1)
    batch, k, dim = 3, 2, 6
    query, key = torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)
    neighbors = torch.randn(batch, k, dim, generator=g)
    weights = torch.softmax(torch.randn(batch, k, generator=g), 1)
    own = torch.cat([key[:, None], neighbors], 1).flatten(0, 1)
    got = snclr_loss(query, key, neighbors, weights, 0.2)
    torch.testing.assert_close(got, reference_loss(query, own, weights, 0, 0.2))
    # Rank 1 of 2: rank 0's blocks come first among the gathered candidates.
    other = torch.randn(batch * (k + 1), dim, generator=g)
    gathered = torch.cat([other, own])
    got = snclr_loss(query, key, neighbors, weights, 0.3, candidates=gathered, offset=batch)
    torch.testing.assert_close(got, reference_loss(query, gathered, weights, batch, 0.3))


def test_loss_exact_value_when_every_embedding_is_the_same():
    batch, k = 4, 3
    ones = torch.ones(batch, 5)
    weights = torch.full((batch, k), 1 / k)
    loss = snclr_loss(ones, ones, torch.ones(batch, k, 5), weights, 0.2)
    assert loss.item() == pytest.approx(2 * 0.2 * 2 * math.log(batch * (k + 1)))


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_bank_topk_equals_brute_force_in_chunks(chunk):
    g = torch.Generator().manual_seed(0)
    keys, bank = torch.randn(5, 8, generator=g), 3 * torch.randn(100, 8, generator=g)
    sims = F.normalize(keys, dim=1) @ F.normalize(bank, dim=1).T
    assert torch.equal(bank_topk(keys, bank, 6, chunk_size=chunk), sims.topk(6, dim=1).indices)
    with pytest.raises(ValueError, match="k=101"):
        bank_topk(keys, bank, 101)


# ---------------------------------------------------------------- the method


def make(*overrides: str):
    torch.manual_seed(0)
    return build_method(load_config(None, [*TINY, *overrides]))


def views(batch: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, 16, 16, generator=g), torch.randn(batch, 3, 16, 16, generator=g)


def reference_direction(method, z, p, key, bank, weighting="attention", threshold=False):
    sims = F.normalize(key, dim=1) @ F.normalize(bank, dim=1).T
    neighbors = bank[sims.topk(method.num_neighbors, dim=1).indices]
    k = method.num_neighbors
    if weighting == "uniform":
        weights = torch.full((key.shape[0], k), 1 / k)
    else:
        cos = torch.stack(
            [F.cosine_similarity(z[:, None], neighbors[:, j : j + 1], dim=-1)[:, 0] for j in range(k)], 1
        )
        weights = torch.softmax(cos, dim=1)
        if weighting == "hard":
            weights = F.one_hot(weights.argmax(1), k).float()
        elif threshold:
            weights = torch.where(weights >= 1 / k, weights, torch.zeros_like(weights))
    candidates = torch.cat([key[:, None], neighbors], 1).flatten(0, 1)
    return reference_loss(p, candidates, weights, 0, method.temperature)


@pytest.mark.parametrize(
    "extra, weighting, threshold",
    [
        ([], "attention", False),
        (["method.weighting=uniform"], "uniform", False),
        (["method.weighting=hard", "method.momentum=null"], "hard", False),
        (["method.threshold=true", "method.temperature=0.1"], "attention", True),
    ],
)
def test_forward_matches_the_reference_and_looks_up_the_bank_before_enqueuing(extra, weighting, threshold):
    method = make(*extra)
    x1, x2 = views()
    bank = method.bank.clone()
    z1, p1 = method.online(x1)
    z2, p2 = method.online(x2)
    k1, k2 = method.keys(x1), method.keys(x2)
    expected = reference_direction(method, z1, p1, k2, bank, weighting, threshold)
    expected = expected + reference_direction(method, z2, p2, k1, bank, weighting, threshold)
    loss, logs = method(x1, x2)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["loss/view1_to_view2"] + logs["loss/view2_to_view1"], loss.detach())
    # Then the raw view-2 keys went in, and nothing else.
    torch.testing.assert_close(method.bank[:6], k2)
    torch.testing.assert_close(method.bank[6:], bank[6:])
    entropy = logs["snclr/weight_entropy"].item()
    if weighting == "uniform":
        assert entropy == pytest.approx(math.log(4))
    elif weighting == "hard":
        assert entropy == pytest.approx(0.0, abs=1e-6)
    else:
        assert 0.0 < entropy <= math.log(4) + 1e-6


def test_neighbours_in_the_bank_are_soft_positives():
    """A bank holding near-copies of the keys makes them neighbours with large weights."""
    method = make("method.momentum=null")
    method.eval()  # fixed BatchNorm statistics: keys do not depend on the batch
    x1, x2 = views()
    with torch.no_grad():
        method.bank.copy_(torch.randn(40, 16))
        method.bank[:6] = method.keys(x2) + 0.01 * torch.randn(6, 16)
    neighbors = method.neighbors(method.keys(x2))
    torch.testing.assert_close(neighbors[:, 0], method.bank[:6])  # each key's own near-copy first


def test_weights_carry_gradient_unless_detached():
    z = torch.randn(3, 16, requires_grad=True)
    neighbors = torch.randn(3, 4, 16)
    assert make().weights(z, neighbors).requires_grad
    assert not make("method.detach_weights=true").weights(z, neighbors).requires_grad
    method = make()
    loss, _ = method(*views())
    loss.backward()
    assert all(p.grad is None for p in method.key_backbone.parameters())
    assert method.projector[0].weight.grad is not None


def test_bank_is_fifo_wraps_and_stays_still_in_eval_mode():
    method = make("method.bank_size=10")
    first, second = torch.eye(16)[:6], torch.eye(16)[6:12]
    method.enqueue_bank(first)
    assert method.bank_ptr.item() == 6
    method.enqueue_bank(second)  # rows 6..9, then wraps to 0..1
    assert method.bank_ptr.item() == 2
    torch.testing.assert_close(method.bank[6:10], second[:4])
    torch.testing.assert_close(method.bank[:2], second[4:])
    torch.testing.assert_close(method.bank[2:6], first[2:6])
    method.eval()
    method.enqueue_bank(torch.ones(3, 16))
    assert method.bank_ptr.item() == 2


def test_bank_survives_a_checkpoint(tmp_path):
    method = make()
    method(*views())
    torch.save(method.state_dict(), tmp_path / "state.pt")
    restored = make()
    assert not torch.equal(restored.bank, method.bank)
    restored.load_state_dict(torch.load(tmp_path / "state.pt"))
    assert torch.equal(restored.bank, method.bank) and restored.bank_ptr.item() == 6


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method.num_neighbors=0"], "method.num_neighbors"),
        (["method.num_neighbors=41"], "method.num_neighbors=41 is larger than method.bank_size=40"),
        (["method.bank_size=0"], "method.bank_size"),
        (["method.weighting=soft"], "method.weighting"),
    ],
)
def test_bad_options_name_the_option(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*TINY, *overrides])


def test_a_bank_larger_than_the_data_per_worker_is_refused(tmp_path, capsys):
    small = [
        "data.name=synthetic", "data.synthetic_train_size=96", "training.batch_size=32",
        "method.bank_size=97", "method.num_neighbors=4",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="method.bank_size=97 is larger than the 96 training images"):
        Trainer(load_config(None, [*TINY, *small]))
    out = tmp_path / "run"
    assert main(["train", "launch/experiments/digits.yaml", "method.name=snclr", "method.bank_size=5000",
                 f"training.output_dir={out}"]) == 2  # fmt: skip
    assert "method.bank_size=5000 is larger than the 1344 training images" in capsys.readouterr().err
    assert not out.exists()


def test_defaults_follow_the_paper():
    method = load_config(None, ["method.name=snclr"]).method
    assert (method.num_neighbors, method.weighting, method.threshold, method.detach_weights) == (
        30,
        "attention",
        False,
        False,
    )
    assert (method.temperature, method.momentum, method.momentum_schedule) == (0.2, 0.99, "cosine")


# ---------------------------------------------------------------- training


def test_short_digits_run_beats_initialisation(digits_run):
    _, result, history = digits_run(
        "method.name=snclr", "method.bank_size=1024", "method.num_neighbors=5", "training.epochs=4"
    )
    assert result["knn_top1"] > result["knn_top1_init"] + 0.05, result
    assert '"snclr/weight_entropy"' in history
