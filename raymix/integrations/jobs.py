"""``raymix submit``: run ``raymix tune`` or ``raymix train`` on a Ray cluster as a Ray job.

Submits ``raymix COMMAND ...`` through Ray's public job SDK
(:class:`ray.job_submission.JobSubmissionClient`) with this folder as the job's working
directory. The runtime environment carries ``MLFLOW_TRACKING_URI`` and
``RAYMIX_STORAGE_PATH`` (and any ``--env``) to the job, whose entrypoint then joins the
cluster through the ``RAY_ADDRESS`` that Ray sets for it. Before submitting, the job
server must answer at the address, and the sweep or run must have somewhere to keep its
results: a job's working directory is deleted with the cluster's session.

Then: the job's id and dashboard link are printed, its logs followed (unless ``--no-wait``)
and its final status ends the command (exit 1 unless it succeeded).

Token authentication: with ``RAY_AUTH_MODE=token``, or no mode set and a token at hand
(``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, as ``ray
start`` decides for a new head), the token goes in the client's ``Authorization: Bearer``
header (the client's public ``headers`` argument).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from raymix.config import ConfigError, load_config
from raymix.errors import RunFailedError
from raymix.integrations.cluster import (
    MASK,
    STORAGE_ENV,
    auth_mode,
    http_probe,
    redact_uri,
    token_available,
)
from raymix.integrations.search_space import config_for, load_search_space

DASHBOARD_PORT = 8265
# Never uploaded with the working directory: environments, local results and data.
EXCLUDES = [
    "/.git", "/.venv", "/venv", "/runs", "/sweeps", "/mlruns", "/mlartifacts", "/mlflow-server", "/data",
    "*.db", "*.pt",
]  # fmt: skip
TRACKING_ENV = "MLFLOW_TRACKING_URI"
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# How long a refused submission is tried again while the head's job agent registers.
AGENT_WAIT_S, AGENT_RETRY_S = 90.0, 5.0
STATUS_POLL_S = 2.0
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def new_submission_id(command: str) -> str:
    """A fresh id for the job (chosen here, so a refused submission can be looked up)."""
    return f"raymix-{command}-{uuid.uuid4().hex[:12]}"


@dataclass
class Job:
    address: str | None  # the job server; None: not named (enough for a dry run)
    entrypoint: list[str]  # the raymix command's arguments: ["tune", "space.yaml", ...]
    working_dir: str = "."
    env_vars: dict[str, str] = field(default_factory=dict)
    no_wait: bool = False
    submission_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.submission_id:
            self.submission_id = new_submission_id(self.entrypoint[0] if self.entrypoint else "job")

    def secrets(self) -> list[str]:
        """The values that are masked wherever raymix prints (at least 4 characters long)."""
        values = [v for k, v in self.env_vars.items() if mask_value(k, v) == MASK]
        for uri in (self.env_vars.get(TRACKING_ENV, ""), self.env_vars.get(STORAGE_ENV, "")):
            hidden = redact_uri(uri)
            if hidden != uri:
                values.append(uri.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1])
        return [v for v in values if len(v) >= 4]

    def runtime_env(self, *, masked: bool = False) -> dict[str, Any]:
        env = {key: mask_value(key, value) if masked else value for key, value in self.env_vars.items()}
        return {"working_dir": self.working_dir, "env_vars": env, "excludes": list(EXCLUDES)}

    def command(self, *, masked: bool = False) -> str:
        """The job's entrypoint: the shell command the cluster runs."""
        words = [redact_uri(word) for word in self.entrypoint] if masked else self.entrypoint
        return shlex.join(["raymix", *words])

    def request(self, *, masked: bool = True) -> dict[str, Any]:
        """What is sent to the job server (``JobSubmissionClient.submit_job``'s arguments)."""
        return {
            "entrypoint": self.command(masked=masked),
            "submission_id": self.submission_id,
            "runtime_env": self.runtime_env(masked=masked),
            "metadata": dict(self.metadata),
        }

    def link(self, job_id: str) -> str:
        """The job's page in the cluster's dashboard (served by the job server)."""
        return f"{self.address}/#/jobs/{job_id}"


