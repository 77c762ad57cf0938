"""The epoch loop shared by every driver that reports to an orchestrator (Ray Train, Tune).

``train_loop`` advances a :class:`Trainer` to its last epoch and hands each epoch's metrics
to ``report``, with the state to checkpoint on checkpoint epochs. It knows nothing about
Ray: the caller passes how to report and where it resumed from.

Every report carries the latest evaluation: on epochs without one the previous values are
repeated, with ``eval_epoch`` saying when they were measured, so a scheduler comparing
trials at the same epoch always finds the metric. A checkpoint is always freshly scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from raymix.engine.run import format_metrics
from raymix.engine.trainer import Trainer

Report = Callable[[dict[str, Any], "dict[str, Any] | None"], None]


def train_loop(
    trainer: Trainer,
    state: dict[str, Any] | None,
    report: Report,
    *,
    rank0: bool = True,
    before_epoch: Callable[[int], None] | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Train from ``state`` (or from scratch) to ``training.epochs``, reporting every epoch.

    Only rank 0 evaluates and passes a state to checkpoint; the other ranks report their
    training metrics (every rank must call ``report`` when it is a barrier).
    """
    cfg = trainer.cfg
    epochs, every = cfg.training.epochs, cfg.training.eval_every
    if state is not None:
        trainer.load_state_dict(state)
        run = dict(state["run"])
        latest = dict(state.get("latest_eval", {}))
    else:
        initial = trainer.evaluate() if rank0 else {}
        run = {"knn_top1_init": initial.get("knn_top1", math.nan), "best_knn_top1": -math.inf}
        latest = {**initial, "eval_epoch": 0} if rank0 else {}
    if trainer.epoch >= epochs:  # a finished run started again: report its encoder once more
        report({**(trainer.evaluate() if rank0 else {}), "epoch": trainer.epoch, **run}, None)
        return
    while trainer.epoch < epochs:
        if before_epoch is not None:
            before_epoch(trainer.epoch + 1)
        metrics: dict[str, Any] = trainer.train_epoch()
        last = trainer.epoch == epochs
        save = last or trainer.epoch % cfg.training.checkpoint_every == 0
        if rank0 and (save or (every and trainer.epoch % every == 0)):
            latest = {**trainer.evaluate(linear=last and cfg.eval.linear_at_end), "eval_epoch": trainer.epoch}
            run["best_knn_top1"] = max(run["best_knn_top1"], latest["knn_top1"])
        metrics = {**latest, **metrics, **run}
        if rank0:
            log(format_metrics(metrics, epochs))
        checkpoint = {**trainer.state_dict(), "run": run, "latest_eval": latest} if save and rank0 else None
        report(metrics, checkpoint)
