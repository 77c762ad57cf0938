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
parameter is then sampled only for the methods whose section has that key. With
``objectives`` (two or more ``{metric, mode}``, the first being ``metric``/``mode``) the
sweep is multi-objective; ``searcher.storage`` places its Optuna study (see
:mod:`raymix.integrations.study`). Loading
checks every key against the config, every distribution, the metric(s), and that the
corners of every range and every point to evaluate give a valid config; errors name the
key. Sampling (:func:`sample`) talks to any object with Optuna's ``suggest_*`` methods.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from raymix.config import (
    MAX_COUNT,
    MAX_EPOCHS,
    MAX_SEED,
    METHOD_CONFIGS,
    MUTABLE_KEYS,
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


POPULATION_SCHEDULERS = ("pbt", "pb2")  # Population Based Training (and its bandit variant)
_ASHA_FIELDS = ("grace_period", "reduction_factor", "max_t")
_PBT_FIELDS = (
    "perturbation_interval", "burn_in_period", "quantile_fraction", "resample_probability",
    "perturbation_factors", "synch", "mutations",
)  # fmt: skip


class Scheduler(Section):
    """ASHA (stops poor trials early), Population Based Training (``pbt``: poor trials take a
    better trial's checkpoint and perturbed hyperparameters mid-run; ``pb2``: the same with
    new values picked by a Gaussian-process bandit) or none (every trial runs to the end)."""

    type: Literal["asha", "pbt", "pb2", "none"] = "asha"
    grace_period: int = Field(1, ge=1, le=MAX_EPOCHS, description="asha")
    reduction_factor: float = Field(2.0, gt=1.0, description="asha")
    max_t: int | None = Field(
        None, ge=1, le=MAX_EPOCHS, description="asha; null: the base config's training.epochs"
    )
    perturbation_interval: int = Field(
        2, ge=1, le=MAX_EPOCHS, description="pbt/pb2: epochs between a trial's exploit/explore steps"
    )
    burn_in_period: int = Field(0, ge=0, le=MAX_EPOCHS, description="pbt/pb2: epochs before the first")
    quantile_fraction: float = Field(
        0.25, ge=0.0, le=0.5, description="pbt/pb2: the bottom share clones the top share"
    )
    resample_probability: float = Field(
        0.25, ge=0.0, le=1.0, description="pbt: chance to redraw a value instead of perturbing it"
    )
    perturbation_factors: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = Field(
        (1.2, 0.8), description="pbt: a number is multiplied by one of these (then kept in its range)"
    )
    synch: bool = Field(False, description="pbt/pb2: perturb only when the whole population is there")
    mutations: list[str] | None = Field(
        None,
        description="pbt/pb2: the params that change mid-run; null: every param of the space that "
        "may (raymix.config.MUTABLE_KEYS)",
    )

    @model_validator(mode="after")
    def _own_fields(self) -> Scheduler:
        """A PBT setting on another type, or an ASHA one on pbt/pb2, changed from its default, is refused."""
        defaults = type(self).model_fields
        population = self.type in POPULATION_SCHEDULERS
        for name in _ASHA_FIELDS if population else _PBT_FIELDS:
            if getattr(self, name) != defaults[name].default:
                owner = "pbt/pb2" if name in _PBT_FIELDS else "asha"
                raise ValueError(f"{name} is a setting of type {owner}, not of type {self.type}")
        if self.type == "pb2":  # PB2 picks new values with its bandit, from the params' ranges
            for name in ("resample_probability", "perturbation_factors", "burn_in_period"):
                if getattr(self, name) != defaults[name].default:
                    raise ValueError(f"{name} is a setting of type pbt, not of type pb2")
        return self

    def rungs(self, epochs: int) -> list[int]:
        """The epochs where this scheduler compares or stops trials of ``epochs`` epochs.

        ASHA (one bracket, as Ray's ``ASHAScheduler``) has rungs at ``grace_period * rf**k``
        below ``max_t``, acted on at the first reported epoch at or past each; trials stop
        at ``max_t``. Trials evaluate and checkpoint there, so no decision uses a stale value.
        PBT perturbs at the first epoch past ``burn_in_period`` that is ``perturbation_interval``
        epochs after the start, then every ``perturbation_interval`` epochs: the trials being
        compared there are evaluated, and the checkpoint another trial may take is that epoch's.
        """
        if self.type in POPULATION_SCHEDULERS:
            first = max(self.perturbation_interval, self.burn_in_period)
            return [*range(first, epochs, self.perturbation_interval), epochs] if first < epochs else [epochs]
        if self.type != "asha":
            return []
        max_t = self.max_t or epochs
        count = int(np.log(max_t / self.grace_period) / np.log(self.reduction_factor) + 1)
        marks = {math.ceil(self.grace_period * self.reduction_factor**k) for k in range(count)}
        last = min(max_t, epochs)
        return sorted(e for e in marks | {last} if e <= last)