def mask_value(key: str, value: str) -> str:
    """What is printed of an environment variable passed to the job.

    raymix's own settings are shown with any password in a URI masked; references to the
    cluster's environment (``${KEY}``) are shown as they are; any other value is masked, since
    ``--env`` is how secrets reach a job.
    """
    if key in (TRACKING_ENV, STORAGE_ENV):
        return redact_uri(value)
    if value == f"${{{key}}}":
        return value
    return MASK


def mask(text: str, secrets: Sequence[str]) -> str:
    """``text`` with each secret value and every password in a URI replaced by ``***``."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return redact_uri(text)


def job_server(address: str | None, environ: Mapping[str, str]) -> str:
    """The job server's URL: ``--address``, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS."""
    address = address or environ.get("RAY_API_SERVER_ADDRESS") or environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError(
            f"--address: no Ray job server named; pass --address http://HEAD:{DASHBOARD_PORT} "
            "(the head's dashboard) or set RAY_ADDRESS"
        )
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"--address {address}: expected the dashboard's http://HOST:{DASHBOARD_PORT}")
    return address.rstrip("/")


def check_job_server(address: str, environ: Mapping[str, str], timeout: float = 5.0) -> None:
    """The job server answers at ``address`` and we hold a token if it wants one."""
    status, why = http_probe(f"{address}/api/version", timeout)
    if why is not None:
        hint = " (6379 is the cluster's GCS port; jobs go to the dashboard's)" if ":6379" in address else ""
        raise ConfigError(
            f"--address {address}: no Ray job server answers there ({why}){hint}. Start a cluster "
            f"with ray start --head, or give the head's dashboard address http://HEAD:{DASHBOARD_PORT}"
        )
    if status in (401, 403) and not token_available(environ):
        raise ConfigError(
            f"--address {address}: the Ray cluster requires token authentication and no token is "
            "here; copy the head's ~/.ray/auth_token here or set RAY_AUTH_TOKEN"
        )


def _absolute(value: str, what: str) -> None:
    if "://" not in value and not Path(value).expanduser().is_absolute():
        raise ConfigError(
            f"{what} {value!r}: must be absolute or a URI; the job runs in a temporary working directory"
        )


def check_entrypoint(
    command: str, file: str, overrides: Sequence[str], working_dir: str, env_vars: Mapping[str, str]
) -> None:
    """Validate the command's file and overrides here, before the cluster sees them.

    A job must keep its results (a sweep's folder, a run's checkpoints) in storage that
    outlives the job's temporary working directory and, unless ``tracking.enabled=false``,
    record to a tracking URI the cluster reaches: the default ``mlflow.db`` would be written
    into that directory and deleted with it.
    """
    path = Path(working_dir) / file
    if command == "tune":
        space, base = load_search_space(path, list(overrides))
        cfg = config_for(base, {})
        key, storage = "storage_path", space.storage_path
    else:
        cfg = load_config(path, list(overrides))
        key, storage = "scaling.storage_path", cfg.scaling.storage_path
    if env_vars.get(STORAGE_ENV):
        key, storage = "--storage", env_vars[STORAGE_ENV]
    if not storage:
        raise ConfigError(
            f"raymix submit: pass --storage (or set {key}): results in the job's working directory are "
            "deleted with the cluster's session. Use a path on the head, or shared storage on several nodes"
        )
    _absolute(storage, key)
    if not cfg.tracking.enabled:
        return
    uri = env_vars.get(TRACKING_ENV) or cfg.tracking.uri
    if not uri:
        what = "sweep" if command == "tune" else "run"
        raise ConfigError(
            f"raymix submit: the {what}'s MLflow records need a tracking server the cluster reaches: "
            "pass --tracking-uri http://HOST:5000 (launch/mlflow_server.sh), or tracking.enabled=false"
        )
    if uri.startswith("sqlite:///"):
        _absolute(uri.removeprefix("sqlite:///"), "tracking.uri")


