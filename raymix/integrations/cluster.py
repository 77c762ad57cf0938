"""Where raymix runs: a Ray cluster or a private local one, and the storage its nodes share.

Every raymix command that uses Ray (``train`` on Ray Train, ``tune``, ``submit``) follows
the same rules:

- **Address.** ``RAY_ADDRESS`` set: join that cluster (inside a ``ray job submit`` job Ray
  sets it). Not set: start a private local cluster, even when a ``ray start`` cluster runs
  on the machine. A ``RAY_ADDRESS`` where nothing answers is refused at once, naming it.
- **Token authentication.** ``RAY_AUTH_MODE`` as the user set it. Otherwise, to join a
  cluster or submit a job: ``token`` when a token is at hand (``RAY_AUTH_TOKEN``, the file
  ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), as ``ray start`` decides for a new
  head; for a private local cluster, Ray's default for new clusters (token on).
- **A private cluster's processes find it.** Ray's own processes (Train's placement-group
  cleaner among them) query the State API of "the" cluster of the machine: the one in
  ``RAY_API_SERVER_ADDRESS``, else the last ``ray start`` cluster, whose address Ray leaves in
  ``/tmp/ray/ray_current_cluster`` (stale once that cluster is gone). A private cluster starts
  its dashboard on a port chosen beforehand and its processes inherit that address, so a stale
  record cannot stall them (Ray Train then waited 12 s at the end of every run) and a live
  ``ray start`` cluster is not mistaken for this one. They also inherit :data:`PRIVATE_TRAIN_ENV`
  (settings a one-machine cluster wants), unless the user set those variables.
- **Storage.** ``RAYMIX_STORAGE_PATH`` (set by ``raymix submit --storage``) overrides the
  storage named in the config or space. On a cluster of more than one node it must be
  given and shared: a URI (s3://, gs://, ...) or a path that every node sees (NFS). A path
  is checked by writing a file and looking for it from every node.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raymix.config import ConfigError

AUTH_MODE_ENV = "RAY_AUTH_MODE"
STORAGE_ENV = "RAYMIX_STORAGE_PATH"
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's State API clients look first
LOCALHOST = "127.0.0.1"
DASHBOARD_PORT = 8265  # Ray's default, kept for private clusters while it is free
CONNECT_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 120.0


# ---------------------------------------------------------------- secrets

# scheme://user:password@host -> the password part
_URI_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*:)[^/@\s]+(@)")
MASK = "***"


def redact_uri(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` in it masked."""
    return _URI_PASSWORD.sub(rf"\g<1>{MASK}\g<2>", text)


# ---------------------------------------------------------------- authentication


def token_available(environ: Mapping[str, str]) -> bool:
    """A Ray authentication token in the environment, in RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    if environ.get("RAY_AUTH_TOKEN"):
        return True
    path = environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return Path(path).expanduser().is_file()


def auth_mode(environ: Mapping[str, str]) -> str | None:
    """The RAY_AUTH_MODE every raymix command uses: as set, else ``token`` with a token at hand."""
    mode = environ.get(AUTH_MODE_ENV)
    if mode:
        return mode
    return "token" if token_available(environ) else None


def apply_auth_mode(environ: MutableMapping[str, str]) -> None:
    """Set RAY_AUTH_MODE in ``environ`` by :func:`auth_mode` (no change when it gives none)."""
    mode = auth_mode(environ)
    if mode:
        environ[AUTH_MODE_ENV] = mode


# ---------------------------------------------------------------- joining a cluster


def host_port(address: str, default_port: int) -> tuple[str, int]:
    """``(host, port)`` of ``host[:port]``, ``ray://host[:port]`` or ``http://host[:port]``."""
    rest = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    try:
        return host.strip("[]"), int(port) if port else default_port
    except ValueError:
        raise ConfigError(f"address {address!r}: the port must be a number") from None


def reachable(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """None when a TCP connection to host:port opens, else why it did not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def http_probe(url: str, timeout: float = CONNECT_TIMEOUT_S) -> tuple[int | None, str | None]:
    """``(status, None)`` when a server answers at ``url`` (an error status too), else ``(None, why)``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), None
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, OSError) as exc:
        return None, str(getattr(exc, "reason", exc))


def check_cluster_address(address: str) -> None:
    """Refuse at once a RAY_ADDRESS where no cluster answers (``ray.init`` waits minutes)."""
    if address == "auto":
        return  # Ray looks up the cluster started on this machine and says so if there is none
    if address.startswith(("http://", "https://")):
        raise ConfigError(
            f"RAY_ADDRESS={address} is a job server (dashboard) address; raymix train and tune join a "
            "cluster at its GCS address HOST:6379. To run on a cluster from outside it, use "
            f"raymix submit --address {address} -- tune ..."
        )
    host, port = host_port(address, 10001 if address.startswith("ray://") else 6379)
    why = reachable(host, port)
    if why:
        raise ConfigError(
            f"RAY_ADDRESS={address}: no Ray cluster answers at {host}:{port} ({why}). Start one with "
            "`ray start --head`, or unset RAY_ADDRESS to run on a private local cluster"
        )


