"""MLflow records of a sweep, written only by the driver process.

One parent run per sweep (the space, its base config and the searcher settings as params;
at the end the leaderboard, the best config and Optuna's plots as artifacts) and one child
run per trial nested under it (the trial's resolved config flattened into params and as
``config.yaml``, every reported metric with ``step = epoch``, its best and last checkpoint,
and a status: FINISHED for completed trials, KILLED for trials ASHA stopped early, FAILED
with the error for trials that failed). Trials report to Tune; :class:`TrialRecorder`, a
Tune callback in the driver, turns the reports into MLflow writes, so a SQLite store never
sees two writers and workers on other nodes need no access to it. A multi-objective sweep
tags its Pareto front's runs ``raymix.pareto=true`` (the others ``false``) and lists the
front on the parent (tag ``raymix.pareto_front``, artifact ``pareto_front.csv``).

A resumed sweep finds its parent and children again by tags (``raymix.sweep``,
``raymix.trial_id``) and logs only epochs that are not recorded yet.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from raymix.config import ConfigError, TrackingConfig
from raymix.engine.loop import fresh
from raymix.engine.run import flatten
from raymix.integrations import study
from raymix.integrations.cluster import redact_uri
from raymix.integrations.leaderboard import Board, file_system, trial_error
from raymix.integrations.plan import Sweep
from raymix.integrations.ray_train import METRICS_FILE
from raymix.integrations.search_space import (
    POPULATION_SCHEDULERS,
    SearchSpace,
    config_for,
    decode_point,
    trial_config,
)

SWEEP_TAG, TRIAL_TAG, PARENT_TAG = "raymix.sweep", "raymix.trial_id", "mlflow.parentRunId"
PARETO_TAG = "raymix.pareto"  # multi-objective sweeps: "true" on the runs of the Pareto front
RETRIES_ENV, TIMEOUT_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"
BATCH = 100  # MLflow takes at most 100 params per batch
# Keys Tune adds to every result: bookkeeping, not measurements.
TUNE_KEYS = {
    "done", "training_iteration", "trial_id", "timestamp", "time_this_iter_s", "time_total_s",
    "pid", "hostname", "node_ip", "time_since_restore", "iterations_since_restore",
    "checkpoint_dir_name", "should_checkpoint",
}  # fmt: skip


def tracking_uri(configured: str | None) -> str:
    """``MLFLOW_TRACKING_URI``, else the config's, else ``sqlite:///mlflow.db`` here; made absolute."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured or "sqlite:///mlflow.db"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix) :]).expanduser().resolve())
    return uri


def uri_source() -> str:
    """Which setting the tracking URI came from, for messages."""
    return "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking.uri"


@contextlib.contextmanager
def _impatient_http(timeout: float) -> Iterator[None]:
    """MLflow's HTTP calls without retries and with a short timeout, for the start-up check."""
    saved = {key: os.environ.get(key) for key in (RETRIES_ENV, TIMEOUT_ENV)}
    os.environ[RETRIES_ENV], os.environ[TIMEOUT_ENV] = "0", str(max(1, round(timeout)))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _reason(exc: BaseException) -> str:
    """A short reason from MLflow's long error texts: the HTTP status, the socket error, a timeout."""
    text = str(exc)
    status = re.search(r"error code (\d{3})|too many (\d{3}) error responses", text)
    if status:
        return f"HTTP {status.group(1) or status.group(2)}"
    if "not in a valid JSON format" in text:
        return "the answer is not MLflow's: not JSON"
    if "timed out" in text.lower() or "timeout" in text.lower():
        return "no answer in time"
    socket_error = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if socket_error:
        return socket_error.group(1).strip()
    lines = text.strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


