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
``raymix.trial_id``) and logs only epochs that are not recorded yet. The parent and the
trials carry the same system tags as single runs (:func:`run_tracking.system_tags`);
``tracking.log_checkpoints`` says which of a trial's checkpoints are logged (best by
default). The sweep folder itself is not copied: the parent gets only its summary files.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs
import yaml
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from raymix.engine.run import flatten
from raymix.integrations import study
from raymix.integrations.cluster import redact_uri
from raymix.integrations.leaderboard import (
    BEST_CONFIG_FILE,
    LEADERBOARD_FILE,
    PARETO_FILE,
    Board,
    file_system,
    trial_error,
)
from raymix.integrations.plan import Sweep
from raymix.integrations.ray_train import METRICS_FILE
from raymix.integrations.run_tracking import (  # noqa: F401 (check_reachable, tracking_uri: re-exported)
    CHECKPOINT_KINDS,
    check_reachable,
    epoch_metrics,
    experiment_id,
    log_params,
    store_error,
    store_lock,
    system_tags,
    tracking_uri,
)
from raymix.integrations.search_space import (
    POPULATION_SCHEDULERS,
    SearchSpace,
    config_for,
    decode_point,
    trial_config,
)

SWEEP_TAG, TRIAL_TAG, PARENT_TAG = "raymix.sweep", "raymix.trial_id", "mlflow.parentRunId"
PARETO_TAG = "raymix.pareto"  # multi-objective sweeps: "true" on the runs of the Pareto front
# Keys Tune adds to every result: bookkeeping, not measurements.
TUNE_KEYS = {
    "done", "training_iteration", "trial_id", "timestamp", "time_this_iter_s", "time_total_s",
    "pid", "hostname", "node_ip", "time_since_restore", "iterations_since_restore",
    "checkpoint_dir_name", "should_checkpoint",
}  # fmt: skip


def _masked(values: dict[str, Any]) -> dict[str, Any]:
    """Values with the password of any URI in them masked (an RDB URL in searcher.storage)."""
    return {k: redact_uri(v) if isinstance(v, str) else v for k, v in values.items()}


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
            experiment = experiment_id(client, settings.experiment, uri)
        found = (
            client.search_runs([experiment], f"tags.`{SWEEP_TAG}` = '{sweep.path}'", max_results=1)
            if resume
            else []
        )
        tags = system_tags("tune")
        if found:
            parent_id = found[0].info.run_id
        else:
            run = client.create_run(experiment, run_name=sweep.name, tags={**tags, SWEEP_TAG: sweep.path})
            parent_id = run.info.run_id
            space = sweep.space.model_dump(mode="json")
            log_params(
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
        raise store_error(uri, exc) from None
    return TrialRecorder(
        uri=uri,
        experiment_id=experiment,
        parent_run_id=parent_id,
        sweep=sweep.resolved(),
        train_root=f"{sweep.path}/train",
        sweep_name=sweep.name,
        tags=tags,
        log_checkpoints=settings.log_checkpoints,
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
    """Attach the summary files :func:`leaderboard.render` wrote in ``outputs`` (leaderboard,
    Pareto front, best config, plots; the space was attached at the start), never the sweep
    folder itself; close the parent unless trials are left."""
    if recorder is None:
        return
    client, parent = recorder.client, recorder.parent_run_id
    for name in (LEADERBOARD_FILE, PARETO_FILE, BEST_CONFIG_FILE):
        if (outputs / name).is_file():
            client.log_artifact(parent, str(outputs / name))
    if (outputs / "plots").is_dir() and any((outputs / "plots").iterdir()):
        client.log_artifacts(parent, str(outputs / "plots"), "plots")
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
        tags: dict[str, str] | None = None,
        log_checkpoints: str = "best",
    ) -> None:
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self.sweep, self.train_root, self.sweep_name = sweep, train_root, sweep_name
        self.tags, self.log_checkpoints = dict(tags or {}), log_checkpoints
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
            **self.tags,
            PARENT_TAG: self.parent_run_id,
            TRIAL_TAG: trial.trial_id,
            "raymix.sampled": json.dumps(point),
        }
        run = self.client.create_run(
            self.experiment_id, run_name=f"{self.sweep_name}-{trial.trial_id}", tags=tags
        )
        run_id = run.info.run_id
        log_params(self.client, run_id, flatten(cfg.to_dict()))
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
        chosen = {"best": best, "last": last}
        for name in CHECKPOINT_KINDS[self.log_checkpoints]:
            folder = chosen[name]
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
        self.client.log_batch(run_id, metrics=epoch_metrics(result, epoch, TUNE_KEYS))
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