def prepare_job(
    entrypoint: Sequence[str],
    parsed: tuple[str, str, Sequence[str]],
    *,
    address: str | None,
    storage: str | None,
    tracking_uri: str | None,
    env: Sequence[str] = (),
    working_dir: str = ".",
    no_wait: bool = False,
    environ: Mapping[str, str] = os.environ,
) -> Job:
    """The job to submit, checked; raises :class:`ConfigError` on bad input.

    ``entrypoint`` is the raymix command line to run and ``parsed`` its (command, file,
    overrides) as the CLI parsed them. No address (neither given nor in the environment)
    is fine here: a dry run needs none; :func:`submit` asks for it.
    """
    if not Path(working_dir).is_dir():
        raise ConfigError(f"--working-dir {working_dir!r} is not a folder")
    env_vars: dict[str, str] = {}
    for item in env:
        key, sep, value = item.partition("=")
        if not ENV_NAME.fullmatch(key):
            raise ConfigError(
                f"--env {redact_uri(key)!r}: expected KEY=VALUE, or KEY to pass the cluster's own KEY "
                "(KEY: letters, digits and '_', not starting with a digit)"
            )
        # KEY alone: a reference, ${KEY}, that Ray expands from the environment on the cluster.
        env_vars[key] = value if sep else f"${{{key}}}"
    uri = tracking_uri or environ.get(TRACKING_ENV)
    if uri:
        env_vars[TRACKING_ENV] = uri
    storage = storage or environ.get(STORAGE_ENV)
    if storage:
        env_vars[STORAGE_ENV] = storage
    check_entrypoint(*parsed, working_dir, env_vars)
    named = address or environ.get("RAY_API_SERVER_ADDRESS") or environ.get("RAY_ADDRESS")
    from raymix import __version__

    command, file, _ = parsed
    metadata = {"raymix.command": command, "raymix.file": file, "raymix.version": __version__}
    return Job(
        job_server(address, environ) if named else None,
        list(entrypoint),
        working_dir,
        env_vars,
        no_wait,
        submission_id=new_submission_id(command),
        metadata=metadata,
    )


# ---------------------------------------------------------------- submitting


