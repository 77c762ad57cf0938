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
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False
    return True


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
def mlflow_server(folder: Path) -> Iterator[str]:
    """``launch/mlflow_server.sh`` on a free loopback port; yields its URL."""
    port = free_port()
    log = folder / "mlflow-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(REPO / "launch" / "mlflow_server.sh"), "--port", str(port), "--dir", str(folder / "mlflow")],
            env=venv_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    _wait(proc, f"{url}/health", log, timeout=120)
    try:
        yield url
    finally:
        _stop(proc)


@contextmanager
def ray_head(folder: Path, num_cpus: int = 2) -> Iterator[str]:
    """``ray start --head --block`` on free loopback ports; yields the job server's URL."""
    gcs, dashboard, client = free_port(), free_port(), free_port()
    log = folder / "ray-head.log"
    command = [
        str(BIN / "ray"), "start", "--head", "--block", "--port", str(gcs),
        "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
        "--num-cpus", str(num_cpus), "--dashboard-host", "127.0.0.1", "--disable-usage-stats",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, env=venv_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{dashboard}"
    _wait(proc, f"{url}/api/version", log, timeout=180)
    try:
        yield url
    finally:
        _stop(proc)
