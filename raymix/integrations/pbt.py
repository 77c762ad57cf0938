"""Population Based Training sweeps (``scheduler: {type: pbt}`` or ``pb2``) with Ray Tune.

A PBT sweep trains ``num_samples`` trials together. Every ``perturbation_interval``
epochs each trial is ranked by the sweep's metric: one in the bottom ``quantile_fraction``
stops, takes the checkpoint of a trial in the top share and goes on from there with that
trial's hyperparameters, perturbed (PBT: each number multiplied by one of
``perturbation_factors`` or, with ``resample_probability``, drawn again; a categorical
value moved to a neighbouring choice or drawn again. PB2: numbers picked by a
Gaussian-process bandit over the population's progress). Only the params that may change
mid-run (:data:`raymix.config.MUTABLE_KEYS`) are perturbed; the others keep the value the
trial was started with (copied from the trial it clones).

Tune's PBT refuses search algorithms: the population is drawn by Tune's own random
sampling (``BasicVariantGenerator`` seeded with ``searcher.seed``) from the space's params
converted to Tune domains (:func:`domain`). Explored values are put back into each
param's range (and onto its step) by :class:`KeepInRange`, so every config stays valid.
Each epoch a trial reports the values it trains with as ``hp/<key>`` metrics: the
schedule PBT found is in the trial's results and its MLflow metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.sample import Domain

from raymix.config import Config, ConfigError
from raymix.engine.run import flatten
from raymix.integrations.plan import Sweep
from raymix.integrations.search_space import (
    POPULATION_SCHEDULERS,
    Param,
    SearchSpace,
    encode_point,
    mutable_params,
)

HP_PREFIX = "hp/"  # the metrics holding a trial's current values of the mutated params
MAX_GRID = 10_000  # a param with a step is drawn from its grid of values up to this size


def enabled(space: SearchSpace) -> bool:
    """Whether the sweep is a PBT or PB2 sweep."""
    return space.scheduler.type in POPULATION_SCHEDULERS


def _grid(param: Param) -> list[float] | None:
    assert param.low is not None and param.high is not None and param.step is not None
    count = math.floor((param.high - param.low) / param.step + 1e-9) + 1
    if count > MAX_GRID:
        return None
    cast = int if param.type == "int" else float
    return [cast(param.low + k * param.step) for k in range(count)]


def domain(param: Param) -> Domain:
    """A param as a Tune domain with the same values as Optuna's distribution."""
    if param.type == "categorical":
        return tune.choice(list(param.choices or []))
    assert param.low is not None and param.high is not None
    if param.step is not None and (grid := _grid(param)) is not None:
        return tune.choice(grid)  # low + k * step, as Optuna (Tune's q* round to multiples of q)
    if param.type == "int":
        low, high = int(param.low), int(param.high)
        if param.log:
            return tune.lograndint(low, high + 1)  # upper bound exclusive
        if param.step is not None:  # a grid too large to list
            return tune.qrandint(low, high, int(param.step))
        return tune.randint(low, high + 1)
    if param.log:
        return tune.loguniform(param.low, param.high)
    if param.step is not None:
        return tune.quniform(param.low, param.high, param.step)
    return tune.uniform(param.low, param.high)


def param_space(sweep: Sweep) -> dict[str, Any] | None:
    """The Tuner's ``param_space`` of a PBT/PB2 sweep (flat dotted keys); None otherwise
    (Optuna's define-by-run space samples the points)."""
    if not enabled(sweep.space):
        return None
    return {key: domain(param) for key, param in sweep.space.params.items()}


def variants(sweep: Sweep) -> BasicVariantGenerator:
    """The population: ``num_samples`` points drawn at random with ``searcher.seed``, after the
    ``points_to_evaluate``; all created at once (PBT time-shares the cluster among them)."""
    space = sweep.space
    points = [encode_point(space, p) for p in space.points_to_evaluate]
    return BasicVariantGenerator(points_to_evaluate=points or None, random_state=space.searcher.seed)


@dataclass(frozen=True)
class KeepInRange:
    """PBT's ``custom_explore_fn``: a perturbed number back into its param's range and onto
    its step, as a plain int or float (a class, not a closure: Tune pickles the scheduler)."""

    params: dict[str, Param]
    keys: tuple[str, ...]

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        out = dict(config)
        for key in self.keys:
            param = self.params[key]
            if param.type == "categorical":
                continue
            assert param.low is not None and param.high is not None
            value = min(max(float(out[key]), param.low), param.high)
            if param.step is not None:
                value = param.low + round((value - param.low) / param.step) * param.step
                value = min(value, param.high)
            out[key] = int(round(value)) if param.type == "int" else float(value)
        return out


