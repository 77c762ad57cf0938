"""Checkpoint files: written atomically, read without running code, checked on the way in.

A crash or a full disk never leaves a half-written checkpoint in place of the last good
one: the state goes to a temporary file in the same folder, which replaces the old file
only once it is complete and synced. Reading uses ``torch.load(weights_only=True)``: a
checkpoint holds tensors and plain values (numbers, strings, lists, dicts) and nothing
else, so a crafted file cannot execute code when it is loaded.
"""

from __future__ import annotations

import errno
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from raymix.config import ConfigError

# What every state written by Trainer.state_dict holds.
REQUIRED_KEYS = ("config", "method", "optimizer", "epoch", "step", "rng")


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be used: damaged, foreign, or holding code."""


class StorageError(ConfigError):
    """A run folder that cannot be written: read-only, missing permission, or a full disk."""


def storage_error(exc: OSError, path: str | Path) -> StorageError:
    """One line for an OSError met while writing ``path``."""
    if exc.errno == errno.ENOSPC:
        return StorageError(f"no space left on device writing {path}")
    if exc.errno == errno.EDQUOT:
        return StorageError(f"disk quota exceeded writing {path}")
    return StorageError(f"cannot write to {path}: {exc.strerror or exc}")


def check_writable(folder: str | Path, key: str) -> None:
    """Create ``folder`` if needed and write a file in it; :class:`StorageError` naming ``key`` if not."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise StorageError(f"{key}: {storage_error(exc, folder)}") from None


def first_missing(path: str | Path) -> Path | None:
    """The outermost folder of a local ``path`` that does not exist yet (None: it exists, or a URI).

    What to remove to leave no trace when a run or sweep that created ``path`` is refused.
    """
    if "://" in str(path):
        return None
    missing = None
    for folder in [Path(path), *Path(path).parents]:
        if folder.exists():
            break
        missing = folder
    return missing


class _File:
    """A file object for ``torch.save`` that keeps the OSError of a failed write.

    torch's writer turns a failed write into "unexpected pos ..."; the saved error says what
    really happened (a full disk, say).
    """

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return int(self.raw.write(data))
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.raw.flush()


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` via a temporary file in the same folder and a rename.

    On failure the previous file at ``path`` is untouched, the temporary file is removed,
    and an OSError becomes a one-line :class:`StorageError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise storage_error(exc, path) from None
    file = None
    try:
        with os.fdopen(fd, "wb") as raw:
            file = _File(raw)
            torch.save(state, file)  # type: ignore[arg-type]
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        cause = exc if isinstance(exc, OSError) else getattr(file, "error", None)
        if isinstance(cause, OSError):
            raise storage_error(cause, path) from None
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state saved at ``path``, loaded without unpickling objects (``weights_only``).

    Raises :class:`CheckpointError` (one line naming the file) for a missing, truncated or
    foreign file and for one that holds anything but tensors and plain values.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain values; refused unread "
            "(loading it could run code). raymix checkpoints never do"
        ) from None
    except Exception as exc:  # torch's readers fail in many ways on bytes that are not theirs
        text = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else ""
        reason = text if len(text) >= 12 else type(exc).__name__  # a bare key or number says nothing
        raise CheckpointError(f"checkpoint {path} is damaged or not a torch file ({reason[:200]})") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
        raise CheckpointError(
            f"checkpoint {path} is not a raymix checkpoint (no {', '.join(repr(k) for k in missing)})"
        )
    return state
