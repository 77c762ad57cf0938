"""Linear probe on frozen, precomputed features.

Follows the linear-probing protocol of MAE (He et al. 2022, appendix "Linear probing"): the features are
standardised by a BatchNorm without affine parameters, then a single linear layer is trained with
SGD (momentum 0.9) and a cosine learning-rate decay. Because the backbone is frozen and the
features are fixed, the BatchNorm statistics are simply the train-set mean and variance, computed
once, and the whole probe is a few hundred small matrix products.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raymix.schedules import cosine_schedule

# MAE's probe uses BatchNorm1d(affine=False, eps=1e-6).
_BN_EPS = 1e-6
# MAE initialises the probe head with trunc_normal_(std=0.01) and zero bias; its cut-off at +-2
# (absolute) is 200 std away, so a plain normal draw is the same distribution in practice.
_INIT_STD = 0.01
# Momentum 0.9 as in MAE's linear-probing recipe (which uses LARS; plain SGD suffices at this scale).
_MOMENTUM = 0.9
# Below this many multiply-adds per step (B * D * K) a CPU step is a few hundred microseconds, too
# small for intra-op threads to pay off; worse, when other processes share the cores, OpenMP's
# barrier waits for descheduled threads and the probe became 30-100x slower (measured: 1,347 x 192
# features, 50 epochs: 0.13 s on one thread, 5-13 s on two threads of a loaded 2-core machine).
_SMALL_STEP_MACS = 1 << 24


@contextmanager
def _cpu_threads(num_threads: int) -> Iterator[None]:
    """Temporarily set torch's intra-op CPU thread count, restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class LinearProbeResult:
    """Test top-1 accuracies (fractions in ``[0, 1]``) of a linear probe.

    ``best_epoch`` is the 0-based epoch at which ``best_top1`` was first reached.
    """

    best_top1: float
    last_top1: float
    best_epoch: int


