"""Search spaces as data: a YAML file that names a base config, the metric and budget, and
``params`` keyed by dotted config paths in Optuna's vocabulary.

::

    base: launch/experiments/digits.yaml     # a config file (relative to the space file) ...
    overrides: {training.epochs: 6}          # ... refined by dotted overrides
    metric: knn_top1
    mode: max
    num_samples: 8
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
    searcher: {type: tpe, seed: 0, multivariate: true, n_startup_trials: 4}
    points_to_evaluate: [{method.temperature: 0.2}]
    params:
      method.temperature: {type: float, low: 0.1, high: 0.3, log: true}
      method.queue_size: {type: categorical, choices: [0, 4096]}

A space may search across methods with a categorical ``method.name``: a ``method.*``
parameter is then sampled only for the methods whose section has that key. Loading
checks every key against the config, every distribution, the metric, and that the
corners of every range and every point to evaluate give a valid config; errors name the
key. Sampling (:func:`sample`) talks to any object with Optuna's ``suggest_*`` methods.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, Field, ValidationError, model_validator

from raymix.config import (
    MAX_COUNT,
    MAX_EPOCHS,
    MAX_SEED,
    METHOD_CONFIGS,
    Config,
    ConfigError,
    Section,
    apply_overrides,
    apply_values,
    check_name,
    config_from_dict,
    read_yaml,
)

Value = Any  # a number, string, boolean, null, or a list of them (e.g. a crop range)


class Param(Section):
    """One distribution, in Optuna's words."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    choices: list[Value] | None = None

    @model_validator(mode="after")
    def _shape(self) -> Param:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty 'choices' list")
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("categorical takes only 'choices'")
            return self
        if self.choices is not None:
            raise ValueError(f"{self.type} takes low/high, not 'choices'")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs 'low' and 'high'")
        if self.low > self.high:
            raise ValueError(f"low={self.low:g} is greater than high={self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got low={self.low:g}")
        if self.log and self.step is not None:
            raise ValueError("'log' and 'step' cannot be combined (as in Optuna)")
        if self.type == "int" and not all(
            float(v).is_integer() for v in (self.low, self.high, self.step or 1)
        ):
            raise ValueError("int needs integer low, high and step")
        return self

    def corners(self) -> list[Value]:
        """The values that bound what sampling can return."""
        if self.type == "categorical":
            return list(self.choices or [])
        assert self.low is not None and self.high is not None
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]


class Scheduler(Section):
    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1, le=MAX_EPOCHS)
    reduction_factor: float = Field(2.0, gt=1.0)
    max_t: int | None = Field(
        None, ge=1, le=MAX_EPOCHS, description="null: the base config's training.epochs"
    )

    def rungs(self, epochs: int) -> list[int]:
        """The epochs where this scheduler compares or stops trials of ``epochs`` epochs.

        ASHA (one bracket, as Ray's ``ASHAScheduler``) has rungs at ``grace_period * rf**k``
        below ``max_t``, acted on at the first reported epoch at or past each; trials stop
        at ``max_t``. Trials evaluate and checkpoint there, so no decision uses a stale value.
        """
        if self.type != "asha":
            return []
        max_t = self.max_t or epochs
        count = int(np.log(max_t / self.grace_period) / np.log(self.reduction_factor) + 1)
        marks = {math.ceil(self.grace_period * self.reduction_factor**k) for k in range(count)}
        last = min(max_t, epochs)
        return sorted(e for e in marks | {last} if e <= last)


class Searcher(Section):
    type: Literal["tpe", "random"] = "tpe"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    multivariate: bool = True
    n_startup_trials: int = Field(10, ge=0, le=MAX_COUNT)