def check_reachable(settings: TrackingConfig, timeout: float = 5.0) -> None:
    """An MLflow server (http/https URI) must answer MLflow's API within ``timeout`` seconds.

    A search call, without retries: a server that is down, slow, or answers with errors
    (HTTP 5xx, a page that is not MLflow's) is refused at once with one line, where MLflow's
    own client would retry for minutes.
    """
    uri = tracking_uri(settings.uri)
    if not settings.enabled or not uri.startswith(("http://", "https://")):
        return
    key = uri_source()
    shown = redact_uri(uri)
    with _impatient_http(timeout):
        try:
            MlflowClient(uri).search_experiments(max_results=1)
            return
        except MlflowException as exc:
            why = _reason(exc)
        except (OSError, ValueError) as exc:  # requests' errors are OSErrors
            why = _reason(exc)
    raise ConfigError(
        f"{key} {shown}: no working MLflow server answers there ({redact_uri(why)}). Start one "
        "(launch/mlflow_server.sh), fix MLFLOW_TRACKING_URI or tracking.uri, or set tracking.enabled=false"
    )


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """For a SQLite store: one process at a time creates (migrates) the database and the
    experiment. Two sweeps started at once on a new store otherwise both run MLflow's schema
    migrations, and one of them fails halfway."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri.removeprefix("sqlite:///"))
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        lock = open(db.with_name(db.name + ".lock"), "a")  # noqa: SIM115 (held across the yield)
    except OSError as exc:
        raise ConfigError(f"{uri_source()} {uri}: cannot write beside the database: {exc.strerror}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _params(values: dict[str, Any]) -> list[Param]:
    return [
        Param(k, json.dumps(v) if isinstance(v, list | dict) else str(v)[:6000]) for k, v in values.items()
    ]


def _log_params(client: MlflowClient, run_id: str, values: dict[str, Any]) -> None:
    params = _params(values)
    for i in range(0, len(params), BATCH):
        client.log_batch(run_id, params=params[i : i + BATCH])


def _masked(values: dict[str, Any]) -> dict[str, Any]:
    """Values with the password of any URI in them masked (an RDB URL in searcher.storage)."""
    return {k: redact_uri(v) if isinstance(v, str) else v for k, v in values.items()}


def _experiment(client: MlflowClient, name: str, uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = None
    if uri.startswith("sqlite:///"):  # artifacts beside the database, not in the working directory
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return str(client.create_experiment(name, artifact_location=location))


def open_sweep(sweep: Sweep, *, resume: bool) -> TrialRecorder | None:
    """The sweep's parent run (found again on resume) and the callback that records trials.

    Raises :class:`ConfigError` when the tracking store cannot be reached, before any trial.
    """
    settings = sweep.config.tracking
    if not settings.enabled:
        return None
    uri = tracking_uri(settings.uri)
    try:
        with store_lock(uri):  # a new SQLite store is created (migrated) by the first client
            client = MlflowClient(uri)
            experiment_id = _experiment(client, settings.experiment, uri)
        found = (
            client.search_runs([experiment_id], f"tags.`{SWEEP_TAG}` = '{sweep.path}'", max_results=1)
            if resume
            else []
        )
        if found:
            parent_id = found[0].info.run_id
        else:
            run = client.create_run(experiment_id, run_name=sweep.name, tags={SWEEP_TAG: sweep.path})
            parent_id = run.info.run_id
            space = sweep.space.model_dump(mode="json")
            _log_params(
                client,
                parent_id,
                {
                    "space.file": sweep.source,
                    "space.folder": sweep.path,
                    **_masked(flatten({k: v for k, v in space.items() if k != "params"}, "space.")),
                    "space.params": space["params"],
                    **flatten(sweep.base, "base."),
                },
            )
            client.log_artifact(parent_id, sweep.source, "space")
            resolved = redact_uri(yaml.safe_dump(sweep.resolved(), sort_keys=False))
            client.log_text(parent_id, resolved, "space/resolved.yaml")
            if sweep.space.scheduler.type not in POPULATION_SCHEDULERS:  # PBT keeps no Optuna study
                where = study.location(sweep)
                client.log_batch(
                    parent_id,
                    tags=[
                        RunTag("raymix.optuna_study", sweep.name),
                        RunTag("raymix.optuna_storage", redact_uri(where) if where else "memory"),
                    ],
                )
    except (MlflowException, OSError) as exc:
        raise ConfigError(
            f"{uri_source()} {redact_uri(uri)}: the MLflow tracking store cannot be used: "
            f"{redact_uri(_reason(exc))}"
        ) from None
    return TrialRecorder(
        uri=uri,
        experiment_id=experiment_id,
        parent_run_id=parent_id,
        sweep=sweep.resolved(),
        train_root=f"{sweep.path}/train",
        sweep_name=sweep.name,
    )


def fail_sweep(recorder: TrialRecorder | None, error: BaseException) -> None:
    """Mark the parent run FAILED, with the error, when the driver fails (best effort)."""
    if recorder is None:
        return
    try:
        why = f"{type(error).__name__}: {error}"[:5000]
        recorder.client.set_tag(recorder.parent_run_id, "raymix.error", why)
        recorder.client.set_terminated(recorder.parent_run_id, "FAILED")
    except (MlflowException, OSError):
        pass  # the store is what failed: the run keeps its last state


def discard_sweep(recorder: TrialRecorder | None) -> None:
    """Delete the parent run of a sweep refused before its first trial (best effort)."""
    if recorder is None:
        return
    try:
        recorder.client.delete_run(recorder.parent_run_id)
    except (MlflowException, OSError):
        pass


def close_sweep(recorder: TrialRecorder | None, board: Board, outputs: Path) -> None:
    """Attach the leaderboard, best config and plots; close the parent unless trials are left."""
    if recorder is None:
        return
    client, parent = recorder.client, recorder.parent_run_id
    client.log_artifacts(parent, str(outputs))
    counts: dict[str, int] = {}
    for row in board.rows:
        counts[row.outcome] = counts.get(row.outcome, 0) + 1
    client.log_batch(parent, tags=[RunTag(f"raymix.trials.{k}", str(v)) for k, v in counts.items()])
    best = board.best_row()
    if best is not None:
        client.log_metric(parent, f"best_{board.metric}", best.last)
        client.set_tag(parent, "raymix.best_trial", best.trial_id)
    if board.space.multi_objective:
        tag_front(recorder, board)
    unfinished = set(counts) - {"completed", "pruned", "failed"}
    if not unfinished:
        client.set_terminated(parent, "FINISHED")


def tag_front(recorder: TrialRecorder, board: Board) -> None:
    """A multi-objective sweep's Pareto front: ``raymix.pareto`` true/false on each trial's run,
    the front's trial ids on the parent (``raymix.pareto_front``); ``pareto_front.csv`` is
    among the parent's artifacts."""
    client, parent = recorder.client, recorder.parent_run_id
    front = {row.trial_id for row in board.front()}
    on_front = [row.trial_id for row in board.ranked() if row.trial_id in front]
    client.set_tag(parent, "raymix.pareto_front", ",".join(on_front)[:5000])
    query = f"tags.`{PARENT_TAG}` = '{parent}'"
    token = None
    while True:
        page = client.search_runs([recorder.experiment_id], query, max_results=1000, page_token=token)
        for run in page:
            trial = run.data.tags.get(TRIAL_TAG)
            if trial is not None:
                client.set_tag(run.info.run_id, PARETO_TAG, str(trial in on_front).lower())
        token = page.token
        if not token:
            break