def _use_token_auth_if_at_hand() -> None:
    """Apply :func:`auth_mode` to this process before joining a cluster.

    ``ray.init`` never turns token authentication on by itself for an explicit address,
    and Ray caches the mode: set it the way ``ray start`` does, through Ray's own helper.
    """
    if os.environ.get(AUTH_MODE_ENV) is None and auth_mode(os.environ) == "token":
        from ray._private.authentication.authentication_token_setup import _enable_token_auth

        _enable_token_auth()


def init_ray(num_cpus: int | None = None) -> bool:
    """Join the cluster of RAY_ADDRESS, or start a private local one. True if started here.

    A private cluster gets Ray's default for new clusters: token authentication on.
    """
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_cluster_address(address)
        _use_token_auth_if_at_hand()
        try:
            ray.init(log_to_driver=True)
        except ConnectionError as exc:
            raise ConfigError(f"RAY_ADDRESS={address}: {exc}") from None
    else:
        start_private_cluster(num_cpus)
    return True


# ---------------------------------------------------------------- a private cluster


def free_port(preferred: int, host: str = LOCALHOST) -> int:
    """``preferred`` when nothing listens on it, else a free port the system picks."""
    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise OSError(f"no free port on {host}")


# Ray Train settings for a private cluster (one machine, nobody drains its node): the
# controller polls its workers every 0.5 s instead of 2 s (a run's end is seen ~2 s sooner;
# a poll is one small call per worker) and starts no preemption watcher (one Python process
# less per worker group, which only watches for drained nodes).
PRIVATE_TRAIN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def private_cluster_env(dashboard_port: int) -> dict[str, str]:
    """What the processes of a private cluster inherit: its State API address, Train's settings."""
    return {API_SERVER_ENV: f"http://{LOCALHOST}:{dashboard_port}", **PRIVATE_TRAIN_ENV}


@contextmanager
def inherited_env(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in this process's environment for the block (what is set stays as set).

    Processes started in the block inherit them; afterwards the environment is as before,
    so a later client in this process (``ray job submit`` to another cluster) is not redirected.
    """
    added = {key: value for key, value in values.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def start_private_cluster(num_cpus: int | None = None) -> None:
    """``ray.init`` a private local cluster whose own processes find its State API.

    Its head processes start inside ``ray.init`` and every Ray worker process is their
    child, so what is set around the call reaches all of them and nothing else.
    """
    # Two clusters starting in the same second may both find 8265 free; the second then runs
    # without a dashboard and its processes ask the first one, as every private cluster did
    # before: rare, and no worse.
    port = free_port(DASHBOARD_PORT)
    with inherited_env(private_cluster_env(port)):
        ray.init(address="local", num_cpus=num_cpus, dashboard_host=LOCALHOST, dashboard_port=port)


# ---------------------------------------------------------------- shared storage


def storage_override() -> str | None:
    """RAYMIX_STORAGE_PATH, which wins over the storage a config or space names."""
    return os.environ.get(STORAGE_ENV) or None


def storage_key(setting: str) -> str:
    """What messages name as the storage's source: RAYMIX_STORAGE_PATH when set, else ``setting``."""
    return STORAGE_ENV if storage_override() else setting


def alive_nodes() -> list[dict[str, Any]]:
    return [node for node in ray.nodes() if node.get("Alive")]


@ray.remote(num_cpus=0)
def _sees(path: str) -> bool:
    return os.path.isfile(path)


def check_shared_storage(storage_path: str, given: bool, key: str) -> None:
    """On a cluster of several nodes, storage must be named and seen by every node.

    ``given`` says whether the user named the storage (else it is a local default);
    ``key`` names the setting in messages. Needs Ray initialised.
    """
    nodes = alive_nodes()
    if len(nodes) <= 1:
        return
    shared = "shared storage: a URI such as s3://bucket/raymix, or a path mounted on every node (NFS)"
    if not given:
        raise ConfigError(
            f"{key} is required on a cluster of {len(nodes)} nodes: every node writes checkpoints "
            f"there, so it must be {shared}. Set it, or {STORAGE_ENV} (raymix submit --storage)"
        )
    if "://" in storage_path:
        return  # object stores are shared by construction; Ray checks access when the run starts
    marker = Path(storage_path) / f".raymix-shared-{uuid.uuid4().hex}"
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("written by the raymix driver to check that every node sees this folder\n")
    except OSError as exc:
        raise ConfigError(f"{key}: cannot write to {storage_path}: {exc.strerror}") from None
    try:
        refs = [
            _sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(str(marker))
            for node in nodes
        ]
        seen = ray.get(refs, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise ConfigError(
            f"{key}={storage_path}: could not check within {PROBE_TIMEOUT_S:g} s that every node sees it"
        ) from None
    finally:
        marker.unlink(missing_ok=True)
    blind = [node["NodeManagerAddress"] for node, ok in zip(nodes, seen, strict=True) if not ok]
    if blind:
        raise ConfigError(
            f"{key}={storage_path} is not shared: {len(blind)} of the cluster's {len(nodes)} nodes "
            f"({', '.join(sorted(blind))}) cannot see it. Use {shared}"
        )