#: ``searcher.storage`` for a study kept in memory only (nothing for optuna-dashboard to open).
MEMORY_STORAGE = "memory"
JOURNAL_FILE = "optuna.journal"  # the default study storage, in the sweep folder
RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")


class Searcher(Section):
    """Optuna's sampler and the study's storage.

    ``tpe`` (single- or multi-objective), ``nsga2`` (NSGA-II, for ``objectives``; its first
    generation of ``population_size`` trials is random) or ``random``.
    """

    type: Literal["tpe", "nsga2", "random"] = "tpe"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    multivariate: bool = Field(True, description="tpe only")
    n_startup_trials: int = Field(10, ge=0, le=MAX_COUNT, description="tpe only")
    group: bool = Field(
        False, description="tpe with multivariate: model each conditional branch's params apart "
        "(spaces whose params depend on method.name)",
    )  # fmt: skip
    constant_liar: bool = Field(
        False, description="tpe: count running trials as poor results, so concurrent trials spread out"
    )
    population_size: int = Field(50, ge=2, le=MAX_COUNT, description="nsga2 only")
    storage: str | None = Field(
        None,
        description="the Optuna study's storage: null: a journal file <sweep folder>/optuna.journal "
        "(in memory for sweep folders on s3:// and other URIs); an RDB URL (sqlite:///optuna.db, "
        "postgresql://...); a journal file path; or 'memory'",
    )

    @model_validator(mode="after")
    def _group_needs_multivariate(self) -> Searcher:
        if self.group and not self.multivariate:
            raise ValueError("searcher.group=true needs searcher.multivariate=true (Optuna's grouped TPE)")
        return self

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str | None) -> str | None:
        if value is None or value == MEMORY_STORAGE:
            return value
        if not value.strip():
            raise ValueError("empty; leave it out for the sweep folder's journal file")
        if "://" in value:
            scheme = value.split("://", 1)[0].split("+", 1)[0].lower()
            if scheme not in RDB_SCHEMES:
                raise ValueError(
                    f"{scheme}:// is not a database URL Optuna opens (sqlite:///FILE, "
                    "postgresql://..., mysql://...); for a journal file give its local path"
                )
        return value


class Objective(Section):
    metric: str
    mode: Literal["max", "min"]


MAX_TIME_BUDGET_S = 366 * 24 * 3600.0  # a year: more is a typo
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([dhms]?)")
_UNIT_S = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}
DURATION_HELP = "seconds, or a duration such as 90s, 30m, 2h, 1h30m, 1.5d"


def parse_duration(text: str) -> float:
    """Seconds from ``"3600"``, ``"90s"``, ``"30m"``, ``"2h"``, ``"1h30m"``, ``"1.5d"``."""
    compact = text.strip().lower().replace(" ", "")
    parts = list(_DURATION.finditer(compact))
    if (
        not compact
        or "".join(p.group(0) for p in parts) != compact
        or (len(parts) > 1 and not all(p.group(2) for p in parts))
    ):
        raise ValueError(f"{text!r} is not a duration: give {DURATION_HELP}")
    return sum(float(p.group(1)) * _UNIT_S[p.group(2)] for p in parts)


