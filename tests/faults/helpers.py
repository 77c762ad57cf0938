"""Helpers of the fault-injection suite: tiny runs, the CLI in a process, private mounts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[2]
DIGITS = ROOT / "launch" / "experiments" / "digits.yaml"
# A run of about a second an epoch on 2 cores: digits at 16 px, a one-block ViT.
TINY = [
    "data.image_size=16", "backbone.patch_size=8", "backbone.depth=1", "head.hidden_dim=32",
    "head.out_dim=16", "training.batch_size=64", "training.progress=false", "eval.knn_k=[20]",
]  # fmt: skip


def raymix(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``raymix ARGS`` in a new process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "raymix", *args], cwd=cwd, env=env or dict(os.environ),
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def one_line(proc: subprocess.CompletedProcess) -> bool:
    """The refusal is one line on stderr (no traceback)."""
    err = proc.stderr.strip()
    return err.startswith("raymix: error:") and "\n" not in err


def namespace_runner() -> list[str] | None:
    """A prefix that runs a shell script in its own mount namespace, where it may mount a tmpfs
    (a small disk that fills up, a read-only one); None where the machine does not allow it."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    for prefix in ([unshare, "-m"], [unshare, "-rm"]):
        probe = subprocess.run(
            [*prefix, "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d"],
            capture_output=True,
        )
        if probe.returncode == 0:
            return prefix
    return None


def space_file(tmp_path: Path, stem: str, **fields: object) -> Path:
    """A small sweep of the tiny run: trials one at a time, no scheduler, 2 epochs."""
    import yaml

    overrides = dict(item.split("=", 1) for item in TINY)
    space = {
        "base": str(DIGITS),
        "overrides": {
            **{k: yaml.safe_load(v) for k, v in overrides.items()},
            "training.epochs": 2, "optim.lr_scaling": "none", "optim.warmup_epochs": 0,
            "scaling.cpus_per_worker": 1.0,
        },
        "storage_path": str(tmp_path / "sweeps"),
        "num_samples": 1,
        "max_concurrent_trials": 1,
        "scheduler": {"type": "none"},
        "searcher": {"type": "random", "seed": 0},
        "params": {"optim.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}},
        **fields,
    }  # fmt: skip
    path = tmp_path / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def alive_in_session(sid: int) -> list[int]:
    """Processes of a session that are still running (zombies are dead: they only await reaping)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def sweep_runs(uri: str) -> tuple[Any, list, list]:
    """(client, parent runs, trial runs) of the raymix experiment in an MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("raymix")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children
