"""What a sweep is, before anything runs: its space, base config, folder and name.

The sweep modules import in one direction: :mod:`~raymix.integrations.search_space` ->
this module -> :mod:`~raymix.integrations.leaderboard` and
:mod:`~raymix.integrations.tracking` -> :mod:`~raymix.integrations.sweep` (which runs it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raymix.config import Config, check_name
from raymix.integrations import cluster, ray_train
from raymix.integrations.search_space import SearchSpace, config_for, load_search_space, with_controls


@dataclass(frozen=True)
class Sweep:
    space: SearchSpace
    base: dict[str, Any]
    source: str  # the space file
    storage_path: str
    name: str
    storage_given: bool = True  # False: the local default ./sweeps, refused on multi-node clusters

    @property
    def path(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    @property
    def config(self) -> Config:
        """The base config (what every trial starts from)."""
        return config_for(self.base, {})

    def resolved(self) -> dict[str, Any]:
        """What defines the sweep: the space and its base config (saved as ``sweep.yaml``)."""
        return {"space": self.space.model_dump(mode="json"), "base": self.base}


def prepare(
    space_path: str | Path,
    overrides: list[str] | None = None,
    name: str | None = None,
    num_samples: int | None = None,
    controls: dict[str, Any] | None = None,
) -> Sweep:
    """Load and check the space; resolve the sweep's folder and the data root to absolute paths.

    ``controls`` (and ``num_samples``): sweep controls given on the command line, which
    replace the space file's (:data:`~raymix.integrations.search_space.CONTROL_FLAGS`).
    """
    space, base = load_search_space(space_path, overrides)
    given_controls = {**(controls or {}), **({"num_samples": num_samples} if num_samples is not None else {})}
    space = with_controls(space, base, given_controls)
    cfg = ray_train.absolute_paths(config_for(base, {}))
    if cfg.data.root:
        base = {**base, "data": {**base.get("data", {}), "root": cfg.data.root}}
    given = cluster.storage_override() or space.storage_path
    storage = given or "sweeps"
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    if name is not None:
        stem = check_name(name, "--name")
    elif space.name is not None:
        stem = space.name
    else:
        stem = check_name(Path(space_path).stem, "the space file's stem (set --name)")
    return Sweep(space, base, str(Path(space_path).resolve()), storage, stem, storage_given=bool(given))