def auth_headers(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``Authorization`` header for a cluster with token authentication, by
    :func:`raymix.integrations.cluster.auth_mode` (none when the mode is not ``token``)."""
    if auth_mode(environ) != "token":
        return {}
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
        try:
            token = path.read_text().strip()
        except OSError:
            return {}  # RAY_AUTH_MODE=token without a token: the server's 401 says so
    return {"Authorization": f"Bearer {token}"} if token else {}


class Client(Protocol):
    """What raymix uses of :class:`ray.job_submission.JobSubmissionClient` (fakes in tests)."""

    def submit_job(
        self,
        *,
        entrypoint: str,
        submission_id: str | None = ...,
        runtime_env: dict[str, Any] | None = ...,
        metadata: dict[str, str] | None = ...,
    ) -> str: ...
    def list_jobs(self) -> Sequence[Any]: ...
    def get_job_status(self, job_id: str) -> Any: ...
    def get_job_info(self, job_id: str) -> Any: ...
    def tail_job_logs(self, job_id: str) -> Any: ...


def connect(address: str, headers: Mapping[str, str]) -> Client:
    """Ray's job client for ``address``; refusals become :class:`ConfigError`."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=dict(headers) or None)
    except ConnectionError as exc:
        raise ConfigError(f"--address {address}: {exc}") from None
    except AuthenticationError as exc:
        raise ConfigError(f"--address {address}: {_refused_token(exc)}") from None


def _refused_token(error: BaseException) -> str:
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return (
        f"the job server refused the request ({first}); copy the head's ~/.ray/auth_token here "
        "or set RAY_AUTH_TOKEN (RAY_AUTH_MODE=token)"
    )


def should_retry(error: BaseException, job_created: bool | None) -> bool:
    """Whether a failed submission is tried again (while time remains).

    Ray's job server answers a submission it cannot hand to the head's job agent (not
    registered yet: the first seconds after ``ray start``) with an error, and the SDK raises
    a plain ``RuntimeError``; such a job is never created. So: a ``RuntimeError`` from the
    request, and the server holds no job under our submission id (``job_created`` False),
    is tried again with the same id, which cannot start the job twice. Not: no server
    (``ConnectionError``), a refused token (``AuthenticationError``), the SDK's own checks
    of the request (``ValueError``, ``TypeError``), a job that was created after all, or a
    server that could not be asked (``job_created`` None).
    """
    return isinstance(error, RuntimeError) and job_created is False


def job_exists(client: Client, submission_id: str) -> bool | None:
    """Whether the server holds a job with ``submission_id``; None when it cannot say."""
    try:
        return any(getattr(job, "submission_id", None) == submission_id for job in client.list_jobs())
    except Exception:  # the server could not be asked: do not retry blindly
        return None


def submit_job(
    client: Client,
    job: Job,
    *,
    log: Callable[[str], None] = print,
    wait_s: float = AGENT_WAIT_S,
    retry_s: float = AGENT_RETRY_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Submit ``job`` through ``client``, again while the job agent is not ready; its id.

    Raises :class:`RunFailedError` when the server refuses the job for good.
    """
    from ray.exceptions import AuthenticationError

    deadline = clock() + wait_s
    request = job.request(masked=False)
    while True:
        try:
            return str(client.submit_job(**request))
        except AuthenticationError as exc:
            raise ConfigError(f"--address {job.address}: {_refused_token(exc)}") from None
        except (RuntimeError, ValueError, TypeError) as exc:
            if not should_retry(exc, job_exists(client, job.submission_id)) or clock() >= deadline:
                message = mask(str(exc).strip(), job.secrets())
                raise RunFailedError(f"the job server refused the job: {message}") from None
        # The head's job server answers before its job agent has registered (seconds after
        # `ray start`): Ray refuses the job without creating it, so it is safe to ask again.
        log(f"the cluster's job agent is not ready yet; submitting again in {retry_s:g} s")
        sleep(retry_s)


def follow_logs(
    client: Client, job_id: str, secrets: Sequence[str], write: Callable[[str], Any] | None = None
) -> None:
    """Print the job's logs as they come (``tail_job_logs``), line by line, secrets masked."""
    out: Callable[[str], Any] = write or sys.stdout.write

    async def tail() -> None:
        rest = ""
        async for chunk in client.tail_job_logs(job_id):
            *lines, rest = (rest + chunk).split("\n")
            for line in lines:
                out(mask(line, secrets) + "\n")
            sys.stdout.flush()
        if rest:
            out(mask(rest, secrets) + "\n")

    asyncio.run(tail())


def final_status(
    client: Client,
    job_id: str,
    *,
    poll_s: float = STATUS_POLL_S,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """The job's terminal status (SUCCEEDED, FAILED, STOPPED), waiting for it."""
    while True:
        answer = client.get_job_status(job_id)  # a JobStatus (a str Enum)
        status = str(getattr(answer, "value", answer))
        if status in TERMINAL:
            return status
        sleep(poll_s)


def submit(
    job: Job,
    *,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
    environ: Mapping[str, str] = os.environ,
    client: Client | None = None,
) -> int:
    """Submit ``job``; 0 when it succeeded (or, with ``no_wait``, was accepted), else 1.

    A dry run prints the request as JSON (secrets masked) and needs no address or cluster.
    Otherwise: raises :class:`ConfigError` when no job server answers at the address or it
    wants a token that is not here; prints the job id and its dashboard link, follows its
    logs unless ``no_wait``, and ends with its final status.
    """
    if dry_run:
        mode = auth_mode(environ)
        log(json.dumps({"address": job.address, "auth": mode, **job.request(masked=True)}, indent=2))
        return 0
    address = job.address or job_server(None, environ)
    job.address = address
    if client is None:
        check_job_server(address, environ)
        client = connect(address, auth_headers(environ))
    job_id = submit_job(client, job, log=log)
    log(f"job {job_id} submitted to {address}")
    log(f"dashboard: {job.link(job_id)}")
    if job.no_wait:
        log(f"not waiting; follow it with: ray job logs --follow --address {address} {job_id}")
        return 0
    try:
        try:
            follow_logs(client, job_id, job.secrets())
        except (RuntimeError, OSError) as exc:  # the log stream broke: the status still tells
            log(f"the job's log stream closed ({mask(str(exc), job.secrets())}); waiting for its end")
        status = final_status(client, job_id)
    except KeyboardInterrupt:
        log(f"stopped following; job {job_id} keeps running: ray job stop --address {address} {job_id}")
        return 130
    message = ""
    if status != "SUCCEEDED":
        why = getattr(client.get_job_info(job_id), "message", "") or ""
        message = f": {mask(why.strip(), job.secrets())}" if why.strip() else ""
    log(f"job {job_id} {status.lower()}{message}")
    return 0 if status == "SUCCEEDED" else 1
