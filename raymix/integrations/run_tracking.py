"""MLflow records of single runs (``raymix train``), and the MLflow helpers sweeps share.

One MLflow run per training run, in-process (:func:`raymix.engine.run.fit`) or through Ray
Train (:func:`raymix.integrations.ray_train.run`): the resolved config flattened into params
and as ``config.yaml``, every trained epoch's measured metrics with ``step = epoch``, the
system tags MLflow's UI filters on (:func:`system_tags`), and at the end the checkpoints
that ``tracking.log_checkpoints`` names as artifacts.

The run's id is kept in its folder (:data:`RUN_FILE`): a run resumed from its latest
checkpoint reopens that MLflow run (RUNNING again, then FINISHED) instead of starting a
second one, and records only the epochs it has not recorded yet. A run that raises is
marked FAILED (KILLED when interrupted) with the error as a tag.

Nothing here imports Ray: ``raymix train`` in one process loads MLflow only. Sweep trials
never come through here: their runs are written by the sweep driver's
:class:`raymix.integrations.tracking.TrialRecorder`.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import logging
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from raymix.config import Config, ConfigError, TrackingConfig
from raymix.engine.loop import EpochEnd, Report, fresh
from raymix.engine.run import flatten
from raymix.integrations.cluster import redact_uri

RUN_FILE = "mlflow_run.json"  # in the run folder: the MLflow run a resumed run continues
RUN_DIR_TAG = "raymix.run_dir"
RETRIES_ENV, TIMEOUT_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"
BATCH = 100  # MLflow takes at most 100 params per batch
# tracking.log_checkpoints -> the checkpoints logged as artifacts
CHECKPOINT_KINDS = {"best": ("best",), "last": ("last",), "both": ("best", "last"), "none": ()}
VERSIONED = ("raymix", "torch", "timm", "ray", "optuna", "mlflow")  # recorded in raymix.versions


# ---------------------------------------------------------------- the store


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


def reason(exc: BaseException) -> str:
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


def store_error(uri: str, exc: BaseException) -> ConfigError:
    return ConfigError(
        f"{uri_source()} {redact_uri(uri)}: the MLflow tracking store cannot be used: "
        f"{redact_uri(reason(exc))}"
    )


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
            why = reason(exc)
        except (OSError, ValueError) as exc:  # requests' errors are OSErrors
            why = reason(exc)
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
    # MLflow announces on stderr that it creates the tables of a new database: not news here.
    quiet = [logging.getLogger(name) for name in ("mlflow.store.db.utils", "alembic")]
    levels = [logger.level for logger in quiet]
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for logger in quiet:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(quiet, levels, strict=True):
                logger.setLevel(level)
            fcntl.flock(lock, fcntl.LOCK_UN)


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = None
    if uri.startswith("sqlite:///"):  # artifacts beside the database, not in the working directory
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return str(client.create_experiment(name, artifact_location=location))


def log_params(client: MlflowClient, run_id: str, values: dict[str, Any]) -> None:
    params = [
        Param(k, json.dumps(v) if isinstance(v, list | dict) else str(v)[:6000]) for k, v in values.items()
    ]
    for i in range(0, len(params), BATCH):
        client.log_batch(run_id, params=params[i : i + BATCH])


def epoch_metrics(
    result: dict[str, Any], epoch: int, skip: set[str] | frozenset[str] = frozenset()
) -> list[Metric]:
    """An epoch's measured values as MLflow metrics at ``step = epoch``: repeated evaluations,
    non-numbers, flags and infinities (no best value before the first evaluation) left out."""
    now = int(time.time() * 1000)
    return [
        Metric(key, float(value), now, epoch)
        for key, value in fresh(result).items()
        if key not in skip and isinstance(value, int | float) and not isinstance(value, bool)
        and not (isinstance(value, float) and math.isinf(value))
    ]  # fmt: skip


# ---------------------------------------------------------------- reproducibility tags


def git_commit(folder: Path | None = None) -> str | None:
    """The commit of the git checkout holding ``folder`` (default: raymix's code), if any."""
    where = folder or Path(__file__).resolve().parent
    try:
        done = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        return str(os.getuid())


def _versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def system_tags(command: str) -> dict[str, str]:
    """The tags MLflow's own clients set (source, user, git commit) plus raymix's command line
    and library versions; ``command``: ``train`` or ``tune``."""
    tags = {
        "mlflow.source.name": f"raymix {command}",
        "mlflow.source.type": "LOCAL",
        "mlflow.user": _user(),
        "raymix.command": redact_uri(shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]))[:5000],
        "raymix.versions": json.dumps(_versions()),
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


