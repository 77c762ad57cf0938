"""A single in-process run: train, evaluate, checkpoint, resume. Used by ``raymix train``.

Output folder layout::

    config.yaml            the resolved config
    metrics.jsonl          one line per epoch (epoch 0: the encoder at initialisation)
    checkpoints/last.pt    the latest state (resumed from when the same run starts again)
    checkpoints/best.pt    the state with the best knn_top1
    mlflow_run.json        the run's MLflow record, continued on resume (tracking.enabled)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from raymix.config import MUTABLE_KEYS, Config, ConfigError
from raymix.engine.checkpoint import (
    CheckpointError,
    check_writable,
    first_missing,
    load_checkpoint,
    save_checkpoint,
    storage_error,
)
from raymix.engine.loop import EpochEnd, fresh, train_loop
from raymix.errors import RunFailedError  # re-exported: it was defined here

# Keys that may change between a run and its resumption: they do not alter the trajectory.
RESUMABLE_CHANGES = (
    "training.progress",
    "training.eval_every",
    "training.checkpoint_every",
    "training.keep_checkpoints",
    "training.compile",
    "training.channels_last",
    "training.tf32",
    "scaling.sync_batchnorm",
    "eval.",
    "tracking.",
    "debug.",
    "scaling.max_failures",
)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config dicts, ignoring resumable ones.

    Resumable: the keys of :data:`RESUMABLE_CHANGES` (prefixes), which leave the trajectory
    alone, and the hyperparameters of :data:`raymix.config.MUTABLE_KEYS` (exact keys), which
    a resumed run takes up from its next step: a run may continue with a new learning rate
    or temperature, as Population Based Training does with the checkpoints it hands on.
    """
    a, b = flatten(old), flatten(new)
    changed = [key for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
    return [key for key in changed if not key.startswith(RESUMABLE_CHANGES) and key not in MUTABLE_KEYS]


def resume_state(cfg: Config) -> dict[str, Any] | None:
    """The latest checkpoint of this run's folder, if any; refuses one from another config."""
    last = cfg.output_dir / "checkpoints" / "last.pt"
    if not last.exists():
        return None
    try:
        state = load_checkpoint(last)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc}; move it away to resume from checkpoints/best.pt, or set training.run_name "
            "to start a new run"
        ) from None
    changed = config_changes(state["config"], cfg.to_dict())
    if changed:
        raise ConfigError(
            f"{cfg.output_dir} holds a run with a different config ({', '.join(changed)}); "
            "set training.output_dir (or training.run_name) to start a new run there"
        )
    return state


def read_history(path: Path, epoch: int) -> list[str]:
    """The lines of ``metrics.jsonl`` up to ``epoch``: what a run resumed there has written.

    Later lines (epochs trained after the last checkpoint, then lost) and a line torn by a
    crash are dropped, so the resumed run writes each epoch once.
    """
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["epoch"]) > epoch:
                break
        except (ValueError, KeyError, TypeError):
            break
        kept.append(line)
    return kept


def write_text(path: Path, text: str, mode: str = "w") -> None:
    """Write (or append) ``text``; an OSError becomes a one-line StorageError naming ``path``."""
    try:
        with path.open(mode) as f:
            f.write(text)
    except OSError as exc:
        raise storage_error(exc, path) from None


def replace_text(path: Path, text: str) -> None:
    """Replace ``path``'s contents at once (a temporary file and a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    write_text(tmp, text)
    try:
        os.replace(tmp, path)
    except OSError as exc:
        raise storage_error(exc, path) from None


class LocalReport:
    """What a run in-process makes of each epoch: a line of ``metrics.jsonl`` (measured values
    only), ``last.pt`` on checkpoint epochs and ``best.pt`` when ``knn_top1`` improves."""

    def __init__(self, out: Path) -> None:
        self.history = out / "metrics.jsonl"
        self.checkpoints = out / "checkpoints"

    def __call__(self, end: EpochEnd) -> None:
        if end.kind == "repeat":
            return
        write_text(self.history, json.dumps(fresh(end.metrics)) + "\n", mode="a")
        if end.state is None or not (end.checkpoint or end.improved):
            return
        state = end.state()
        if end.checkpoint:
            save_checkpoint(state, self.checkpoints / "last.pt")
        if end.improved:
            save_checkpoint(state, self.checkpoints / "best.pt")


def fit(cfg: Config, *, log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg`` to its last epoch, resuming its folder's latest checkpoint if there is one.

    Everything that can reject the input (config, data, an incompatible old run, a tracking
    store that cannot be used) happens before the first file is written. With
    ``tracking.enabled`` the run is recorded in MLflow (see
    :mod:`raymix.integrations.run_tracking`). Returns the last epoch's metrics plus the paths.
    """
    from raymix.engine.trainer import Trainer  # torch, timm: only once a run starts

    trainer = Trainer(cfg)
    state = resume_state(cfg)
    tracker = None
    if cfg.tracking.enabled:
        from raymix.integrations.run_tracking import RunTracker  # MLflow: only for runs it records

        tracker = RunTracker.connect(cfg)  # a server that does not answer stops the run here
    out = cfg.output_dir
    created = first_missing(out)
    check_writable(out, "training.output_dir")
    try:
        record = tracker.start(cfg, out.resolve(), resumed=state is not None, log=log) if tracker else None
    except ConfigError:
        if created is not None:  # refused before training: leave nothing behind
            shutil.rmtree(created, ignore_errors=True)
        raise
    write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    report = LocalReport(out)
    if state is not None:
        kept = read_history(report.history, int(state["epoch"]))
        replace_text(report.history, "".join(line + "\n" for line in kept))
        log(f"resuming {out} after epoch {int(state['epoch'])}")
    else:
        replace_text(report.history, "")
    with record.running() if record else contextlib.nullcontext():  # MLflow: FAILED if it raises
        try:
            epochs = record.around(report) if record else report
            metrics = train_loop(trainer, state, epochs, log=log, progress=progress and cfg.training.progress)
        except FloatingPointError as exc:
            saved = report.checkpoints / "last.pt"
            where = (
                f"the last checkpoint is kept in {saved}" if saved.exists() else "no checkpoint was written"
            )
            raise RunFailedError(f"{exc}; {where}") from exc
    best = report.checkpoints / "best.pt"
    if record:
        record.finish({"best": best, "last": report.checkpoints / "last.pt"})
    return {**metrics, "output_dir": str(out), "best_checkpoint": str(best)}
