import math

import pytest
import torch
import torch.nn.functional as F

from raymix.losses import info_nce, moco_v2_loss, soft_contrast, soft_cross_entropy


def reference_info_nce(q, k, offset, tau, negatives=None):
    """Slow: one row at a time, straight from 2 tau * -log(exp(q.k+ / tau) / sum exp(q.k / tau))."""
    q = [row / row.norm() for row in q.double()]
    cols = [row / row.norm() for row in k.double()]
    if negatives is not None:
        cols += [row / row.norm() for row in negatives.double()]
    total = 0.0
    for b, qb in enumerate(q):
        sims = [float(qb @ c) / tau for c in cols]
        total += -(sims[offset + b] - math.log(sum(math.exp(s) for s in sims)))
    return 2 * tau * total / len(q)


@pytest.mark.parametrize("offset", [0, 4, 8])
@pytest.mark.parametrize("queue", [0, 5])
def test_info_nce_matches_reference(offset, queue):
    g = torch.Generator().manual_seed(offset + queue)
    q, k = torch.randn(4, 16, generator=g), torch.randn(12, 16, generator=g)
    neg = torch.randn(queue, 16, generator=g) if queue else None
    got = info_nce(q, k, offset, 0.2, neg)
    assert got.item() == pytest.approx(reference_info_nce(q, k, offset, 0.2, neg), rel=1e-5)


def test_info_nce_exact_value():
    # q = k = two orthogonal unit vectors, tau = 1: logits [[1, 0], [0, 1]],
    # loss = 2 * 1 * -log(e / (e + 1)) = 2 log(1 + 1/e).
    eye = torch.eye(2)
    assert info_nce(eye, eye, 0, 1.0).item() == pytest.approx(2 * math.log(1 + math.exp(-1)), rel=1e-6)


def test_info_nce_scale_invariant_and_keys_get_no_special_treatment():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    assert info_nce(q, k, 0, 0.1).item() == pytest.approx(info_nce(5 * q, 0.3 * k, 0, 0.1).item(), rel=1e-5)


def test_info_nce_positive_column_matters():
    g = torch.Generator().manual_seed(1)
    k = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    aligned = info_nce(k[2:4], k, offset=2, temperature=0.1)
    shifted = info_nce(k[2:4], k, offset=0, temperature=0.1)
    assert aligned < shifted


def test_soft_cross_entropy_one_hot_equals_cross_entropy():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 7, generator=g)
    labels = torch.tensor([0, 3, 6, 2, 2])
    got = soft_cross_entropy(logits, F.one_hot(labels, 7).float())
    assert got.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_soft_cross_entropy_uniform_logits():
    # Uniform logits over N columns and targets summing to 2: 2 log N per row.
    targets = torch.zeros(3, 4)
    targets[:, 0] = 1.0
    targets[:, 1] = 1.0
    assert soft_cross_entropy(torch.zeros(3, 4), targets).item() == pytest.approx(2 * math.log(4))


def test_soft_contrast_exact_values_and_scale_invariance():
    # Equal embeddings: every logit is 1 / tau, so the loss is log N for any target rows summing to 1.
    q, k = torch.ones(3, 4), torch.ones(5, 4)
    targets = torch.softmax(torch.randn(3, 5), dim=1)
    assert soft_contrast(q, k, targets, 0.2).item() == pytest.approx(math.log(5))
    # Two orthogonal keys, target all on the first: -log(e^{1/tau} / (e^{1/tau} + 1)).
    q, k = torch.tensor([[2.0, 0.0]]), torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    expected = -math.log(math.exp(5.0) / (math.exp(5.0) + 1.0))
    assert soft_contrast(q, k, torch.tensor([[1.0, 0.0]]), 0.2).item() == pytest.approx(expected)
    # No 2 tau factor, and the norms of queries and keys do not matter.
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g)
    targets = torch.softmax(torch.randn(4, 6, generator=g), dim=1)
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.3
    torch.testing.assert_close(soft_contrast(q, k, targets, 0.3), soft_cross_entropy(logits, targets))
    torch.testing.assert_close(soft_contrast(7 * q, 0.1 * k, targets, 0.3), soft_contrast(q, k, targets, 0.3))


def reference_moco_v2(q, k, offset, tau, negatives):
    """He et al. 2020, Algorithm 1, one query at a time: the own key first, then the queue."""
    total = 0.0
    for b in range(q.shape[0]):
        columns = [k[offset + b]] + list(negatives)
        logits = torch.stack([F.cosine_similarity(q[b], c, dim=0) for c in columns]) / tau
        total = total - (logits[0] - torch.logsumexp(logits, 0))
    return total / q.shape[0]


@pytest.mark.parametrize("offset", [0, 3])
def test_moco_v2_loss_matches_reference(offset):
    g = torch.Generator().manual_seed(1)
    q, k, queue = (torch.randn(n, 8, generator=g) for n in (3, 9, 5))
    expected = reference_moco_v2(q, k, offset, 0.1, queue)
    torch.testing.assert_close(moco_v2_loss(q, k, offset, 0.1, queue), expected)


def test_moco_v2_loss_exact_value_and_no_in_batch_negatives():
    # Each query equals its key (cosine 1) and is orthogonal to the M = 3 queued keys (0).
    eye = torch.eye(6)
    q, keys, queue = eye[:2], eye[:2], eye[2:5]
    tau = 0.2
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 3))
    assert moco_v2_loss(q, keys, 0, tau, queue).item() == pytest.approx(expected, rel=1e-6)
    # Other rows of the gathered keys are no negatives: replacing them changes nothing.
    keys_elsewhere = torch.cat([torch.randn(4, 6), keys])
    assert moco_v2_loss(q, keys_elsewhere, 4, tau, queue).item() == pytest.approx(expected, rel=1e-6)
    # No 2 tau factor: tau enters through the logits alone.
    at_half = -math.log(math.exp(2) / (math.exp(2) + 3))
    assert moco_v2_loss(q, keys, 0, 0.5, queue).item() == pytest.approx(at_half)
    # Without a queue the positive is the only column: the loss is 0.
    assert moco_v2_loss(q, keys, 0, tau, None).item() == 0.0
