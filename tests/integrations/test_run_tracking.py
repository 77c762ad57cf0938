"""``raymix train`` in MLflow, against a real ``mlflow server`` process (one per module).

Each test records into its own experiment (``tracking.experiment``), so the tests share the
server and still see only their own runs. Runs are tiny: digits at 16 px, a one-block ViT.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raymix.cli import main
from raymix.engine.trainer import Trainer
from raymix.integrations import ray_train, run_tracking, sweep
from tests.integrations import servers
from tests.integrations.test_sweep import DIGITS, TINY, write_space

ROOT = Path(__file__).parents[2]
TINY_ARGS = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in TINY.items()]
SMALL = ["data.test_fraction=0.8"]  # digits: 359 training images, so an epoch takes seconds
SYNTHETIC = ["data.name=synthetic", "data.synthetic_train_size=128", "data.synthetic_test_size=64"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with servers.mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture
def store(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    return server


def train(out: Path, experiment: str, *extra: str) -> int:
    args = [*TINY_ARGS, *SMALL, "training.epochs=1", "optim.warmup_epochs=0"]
    argv = ["train", str(DIGITS), *args, f"training.output_dir={out}", f"tracking.experiment={experiment}"]
    return main([*argv, *extra])


def runs(uri: str, experiment: str) -> tuple[MlflowClient, list]:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client, ([] if found is None else client.search_runs([found.experiment_id]))


def files(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, path)}


def test_a_run_is_recorded_and_its_resumption_continues_it(store, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    original = Trainer.train_epoch

    def dies_in_epoch_2(self, progress=False):
        if self.epoch == 1:
            raise FloatingPointError("loss is not finite (injected)")
        return original(self, progress)

    # Epoch 1 trained and checkpointed, then the run fails: its MLflow run is FAILED.
    monkeypatch.setattr(Trainer, "train_epoch", dies_in_epoch_2)
    assert train(out, "resume", "training.epochs=2") == 1
    client, (run,) = runs(store, "resume")
    assert run.info.status == "FAILED" and "injected" in run.data.tags["raymix.error"]
    assert json.loads((out / run_tracking.RUN_FILE).read_text())["run_id"] == run.info.run_id

    # The same command again resumes epoch 1's checkpoint and the same MLflow run.
    monkeypatch.setattr(Trainer, "train_epoch", original)
    capsys.readouterr()
    assert train(out, "resume", "training.epochs=2") == 0
    assert f"continues run {run.info.run_id} after epoch 1" in capsys.readouterr().out
    client, (again,) = runs(store, "resume")
    run_id = again.info.run_id
    assert run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "knn_top1")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]
    params, tags = again.data.params, again.data.tags
    assert params["training.epochs"] == "2" and params["method.name"] == "moco"
    assert params["data.image_size"] == "16" and params["tracking.log_checkpoints"] == "best"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert tags["mlflow.source.name"] == "raymix train" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"] and tags["mlflow.source.git.commit"] == commit.stdout.strip()
    assert tags[run_tracking.RUN_DIR_TAG] == str(out.resolve())
    # tracking.log_checkpoints=best (the default): best.pt only, beside the config.
    assert {"config.yaml", "checkpoints"} <= files(client, run_id)
    assert files(client, run_id, "checkpoints") == {"checkpoints/best.pt"}


def test_log_checkpoints_and_tracking_off(store, tmp_path):
    assert train(tmp_path / "none", "no-checkpoints", *SYNTHETIC, "tracking.log_checkpoints=none") == 0
    client, (run,) = runs(store, "no-checkpoints")
    assert run.info.status == "FINISHED" and "checkpoints" not in files(client, run.info.run_id)
    assert train(tmp_path / "both", "both-checkpoints", *SYNTHETIC, "tracking.log_checkpoints=both") == 0
    client, (run,) = runs(store, "both-checkpoints")
    assert files(client, run.info.run_id, "checkpoints") == {"checkpoints/best.pt", "checkpoints/last.pt"}
    assert train(tmp_path / "off", "disabled", *SYNTHETIC, "tracking.enabled=false") == 0
    assert runs(store, "disabled")[1] == [] and not (tmp_path / "off" / run_tracking.RUN_FILE).exists()


def test_an_unreachable_store_exits_2_before_anything_is_written(tmp_path, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{servers.free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    assert train(tmp_path / "run", "down") == 2
    assert time.monotonic() - start < 60
    err = capsys.readouterr().err
    assert f"MLFLOW_TRACKING_URI {uri}: no working MLflow server answers there" in err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_sweep_trials_are_one_run_each_with_the_system_tags(local_ray, store, tmp_path):
    overrides = {**TINY, "training.epochs": 1, "data.test_fraction": 0.8, "tracking.experiment": "sweep"}
    path = write_space(tmp_path, num_samples=2, overrides=overrides)
    board = sweep.run_sweep(path, log=lambda _: None)
    assert [row.outcome for row in board.rows] == ["completed", "completed"]
    client, found = runs(store, "sweep")
    assert len(found) == 3  # the parent and one run per trial: trials open no run of their own
    (parent,) = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2
    for run in [parent, *children]:
        assert run.data.tags["mlflow.source.name"] == "raymix tune" and run.data.tags["mlflow.user"]
        assert "mlflow.source.git.commit" in run.data.tags
    for run in children:  # tracking.log_checkpoints=best: no copy of the last checkpoint
        assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")} == {"checkpoints/best"}
    outputs = files(client, parent.info.run_id)
    assert {"leaderboard.csv", "best_config.yaml", "plots", "space"} <= outputs
    assert outputs <= {"leaderboard.csv", "best_config.yaml", "plots", "space"}  # no sweep folder copy


def test_a_ray_train_run_is_one_mlflow_run(local_ray, store, tmp_path):
    from raymix.config import load_config

    overrides = [*TINY_ARGS, *SMALL, "training.epochs=1", "scaling.backend=ray", "tracking.experiment=ray"]
    cfg = load_config(DIGITS, [*overrides, f"training.output_dir={tmp_path / 'run'}"])
    ray_train.run(cfg, log=lambda _: None)
    client, (run,) = runs(store, "ray")
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.source.name"] == "raymix train"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "knn_top1")] == [1]
    assert files(client, run.info.run_id, "checkpoints/best") == {
        "checkpoints/best/state.pt",
        "checkpoints/best/metrics.json",
    }
