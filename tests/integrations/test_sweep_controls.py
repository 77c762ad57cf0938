"""Sweep controls: concurrency against the cluster's maximum, the ``raymix tune`` flags, and
a sweep that its time budget stops (on a private local Ray with 2 CPUs, a SQLite MLflow)."""

from __future__ import annotations

import collections
import threading
import time

import pytest
import yaml

from raymix.cli import main
from raymix.config import ConfigError
from raymix.integrations import capacity, stopping, sweep
from raymix.integrations import tracking as tracking_module
from raymix.integrations.search_space import SearchSpaceError, load_search_space, parse_duration
from tests.integrations.test_sweep import TINY, mlflow_runs, write_space

# launch/cluster.yaml as `ray up` writes it on the head (~/ray_bootstrap_config.yaml): the
# node types' CPUs and GPUs filled in. GPU workers start at 0 and go up to 8.
LAUNCHER = {
    "max_workers": 8,
    "head_node_type": "head",
    "available_node_types": {
        "head": {"resources": {"CPU": 8}},
        "gpu_worker": {"min_workers": 0, "max_workers": 8, "resources": {"CPU": 8, "GPU": 1}},
    },
}
HEAD_ONLY = capacity.Cluster.of_nodes([{"CPU": 8.0, "memory": 3.0e10}])
SHORT = {**TINY, "optim.lr_scaling": "none", "optim.warmup_epochs": 0}  # as write_space's default


def gpu_sweep(tmp_path, name="gpu", **fields):
    space = write_space(tmp_path, name=name, **{"num_samples": 16, **fields})
    return sweep.prepare(space, ["scaling.use_gpu=true", "scaling.cpus_per_worker=2"])


# ---------------------------------------------------------------- concurrency (no Ray)


def test_a_gpu_sweep_queues_against_the_autoscalers_maximum(tmp_path):
    most = capacity.from_launcher(LAUNCHER, "the autoscaler's ~/ray_bootstrap_config.yaml")
    whole = gpu_sweep(tmp_path)
    room = sweep.concurrency_plan(whole, HEAD_ONLY, most)
    assert (room.limit, room.now, room.most) == (8, 0, 8)  # none fits now; 8 GPU workers at most
    assert "bootstrap" in room.source
    # Fractional GPUs pack trials on one GPU: 4 per worker node (CPU 8 / 2, GPU 1 / 0.25).
    packed = gpu_sweep(tmp_path, name="packed", gpus_per_trial=0.25, num_samples=64)
    assert sweep.trial_resources(packed) == {"CPU": 2.0, "GPU": 0.25}
    assert sweep.concurrency(packed, HEAD_ONLY, most) == 32
    # The launcher's global max_workers caps the nodes of every type together.
    capped = capacity.from_launcher({**LAUNCHER, "max_workers": 3}, "cluster.yaml")
    assert sweep.concurrency(whole, HEAD_ONLY, capped) == 3
    # Without an autoscaler the nodes alive now are all there is: a GPU trial never fits.
    never = r"can ever hold .*no node has any GPU: set scaling.use_gpu=false; if an autoscaler"
    with pytest.raises(ConfigError, match=never):
        sweep.concurrency(whole, HEAD_ONLY)
    # Ray Train trials: 4 workers of {CPU 2, GPU 1}, each on one node: 2 trials on 8 GPU nodes.
    gpu4 = ["scaling.use_gpu=true", "scaling.cpus_per_worker=2", "scaling.num_workers=4"]
    train = sweep.prepare(write_space(tmp_path, name="train", num_samples=5), gpu4)
    assert sweep.trial_shape(train) == capacity.Shape({"CPU": 2.0, "GPU": 1.0}, 4, {"CPU": 8.01, "GPU": 4.0})
    assert sweep.concurrency(train, HEAD_ONLY, most) == 2


def test_an_explicit_limit_wins_and_a_trial_that_never_fits_is_refused(tmp_path):
    most = capacity.from_launcher(LAUNCHER, "cluster.yaml")
    assert sweep.concurrency(gpu_sweep(tmp_path, max_concurrent_trials=3), HEAD_ONLY, most) == 3
    assert sweep.concurrency(gpu_sweep(tmp_path, max_concurrent_trials=12), HEAD_ONLY, most) == 12  # queued
    many = gpu_sweep(tmp_path, max_concurrent_trials=99)
    assert sweep.concurrency(many, HEAD_ONLY, most) == 16  # never more than num_samples
    big = sweep.prepare(write_space(tmp_path, name="big"), ["scaling.cpus_per_worker=16"])
    with pytest.raises(ConfigError) as refused:
        sweep.concurrency(big, HEAD_ONLY, most)
    assert str(refused.value) == (
        "one trial needs {CPU 16} on one node, which no node can ever hold (cluster.yaml: "
        "head: {CPU 8} x1; gpu_worker: {CPU 8, GPU 1} x8); lower scaling.cpus_per_worker, "
        "scaling.num_workers or gpus_per_trial"
    )
    # The autoscaler's own report (node groups, -1: no limit, caps on totals) counts the same way.
    from ray.core.generated import autoscaler_pb2 as pb

    groups = [pb.NodeGroupConfig(name="gpu", resources={"CPU": 8, "GPU": 1}, max_count=-1)]
    unbounded = capacity.from_cluster_config(pb.ClusterConfig(node_group_configs=groups))
    assert sweep.concurrency(gpu_sweep(tmp_path), HEAD_ONLY, unbounded) == 16
    limited = pb.ClusterConfig(node_group_configs=groups, max_resources={"GPU": 5})
    assert sweep.concurrency(gpu_sweep(tmp_path), HEAD_ONLY, capacity.from_cluster_config(limited)) == 5