def _standardise(
    train: torch.Tensor, test: torch.Tensor, eps: float = _BN_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets standardised with the train mean and (biased) variance, like BatchNorm in train mode."""
    mean = train.mean(dim=0, keepdim=True)  # (1, D)
    # BatchNorm normalises with the biased variance of the batch (here: the whole train set).
    std = torch.sqrt(train.var(dim=0, unbiased=False, keepdim=True) + eps)  # (1, D)
    return (train - mean) / std, (test - mean) / std


def _sgd_momentum_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    bufs: list[torch.Tensor | None],
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """One in-place SGD step with heavy-ball momentum and L2 weight decay, as ``torch.optim.SGD``.

    Same update as PyTorch's SGD (dampening 0, no Nesterov; the Sutskever et al. 2013 form)::

        g = grad + weight_decay * p;   v = g (first step) or momentum * v + g;   p = p - lr * v

    Written out because ``torch.optim`` imports ``torch._dynamo`` on first use, which costs a few
    seconds of start-up on CPU, far more than the whole probe.
    """
    with torch.no_grad():
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if weight_decay != 0.0:
                g = g.add(p, alpha=weight_decay)
            buf = bufs[i]
            if buf is None:
                buf = g.clone()
                bufs[i] = buf
            else:
                buf.mul_(momentum).add_(g)
            p.add_(buf, alpha=-lr)


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    epochs: int = 50,
    lr: float = 0.1,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> LinearProbeResult:
    """Train a linear classifier on frozen features and report its test top-1 accuracy.

    Args:
        train_features: ``(N, D)`` features from the frozen backbone.
        train_labels: ``(N,)`` integer labels.
        test_features: ``(M, D)`` features on the same device.
        test_labels: ``(M,)`` integer labels.
        epochs: passes over the shuffled train set; test accuracy is measured after each.
        lr: peak learning rate; decayed to 0 along a half cosine, per step (MAE's per-iteration
            schedule, without warm-up).
        batch_size: minibatch size; the last, smaller batch of an epoch is kept.
        weight_decay: L2 penalty of SGD.
        seed: seeds the head initialisation and the shuffling; the global RNG is not touched.

    Returns:
        :class:`LinearProbeResult` with the best and last test top-1 and the best epoch.
    """
    (result,), _ = linear_probe_ensemble(
        [train_features], train_labels, [test_features], test_labels,
        epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, seed=seed,
    )  # fmt: skip
    return result


def _check(
    train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor
) -> None:
    if train.ndim != 2 or test.ndim != 2:
        raise ValueError("features must be 2-D (rows, dim)")
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train and test feature dims differ: {train.shape[1]} vs {test.shape[1]}")
    if train_labels.shape != (train.shape[0],) or test_labels.shape != (test.shape[0],):
        raise ValueError("labels must be 1-D with one entry per feature row")
    if train.shape[0] == 0 or test.shape[0] == 0:
        raise ValueError("linear probe needs at least one train and one test row")


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == labels).float().mean().item()


def _result(top1_per_epoch: list[float]) -> LinearProbeResult:
    best = max(range(len(top1_per_epoch)), key=lambda e: (top1_per_epoch[e], -e))  # the first best epoch
    return LinearProbeResult(best_top1=top1_per_epoch[best], last_top1=top1_per_epoch[-1], best_epoch=best)


def _probe_epochs(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    num_classes: int,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
) -> Iterator[torch.Tensor]:
    """Train the head epoch by epoch; yield its test logits (M, K) after each epoch."""
    device = x_train.device
    n_train, dim = x_train.shape
    # A private CPU generator makes the run a function of ``seed`` alone (initialisation and
    # shuffling), independent of the global RNG state and of the device.
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # The head is held as two plain tensors rather than an nn.Linear, whose default initialisation
    # would draw from (and advance) the global RNG before being overwritten.
    weight = (torch.randn(num_classes, dim, generator=gen) * _INIT_STD).to(device).requires_grad_()  # (K, D)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)  # (K,)
    params = [weight, bias]
    momentum_bufs: list[torch.Tensor | None] = [None, None]

    steps_per_epoch = -(-n_train // batch_size)  # ceil division: the last partial batch is kept
    total_steps = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n_train, generator=gen).to(device)  # (N,)
        for start in range(0, n_train, batch_size):
            idx = order[start : start + batch_size]  # (B,)
            logits = F.linear(x_train[idx], weight, bias)  # (B, K)
            loss = F.cross_entropy(logits, y_train[idx])
            grads = torch.autograd.grad(loss, params)
            step_lr = cosine_schedule(step, total_steps, lr, 0.0)
            _sgd_momentum_step(params, list(grads), momentum_bufs, step_lr, _MOMENTUM, weight_decay)
            step += 1
        with torch.no_grad():
            test_logits = F.linear(x_test, weight, bias)
        yield test_logits  # outside no_grad: probes trained side by side resume with gradients on


def linear_probe_ensemble(
    train_features: list[torch.Tensor],
    train_labels: torch.Tensor,
    test_features: list[torch.Tensor],
    test_labels: torch.Tensor,
    *,
    epochs: int = 50,
    lr: float = 0.1,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> tuple[list[LinearProbeResult], LinearProbeResult]:
    """One linear probe per feature set (as :func:`linear_probe`, the same seed and order),
    and their ensemble: the class with the highest mean softmax probability.

    Returns each set's result and the ensemble's, best and last over the same epochs.
    """
    if len(train_features) != len(test_features) or not train_features:
        raise ValueError("give one test feature set per train feature set, at least one")
    for train, test in zip(train_features, test_features, strict=True):
        _check(train, train_labels, test, test_labels)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    device = train_features[0].device
    y_train = train_labels.to(device=device, dtype=torch.long)  # (N,)
    y_test = test_labels.to(device=device, dtype=torch.long)  # (M,)
    num_classes = int(max(y_train.max().item(), y_test.max().item())) + 1
    # Small CPU steps run on one thread (see _SMALL_STEP_MACS); anything else keeps the caller's setting.
    widest = max(train.shape[1] for train in train_features)
    small = device.type == "cpu" and min(batch_size, len(y_train)) * widest * num_classes < _SMALL_STEP_MACS
    runs = []
    for train, test in zip(train_features, test_features, strict=True):
        x_train, x_test = _standardise(train.float(), test.to(device).float())
        runs.append(
            _probe_epochs(x_train, y_train, x_test, num_classes, epochs, lr, batch_size, weight_decay, seed)
        )
    single: list[list[float]] = [[] for _ in runs]
    ensemble: list[float] = []
    with _cpu_threads(1 if small else torch.get_num_threads()):
        for epoch_logits in zip(*runs, strict=True):
            for i, logits in enumerate(epoch_logits):
                single[i].append(_accuracy(logits, y_test))
            mean_prob = torch.stack([logits.softmax(dim=1) for logits in epoch_logits]).mean(dim=0)
            ensemble.append(_accuracy(mean_prob, y_test))
    return [_result(top1) for top1 in single], _result(ensemble)
