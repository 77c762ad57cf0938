"""Population Based Training: the keys that may change mid-run, the trainer taking new values
from a checkpoint, the space's checks, and a PBT sweep on digits end to end (Ray, 2 CPUs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from raymix.config import MUTABLE_KEYS, ConfigError, load_config
from raymix.engine.run import config_changes
from raymix.engine.trainer import Trainer
from raymix.integrations import pbt, study, sweep
from raymix.integrations.plan import prepare
from raymix.integrations.search_space import SearchSpaceError, load_search_space, method_keys
from raymix.methods import build_method
from tests.faults.helpers import sweep_runs

ROOT = Path(__file__).parents[2]
DIGITS = ROOT / "launch" / "experiments" / "digits.yaml"
TINY = [
    "data.name=synthetic", "data.image_size=16", "data.synthetic_train_size=96",
    "data.synthetic_test_size=32", "backbone.patch_size=8", "backbone.depth=1", "head.hidden_dim=32",
    "head.out_dim=16", "training.batch_size=32", "training.epochs=3", "training.progress=false",
]  # fmt: skip
SWEEP = {  # digits at 16 px, a one-block ViT: about a second an epoch on 2 cores
    "data.image_size": 16, "backbone.patch_size": 8, "backbone.depth": 1, "head.hidden_dim": 32,
    "head.out_dim": 16, "training.batch_size": 64, "training.epochs": 3, "training.progress": False,
    "eval.knn_k": [20], "scaling.cpus_per_worker": 1.0, "optim.lr_scaling": "none",
    "optim.warmup_epochs": 0,
}  # fmt: skip
PARAMS = {
    "method.temperature": {"type": "float", "low": 0.1, "high": 0.5, "log": True},
    "optim.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True},
}


def tiny(*overrides: str):
    return load_config(None, [*TINY, *overrides])


def write_space(tmp_path: Path, name: str = "pbt", overrides: dict | None = None, **fields) -> Path:
    space = {
        "base": str(DIGITS),
        "overrides": {**SWEEP, **(overrides or {})},
        "storage_path": str(tmp_path / "sweeps"),
        "num_samples": 2,
        "scheduler": {"type": "pbt", "perturbation_interval": 2},
        "searcher": {"seed": 0},
        "params": PARAMS,
        **fields,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


# ---------------------------------------------------------------- resuming with new values


def test_config_changes_accepts_the_mutable_keys_and_refuses_others():
    old = tiny().to_dict()
    new = tiny("optim.lr=0.5", "optim.weight_decay=0.1", "method.temperature=0.7").to_dict()
    assert config_changes(old, new) == []
    snclr = tiny("method.name=snclr", "method.bank_size=64", "method.num_neighbors=4").to_dict()
    changed = tiny(
        "method.name=snclr", "method.bank_size=64", "method.num_neighbors=8", "method.weighting=uniform"
    ).to_dict()
    assert config_changes(snclr, changed) == []
    # Exact keys, not prefixes: optim.lr_scaling is not optim.lr.
    refused = tiny("optim.lr_scaling=none", "training.batch_size=16", "method.momentum=0.9").to_dict()
    assert config_changes(old, refused) == ["method.momentum", "optim.lr_scaling", "training.batch_size"]


METHOD_CASES = {  # every mutable method key, a valid config of its method and a new value
    "moco": ([], {"temperature": 0.7}),
    "patchmix": (
        [],
        {
            "temperature": 0.7,
            "mix_prob": 0.3,
            "mixed_weight": 0.9,
            "smoothing_oo": 0.2,
            "smoothing_mixed": 0.1,
        },
    ),
    "unmix": ([], {"temperature": 0.7, "prob_global": 0.9, "beta": 2.0}),
    "snclr": (
        ["method.bank_size=64", "method.num_neighbors=4"],
        {
            "temperature": 0.7,
            "num_neighbors": 8,
            "weighting": "uniform",
            "threshold": True,
            "detach_weights": True,
        },
    ),  # fmt: skip
    "selfcon": (["backbone.depth=2"], {"temperature": 0.7}),
}


def test_every_mutable_method_key_has_a_case():
    covered = {f"method.{k}" for _, values in METHOD_CASES.values() for k in values}
    assert covered == {k for k in MUTABLE_KEYS if k.startswith("method.")}
    for name, (_, values) in METHOD_CASES.items():  # and each applies to its method
        assert {f"method.{k}" for k in values} <= method_keys()[name]


@pytest.mark.parametrize("name", list(METHOD_CASES))
def test_a_method_rebuilt_from_a_checkpoint_takes_the_new_values(name):
    """Nothing mutable is in the state dict: the rebuilt method keeps the config's values."""
    extra, values = METHOD_CASES[name]
    old = build_method(tiny(f"method.name={name}", *extra))
    state = old.state_dict()
    new_cfg = tiny(f"method.name={name}", *extra, *(f"method.{k}={json.dumps(v)}" for k, v in values.items()))
    new = build_method(new_cfg)
    new.load_state_dict(state)
    for key, value in values.items():
        assert getattr(new, key) == value != getattr(old, key), key
        assert not any(k.split(".")[-1] == key for k in state), f"{key} is in the state dict"


