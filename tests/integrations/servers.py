"""Real servers on loopback for the launch tests: a Ray head and an MLflow server.

Each is started by the test in its own process group and stopped by killing that group,
so nothing else running on the machine is touched.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from raymix.integrations.cluster import http_probe

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def venv_env() -> dict[str, str]:
    """This environment's bin first on PATH (Ray runs jobs with the head's PATH), no cluster named."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def answers(url: str) -> bool:
    """Any HTTP response counts (a 401 from a cluster with token auth is an answer)."""
    return http_probe(url, timeout=2)[1] is None


def _wait(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not answers(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"{url} never answered; log:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process (it stops what it started), then SIGKILL to its group's leftovers."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    try:  # children that outlived their parent (Ray's workers, MLflow's server workers)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def _serving(
    command: list[str], log: Path, ready: str, timeout: float, extra_env: Mapping[str, str] | None = None
) -> Iterator[None]:
    """Run ``command`` in its own process group until ``ready`` answers; stop it on exit."""
    env = {**venv_env(), **(extra_env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    _wait(proc, ready, log, timeout)
    try:
        yield
    finally:
        _stop(proc)


@contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """``launch/mlflow_server.sh`` on a free loopback port; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    script = str(REPO / "launch" / "mlflow_server.sh")
    command = [script, "--port", str(port), "--dir", str(folder / "mlflow")]
    with _serving(command, folder / "mlflow-server.log", f"{url}/health", timeout=120):
        yield url


@contextmanager
def mlflow_server_with(folder: Path, *options: str, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """``launch/mlflow_server.sh`` with more ``options`` (a ``--backend-store-uri``...) and
    ``env`` added to its environment, on a free loopback port; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    script = str(REPO / "launch" / "mlflow_server.sh")
    command = [script, "--port", str(port), "--dir", str(folder / "mlflow"), *options]
    with _serving(command, folder / "mlflow-server.log", f"{url}/health", timeout=120, extra_env=env):
        yield url


@contextmanager
def ray_head(folder: Path, num_cpus: int = 2) -> Iterator[str]:
    """``ray start --head --block`` on free loopback ports; yields the job server's URL."""
    gcs, dashboard, client = free_port(), free_port(), free_port()
    url = f"http://127.0.0.1:{dashboard}"
    command = [
        str(BIN / "ray"), "start", "--head", "--block", "--port", str(gcs),
        "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
        "--num-cpus", str(num_cpus), "--dashboard-host", "127.0.0.1", "--disable-usage-stats",
    ]  # fmt: skip
    try:
        with _serving(command, folder / "ray-head.log", f"{url}/api/version", timeout=180):
            yield url
    finally:
        # A head stopped by a signal leaves its address as the machine's "current cluster",
        # where Ray's State API clients would later look for it: take it back.
        record = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if record.exists() and record.read_text().strip().endswith(f":{gcs}"):
            record.unlink(missing_ok=True)
