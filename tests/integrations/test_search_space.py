"""Search spaces: loading, the errors that name the key, and sampled points that validate."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml

from raymix.integrations.search_space import (
    Scheduler,
    SearchSpaceError,
    applies,
    config_for,
    decode_point,
    encode_point,
    load_search_space,
    sample,
)

SPACES = sorted(Path(__file__).parents[2].joinpath("search_spaces").glob("*.yaml"))
DIGITS = Path(__file__).parents[2] / "launch" / "experiments" / "digits.yaml"


def floats(low, high=None, **extra):
    bounds = {"low": low} if high is None else {"low": low, "high": high}
    return {"type": "float", **bounds, **extra}


def choices(*values):
    return {"type": "categorical", "choices": list(values)}


def write(tmp_path: Path, **fields) -> Path:
    space = {"base": str(DIGITS), "params": {"method.temperature": floats(0.1, 0.3)}}
    space.update(fields)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_every_shipped_space_loads_and_samples_valid_configs(path: Path):
    space, base = load_search_space(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        encoded = sample(trial, space, base)
        assert all(v is None or isinstance(v, bool | int | float | str) for v in encoded.values())
        point = decode_point(space, encoded)
        assert encode_point(space, point) == encoded
        # Every parameter that applies to the sampled method, and no other.
        assert set(point) == {k for k in space.params if applies(k, point, base)}
        assert "method.name" not in space.params or len(point) < len(space.params)
        cfg = config_for(base, point)
        for key, value in point.items():
            section, name = key.split(".", 1)
            got = getattr(getattr(cfg, section), name)
            assert (list(got) if isinstance(got, tuple) else got) == value
        study.tell(trial, 0.0)


def test_quickstart_space_values():
    space, base = load_search_space(SPACES[[p.stem for p in SPACES].index("quickstart")])
    assert space.metric == "knn_top1" and space.mode == "max"
    assert base["training"]["epochs"] == 8 and base["data"]["name"] == "digits"
    first = config_for(base, space.points_to_evaluate[0])
    assert first.method.temperature == 0.2 and first.augment.crop_scale == (0.5, 1.0)


def test_int_and_step_distributions_sample_in_range(tmp_path):
    params = {
        "training.batch_size": {"type": "int", "low": 32, "high": 128, "step": 32},
        "method.queue_size": choices(0, 256),
        "optim.weight_decay": {"type": "float", "low": 0.0, "high": 0.1, "step": 0.05},
    }
    space, base = load_search_space(write(tmp_path, params=params))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = [sample(study.ask(), space, base) for _ in range(30)]
    assert {p["training.batch_size"] for p in seen} <= {32, 64, 96, 128}
    assert {p["optim.weight_decay"] for p in seen} <= {0.0, 0.05, 0.1}


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"params": {"method.tau": {"type": "float", "low": 0.1, "high": 0.2}}},
            "params.method.tau: no such config key",
        ),
        ({"params": {"optim.name": {"type": "categorical", "choices": []}}}, "non-empty 'choices'"),
        (
            {"params": {"optim.lr": {"type": "float", "low": 0.2, "high": 0.1}}},
            "low=0.2 is greater than high=0.1",
        ),
        (
            {"params": {"optim.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}},
            "log scale needs low > 0",
        ),
        ({"params": {"optim.lr": {"type": "float", "low": 0.1}}}, "needs 'low' and 'high'"),
        ({"metric": "accuracy"}, "metric 'accuracy' is never reported; allowed: knn_top1"),
        (
            {"params": {"optim.name": {"type": "categorical", "choices": ["adamw", "lamb"]}}},
            "params.optim.name='lamb'",
        ),
        ({"params": {"method.temperature": {"type": "float", "low": -1, "high": 0.2}}}, "method.temperature"),
        ({"points_to_evaluate": [{"optim.lr": 0.1}]}, "points_to_evaluate[0].optim.lr is not among params"),
        ({"searcher": {"type": "grid"}}, "searcher.type"),
        ({"params": {}}, "params"),
    ],
)
def test_bad_spaces_fail_before_any_trial_naming_the_key(tmp_path, fields, message):
    with pytest.raises(SearchSpaceError) as err:
        load_search_space(write(tmp_path, **fields))
    assert message in str(err.value)


def test_method_keys_apply_only_to_methods_that_have_them():
    base = {"method": {"name": "moco"}}
    assert applies("method.temperature", {}, base)
    assert applies("optim.lr", {"method.name": "moco"}, base)
    assert not applies("method.temperature", {"method.name": "no-such-method"}, base)


@pytest.mark.parametrize(
    ("grace", "factor", "max_t", "epochs"),
    [(1, 2.0, None, 10), (1, 3.0, None, 20), (2, 2.0, 16, 16), (1, 1.5, 12, 30), (3, 2.0, None, 5)]
    + [(1, 4.0, 40, 20)],
)
def test_rungs_are_where_rays_asha_compares_trials(grace, factor, max_t, epochs):
    from ray.tune.schedulers import ASHAScheduler

    rungs = Scheduler(grace_period=grace, reduction_factor=factor, max_t=max_t).rungs(epochs)
    asha = ASHAScheduler(grace_period=grace, reduction_factor=factor, max_t=max_t or epochs)
    milestones = [milestone for milestone, _ in asha._brackets[0]._rungs]
    last = min(max_t or epochs, epochs)
    # Each rung acts at the first whole epoch at or past its milestone; trials stop at max_t.
    expected = {math.ceil(m) for m in milestones if math.ceil(m) <= last} | {last}
    assert rungs == sorted(expected)
    assert Scheduler(type="none").rungs(epochs) == []