def test_a_trainer_rebuilt_from_a_checkpoint_uses_the_new_temperature_and_lr():
    cfg = tiny("optim.lr=0.01", "optim.lr_scaling=none")
    first = Trainer(cfg)
    first.train_epoch()
    state = first.state_dict()

    new_cfg = tiny("optim.lr=0.05", "optim.lr_scaling=none", "method.temperature=0.5")
    assert config_changes(state["config"], new_cfg.to_dict()) == []
    resumed, same = Trainer(new_cfg), Trainer(cfg)
    resumed.load_state_dict(state)
    same.load_state_dict(state)
    assert resumed.method.temperature == 0.5 and same.method.temperature == 0.2
    assert resumed.schedules.peak_lr == 0.05 and same.schedules.peak_lr == 0.01

    # The loss uses the new temperature: the same weights and views at 0.2 give another loss.
    images, labels = next(iter(resumed.train_loader))
    views = resumed.augment(images, torch.Generator().manual_seed(0), views=2)
    with torch.no_grad():
        new_loss = resumed.method(views[0], views[1], None)[0]
        old_loss = same.method(views[0], views[1], None)[0]
    assert not torch.isclose(new_loss, old_loss)

    # The optimiser's rate comes from the new schedule, not from the restored optimiser state.
    resumed.train_step(images, labels)
    decayed = [g["lr"] for g in resumed.optimizer.param_groups]
    assert decayed == pytest.approx([resumed.schedules.lr(first.step)] * len(decayed))
    assert resumed.schedules.lr(first.step) == pytest.approx(5 * same.schedules.lr(first.step))


# ---------------------------------------------------------------- the space's checks


@pytest.mark.parametrize(
    ("fields", "overrides", "message"),
    [
        (
            {"scheduler": {"type": "pbt", "mutations": ["optim.lr", "optim.lr_scaling"]}},
            {},
            "scheduler.mutations: optim.lr_scaling cannot change mid-run for method moco; allowed: "
            "optim.lr, optim.min_lr",
        ),
        (
            {"scheduler": {"type": "pbt", "mutations": ["method.mix_prob"]}},
            {},
            "method.mix_prob cannot change mid-run for method moco",
        ),
        (
            {"scheduler": {"type": "pbt", "mutations": ["optim.weight_decay"]}},
            {},
            "scheduler.mutations: optim.weight_decay is not among params",
        ),
        (
            {},
            {"scaling.num_workers": 2},
            "scheduler.type=pbt needs single-worker trials that train in their own process "
            "(scaling.num_workers=1",
        ),
        ({"scheduler": {"type": "pbt", "grace_period": 2}}, {}, "grace_period is a setting of type asha"),
        ({"scheduler": {"type": "asha", "synch": True}}, {}, "synch is a setting of type pbt/pb2"),
        ({"scheduler": {"type": "pb2", "resample_probability": 0.5}}, {}, "not of type pb2"),
        (
            {"scheduler": {"type": "pbt", "perturbation_interval": 3}},
            {},
            "perturbation_interval=3 (burn_in_period=0) leaves no perturbation before training.epochs=3",
        ),
        (
            {"params": {"augment.crop_scale": {"type": "categorical", "choices": [[0.5, 1.0], [0.7, 1.0]]}}},
            {},
            "needs a param that may change mid-run",
        ),
        (
            {"params": {**PARAMS, "method.name": {"type": "categorical", "choices": ["moco", "unmix"]}}},
            {},
            "params.method.name: a population shares one method",
        ),
        (
            {
                "scheduler": {"type": "pb2"},
                "params": {
                    **PARAMS,
                    "method.weighting": {"type": "categorical", "choices": ["hard", "uniform"]},
                },
            },
            {"method.name": "snclr", "method.bank_size": 64, "method.num_neighbors": 4},
            "params.method.weighting is categorical; PB2 changes numbers only",
        ),
        ({"max_concurrent_trials": 1}, {}, "max_concurrent_trials: the whole population"),
    ],
)
def test_spaces_pbt_cannot_run_are_refused(tmp_path, fields, overrides, message):
    with pytest.raises(SearchSpaceError, match="^pbt.yaml: .*" + _escape(message)):
        load_search_space(write_space(tmp_path, overrides=overrides, **fields))


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_the_pbt_scheduler_and_population(tmp_path):
    space, base = load_search_space(write_space(tmp_path))
    assert space.scheduler.rungs(3) == [2, 3]  # evaluate and checkpoint where PBT compares
    assert space.scheduler.model_copy(update={"perturbation_interval": 2}).rungs(8) == [2, 4, 6, 8]
    burn = space.scheduler.model_copy(update={"perturbation_interval": 2, "burn_in_period": 3})
    assert burn.rungs(8) == [3, 5, 7, 8]
    planned = prepare(write_space(tmp_path))
    sched = sweep.scheduler(planned)
    assert isinstance(sched, pbt.PopulationBasedTraining) and sched.last_epoch == 3
    # No perturbation at the last epoch: it would restart a finished trial to train nothing.
    assert sched.on_trial_result(None, None, {"epoch": 3, "knn_top1": 0.5}) == sched.CONTINUE
    assert set(sched._hyperparam_mutations) == {"method.temperature", "optim.lr"}
    assert isinstance(sweep.searcher(planned), pbt.BasicVariantGenerator)
    assert set(pbt.param_space(planned) or {}) == set(PARAMS)
    # Explored values go back into the ranges, as plain floats.
    keep = pbt.KeepInRange(dict(planned.space.params), ("method.temperature", "optim.lr"))
    assert keep({"method.temperature": 0.6, "optim.lr": 5e-4}) == {
        "method.temperature": 0.5,
        "optim.lr": 1e-3,
    }
    pb2 = sweep.scheduler(prepare(write_space(tmp_path, "pb2", scheduler={"type": "pb2"})))
    from ray.tune.schedulers.pb2 import PB2  # scikit-learn, a dependency, is all PB2 needs

    assert isinstance(pb2, PB2) and pb2.last_epoch == 3
    with pytest.raises(ConfigError, match="num_samples=1; allowed: 2 or more"):
        sweep.scheduler(prepare(write_space(tmp_path, "one", num_samples=1)))
    with pytest.raises(ConfigError, match="keeps no Optuna study: leave out --optuna-storage"):
        sweep.scheduler(study.with_storage(planned, "sqlite:///optuna.db"))