# ---------------------------------------------------------------- the run folder's record


def _read(location: str) -> str | None:
    """A small file of a local run folder or of one on remote storage (s3://, gs://, ...)."""
    try:
        if "://" not in location:
            return Path(location).read_text()
        import pyarrow.fs  # remote run folders only (Ray Train with remote storage)

        fs, path = pyarrow.fs.FileSystem.from_uri(location)
        with fs.open_input_stream(path) as f:
            return bytes(f.read()).decode()
    except (OSError, ValueError):
        return None


def _write(location: str, text: str) -> None:
    if "://" not in location:
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        Path(location).write_text(text)
        return
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(location)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


class RunTracker:
    """Where one run is recorded; :meth:`connect` checks the store before anything is written."""

    def __init__(self, uri: str, settings: TrackingConfig) -> None:
        self.uri, self.settings = uri, settings

    @classmethod
    def connect(cls, cfg: Config) -> RunTracker | None:
        """None when ``tracking.enabled`` is false; :class:`ConfigError` naming the URI when an
        MLflow server does not answer (a SQLite store is created by :meth:`start`)."""
        if not cfg.tracking.enabled:
            return None
        check_reachable(cfg.tracking)
        return cls(tracking_uri(cfg.tracking.uri), cfg.tracking)

    def start(
        self,
        cfg: Config,
        folder: str | Path,
        *,
        resumed: bool,
        command: str = "train",
        log: Callable[[str], None] = print,
    ) -> RunRecord:
        """The run's MLflow record: the one its folder names when ``resumed`` (a run continued
        from its latest checkpoint), else a new one whose id is saved in the folder."""
        folder = str(folder)
        try:
            with store_lock(self.uri):  # a new SQLite store is created (migrated) by the first client
                client = MlflowClient(self.uri)
                experiment = experiment_id(client, self.settings.experiment, self.uri)
            found = self._previous(client, folder, experiment) if resumed else None
            values = flatten(cfg.to_dict())
            if found is not None:
                run_id, last = found.info.run_id, int(found.data.metrics.get("epoch", 0))
                client.update_run(run_id, status="RUNNING")
                # A resumed run may change resumable keys; MLflow refuses to change a param.
                log_params(client, run_id, {k: v for k, v in values.items() if k not in found.data.params})
            else:
                tags = {**system_tags(command), RUN_DIR_TAG: folder}
                run = client.create_run(experiment, run_name=Path(folder).name, tags=tags)
                run_id, last = run.info.run_id, 0
                log_params(client, run_id, values)
            client.log_text(run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
            saved = {"run_id": run_id, "experiment_id": experiment, "tracking_uri": redact_uri(self.uri)}
            _write(f"{folder}/{RUN_FILE}", json.dumps(saved) + "\n")
        except (MlflowException, OSError) as exc:
            raise store_error(self.uri, exc) from None
        how = f"continues run {run_id} after epoch {last}" if found is not None else f"run {run_id}"
        log(f"MLflow {redact_uri(self.uri)}: {how}")
        return RunRecord(self.uri, run_id, last, self.settings.log_checkpoints)

    def _previous(self, client: MlflowClient, folder: str, experiment: str) -> Any:
        """The run named in the folder's :data:`RUN_FILE`, if it is in this store and not deleted."""
        text = _read(f"{folder}/{RUN_FILE}")
        try:
            run_id = json.loads(text)["run_id"] if text else None
        except (ValueError, KeyError, TypeError):
            return None
        if not run_id:
            return None
        try:
            run = client.get_run(run_id)
        except MlflowException:
            return None  # another store, or deleted for good
        if run.info.lifecycle_stage != "active" or run.info.experiment_id != experiment:
            return None
        return run


class RunRecord:
    """One run's MLflow run, written by one process: the run's own (in-process) or Ray Train's
    controller, which sits on the driver's node (epochs), then the driver (the end).

    A store that fails mid-run costs the record, not the run: the failure is reported once
    and the later epochs go unrecorded (``metrics.jsonl`` and the checkpoints keep them).
    """

    def __init__(self, uri: str, run_id: str, last_epoch: int, log_checkpoints: str) -> None:
        self.uri, self.run_id, self.last_epoch = uri, run_id, last_epoch
        self.log_checkpoints = log_checkpoints
        self.broken = False
        self._client: MlflowClient | None = None

    def __getstate__(self) -> dict[str, Any]:  # pickled to Ray Train's controller
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.uri)
        return self._client

    def _warn(self, what: str, exc: BaseException) -> None:
        print(
            f"raymix: warning: MLflow {redact_uri(self.uri)} run {self.run_id}: {what} failed "
            f"({redact_uri(reason(exc))}); the run goes on without its MLflow record",
            file=sys.stderr,
            flush=True,
        )
        self.broken = True

    def epoch(self, metrics: dict[str, Any]) -> None:
        """A trained epoch's metrics at ``step = epoch``; epochs recorded before are skipped (a
        run resumed after epochs that its last checkpoint does not hold, a restarted worker group)."""
        epoch = int(metrics.get("epoch", 0))
        if self.broken or epoch <= self.last_epoch:
            return
        try:
            if self._client is None:  # a new process (a restarted Train controller): what is recorded?
                recorded = self.client.get_run(self.run_id).data.metrics.get("epoch", 0)
                self.last_epoch = max(self.last_epoch, int(recorded))
                if epoch <= self.last_epoch:
                    return
            self.client.log_batch(self.run_id, metrics=epoch_metrics(metrics, epoch))
        except (MlflowException, OSError) as exc:
            self._warn(f"recording epoch {epoch}", exc)
            return
        self.last_epoch = epoch

    def around(self, report: Report) -> Report:
        """``report``, then the epoch into MLflow (trained epochs only: not the initial
        evaluation, nor a finished run's final one again)."""

        def both(end: EpochEnd) -> None:
            report(end)
            if end.kind == "epoch":
                self.epoch(end.metrics)

        return both

    def finish(self, checkpoints: Mapping[str, str | Path | None]) -> None:
        """Log the checkpoints ``tracking.log_checkpoints`` names (``{"best": path, "last":
        path}``: a file goes into ``checkpoints/``, a Ray Train checkpoint folder becomes
        ``checkpoints/<kind>/``) and mark the run FINISHED. A store failing now is reported:
        the run itself has succeeded."""
        try:
            for kind in CHECKPOINT_KINDS[self.log_checkpoints]:
                path = checkpoints.get(kind)
                if path is None:
                    continue
                if Path(path).is_dir():
                    self.client.log_artifacts(self.run_id, str(path), f"checkpoints/{kind}")
                elif Path(path).is_file():
                    self.client.log_artifact(self.run_id, str(path), "checkpoints")
            self.client.set_terminated(self.run_id, "FINISHED")
        except (MlflowException, OSError) as exc:
            self._warn("closing the run", exc)

    def fail(self, error: BaseException) -> None:
        """FAILED with the error as a tag (KILLED when interrupted); best effort: the store may
        be what failed. A run resumed later reopens the same MLflow run."""
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        try:
            self.client.set_tag(self.run_id, "raymix.error", f"{type(error).__name__}: {error}"[:5000])
            self.client.set_terminated(self.run_id, status)
        except (MlflowException, OSError):
            pass

    @contextlib.contextmanager
    def running(self) -> Iterator[RunRecord]:
        """Marks the run failed if the block raises (and re-raises)."""
        try:
            yield self
        except BaseException as exc:
            self.fail(exc)
            raise
