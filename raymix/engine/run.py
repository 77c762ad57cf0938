"""A single in-process run: train, evaluate, checkpoint, resume. Used by ``raymix train``.

Output folder layout::

    config.yaml            the resolved config
    metrics.jsonl          one line per epoch (epoch 0: the encoder at initialisation)
    checkpoints/last.pt    the latest state (resumed from when the same run starts again)
    checkpoints/best.pt    the state with the best knn_top1
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from raymix.config import Config, ConfigError
from raymix.engine.checkpoint import (
    CheckpointError,
    check_writable,
    load_checkpoint,
    save_checkpoint,
    storage_error,
)
from raymix.engine.trainer import Trainer

# Keys that may change between a run and its resumption: they do not alter the trajectory.
RESUMABLE_CHANGES = (
    "training.progress",
    "training.eval_every",
    "training.checkpoint_every",
    "training.keep_checkpoints",
    "training.compile",
    "training.channels_last",
    "eval.",
    "tracking.",
    "debug.",
    "scaling.max_failures",
)


class RunFailedError(RuntimeError):
    """A run that stopped with an error (a non-finite loss, a failed worker group)."""


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
    """Dotted keys whose values differ between two config dicts, ignoring resumable ones."""
    a, b = flatten(old), flatten(new)
    changed = [key for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
    return [key for key in changed if not key.startswith(RESUMABLE_CHANGES)]


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


def format_metrics(metrics: dict[str, float], epochs: int) -> str:
    parts = [f"epoch {int(metrics['epoch']):>3}/{epochs}"]
    for key in ("loss", "knn_top1", "linear_top1_best"):
        if key in metrics:
            parts.append(f"{key} {metrics[key]:.4f}")
    if "epoch_seconds" in metrics:
        parts.append(f"{metrics['epoch_seconds']:.1f} s")
    return "  ".join(parts)


def fit(cfg: Config, *, log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg`` to its last epoch, resuming its folder's latest checkpoint if there is one.

    Everything that can reject the input (config, data, an incompatible old run) happens
    before the first file is written. Returns the last epoch's metrics plus the paths.
    """
    trainer = Trainer(cfg)
    state = resume_state(cfg)
    out = cfg.output_dir
    check_writable(out, "training.output_dir")
    ckpt_dir, history = out / "checkpoints", out / "metrics.jsonl"
    write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    epochs = cfg.training.epochs

    if state is not None:
        trainer.load_state_dict(state)
        run = dict(state["run"])
        kept = read_history(history, trainer.epoch)
        replace_text(history, "".join(line + "\n" for line in kept))
        log(f"resuming {out} after epoch {trainer.epoch}")
    else:
        initial = {"epoch": 0, **trainer.evaluate()}
        run = {"knn_top1_init": initial["knn_top1"], "best_knn_top1": float("-inf")}
        write_text(history, json.dumps(initial) + "\n")
        log(format_metrics(initial, epochs) + "  (initialisation)")

    metrics: dict[str, Any] = {"epoch": trainer.epoch}
    while trainer.epoch < epochs:
        try:
            metrics = trainer.train_epoch(progress=progress and cfg.training.progress)
        except FloatingPointError as exc:
            saved = ckpt_dir / "last.pt"
            where = (
                f"the last checkpoint is kept in {saved}" if saved.exists() else "no checkpoint was written"
            )
            raise RunFailedError(f"{exc}; {where}") from exc
        last = trainer.epoch == epochs
        every = cfg.training.eval_every
        if last or (every and trainer.epoch % every == 0):
            metrics.update(trainer.evaluate(linear=last and cfg.eval.linear_at_end))
        write_text(history, json.dumps(metrics) + "\n", mode="a")
        log(format_metrics(metrics, epochs))
        improved = metrics.get("knn_top1", float("-inf")) > run["best_knn_top1"]
        if improved:
            run["best_knn_top1"] = metrics["knn_top1"]
        state = {**trainer.state_dict(), "run": run}
        if last or trainer.epoch % cfg.training.checkpoint_every == 0:
            save_checkpoint(state, ckpt_dir / "last.pt")
        if improved:
            save_checkpoint(state, ckpt_dir / "best.pt")
    if "knn_top1" not in metrics:  # resumed a finished run: report its encoder again
        metrics.update(trainer.evaluate(linear=cfg.eval.linear_at_end))
    return {**metrics, **run, "output_dir": str(out), "best_checkpoint": str(ckpt_dir / "best.pt")}
