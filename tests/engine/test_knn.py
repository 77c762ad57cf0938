"""Tests of the weighted kNN monitor (raymix.engine.knn) against a slow, obviously-correct reference."""

from __future__ import annotations

import math

import pytest
import torch

from raymix.engine.knn import knn_accuracies, knn_accuracy, knn_predict


def naive_knn_predict(
    train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, k: int, temperature: float
) -> list[int]:
    """Wu et al. 2018 weighted kNN with Python loops, float64 and math.exp (no overflow tricks)."""
    tr = train.double()
    tr = tr / tr.norm(dim=1, keepdim=True)
    preds = []
    for row in test.double():
        q = row / row.norm()
        sims = [(float(q @ tr[i]), int(train_labels[i])) for i in range(tr.shape[0])]
        sims.sort(key=lambda pair: pair[0], reverse=True)
        votes: dict[int, float] = {}
        for sim, label in sims[:k]:
            votes[label] = votes.get(label, 0.0) + math.exp(sim / temperature)
        best = max(votes.values())
        preds.append(min(label for label, v in votes.items() if v == best))
    return preds


def _random_problem(seed: int, n_train: int = 120, n_test: int = 40, dim: int = 16, classes: int = 5):
    gen = torch.Generator().manual_seed(seed)
    train = torch.randn(n_train, dim, generator=gen)
    test = torch.randn(n_test, dim, generator=gen)
    train_labels = torch.randint(0, classes, (n_train,), generator=gen)
    test_labels = torch.randint(0, classes, (n_test,), generator=gen)
    return train, train_labels, test, test_labels