def test_the_maximum_comes_from_an_autoscaler_config_file(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(LAUNCHER))
    found = capacity.autoscaler_maximum({capacity.AUTOSCALER_CONFIG_ENV: str(path)})
    assert found is not None and found.max_nodes == 8 and found.source.endswith(str(path))
    assert sorted((g.name, g.count, g.capped) for g in found.groups) == [
        ("gpu_worker", 8, True),
        ("head", 1, False),
    ]
    path.write_text("available_node_types: {gpu: {resources: {GPU: many}}}")
    with pytest.raises(ConfigError, match="available_node_types.gpu.resources: expected numbers"):
        capacity.autoscaler_maximum({capacity.AUTOSCALER_CONFIG_ENV: str(path)})
    with pytest.raises(ConfigError, match="cannot read"):
        capacity.autoscaler_maximum({capacity.AUTOSCALER_CONFIG_ENV: str(tmp_path / "missing.yaml")})


# ---------------------------------------------------------------- the controls


def test_space_keys_and_flags_for_the_controls(tmp_path):
    path = write_space(tmp_path, time_budget="1h30m", stop={"knn_top1": 0.9}, max_concurrent_trials=2)
    space, base = load_search_space(path)
    assert space.time_budget == 5400.0 and space.stop == {"knn_top1": 0.9}
    assert stopping.describe(space) == "time budget 1h30m or knn_top1 >= 0.9"
    # Flags replace the file's keys.
    flags = {"time_budget": 20, "stop": {"knn_top1": 0.5}, "max_concurrent_trials": 1, "gpus_per_trial": 0.5}
    given = sweep.prepare(path, None, None, 4, flags).space
    assert (given.time_budget, given.stop, given.max_concurrent_trials) == (20.0, {"knn_top1": 0.5}, 1)
    assert (given.gpus_per_trial, given.num_samples) == (0.5, 4)
    assert parse_duration("90s") == 90.0 and parse_duration("2h") == 7200.0 and parse_duration("45") == 45.0
    for bad, message in [
        ({"time_budget": "soon"}, "time_budget: 'soon' is not a duration"),
        ({"time_budget": 0}, "time_budget: Input should be greater than 0"),
        ({"stop": {"loss": 0.1}}, "stop: loss is not what the sweep optimises; allowed: knn_top1"),
    ]:
        with pytest.raises(SearchSpaceError, match=message):
            load_search_space(write_space(tmp_path, name="bad", **bad))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-concurrent", "0"], "--max-concurrent 0: must be at least 1"),
        (["--max-concurrent", "two"], "--max-concurrent two: expected a whole number of trials"),
        (["--num-samples", "1.5"], "--num-samples 1.5: expected a whole number of trials"),
        (["--gpus-per-trial", "1.5"], "--gpus-per-trial 1.5: expected a share of one GPU, 0 < X <= 1"),
        (["--gpus-per-trial", "0"], "--gpus-per-trial 0: expected a share of one GPU"),
        (["--time-budget", "5x"], "--time-budget 5x: expected seconds, or a duration such as 90s"),
        (["--time-budget", "0m"], "--time-budget 0m: expected seconds"),
        (["--stop", "knn_top1"], "--stop knn_top1: expected METRIC=VALUE with a number"),
        (["--stop", "knn_top1=high"], "--stop knn_top1=high: expected METRIC=VALUE"),
        (["--stop", "loss=0.1"], "--stop: loss is not what the sweep optimises; allowed: knn_top1"),
        (["--gpus-per-trial", "0.5", "scaling.num_workers=2"], "gpus_per_trial=0.5 needs scaling.num"),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, monkeypatch, flags, message):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for bad flags")

    monkeypatch.setattr(sweep.ray_train, "init_ray", no_ray)
    assert main(["tune", str(write_space(tmp_path)), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raymix: error: ") and "\n" not in err and message in err
    assert not (tmp_path / "sweeps").exists()


def test_the_stopper_reaches_targets_in_the_modes_direction(monkeypatch):
    stop = stopping.SweepStop(None, {"knn_top1": 0.8}, {"knn_top1": "max"})
    assert not stop("a", {"knn_top1": 0.79}) and not stop("a", {"loss": 9.0}) and not stop.stop_all()
    assert stop("b", {"knn_top1": 0.8}) and stop.stop_all()
    assert stop.reason == "trial b reached knn_top1 0.8 (stop: knn_top1 >= 0.8)"
    low = stopping.SweepStop(None, {"loss": 0.5}, {"loss": "min"})
    assert not low("a", {"loss": 0.6}) and not low("a", {"loss": float("nan")}) and low("a", {"loss": 0.4})
    clock = iter([100.0, 110.0, 130.5])
    monkeypatch.setattr(stopping.time, "monotonic", lambda: next(clock))
    budget = stopping.SweepStop(30.0, {}, {})
    assert not budget.stop_all() and not budget.stop_all() and budget.stop_all()  # from the first step
    assert budget.reason == "time budget of 30s reached"


# ---------------------------------------------------------------- a real sweep


def test_a_time_budget_stops_the_sweep_and_keeps_finished_trials_once(
    local_ray, tracking, tmp_path, capsys, monkeypatch
):
    """``--time-budget 1s`` on a sweep of 4-epoch trials, one at a time.

    The budget's clock (what :class:`~raymix.integrations.stopping.SweepStop` reads, unit-tested
    above) is held until one trial has completed and a later one has trained its first epoch:
    then the budget cuts that trial mid-run, however loaded the machine is.
    """
    completed, started_after = threading.Event(), threading.Event()
    on_complete, on_result = (
        tracking_module.TrialRecorder.on_trial_complete,
        tracking_module.TrialRecorder.on_trial_result,
    )

    def complete(self, *args, **kwargs):
        on_complete(self, *args, **kwargs)
        completed.set()

    def result(self, iteration, trials, trial, result, **info):
        on_result(self, iteration, trials, trial, result, **info)
        if completed.is_set() and result.get("epoch") == 1:
            started_after.set()

    monkeypatch.setattr(tracking_module.TrialRecorder, "on_trial_complete", complete)
    monkeypatch.setattr(tracking_module.TrialRecorder, "on_trial_result", result)
    real, held = time.monotonic, {"at": None, "off": None}

    def clock() -> float:
        now = real()
        held["at"] = now if held["at"] is None else held["at"]
        if not started_after.is_set():
            return held["at"]
        held["off"] = now - held["at"] if held["off"] is None else held["off"]
        return now - held["off"]

    monkeypatch.setattr(stopping.time, "monotonic", clock)
    path = write_space(
        tmp_path, num_samples=8, max_concurrent_trials=1, overrides={**SHORT, "training.epochs": 4}
    )
    assert main(["tune", str(path), "--time-budget", "1s", "--stop", "knn_top1=1.01"]) == 0
    out = capsys.readouterr().out
    assert "the sweep stops early at time budget 1s or knn_top1 >= 1.01" in out
    assert "sweep stopped early: time budget of 1s reached" in out and "best: trial " in out

    board = sweep.leaderboard.load(str(tmp_path / "sweeps" / "space"))
    outcomes = collections.Counter(row.outcome for row in board.rows)
    assert 1 <= outcomes["completed"] < 8 and set(outcomes) == {"completed", "pruned"}
    cut = [row for row in board.rows if row.outcome == "pruned" and row.epochs >= 1]
    assert cut and all(row.epochs < 4 for row in cut)  # stopped mid-run, its epochs kept
    assert (tmp_path / "sweeps" / "space" / "leaderboard.csv").is_file()

    _, parent, children = mlflow_runs(tracking)
    assert parent.info.status == "FINISHED" and parent.data.tags["raymix.stopped"].startswith("time budget")
    trial_ids = collections.Counter(run.data.tags["raymix.trial_id"] for run in children)
    assert set(trial_ids.values()) == {1}  # each trial logged once
    status = {run.data.tags["raymix.trial_id"]: run.info.status for run in children}
    assert "RUNNING" not in status.values()
    for row in board.rows:
        if row.outcome == "completed":
            assert status[row.trial_id] == "FINISHED"
        elif row.epochs:  # cut by the budget: recorded as stopped early, with its epochs
            assert status[row.trial_id] == "KILLED"


def test_a_stop_target_ends_the_sweep_at_the_first_trial_that_reaches_it(
    local_ray, tracking, tmp_path, capsys
):
    path = write_space(
        tmp_path, num_samples=4, max_concurrent_trials=1, overrides={**SHORT, "training.epochs": 3}
    )
    assert main(["tune", str(path), "--stop", "knn_top1=0"]) == 0  # any first evaluation reaches 0
    out = capsys.readouterr().out
    assert "sweep stopped early: trial " in out and "(stop: knn_top1 >= 0)" in out
    board = sweep.leaderboard.load(str(tmp_path / "sweeps" / "space"))
    reached = [row for row in board.rows if row.epochs]
    assert len(reached) == 1 and reached[0].epochs == 1 and reached[0].outcome == "pruned"
    assert all(row.outcome == "pruned" for row in board.rows)  # any other never started
    _, parent, children = mlflow_runs(tracking)
    assert parent.info.status == "FINISHED" and "reached knn_top1" in parent.data.tags["raymix.stopped"]
    assert [(r.data.tags["raymix.trial_id"], r.info.status) for r in children] == [
        (reached[0].trial_id, "KILLED")
    ]