def test_the_shipped_pbt_space_loads():
    space, base = load_search_space(ROOT / "search_spaces" / "pbt_digits.yaml")
    assert space.scheduler.type == "pbt"
    planned = prepare(ROOT / "search_spaces" / "pbt_digits.yaml")
    assert set(pbt.mutations(planned)) == {"method.mix_prob", "method.temperature", "optim.lr"}


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_pbt_on_digits_changes_values_mid_run(local_ray, tracking, tmp_path):
    """Two trials, 3 epochs, synchronous PBT at epoch 2: the worse trial takes the better one's
    checkpoint and redrawn values, trains epoch 3 with them, and shows it in MLflow."""
    uri = tracking
    path = write_space(
        tmp_path,
        scheduler={
            "type": "pbt", "perturbation_interval": 2, "quantile_fraction": 0.5,
            "resample_probability": 1.0, "synch": True,
        },
    )  # fmt: skip
    lines: list[str] = []
    board = sweep.run_sweep(path, log=lines.append)
    assert any(line.startswith("PBT: a population of 2") for line in lines)
    assert [row.outcome for row in board.rows] == ["completed", "completed"]
    assert all(row.epochs == 3 for row in board.rows)

    # Exactly one exploit, logged by Tune's PBT in the sweep folder.
    folder = tmp_path / "sweeps" / "pbt"
    policy = [json.loads(line) for line in (folder / "pbt_global.txt").read_text().splitlines()]
    assert len(policy) == 1

    # MLflow: each epoch's values as hp/* metrics; one trial's changed after epoch 2.
    client, _, children = sweep_runs(uri)
    assert isinstance(client, MlflowClient) and len(children) == 2
    changed = []
    for run in children:
        trial = run.data.tags["raymix.trial_id"]
        row = next(r for r in board.rows if r.trial_id == trial)
        for key in PARAMS:
            history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"hp/{key}")}
            assert sorted(history) == [1, 2, 3]
            assert history[3] == pytest.approx(row.point[key])  # the leaderboard: the final values
            if history[3] != history[2]:
                changed.append((trial, key))
                assert history[1] == history[2]  # values change only at the perturbation
    exploited = {trial for trial, _ in changed}
    assert len(exploited) == 1 and len(changed) == 2, changed