class SearchSpace(Section):
    name: str | None = Field(None, description="null: the file's stem")
    storage_path: str | None = Field(
        None, description="sweep folders go here (a path or URI); null: ./sweeps"
    )
    base: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    metric: str = "knn_top1"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(8, ge=1, le=MAX_COUNT)
    max_concurrent_trials: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="null: what the cluster can hold"
    )
    max_failures: int = Field(0, ge=0, le=1000, description="retries of a failed trial")
    gpus_per_trial: float = Field(
        1.0, gt=0.0, le=1.0,
        description="single-worker GPU trials: the share of one GPU each takes (< 1 lets trials share)",
    )  # fmt: skip
    scheduler: Scheduler = Scheduler()
    searcher: Searcher = Searcher()
    points_to_evaluate: list[dict[str, Value]] = Field(default_factory=list)
    params: dict[str, Param] = Field(min_length=1)

    @model_validator(mode="after")
    def _single_folder(self) -> SearchSpace:
        if self.name is not None:
            check_name(self.name, "name")
        return self


class SearchSpaceError(ConfigError):
    """A search space that raymix refuses."""


class Suggester(Protocol):
    """The part of ``optuna.trial.Trial`` that sampling needs."""

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = ..., log: bool = ...
    ) -> float: ...

    def suggest_int(self, name: str, low: int, high: int, *, step: int = ..., log: bool = ...) -> int: ...

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


# ---------------------------------------------------------------- loading


def _config_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= _config_keys(annotation, f"{prefix}{name}.")
        elif name != "method" or prefix:
            keys.add(f"{prefix}{name}")
    return keys


def method_keys() -> dict[str, set[str]]:
    """For each method, the dotted ``method.*`` keys its section accepts."""
    return {name: {f"method.{k}" for k in cls.model_fields} for name, cls in METHOD_CONFIGS.items()}


CONFIG_KEYS = _config_keys(Config) | set().union(*method_keys().values())


def reported_metrics(cfg: Config) -> set[str]:
    """Metric names every trial reports each epoch (after evaluation)."""
    return {"loss", "knn_top1", *(f"knn_top1_k{k}" for k in cfg.eval.knn_k)}


def _base_dict(space: SearchSpace, folder: Path) -> dict[str, Any]:
    raw = read_yaml(folder / space.base) if space.base else {}
    return apply_values(raw, space.overrides)


def applies(key: str, point: dict[str, Value], base: dict[str, Any]) -> bool:
    """Whether ``key`` is sampled for a point: ``method.*`` keys only for methods that have them."""
    if not key.startswith("method.") or key == "method.name":
        return True
    name = point.get("method.name", (base.get("method") or {}).get("name", Config().method.name))
    return key in method_keys().get(str(name), set())


def config_for(base: dict[str, Any], point: dict[str, Value]) -> Config:
    """The validated config of one sampled point."""
    return config_from_dict(apply_values(base, point))  # a new method.name drops the old method's keys


def trial_config(point: dict[str, Value], space: dict[str, Any], base: dict[str, Any]) -> Config:
    """The config of one trial from the searcher's point, the dumped space and the base."""
    return config_for(base, decode_point(SearchSpace.model_validate(space), point))


def load_search_space(
    path: str | Path, overrides: list[str] | None = None
) -> tuple[SearchSpace, dict[str, Any]]:
    """Read and check a space file; returns the space and its base config as a dict.

    ``overrides`` (``key=value``) refine the base config after the file's own overrides.
    """
    path = Path(path)
    if not path.is_file():
        raise SearchSpaceError(f"search space {str(path)!r} does not exist")
    raw = read_yaml(path)
    try:
        space = SearchSpace.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SearchSpaceError(
            f"{path.name}: {where}: {first['msg'].removeprefix('Value error, ')}"
        ) from None
    base = apply_overrides(_base_dict(space, path.parent), overrides or [])
    check(space, base, path.name)
    return space, base


