"""Sweeps on a private local Ray (2 CPUs) against a real MLflow store (SQLite).

Each sweep is small (digits at 16 px, a one-block ViT, 2-3 epochs) but runs the real
stack: Tune, OptunaSearch, ASHA, the trainables, the driver's MLflow callback.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from raymix.cli import main
from raymix.config import METHOD_NAMES, load_config
from raymix.integrations import leaderboard, sweep
from raymix.integrations.search_space import SearchSpaceError, load_search_space
from tests.faults.helpers import sweep_runs

ROOT = Path(__file__).parents[2]
DIGITS = ROOT / "launch" / "experiments" / "digits.yaml"
TINY = {
    "data.image_size": 16,
    "backbone.patch_size": 8,
    "backbone.depth": 1,
    "head.hidden_dim": 32,
    "head.out_dim": 16,
    "training.batch_size": 64,
    "training.epochs": 2,
    "training.progress": False,
    "eval.knn_k": [20],
    "scaling.cpus_per_worker": 1.0,
}
DIVERGE = {"optim.lr": 1.0e30}  # non-finite loss in the first epoch


def write_space(tmp_path: Path, name: str = "space", **fields) -> Path:
    space = {
        "base": str(DIGITS),
        "overrides": {**TINY, "optim.lr_scaling": "none", "optim.warmup_epochs": 0},
        "storage_path": str(tmp_path / "sweeps"),
        "num_samples": 3,
        "scheduler": {"type": "none"},
        "searcher": {"type": "tpe", "seed": 0, "n_startup_trials": 2},
        "params": {
            "optim.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True},
            "augment.crop_scale": {"type": "categorical", "choices": [[0.5, 1.0], [0.7, 1.0]]},
        },
    }
    space.update(fields)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def mlflow_runs(uri: str) -> tuple[MlflowClient, object, list]:
    """The store's one sweep: (client, parent run, trial runs nested under it)."""
    client, parents, children = sweep_runs(uri)
    assert len(parents) == 1 and all(
        r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children
    )
    return client, parents[0], children


