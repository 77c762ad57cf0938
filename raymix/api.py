"""The Python API: :func:`fit` trains one run, :func:`tune` runs a sweep.

These are the functions behind ``raymix train`` and ``raymix tune``; the command line only
parses its arguments and calls them. Importing this module is cheap (the config models
only): torch, Ray, Optuna and MLflow are imported once a run or sweep starts.

Overrides are dotted config keys, given as a mapping (``{"training.epochs": 2}``), as
``key=value`` strings (``["training.epochs=2"]``, values read as YAML, as on the command
line), or as keyword arguments with ``__`` for the dots (``training__epochs=2``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from raymix.config import Config, ConfigError, apply_overrides, apply_values, config_from_dict, read_yaml

if TYPE_CHECKING:
    from raymix.integrations.leaderboard import Board

ConfigLike = str | os.PathLike[str] | Mapping[str, Any] | Config | None
Overrides = Mapping[str, Any] | Sequence[str] | None


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns.

    ``metrics``: the last epoch's metrics (``knn_top1``, ``knn_top1_init``, ``loss``,
    ``epoch``, ...); ``output_dir``: the run's folder (``config.yaml``, ``metrics.jsonl``,
    checkpoints); ``best_checkpoint``: the checkpoint with the best ``knn_top1``;
    ``backend``: ``local`` (in this process) or ``ray`` (Ray Train workers).
    """

    metrics: dict[str, Any]
    output_dir: Path
    best_checkpoint: Path
    config: Config
    backend: Literal["local", "ray"] = "local"


def _dotted(overrides: Overrides, keywords: Mapping[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """(``key=value`` strings, dotted key -> value) from both ways of giving overrides."""
    strings: list[str] = []
    values: dict[str, Any] = {}
    if isinstance(overrides, str):
        strings = [overrides]
    elif isinstance(overrides, Mapping):
        values = {str(key): value for key, value in overrides.items()}
    elif overrides is not None:
        strings = [str(item) for item in overrides]
    for key, value in keywords.items():
        values[key.replace("__", ".")] = value
    return strings, values


def resolve_config(config: ConfigLike = None, overrides: Overrides = None, **keywords: Any) -> Config:
    """A validated :class:`Config` from a YAML path, a nested dict, a Config or None (the
    defaults), with overrides applied. Raises :class:`ConfigError` naming a bad key."""
    if config is None:
        raw: dict[str, Any] = {}
    elif isinstance(config, Config):
        raw = config.to_dict()
    elif isinstance(config, Mapping):
        raw = dict(config)
    elif isinstance(config, (str, os.PathLike)):
        raw = read_yaml(Path(config))
    else:
        raise ConfigError(
            f"config: expected a YAML path, a dict or a raymix Config, got {type(config).__name__}"
        )
    strings, values = _dotted(overrides, keywords)
    return config_from_dict(apply_values(apply_overrides(raw, strings), values))


def uses_ray(cfg: Config) -> bool:
    """``scaling.backend=auto``: Ray Train for several workers, when a cluster is named or
    when Ray Data decodes the images (``data.loader=ray``)."""
    backend = cfg.scaling.backend
    return backend == "ray" or (
        backend == "auto"
        and (cfg.scaling.num_workers > 1 or "RAY_ADDRESS" in os.environ or cfg.data.loader == "ray")
    )


def fit(
    config: ConfigLike = None,
    overrides: Overrides = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    **keywords: Any,
) -> FitResult:
    """Train one run, as ``raymix train`` does; returns its final metrics and folder.

    ``config``: a YAML file, a nested dict of sections, a :class:`raymix.config.Config`, or
    None for the defaults. ``overrides``: dotted keys as a mapping or ``key=value``
    strings; keyword arguments are dotted keys with ``__`` for the dots. Running the same
    run again resumes it from its latest checkpoint in ``training.output_dir``. With
    ``scaling.num_workers > 1`` (or ``RAY_ADDRESS`` set) the run uses Ray Train.

    Raises :class:`raymix.config.ConfigError` for bad input (before anything is written)
    and :class:`raymix.errors.RunFailedError` for a run that fails.

    Example::

        import raymix

        result = raymix.fit(
            "launch/experiments/digits.yaml",
            {"training.epochs": 2},
            backbone__name="vit_micro",
        )
        print(result.metrics["knn_top1"], result.output_dir)
    """
    cfg = resolve_config(config, overrides, **keywords)
    if uses_ray(cfg):
        from raymix.integrations.ray_train import run

        out = run(cfg, log=log)
        backend: Literal["local", "ray"] = "ray"
    else:
        from raymix.engine.run import fit as fit_here

        out = fit_here(cfg, log=log, progress=progress)
        backend = "local"
    out = dict(out)
    output_dir = Path(out.pop("output_dir", cfg.output_dir))
    best = Path(out.pop("best_checkpoint", output_dir / "checkpoints" / "best.pt"))
    return FitResult(metrics=out, output_dir=output_dir, best_checkpoint=best, config=cfg, backend=backend)


def tune(
    space: str | os.PathLike[str],
    overrides: Overrides = None,
    *,
    name: str | None = None,
    resume: bool = False,
    num_samples: int | None = None,
    max_concurrent_trials: int | None = None,
    gpus_per_trial: float | None = None,
    time_budget: float | str | None = None,
    stop: Mapping[str, float] | None = None,
    optuna_storage: str | None = None,
    log: Callable[[str], None] = print,
    **keywords: Any,
) -> Board:
    """Run the sweep of the search-space YAML ``space``, as ``raymix tune`` does; returns its
    leaderboard (:class:`raymix.integrations.leaderboard.Board`: ``best_row()``,
    ``best_config()``, ``format()``, ``path``).

    ``overrides`` and keyword arguments change the space's base config, as for :func:`fit`.
    The other options replace the space's own keys of the same name (``time_budget``:
    seconds or a duration such as ``"30m"``; ``stop``: metric -> value that ends the sweep);
    ``resume`` continues an interrupted sweep of the same ``name``.

    Example::

        import raymix

        board = raymix.tune("search_spaces/quickstart.yaml", {"training.epochs": 2}, num_samples=4)
        print(board.format())
        print(board.best_config())
    """
    from raymix.integrations.sweep import run_sweep

    if time_budget is not None and not isinstance(time_budget, (int, float)):
        from raymix.integrations.search_space import DURATION_HELP, parse_duration

        try:
            time_budget = parse_duration(str(time_budget))
        except ValueError:
            raise ConfigError(f"time_budget {time_budget!r}: expected {DURATION_HELP}") from None
    given = {
        "num_samples": num_samples,
        "max_concurrent_trials": max_concurrent_trials,
        "gpus_per_trial": gpus_per_trial,
        "time_budget": time_budget,
        "stop": dict(stop) if stop is not None else None,
    }
    controls = {key: value for key, value in given.items() if value is not None}
    strings, values = _dotted(overrides, keywords)
    strings += [f"{key}={_yaml(value)}" for key, value in values.items()]
    return run_sweep(
        Path(space),
        strings,
        name=name,
        resume=resume,
        optuna_storage=optuna_storage,
        controls=controls,
        log=log,
    )


def _yaml(value: Any) -> str:
    """A value as the YAML text of a ``key=value`` override (flow style, one line)."""
    import yaml

    return str(yaml.safe_dump(value, default_flow_style=True, width=1 << 30)).strip().removesuffix("\n...")