def check(space: SearchSpace, base: dict[str, Any], label: str = "search space") -> None:
    """Every key exists, the metric is reported, and the corners and given points validate."""
    for key in space.params:
        if key not in CONFIG_KEYS:
            raise SearchSpaceError(f"{label}: params.{key}: no such config key")
    try:
        cfg = config_from_dict(base)
    except ConfigError as exc:
        raise SearchSpaceError(f"{label}: base config: {exc}") from None
    if space.metric not in reported_metrics(cfg):
        allowed = ", ".join(sorted(reported_metrics(cfg)))
        raise SearchSpaceError(f"{label}: metric {space.metric!r} is never reported; allowed: {allowed}")
    if space.gpus_per_trial < 1 and cfg.scaling.num_workers > 1:
        raise SearchSpaceError(
            f"{label}: gpus_per_trial={space.gpus_per_trial:g} needs scaling.num_workers=1; "
            "workers of one trial each take a whole GPU"
        )
    sched = space.scheduler
    max_t = sched.max_t or cfg.training.epochs
    if sched.type == "asha" and sched.grace_period > max_t:
        source = "scheduler.max_t" if sched.max_t else "training.epochs"
        raise SearchSpaceError(
            f"{label}: scheduler.grace_period={sched.grace_period} exceeds {source}={max_t}; "
            "ASHA needs grace_period <= max_t (lower grace_period, or use scheduler.type=none)"
        )
    methods = space.params.get("method.name")
    names = methods.corners() if methods else [cfg.method.name]
    for key, param in space.params.items():
        for value in param.corners():
            for name in names:
                point: dict[str, Value] = {"method.name": name} if methods else {}
                if not applies(key, point, base):
                    continue
                _validate(base, {**point, key: value}, f"{label}: params.{key}={value!r}")
    for i, point in enumerate(space.points_to_evaluate):
        for key in point:
            if key not in space.params:
                raise SearchSpaceError(f"{label}: points_to_evaluate[{i}].{key} is not among params")
        _validate(base, point, f"{label}: points_to_evaluate[{i}]")


def _validate(base: dict[str, Any], point: dict[str, Value], where: str) -> None:
    try:
        config_for(base, point)
    except ConfigError as exc:
        raise SearchSpaceError(f"{where}: {exc}") from None


# ---------------------------------------------------------------- sampling

# Optuna's categorical choices are scalars; a list choice (e.g. a crop range) travels as JSON.


def _scalar(value: Value) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def encoded_choices(param: Param) -> list[Value]:
    return [c if _scalar(c) else json.dumps(c) for c in param.choices or []]


def encode_point(space: SearchSpace, point: dict[str, Value]) -> dict[str, Value]:
    """A point as the searcher sees it (list choices as JSON strings)."""
    out = dict(point)
    for key, value in point.items():
        param = space.params.get(key)
        if param is not None and param.type == "categorical" and not _scalar(value):
            out[key] = json.dumps(value)
    return out


def decode_point(space: SearchSpace, point: dict[str, Value]) -> dict[str, Value]:
    """The inverse of :func:`encode_point`: config values."""
    out = dict(point)
    for key, value in point.items():
        param = space.params.get(key)
        if param is not None and param.type == "categorical" and value not in (param.choices or []):
            out[key] = json.loads(value)
    return out


def sample(trial: Suggester, space: SearchSpace, base: dict[str, Any]) -> dict[str, Value]:
    """Draw one point, define-by-run: ``method.name`` first, then the keys that apply to it.

    The point is in the searcher's encoding: pass it through :func:`decode_point`.
    """
    point: dict[str, Value] = {}
    ordered = sorted(space.params, key=lambda k: k != "method.name")
    for key in ordered:
        if not applies(key, point, base):
            continue
        p = space.params[key]
        if p.type == "categorical":
            point[key] = trial.suggest_categorical(key, encoded_choices(p))
        elif p.type == "int":
            assert p.low is not None and p.high is not None
            point[key] = trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            assert p.low is not None and p.high is not None
            point[key] = trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)
    return point
