"""The one epoch loop of every run: ``raymix train`` in-process, Ray Train workers, Tune trials.

:func:`train_loop` advances a :class:`Trainer` to its last epoch. It evaluates and
checkpoints only at the epochs a :class:`Cadence` names, and hands every epoch to
``report`` as an :class:`EpochEnd`; the caller decides what reporting means (append to
``metrics.jsonl`` and save files, or ``ray.train.report``). It knows nothing about Ray.

Every epoch's metrics carry the latest evaluation: on epochs without one the previous
values are repeated, with ``eval_epoch`` saying when they were measured, so a scheduler
comparing trials at the same epoch always finds the metric. :func:`fresh` drops the
repeated values where a record should hold only measurements.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # the loop drives a Trainer; importing it (torch, timm) is the caller's cost
    from raymix.engine.trainer import Trainer

#: Keys of an evaluation's metrics (kNN and linear probe accuracies).
EVAL_PREFIXES = ("knn_top1_k", "linear_")


@dataclass(frozen=True)
class Cadence:
    """Which epochs evaluate and which checkpoint.

    Evaluation: every ``eval_every`` epochs (0: none but the last), the last epoch, and the
    ``extra`` epochs (a sweep's ASHA rungs, where trials are compared). Checkpoints: every
    ``checkpoint_every`` epochs, the last epoch and the ``extra`` epochs.
    """

    epochs: int
    eval_every: int
    checkpoint_every: int
    extra: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def of(cls, trainer: Trainer, extra: Iterable[int] = ()) -> Cadence:
        t = trainer.cfg.training
        return cls(t.epochs, t.eval_every, t.checkpoint_every, frozenset(extra))

    def evaluates(self, epoch: int) -> bool:
        every = self.eval_every
        return epoch == self.epochs or epoch in self.extra or bool(every and epoch % every == 0)

    def checkpoints(self, epoch: int) -> bool:
        return epoch == self.epochs or epoch in self.extra or epoch % self.checkpoint_every == 0


@dataclass
class EpochEnd:
    """What one epoch hands to ``report``.

    ``kind``: "initial" (the evaluation of the encoder before training, epoch 0, not a
    trained epoch; reported on rank 0 only), "epoch" (a trained epoch) or "repeat" (a
    finished run started again: its final encoder evaluated once more). ``evaluated`` is
    true on rank 0 only, though every rank takes part in each evaluation. ``state`` builds
    the state dict to save; it is set on rank 0 only.
    """

    kind: Literal["initial", "epoch", "repeat"]
    metrics: dict[str, Any]
    evaluated: bool
    checkpoint: bool
    improved: bool = False
    state: Callable[[], dict[str, Any]] | None = None


Report = Callable[[EpochEnd], None]


def fresh(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` without evaluation values repeated from an earlier epoch."""
    if metrics.get("eval_epoch", metrics.get("epoch")) == metrics.get("epoch"):
        return metrics
    return {
        key: value
        for key, value in metrics.items()
        if key not in ("knn_top1", "eval_epoch") and not key.startswith(EVAL_PREFIXES)
    }


def format_metrics(metrics: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {int(metrics['epoch']):>3}/{epochs}"]
    shown = fresh(metrics)
    for key in ("loss", "knn_top1", "linear_top1_best"):
        if key in shown:
            parts.append(f"{key} {shown[key]:.4f}")
    if "epoch_seconds" in metrics:
        parts.append(f"{metrics['epoch_seconds']:.1f} s")
    return "  ".join(parts)


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    """The run's summary values that are measured (no -inf before the first evaluation)."""
    return {key: value for key, value in run.items() if not (isinstance(value, float) and math.isinf(value))}


def train_loop(
    trainer: Trainer,
    state: dict[str, Any] | None,
    report: Report,
    *,
    extra: Iterable[int] = (),
    rank0: bool = True,
    before_epoch: Callable[[int], None] | None = None,
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> dict[str, Any]:
    """Train from ``state`` (or from scratch) to ``training.epochs``; returns the last metrics.

    Evaluation is a collective: every rank calls ``trainer.evaluate`` at the same epochs
    (each extracts features of its shard), and only rank 0 keeps and reports the metrics.
    Only rank 0 builds states to save; every rank calls ``report`` each epoch (it may be a
    barrier). ``extra``: epochs that must evaluate and checkpoint besides the config's
    cadence.
    """
    cadence = Cadence.of(trainer, extra)
    epochs, linear_at_end = cadence.epochs, trainer.cfg.eval.linear_at_end
    if state is not None:
        trainer.load_state_dict(state)
        run = dict(state["run"])
        latest = dict(state.get("latest_eval", {}))
    else:
        initial = trainer.evaluate()  # on every rank: a collective
        initial = initial if rank0 else {}
        run = {"knn_top1_init": initial.get("knn_top1", math.nan), "best_knn_top1": -math.inf}
        latest = {**initial, "eval_epoch": 0} if rank0 else {}
        if rank0:
            report(EpochEnd("initial", {"epoch": 0, **initial}, evaluated=True, checkpoint=False))
            log(format_metrics({"epoch": 0, **initial}, epochs) + "  (initialisation)")

    def snapshot() -> dict[str, Any]:
        return {**trainer.state_dict(), "run": dict(run), "latest_eval": dict(latest)}

    if trainer.epoch >= epochs:  # a finished run started again: its encoder once more
        final = trainer.evaluate(linear=linear_at_end)  # on every rank: a collective
        final = final if rank0 else {}
        again = {**final, "epoch": trainer.epoch, "eval_epoch": trainer.epoch, **_summary(run)}
        report(EpochEnd("repeat", again, evaluated=rank0, checkpoint=False))
        return again
    metrics: dict[str, Any] = {}
    while trainer.epoch < epochs:
        if before_epoch is not None:
            before_epoch(trainer.epoch + 1)
        metrics = trainer.train_epoch(progress=progress)
        epoch = trainer.epoch
        evaluated = rank0 and cadence.evaluates(epoch)
        improved = False
        if cadence.evaluates(epoch):  # on every rank: a collective
            start = time.perf_counter()
            measured = trainer.evaluate(linear=epoch == epochs and linear_at_end)
            if evaluated:
                latest = {**measured, "eval_epoch": epoch}
                metrics["eval_seconds"] = time.perf_counter() - start
                improved = latest["knn_top1"] > run["best_knn_top1"]
                run["best_knn_top1"] = max(run["best_knn_top1"], latest["knn_top1"])
        metrics = {**latest, **metrics, **_summary(run)}
        if rank0:
            log(format_metrics(metrics, epochs))
        end = EpochEnd(
            "epoch", metrics, evaluated, cadence.checkpoints(epoch), improved, snapshot if rank0 else None
        )
        report(end)
    return metrics
