"""``raymix submit``: run ``raymix tune`` or ``raymix train`` on a Ray cluster as a Ray job.

Builds, prints and runs ``ray job submit --address A --working-dir . --runtime-env-json J --
raymix COMMAND ...``. The runtime environment carries ``MLFLOW_TRACKING_URI`` and
``RAYMIX_STORAGE_PATH`` (and any ``--env``) to the job, whose entrypoint then joins the
cluster through the ``RAY_ADDRESS`` that Ray sets for it. Before submitting, the job
server must answer at the address, and the sweep or run must have somewhere to keep its
results: a job's working directory is deleted with the cluster's session.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from raymix.config import ConfigError, load_config
from raymix.integrations.cluster import (
    MASK,
    STORAGE_ENV,
    apply_auth_mode,
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
# Ray's answer when the head's job agent has not registered yet; the job is not created.
AGENT_NOT_READY = "No available agent to submit job"
AGENT_WAIT_S, AGENT_RETRY_S = 90.0, 5.0


@dataclass
class Job:
    address: str
    entrypoint: list[str]  # the raymix command's arguments: ["tune", "space.yaml", ...]
    working_dir: str = "."
    env_vars: dict[str, str] = field(default_factory=dict)
    no_wait: bool = False

    def secrets(self) -> list[str]:
        """The values that are masked wherever raymix prints (at least 4 characters long)."""
        values = [v for k, v in self.env_vars.items() if mask_value(k, v) == MASK]
        for uri in (self.env_vars.get(TRACKING_ENV, ""), self.env_vars.get(STORAGE_ENV, "")):
            hidden = redact_uri(uri)
            if hidden != uri:
                values.append(uri.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1])
        return [v for v in values if len(v) >= 4]

    def runtime_env(self, *, masked: bool = False) -> dict[str, object]:
        env = {key: mask_value(key, value) if masked else value for key, value in self.env_vars.items()}
        return {"env_vars": env, "excludes": EXCLUDES}

    def command(self, ray: str = "ray", *, runtime_env_file: str | None = None) -> list[str]:
        """The ``ray job submit`` command line. With ``runtime_env_file`` the runtime environment
        is read from that file (``--runtime-env``), so no value appears on a command line;
        without, it is shown inline with every secret masked (for printing)."""
        wait = ["--no-wait"] if self.no_wait else []
        if runtime_env_file is not None:
            env = ["--runtime-env", runtime_env_file]
            entrypoint = list(self.entrypoint)
        else:
            env = ["--runtime-env-json", json.dumps(self.runtime_env(masked=True), separators=(",", ":"))]
            entrypoint = [redact_uri(token) for token in self.entrypoint]
        return [
            ray, "job", "submit", "--address", self.address, "--working-dir", self.working_dir,
            *env, *wait, "--", "raymix", *entrypoint,
        ]  # fmt: skip


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

    A ``tune`` job must record to a tracking URI and keep results in storage that outlive
    the job's temporary working directory; a ``train`` job must keep its checkpoints so.
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
    if command != "tune" or not cfg.tracking.enabled:
        return
    uri = env_vars.get(TRACKING_ENV) or cfg.tracking.uri
    if not uri:
        raise ConfigError(
            "raymix submit: the sweep's MLflow records need a tracking server the cluster reaches: "
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
    overrides) as the CLI parsed them.
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
    return Job(job_server(address, environ), list(entrypoint), working_dir, env_vars, no_wait)


def submit(
    job: Job,
    *,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
    environ: Mapping[str, str] = os.environ,
) -> int:
    """Print the ``ray job submit`` command and run it; its exit status (1: the job failed).

    Raises :class:`ConfigError` when no job server answers at the address (not in a dry run).
    """
    env = dict(environ)
    apply_auth_mode(env)
    if not dry_run:
        check_job_server(job.address, env)
    mode = f"RAY_AUTH_MODE={env['RAY_AUTH_MODE']} " if "RAY_AUTH_MODE" in env else ""
    log(mode + shlex.join(job.command()))
    if dry_run:
        return 0
    with tempfile.TemporaryDirectory(prefix="raymix-submit-") as folder:
        # The runtime environment goes in a file only this user can read, not on a command line.
        spec = Path(folder) / "runtime_env.json"
        spec.touch(mode=0o600)
        spec.write_text(json.dumps(job.runtime_env()))
        command = job.command(ray_executable(), runtime_env_file=str(spec))
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            code, agent_not_ready = _run_echoing(command, env, job.secrets())
            if code == 0 or not agent_not_ready or time.monotonic() >= deadline:
                return code
            # The head's job server answers before its job agent has registered (seconds after
            # `ray start`): Ray refuses the job without creating it, so it is safe to ask again.
            log(f"the cluster's job agent is not ready yet; submitting again in {AGENT_RETRY_S:g} s")
            time.sleep(AGENT_RETRY_S)


def ray_executable() -> str:
    """The ``ray`` of this environment, not another one on PATH."""
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else "ray"


def _run_echoing(command: list[str], env: dict[str, str], secrets: Sequence[str] = ()) -> tuple[int, bool]:
    """Run ``command``, passing its output through line by line with ``secrets`` masked;
    (exit status, whether Ray said that no job agent was available)."""
    seen = False
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(mask(line, secrets))
            sys.stdout.flush()
            seen = seen or AGENT_NOT_READY in line
    return proc.returncode, seen