def mutations(sweep: Sweep) -> dict[str, Any]:
    """PBT's ``hyperparam_mutations``: a domain per number (perturbed by a factor or drawn
    again), the list of choices per categorical (moved to a neighbour or drawn again)."""
    params = sweep.space.params
    return {
        key: list(params[key].choices or []) if params[key].type == "categorical" else domain(params[key])
        for key in mutable_params(sweep.space, sweep.base)
    }


class _BeforeTheEnd:
    """Perturbs only before the last epoch: at the last one, Tune's PBT would stop a finished
    trial and start it again from another trial's final checkpoint, to train nothing."""

    last_epoch: int

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if int(result.get("epoch", 0)) >= self.last_epoch:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)  # type: ignore[misc]


class RaymixPBT(_BeforeTheEnd, PopulationBasedTraining):
    """Tune's PBT that leaves the last epoch alone."""

    def __init__(self, last_epoch: int, **kwargs: Any) -> None:
        self.last_epoch = last_epoch
        super().__init__(**kwargs)


_PB2_CLASS: list[type] = []


def __getattr__(name: str) -> Any:
    """``RaymixPB2``, made on first use: importing PB2 imports scikit-learn (seconds), which
    only PB2 sweeps need. A module attribute all the same, so Tune can pickle the scheduler."""
    if name != "RaymixPB2":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not _PB2_CLASS:
        from ray.tune.schedulers.pb2 import PB2

        def __init__(self: Any, last_epoch: int, **kwargs: Any) -> None:
            self.last_epoch = last_epoch
            PB2.__init__(self, **kwargs)

        cls = type("RaymixPB2", (_BeforeTheEnd, PB2), {"__init__": __init__, "__module__": __name__})
        cls.__doc__ = "Tune's PB2 that leaves the last epoch alone."
        _PB2_CLASS.append(cls)
    return _PB2_CLASS[0]


def scheduler(sweep: Sweep) -> PopulationBasedTraining:
    """Tune's PBT (or PB2) over the space's mutable params; metric and mode come from TuneConfig."""
    space = sweep.space
    s = space.scheduler
    if space.num_samples < 2:
        raise ConfigError(
            f"scheduler.type={s.type} needs a population: num_samples={space.num_samples}; allowed: 2 or more"
        )
    if space.searcher.storage is not None:  # given by --optuna-storage after the space was checked
        raise ConfigError(f"scheduler.type={s.type} keeps no Optuna study: leave out --optuna-storage")
    keys = tuple(mutable_params(space, sweep.base))
    explore = KeepInRange(dict(space.params), keys)
    common: dict[str, Any] = {
        "last_epoch": sweep.config.training.epochs,
        "time_attr": "epoch",
        "perturbation_interval": s.perturbation_interval,
        "quantile_fraction": s.quantile_fraction,
        "custom_explore_fn": explore,
        "log_config": True,  # pbt_global.txt and pbt_policy_<trial>.txt in the sweep folder
        "synch": s.synch,
    }
    if s.type == "pb2":
        bounds: dict[str, Any] = {key: [space.params[key].low, space.params[key].high] for key in keys}
        pb2: PopulationBasedTraining = __getattr__("RaymixPB2")(hyperparam_bounds=bounds, **common)
        return pb2
    return RaymixPBT(
        hyperparam_mutations=mutations(sweep),
        burn_in_period=s.burn_in_period,
        resample_probability=s.resample_probability,
        perturbation_factors=s.perturbation_factors,
        **common,
    )


def trial_values(cfg: Config, space: SearchSpace, base: dict[str, Any]) -> dict[str, Any]:
    """``hp/<key>``: the values of the mutated params a PBT/PB2 trial trains with now
    (booleans as 0/1, for MLflow); empty for other sweeps."""
    if not enabled(space):
        return {}
    flat = flatten(cfg.to_dict())
    return {
        f"{HP_PREFIX}{key}": float(v) if isinstance(v := flat[key], bool) else v
        for key in mutable_params(space, base)
    }


def describe(sweep: Sweep) -> str:
    """One line for the sweep's log: the population, its schedule and what changes mid-run."""
    space = sweep.space
    s = space.scheduler
    first = max(s.perturbation_interval, s.burn_in_period)
    return (
        f"{s.type.upper()}: a population of {space.num_samples} drawn at random (searcher.seed="
        f"{space.searcher.seed}; no Optuna study), perturbed at epoch {first} and every "
        f"{s.perturbation_interval} epochs after: {', '.join(mutable_params(space, sweep.base))}"
    )