class SearchSpace(Section):
    name: str | None = Field(None, description="null: the file's stem")
    storage_path: str | None = Field(
        None, description="sweep folders go here (a path or URI); null: ./sweeps"
    )
    base: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    metric: str = Field("knn_top1", description="the metric ASHA, checkpoints and the ranking use")
    mode: Literal["max", "min"] = "max"
    objectives: list[Objective] = Field(
        default_factory=list,
        description="two or more {metric, mode}: a multi-objective sweep (a Pareto front); the "
        "first is the sweep's metric and mode",
    )
    num_samples: int = Field(8, ge=1, le=MAX_COUNT)
    max_concurrent_trials: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="null: what the cluster can hold"
    )
    max_failures: int = Field(0, ge=0, le=1000, description="retries of a failed trial")
    gpus_per_trial: float = Field(
        1.0, gt=0.0, le=1.0,
        description="single-worker GPU trials: the share of one GPU each takes (< 1 lets trials share)",
    )  # fmt: skip
    time_budget: float | None = Field(
        None, gt=0, le=MAX_TIME_BUDGET_S,
        description="seconds, or a duration such as 90s, 30m, 2h, 1h30m: then the sweep stops "
        "(running trials are stopped, finished ones kept); null: no limit",
    )  # fmt: skip
    stop: dict[str, float] = Field(
        default_factory=dict,
        description="{metric: value}: the sweep stops once any trial reaches the value of the "
        "sweep's metric (or of an objective), at or above it for mode max, at or below for min",
    )
    scheduler: Scheduler = Scheduler()
    searcher: Searcher = Searcher()
    points_to_evaluate: list[dict[str, Value]] = Field(default_factory=list)
    params: dict[str, Param] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _first_objective(cls, data: Any) -> Any:
        """With ``objectives``, ``metric`` and ``mode`` default to the first one's."""
        objectives = data.get("objectives") if isinstance(data, dict) else None
        if isinstance(objectives, list) and objectives and isinstance(objectives[0], dict):
            first = objectives[0]
            data = {**data}
            for key in ("metric", "mode"):
                if data.get(key) is None and key in first:
                    data[key] = first[key]
        return data

    @property
    def targets(self) -> list[Objective]:
        """What the searcher optimises: the objectives, else the one metric."""
        return list(self.objectives) or [Objective(metric=self.metric, mode=self.mode)]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @field_validator("time_budget", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value

    def stop_modes(self) -> dict[str, str]:
        """The metrics ``stop`` may name, with the direction (mode) they are reached in."""
        return {self.metric: self.mode, **{o.metric: o.mode for o in self.objectives}}

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
    """Metric names every trial reports each epoch (after evaluation), costs included."""
    return {"loss", "knn_top1", *(f"knn_top1_k{k}" for k in cfg.eval.knn_k), *COST_METRICS}


#: What a trained epoch costs, reported with every epoch's metrics (objectives to minimise).
COST_METRICS = ("epoch_seconds", "images_per_second", "encoder_params", "model_params")


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
        allowed = _allowed(cfg)
        raise SearchSpaceError(f"{label}: metric {space.metric!r} is never reported; allowed: {allowed}")
    _check_objectives(space, cfg, label)
    check_stop(space, f"{label}: stop")
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
    if sched.type in POPULATION_SCHEDULERS:
        _check_population(space, cfg, base, label)
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


def check_stop(space: SearchSpace, label: str) -> None:
    """``stop`` names what the sweep optimises, with finite values."""
    modes = space.stop_modes()
    for metric, value in space.stop.items():
        if metric not in modes:
            raise SearchSpaceError(
                f"{label}: {metric} is not what the sweep optimises; allowed: {', '.join(modes)}"
            )
        if not math.isfinite(value):
            raise SearchSpaceError(f"{label}: {metric}={value}: expected a finite number")


#: The space's sweep controls that ``raymix tune`` flags override: field -> flag.
CONTROL_FLAGS = {
    "num_samples": "--num-samples",
    "max_concurrent_trials": "--max-concurrent",
    "gpus_per_trial": "--gpus-per-trial",
    "time_budget": "--time-budget",
    "stop": "--stop",
}


def with_controls(space: SearchSpace, base: dict[str, Any], controls: dict[str, Any]) -> SearchSpace:
    """The space with sweep controls from the command line (:data:`CONTROL_FLAGS`) replacing
    the file's, checked again; errors name the flag."""
    flags = CONTROL_FLAGS
    if not controls:
        return space
    try:
        space = SearchSpace.model_validate({**space.model_dump(), **controls})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        raise SearchSpaceError(
            f"{flags.get(field, field or 'command line')}: {first['msg'].removeprefix('Value error, ')}"
        ) from None
    check_stop(space, flags.get("stop", "stop"))
    check(space, base, "command line")
    return space


def _allowed(cfg: Config) -> str:
    """The reported metrics, for messages: what evaluation and training measure, then costs."""
    return ", ".join([*sorted(reported_metrics(cfg) - set(COST_METRICS)), *COST_METRICS])


def _check_objectives(space: SearchSpace, cfg: Config, label: str) -> None:
    """Two or more distinct reported metrics; ``metric``/``mode`` name the first, if given."""
    objectives = space.objectives
    if not objectives:
        return
    if len(objectives) < 2:
        raise SearchSpaceError(
            f"{label}: objectives: one objective; give two or more, or use metric and mode alone"
        )
    seen: set[str] = set()
    for i, objective in enumerate(objectives):
        if objective.metric not in reported_metrics(cfg):
            allowed = _allowed(cfg)
            raise SearchSpaceError(
                f"{label}: objectives[{i}].metric {objective.metric!r} is never reported; allowed: {allowed}"
            )
        if objective.metric in seen:
            raise SearchSpaceError(f"{label}: objectives[{i}].metric {objective.metric!r} is given twice")
        seen.add(objective.metric)
    first = objectives[0]
    for key, given, wanted in (("metric", space.metric, first.metric), ("mode", space.mode, first.mode)):
        if given != wanted:
            raise SearchSpaceError(
                f"{label}: {key} {given!r} differs from objectives[0].{key} {wanted!r}: with objectives, "
                f"{key} is the first objective's (leave it out)"
            )


def mutable_params(space: SearchSpace, base: dict[str, Any]) -> list[str]:
    """The params a PBT/PB2 sweep changes mid-run: ``scheduler.mutations``, else every param
    of the space in :data:`raymix.config.MUTABLE_KEYS` that applies to the base's method."""
    if space.scheduler.mutations is not None:
        return list(space.scheduler.mutations)
    return [key for key in space.params if key in MUTABLE_KEYS and applies(key, {}, base)]


def _check_population(space: SearchSpace, cfg: Config, base: dict[str, Any], label: str) -> None:
    """PBT/PB2: one method, in-process trials, perturbations inside the run, valid mutations."""
    kind = f"scheduler.type={space.scheduler.type}"
    if cfg.scaling.num_workers != 1 or cfg.scaling.backend == "ray" or cfg.data.loader == "ray":
        raise SearchSpaceError(
            f"{label}: {kind} needs single-worker trials that train in their own process "
            f"(scaling.num_workers=1, scaling.backend not ray, data.loader not ray); got "
            f"scaling.num_workers={cfg.scaling.num_workers}, scaling.backend={cfg.scaling.backend}, "
            f"data.loader={cfg.data.loader}. A Ray Train trial resumes from its own run folder, "
            "not from the checkpoint PBT hands it; use scheduler.type=asha for multi-worker trials"
        )
    if space.objectives:
        raise SearchSpaceError(f"{label}: {kind} ranks trials by one metric; remove objectives")
    if space.max_concurrent_trials is not None:
        raise SearchSpaceError(
            f"{label}: {kind}: max_concurrent_trials: the whole population (num_samples trials) "
            "starts at once and time-shares the cluster when it holds fewer; remove the setting"
        )
    if space.searcher.type == "nsga2" or space.searcher.storage is not None:
        raise SearchSpaceError(
            f"{label}: {kind} draws its population with Tune's random sampling (seeded by "
            "searcher.seed), without Optuna: remove searcher.type=nsga2 and searcher.storage"
        )
    if "method.name" in space.params:
        raise SearchSpaceError(
            f"{label}: {kind}: params.method.name: a population shares one method (a trial may "
            "take another's checkpoint); set method.name in the base config"
        )
    interval, epochs = space.scheduler.perturbation_interval, cfg.training.epochs
    first = max(interval, space.scheduler.burn_in_period)
    if first >= epochs:
        raise SearchSpaceError(
            f"{label}: scheduler.perturbation_interval={interval} (burn_in_period="
            f"{space.scheduler.burn_in_period}) leaves no perturbation before training.epochs="
            f"{epochs}; allowed: perturbation_interval and burn_in_period below {epochs}"
        )
    allowed = [key for key in MUTABLE_KEYS if applies(key, {}, base)]
    mutations = mutable_params(space, base)
    if not mutations:
        raise SearchSpaceError(
            f"{label}: {kind} needs a param that may change mid-run; none of params is one of "
            f"{', '.join(allowed)}"
        )
    for key in mutations:
        if key not in allowed:
            raise SearchSpaceError(
                f"{label}: scheduler.mutations: {key} cannot change mid-run for method "
                f"{cfg.method.name}; allowed: {', '.join(allowed)}"
            )
        if key not in space.params:
            raise SearchSpaceError(f"{label}: scheduler.mutations: {key} is not among params")
        if space.scheduler.type == "pb2" and space.params[key].type == "categorical":
            raise SearchSpaceError(
                f"{label}: scheduler.type=pb2: params.{key} is categorical; PB2 changes numbers "
                "only (use scheduler.type=pbt, or leave the key out of scheduler.mutations)"
            )


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