def checkpoints(roots: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """(folder, reported metrics) of every checkpoint under the given trial folders."""
    found = []
    for root in roots:
        fs, path = file_system(root)
        try:
            infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
        except OSError:
            continue
        for info in infos:
            if info.type != pyarrow.fs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
                continue
            try:
                with fs.open_input_stream(f"{info.path}/{METRICS_FILE}") as f:
                    metrics = json.loads(bytes(f.read()).decode())
            except (OSError, ValueError):
                continue
            prefix = root[: len(root) - len(path)] if "://" in root else ""
            found.append((prefix + info.path, metrics))
    return found


class TrialRecorder(Callback):
    """A Tune callback in the driver that mirrors every trial into an MLflow child run."""

    def __init__(
        self,
        *,
        uri: str,
        experiment_id: str,
        parent_run_id: str,
        sweep: dict[str, Any],
        train_root: str,
        sweep_name: str,
    ) -> None:
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self.sweep, self.train_root, self.sweep_name = sweep, train_root, sweep_name
        self.epochs = config_for(sweep["base"], {}).training.epochs
        self._client: MlflowClient | None = None
        self._runs: dict[str, str] = {}  # trial_id -> run_id
        self._epochs: dict[str, int] = {}  # trial_id -> last epoch recorded
        self._closed: set[str] = set()  # trial_ids whose run this driver closed

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with its state
        return {**self.__dict__, "_client": None, "_runs": {}, "_epochs": {}, "_closed": set()}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.uri)
        return self._client

    @property
    def metric(self) -> str:
        return str(self.sweep["space"]["metric"])

    # ------------------------------------------------------------ runs

    def _run(self, trial: Any) -> str:
        trial_id = trial.trial_id
        if trial_id in self._runs:
            return self._runs[trial_id]
        query = f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{PARENT_TAG}` = '{self.parent_run_id}'"
        found = self.client.search_runs([self.experiment_id], query, max_results=1)
        if found:
            run_id = found[0].info.run_id
            self._epochs[trial_id] = int(found[0].data.metrics.get("epoch", 0))
        else:
            run_id = self._create(trial)
            self._epochs[trial_id] = 0
        self._runs[trial_id] = run_id
        return run_id

    def _create(self, trial: Any) -> str:
        cfg = trial_config(dict(trial.config), self.sweep["space"], self.sweep["base"])
        point = decode_point(SearchSpace.model_validate(self.sweep["space"]), dict(trial.config))
        tags = {
            PARENT_TAG: self.parent_run_id,
            TRIAL_TAG: trial.trial_id,
            "raymix.sampled": json.dumps(point),
        }
        run = self.client.create_run(
            self.experiment_id, run_name=f"{self.sweep_name}-{trial.trial_id}", tags=tags
        )
        run_id = run.info.run_id
        _log_params(self.client, run_id, flatten(cfg.to_dict()))
        self.client.log_text(run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
        return run_id

    def _finish(self, trial: Any, status: str, tags: dict[str, str]) -> None:
        run_id = self._run(trial)
        self._closed.add(trial.trial_id)
        if self.client.get_run(run_id).info.status != "RUNNING":
            return  # closed before the driver was restarted
        self._log_checkpoints(trial, run_id)
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(run_id, status)

    def _log_checkpoints(self, trial: Any, run_id: str) -> None:
        found = checkpoints([str(trial.path), f"{self.train_root}/{trial.trial_id}"])
        if not found:
            return
        scored = [(f, m) for f, m in found if isinstance(m.get(self.metric), int | float)]
        sign = 1.0 if self.sweep["space"]["mode"] == "max" else -1.0
        last = max(found, key=lambda fm: fm[1].get("epoch", 0))[0]
        best = max(scored, key=lambda fm: sign * fm[1][self.metric])[0] if scored else last
        for name, folder in (("best", best), ("last", last)):
            if "://" in folder:
                with tempfile.TemporaryDirectory() as tmp:
                    fs, path = file_system(folder)
                    pyarrow.fs.copy_files(path, tmp, source_filesystem=fs)
                    self.client.log_artifacts(run_id, tmp, f"checkpoints/{name}")
            else:
                self.client.log_artifacts(run_id, folder, f"checkpoints/{name}")
        self.client.set_tag(run_id, "raymix.best_checkpoint_epoch", str(dict(found)[best].get("epoch")))

    # ------------------------------------------------------------ Tune's hooks

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._run(trial)

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any
    ) -> None:
        run_id = self._run(trial)
        epoch = int(result.get("epoch", 0))
        if epoch <= self._epochs.get(trial.trial_id, 0):
            return  # recorded before the driver was restarted
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, epoch)
            for key, value in fresh(result).items()
            if key not in TUNE_KEYS and isinstance(value, int | float) and not isinstance(value, bool)
            and not (isinstance(value, float) and math.isinf(value))
        ]  # fmt: skip
        self.client.log_batch(run_id, metrics=metrics)
        self._epochs[trial.trial_id] = epoch

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        done = self._epochs.get(trial.trial_id, 0) >= self.epochs
        self._finish(
            trial, "FINISHED" if done else "KILLED", {"raymix.outcome": "completed" if done else "pruned"}
        )

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        """Close, once, the runs of trials that Tune terminated without ``on_trial_complete``:
        it ends a whole sweep that way (a time budget, a stop target: see
        :mod:`raymix.integrations.stopping`). They are recorded as stopped early (pruned)."""
        for trial in trials:
            if trial.status == "TERMINATED" and trial.trial_id in self._runs:
                if trial.trial_id not in self._closed:
                    self.on_trial_complete(iteration, trials, trial)

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.client.set_tag(self._run(trial), "raymix.last_retry_error", trial_error(trial))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._finish(trial, "FAILED", {"raymix.outcome": "failed", "raymix.error": trial_error(trial)})
