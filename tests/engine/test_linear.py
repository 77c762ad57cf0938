"""Tests of the linear probe on frozen features (raymix.engine.linear)."""

from __future__ import annotations

import torch

from raymix.engine.linear import LinearProbeResult, _sgd_momentum_step, linear_probe, linear_probe_ensemble


def _separable(seed: int, n_train: int = 1347, n_test: int = 450, dim: int = 192, classes: int = 10):
    """Gaussian blobs around random class means, shifted and scaled so standardisation matters."""
    gen = torch.Generator().manual_seed(seed)
    means = 3.0 * torch.randn(classes, dim, generator=gen)
    y_train = torch.randint(0, classes, (n_train,), generator=gen)
    y_test = torch.randint(0, classes, (n_test,), generator=gen)
    x_train = 50.0 + 20.0 * (means[y_train] + torch.randn(n_train, dim, generator=gen))
    x_test = 50.0 + 20.0 * (means[y_test] + torch.randn(n_test, dim, generator=gen))
    return x_train, y_train, x_test, y_test


def test_linearly_separable_data_is_learned() -> None:
    x_train, y_train, x_test, y_test = _separable(0)
    result = linear_probe(x_train, y_train, x_test, y_test)
    assert isinstance(result, LinearProbeResult)
    assert result.best_top1 >= 0.95
    assert result.last_top1 >= 0.95


def test_random_labels_stay_near_chance() -> None:
    x_train, _, x_test, _ = _separable(1)
    gen = torch.Generator().manual_seed(2)
    y_train = torch.randint(0, 10, (x_train.shape[0],), generator=gen)
    y_test = torch.randint(0, 10, (x_test.shape[0],), generator=gen)
    result = linear_probe(x_train, y_train, x_test, y_test, epochs=20)
    # chance = 0.1; std over 450 test rows ~ 0.014; "best" is a max over 20 epochs, hence the slack.
    assert abs(result.last_top1 - 0.1) < 0.06
    assert result.best_top1 < 0.2


def test_best_is_at_least_last_and_epoch_in_range() -> None:
    x_train, y_train, x_test, y_test = _separable(3, n_train=300, n_test=100, dim=32)
    for epochs in (1, 7):
        result = linear_probe(x_train, y_train, x_test, y_test, epochs=epochs, batch_size=64)
        assert 0.0 <= result.last_top1 <= result.best_top1 <= 1.0
        assert 0 <= result.best_epoch < epochs


def test_same_seed_gives_identical_result() -> None:
    x_train, y_train, x_test, y_test = _separable(4, n_train=400, n_test=200, dim=24)
    # Noisy labels keep the accuracies away from 1.0, so different runs could actually differ.
    y_train = torch.where(torch.rand(400, generator=torch.Generator().manual_seed(5)) < 0.4, 0, y_train)

    def run() -> LinearProbeResult:
        return linear_probe(
            x_train, y_train, x_test, y_test, epochs=10, lr=0.5, batch_size=32, weight_decay=1e-4, seed=7
        )

    a = run()
    torch.manual_seed(123)  # the global RNG must not matter
    b = run()
    assert a == b


def test_global_rng_untouched() -> None:
    x_train, y_train, x_test, y_test = _separable(6, n_train=64, n_test=32, dim=8)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    linear_probe(x_train, y_train, x_test, y_test, epochs=2)
    assert torch.equal(torch.rand(3), expected)


def test_thread_count_is_restored() -> None:
    x_train, y_train, x_test, y_test = _separable(9, n_train=64, n_test=32, dim=8)
    before = torch.get_num_threads()
    linear_probe(x_train, y_train, x_test, y_test, epochs=1)
    assert torch.get_num_threads() == before


def test_hand_written_sgd_matches_torch_optim() -> None:
    gen = torch.Generator().manual_seed(8)
    ours = [torch.randn(4, 3, generator=gen), torch.randn(4, generator=gen)]
    theirs = [p.clone().requires_grad_() for p in ours]
    optimizer = torch.optim.SGD(theirs, lr=0.3, momentum=0.9, weight_decay=0.01)
    bufs: list[torch.Tensor | None] = [None, None]
    for lr in (0.3, 0.2, 0.05):
        grads = [torch.randn(4, 3, generator=gen), torch.randn(4, generator=gen)]
        _sgd_momentum_step(ours, grads, bufs, lr, 0.9, 0.01)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for p, g in zip(theirs, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b.detach())


def test_ensemble_members_equal_single_probes_and_the_ensemble_combines_them() -> None:
    x_train, y_train, x_test, y_test = _separable(3, n_train=300, n_test=200, dim=16)
    noise_train = torch.randn(300, 16, generator=torch.Generator().manual_seed(4))
    noise_test = torch.randn(200, 16, generator=torch.Generator().manual_seed(5))
    kwargs = {"epochs": 5, "lr": 0.1, "batch_size": 64, "seed": 7}
    (good, noise), ensemble = linear_probe_ensemble(
        [x_train, noise_train], y_train, [x_test, noise_test], y_test, **kwargs
    )
    assert good == linear_probe(x_train, y_train, x_test, y_test, **kwargs)
    assert noise == linear_probe(noise_train, y_train, noise_test, y_test, **kwargs)
    assert good.best_top1 > 0.9 and noise.best_top1 < 0.3
    assert noise.best_top1 < ensemble.best_top1 <= 1.0  # the informative member carries the vote
    # Two copies of one set: the ensemble is that set's probe.
    (a, b), same = linear_probe_ensemble([x_train, x_train], y_train, [x_test, x_test], y_test, **kwargs)
    assert a == b and (same.best_top1, same.last_top1) == (a.best_top1, a.last_top1)