@pytest.mark.parametrize("temperature", [0.01, 0.07, 0.5, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_naive_reference(seed: int, temperature: float) -> None:
    train, train_labels, test, _ = _random_problem(seed)
    ks = [1, 3, 20, 120, 500]  # 500 > N = 120 is clipped to every train row
    got = knn_predict(train, train_labels, test, ks, temperature=temperature, num_classes=5)
    for k in ks:
        expected = naive_knn_predict(train, train_labels, test, min(k, 120), temperature)
        assert got[k].tolist() == expected, f"k={k}, temperature={temperature}"


def test_chunk_size_does_not_change_results() -> None:
    train, train_labels, test, test_labels = _random_problem(3, n_test=50)
    ks = (1, 5, 20, 200)
    results = [knn_predict(train, train_labels, test, ks, chunk_size=c) for c in (1, 7, 50, 1000)]
    for other in results[1:]:
        for k in ks:
            assert torch.equal(results[0][k], other[k])
    accs = [knn_accuracies(train, train_labels, test, test_labels, ks=ks, chunk_size=c) for c in (1, 7, 1000)]
    assert accs[0] == accs[1] == accs[2]


# Hand-made 2-D example. Train bank (cosine similarity ignores the norms):
#   a = (1, 0) -> 0,  b = (0, 1) -> 1,  c = (1, 1) -> 1,  d = (-1, 0) -> 2
TINY_TRAIN = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
TINY_TRAIN_LABELS = torch.tensor([0, 1, 1, 2])
# Test rows and their cosine similarities to (a, b, c, d):
#   q1 = (2, 0),  label 0: ( 1,      0,      .7071, -1     )
#   q2 = (-2, 1), label 2: (-.8944,  .4472, -.3162,  .8944 )
#   q3 = (1, 2),  label 1: ( .4472,  .8944,  .9487, -.4472 )
#   q4 = (1, -.5),label 1: ( .8944, -.4472,  .3162, -.8944 )
TINY_TEST = torch.tensor([[2.0, 0.0], [-2.0, 1.0], [1.0, 2.0], [1.0, -0.5]])
TINY_TEST_LABELS = torch.tensor([0, 2, 1, 1])


def test_tiny_example_by_hand() -> None:
    # k = 1: nearest rows a, d, c, a -> predictions 0, 2, 1, 0; q4 is wrong -> accuracy 3/4.
    assert knn_accuracy(TINY_TRAIN, TINY_TRAIN_LABELS, TINY_TEST, TINY_TEST_LABELS, k=1) == pytest.approx(
        0.75
    )
    # k = 3, tau = 1 (votes = sum of exp(sim)):
    #   q1: class 0 e^1 = 2.718  vs class 1 e^0 + e^.7071 = 1 + 2.028 = 3.028     -> 1 (wrong)
    #   q2: class 2 e^.8944 = 2.446 vs class 1 e^.4472 + e^-.3162 = 1.564 + .729 = 2.293 -> 2 (right)
    #   q3: class 1 e^.9487 + e^.8944 = 2.582 + 2.446 = 5.028 vs class 0 e^.4472 = 1.564 -> 1 (right)
    #   q4: class 0 e^.8944 = 2.446 vs class 1 e^.3162 + e^-.4472 = 1.372 + .639 = 2.011 -> 0 (wrong)
    # -> accuracy 2/4.
    preds = knn_predict(TINY_TRAIN, TINY_TRAIN_LABELS, TINY_TEST, [3], temperature=1.0)
    assert preds[3].tolist() == [1, 2, 1, 0]
    acc = knn_accuracy(TINY_TRAIN, TINY_TRAIN_LABELS, TINY_TEST, TINY_TEST_LABELS, k=3, temperature=1.0)
    assert acc == pytest.approx(0.5)
    # k = 3, tau = 0.1: the nearest neighbour's e^(10 sim) dominates, so q1 flips back to class 0
    # (e^10 = 22026 vs 1 + e^7.071 = 1177) -> predictions 0, 2, 1, 0 -> accuracy 3/4.
    accs = knn_accuracies(
        TINY_TRAIN, TINY_TRAIN_LABELS, TINY_TEST, TINY_TEST_LABELS, ks=(3, 10), temperature=0.1
    )
    assert accs[3] == pytest.approx(0.75)
    # k = 10 is clipped to the 4 train rows; for q1 d adds class 2 only e^-10 -> unchanged.
    assert accs[10] == pytest.approx(0.75)


def test_invariant_to_positive_scaling() -> None:
    train, train_labels, test, test_labels = _random_problem(4)
    ks = (1, 10, 50)
    base = knn_predict(train, train_labels, test, ks)
    scaled = knn_predict(train * 37.5, train_labels, test * 0.02, ks)
    for k in ks:
        assert torch.equal(base[k], scaled[k])


def test_low_precision_inputs_are_computed_in_float32() -> None:
    train, train_labels, test, _ = _random_problem(5)
    for dtype in (torch.float16, torch.bfloat16):
        low = knn_predict(train.to(dtype), train_labels, test.to(dtype), (1, 20))
        ref = knn_predict(train.to(dtype).float(), train_labels, test.to(dtype).float(), (1, 20))
        for k in (1, 20):
            assert low[k].dtype == torch.long
            assert torch.equal(low[k], ref[k])


def _clusters(seed: int, per_class: int, classes: int = 10, dim: int = 32):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen)
    labels = torch.arange(classes).repeat_interleave(per_class)  # (classes * per_class,)
    features = 10.0 * centres[labels] + torch.randn(labels.shape[0], dim, generator=gen)
    return features, labels


def test_separated_clusters_are_classified_perfectly() -> None:
    train, train_labels = _clusters(0, per_class=50)
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(10, 32, generator=torch.Generator().manual_seed(0))
    test_labels = torch.randint(0, 10, (200,), generator=gen)
    test = 10.0 * centres[test_labels] + torch.randn(200, 32, generator=gen)
    accs = knn_accuracies(train, train_labels, test, test_labels, ks=(1, 20, 200))
    assert accs == {1: 1.0, 20: 1.0, 200: 1.0}


def test_permuted_labels_give_chance_accuracy() -> None:
    features, labels = _clusters(2, per_class=300)  # 3000 rows, 10 classes
    gen = torch.Generator().manual_seed(3)
    order = torch.randperm(features.shape[0], generator=gen)
    train, test = features[order[:2000]], features[order[2000:]]
    train_labels, test_labels = labels[order[:2000]], labels[order[2000:]]
    assert knn_accuracy(train, train_labels, test, test_labels) > 0.99  # sanity: true labels work
    shuffled = train_labels[torch.randperm(2000, generator=gen)]
    for k, acc in knn_accuracies(train, shuffled, test, test_labels, ks=(20, 200)).items():
        assert abs(acc - 0.1) < 0.05, f"k={k}: {acc}"  # chance = 1/10, std of 1000 trials ~ 0.0095


def test_num_classes_covers_test_only_labels_and_empty_test() -> None:
    # label 7 appears only in the test set: it is never predicted, but does not crash.
    acc = knn_accuracy(TINY_TRAIN, TINY_TRAIN_LABELS, TINY_TEST, torch.tensor([0, 2, 1, 7]), k=1)
    assert acc == pytest.approx(0.75)
    preds = knn_predict(TINY_TRAIN, TINY_TRAIN_LABELS, TINY_TEST[:0], (1, 5))
    assert preds[1].shape == (0,) and preds[5].shape == (0,)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        knn_predict(TINY_TRAIN, TINY_TRAIN_LABELS, TINY_TEST, [0])
    with pytest.raises(ValueError):
        knn_predict(TINY_TRAIN, TINY_TRAIN_LABELS, TINY_TEST, [1], temperature=0.0)
    with pytest.raises(ValueError):
        knn_predict(TINY_TRAIN, TINY_TRAIN_LABELS, TINY_TEST[:, :1], [1])
    with pytest.raises(ValueError):
        knn_predict(TINY_TRAIN, TINY_TRAIN_LABELS[:3], TINY_TEST, [1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    train, train_labels, test, _ = _random_problem(6)
    cpu = knn_predict(train, train_labels, test, (1, 20))
    gpu = knn_predict(train.cuda(), train_labels.cuda(), test.cuda(), (1, 20))
    for k in (1, 20):
        assert gpu[k].device.type == "cuda"
        assert torch.equal(cpu[k], gpu[k].cpu())