def test_sweep_with_a_failing_trial_records_every_trial(local_ray, tracking, tmp_path, capsys):
    path = write_space(
        tmp_path,
        num_samples=4,
        max_concurrent_trials=1,
        max_failures=1,  # the diverging trial is retried once, and fails again
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
        # A given point may lie outside the ranges (Optuna accepts it): here, one that diverges.
        points_to_evaluate=[{"optim.lr": 4.0e-3, "augment.crop_scale": [0.5, 1.0]}, DIVERGE],
    )
    board = sweep.run_sweep(path, ["training.epochs=3"], log=lambda _: None)

    # The sweep went on past the failure: four trials, one failed with its error.
    outcomes = {row.trial_id: row.outcome for row in board.rows}
    assert len(outcomes) == 4
    failed = [row for row in board.rows if row.outcome == "failed"]
    assert len(failed) == 1 and failed[0].point["optim.lr"] == 1.0e30
    assert "not finite" in failed[0].error
    assert set(outcomes.values()) <= {"completed", "pruned", "failed"} and "completed" in outcomes.values()
    for row in board.rows:
        assert (row.outcome == "completed") == (row.epochs == 3)
    assert board.ranked()[-1].outcome == "failed" and board.best_row() is not None

    # MLflow: the parent with the space and the outputs; one child per trial, closed right.
    client, parent, children = mlflow_runs(tracking)
    assert parent.info.status == "FINISHED"
    assert (
        parent.data.params["space.num_samples"] == "4" and parent.data.params["base.training.epochs"] == "3"
    )
    outputs = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"leaderboard.csv", "best_config.yaml", "plots", "space"} <= outputs
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/parallel_coordinate.png"} <= plots
    status = {"completed": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}
    assert {r.data.tags["raymix.trial_id"]: r.info.status for r in children} == {
        trial: status[outcome] for trial, outcome in outcomes.items()
    }
    for run in children:
        trial = run.data.tags["raymix.trial_id"]
        assert (
            run.data.params["training.epochs"] == "3" and run.data.tags["raymix.outcome"] == outcomes[trial]
        )
        assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
        if outcomes[trial] == "failed":
            assert "not finite" in run.data.tags["raymix.error"]
            assert "not finite" in run.data.tags["raymix.last_retry_error"]
            continue
        history = client.get_metric_history(run.info.run_id, "knn_top1")
        row = next(r for r in board.rows if r.trial_id == trial)
        assert [m.step for m in history] == list(range(1, row.epochs + 1))
        assert math.isclose(history[-1].value, row.last, rel_tol=1e-6)
        # tracking.log_checkpoints=best (the default): the best checkpoint only, not the last too
        assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")} == {"checkpoints/best"}
        files = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints/best")}
        assert "checkpoints/best/state.pt" in files

    # raymix best: the leaderboard, and the winner's config as a file raymix train accepts.
    folder = tmp_path / "sweeps" / "space"
    out = tmp_path / "best.yaml"
    capsys.readouterr()
    assert main(["best", str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    best = board.best_row()
    assert best is not None and best.trial_id in printed[1] and "failed" in printed[4]
    cfg = load_config(out)
    assert cfg.optim.lr == pytest.approx(best.point["optim.lr"])
    assert list(cfg.augment.crop_scale) == best.point["augment.crop_scale"]
    assert cfg.training.epochs == 3 and cfg.backbone.depth == 1
    assert (folder / "leaderboard.csv").read_text().splitlines()[1].split(",")[1] == best.trial_id
    assert main(["best", str(tmp_path)]) == 2  # not a sweep folder
    assert "not a sweep folder" in capsys.readouterr().err


def test_max_t_below_epochs_stops_every_trial_early(local_ray, tracking, tmp_path):
    path = write_space(tmp_path, num_samples=2, scheduler={"type": "asha", "max_t": 1})
    board = sweep.run_sweep(path, log=lambda _: None)
    assert [row.outcome for row in board.rows] == ["pruned", "pruned"]
    assert all(row.epochs == 1 for row in board.rows)
    _, _, children = mlflow_runs(tracking)
    assert sorted(r.info.status for r in children) == ["KILLED", "KILLED"]


def test_an_existing_sweep_needs_resume_and_a_changed_one_is_refused(local_ray, tracking, tmp_path, capsys):
    path = write_space(tmp_path, num_samples=1, overrides={**TINY, "training.epochs": 1})
    assert main(["tune", str(path), "--resume"]) == 2
    assert "no sweep to continue" in capsys.readouterr().err
    assert main(["tune", str(path)]) == 0
    capsys.readouterr()
    assert main(["tune", str(path)]) == 2
    assert "already exists: add --resume" in capsys.readouterr().err
    assert main(["tune", str(path), "--resume", "optim.lr=0.002"]) == 2
    assert "the space differs" in capsys.readouterr().err


def test_multi_worker_trials_run_ray_train(local_ray, tracking, tmp_path):
    overrides = {**TINY, "scaling.num_workers": 2, "scaling.cpus_per_worker": 0.5}
    path = write_space(tmp_path, num_samples=1, overrides=overrides)
    assert sweep.trial_resources(sweep.prepare(path)) == {"CPU": 1.01, "GPU": 0.0}
    board = sweep.run_sweep(path, log=lambda _: None)
    assert [row.outcome for row in board.rows] == ["completed"]
    train_root = tmp_path / "sweeps" / "space" / "train"
    assert sorted(p.name for p in train_root.iterdir()) == sorted(row.trial_id for row in board.rows)
    client, _, children = mlflow_runs(tracking)
    for run in children:
        assert run.info.status == "FINISHED"
        files = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints/best")}
        assert "checkpoints/best/state.pt" in files


def test_the_shipped_cross_method_space_trains_each_method(local_ray, tracking, tmp_path):
    """all_methods.yaml, shrunk to its given points (one per method) and one epoch."""
    space = yaml.safe_load((ROOT / "search_spaces" / "all_methods.yaml").read_text())
    space.update(
        base=str(DIGITS), scheduler={"type": "none"},
        overrides={**TINY, "training.epochs": 1, "backbone.depth": 2},  # SelfCon needs 2 blocks
        num_samples=len(space["points_to_evaluate"]), storage_path=str(tmp_path / "sweeps"),
    )  # fmt: skip
    path = tmp_path / "all_methods.yaml"
    path.write_text(yaml.safe_dump(space))
    board = sweep.run_sweep(path, log=lambda _: None)
    assert [row.outcome for row in board.rows] == ["completed"] * len(METHOD_NAMES)
    assert sorted(row.point["method.name"] for row in board.rows) == sorted(METHOD_NAMES)
    client, _, children = mlflow_runs(tracking)
    by_method = {run.data.params["method.name"]: run for run in children}
    patchmix, moco = by_method["patchmix"], by_method["moco"]
    terms = {"loss/orig_orig", "loss/mixed_orig", "loss/mixed_mixed"}
    assert terms | {"knn_top1"} <= patchmix.data.metrics.keys()
    assert "loss/contrast" in moco.data.metrics and "loss/mixed_mixed" not in moco.data.metrics
    assert "method.queue_size" not in patchmix.data.params and patchmix.data.params["method.mix_num"] == "2"
    unmix = by_method["unmix"]
    assert {"loss/clean", "loss/mixed", "unmix/lambda"} <= unmix.data.metrics.keys()
    assert "snclr/weight_entropy" in by_method["snclr"].data.metrics
    assert "loss/supcon" in by_method["selfcon"].data.metrics


def test_trial_resources_and_concurrency(tmp_path):
    one = sweep.prepare(write_space(tmp_path, name="one"))
    assert sweep.in_process(one.config)
    assert sweep.trial_resources(one) == {"CPU": 1.0, "GPU": 0.0}
    assert sweep.concurrency(one, {"CPU": 2.0}) == 2
    assert sweep.concurrency(one, {"CPU": 16.0}) == 3  # never more than num_samples
    gpu = sweep.prepare(
        write_space(tmp_path, name="gpu", gpus_per_trial=0.25, num_samples=8),
        ["scaling.use_gpu=true", "scaling.cpus_per_worker=2"],
    )
    assert sweep.trial_resources(gpu) == {"CPU": 2.0, "GPU": 0.25}
    assert sweep.concurrency(gpu, {"CPU": 16.0, "GPU": 1.0}) == 4
    forced = sweep.prepare(write_space(tmp_path, name="forced"), ["scaling.backend=ray"])
    assert not sweep.in_process(forced.config)
    with pytest.raises(Exception, match="one trial needs"):
        sweep.concurrency(forced, {"CPU": 1.0})
    with pytest.raises(SearchSpaceError, match="gpus_per_trial=0.5 needs scaling.num_workers=1"):
        sweep.prepare(write_space(tmp_path, name="bad", gpus_per_trial=0.5), ["scaling.num_workers=2"])


def test_tracking_uri_is_absolute(tmp_path, monkeypatch):
    from raymix.integrations.tracking import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path / 'sub' / 'x.db'}"
    assert tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////abs/m.db")
    assert tracking_uri("sqlite:///ignored.db") == "sqlite:////abs/m.db"


def test_ranking_puts_failed_and_missing_last(tmp_path):
    space, base = load_search_space(write_space(tmp_path))
    rows = [
        leaderboard.Row("a", "completed", 2, 0.5, 0.6, {}),
        leaderboard.Row("b", "failed", 0, math.nan, math.nan, {}, "boom"),
        leaderboard.Row("c", "pruned", 1, 0.7, 0.7, {}),
        leaderboard.Row("d", "running", 0, math.nan, math.nan, {}),
    ]
    board = leaderboard.Board(space, base, str(tmp_path), rows)
    assert [r.trial_id for r in board.ranked()][:2] == ["c", "a"]
    assert board.best_row().trial_id == "c"
    minimise = leaderboard.Board(space.model_copy(update={"mode": "min"}), base, str(tmp_path), rows)
    assert minimise.best_row().trial_id == "a"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"params": {"optim.learning_rate": {"type": "float", "low": 0.1, "high": 0.2}}}, "learning_rate"),
        ({"params": {"optim.lr": {"type": "categorical", "choices": []}}}, "non-empty 'choices'"),
        ({"metric": "accuracy"}, "metric 'accuracy' is never reported"),
        ({"scheduler": {"type": "asha", "grace_period": 3}}, "grace_period=3 exceeds training.epochs=2"),
    ],
)
def test_bad_spaces_exit_2_before_ray_starts(tmp_path, capsys, monkeypatch, fields, message):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a bad space")

    monkeypatch.setattr(sweep.ray_train, "init_ray", no_ray)
    path = write_space(tmp_path, **fields)
    assert main(["tune", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists()
    assert main(["tune", str(tmp_path / "missing.yaml")]) == 2


def test_a_driver_that_fails_marks_the_sweeps_run_failed(local_ray, tracking, tmp_path, monkeypatch):
    def broken(_):
        raise RuntimeError("scheduler exploded")

    monkeypatch.setattr(sweep, "scheduler", broken)
    with pytest.raises(RuntimeError, match="scheduler exploded"):
        sweep.run_sweep(write_space(tmp_path))
    client = MlflowClient(tracking)
    (parent,) = client.search_runs([client.get_experiment_by_name("raymix").experiment_id])
    assert parent.info.status == "FAILED"
    assert parent.data.tags["raymix.error"] == "RuntimeError: scheduler exploded"
