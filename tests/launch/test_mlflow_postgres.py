"""``launch/mlflow_server.sh`` with a PostgreSQL backend store, end to end: a real PostgreSQL
server (the system's ``initdb``/``pg_ctl``, in a temporary folder on a free loopback port),
a real ``mlflow server`` process on it with the credentials in PGUSER/PGPASSWORD (as
``launch/rayjob.yaml`` gives them), and a run logged and read back through MLflow's client.

Skipped, with the reason, where PostgreSQL's binaries or the psycopg2 driver are missing,
or where the tests run as root and no other user can run PostgreSQL (it refuses root).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integrations.servers import free_port, mlflow_server_with

PASSWORD = "raymix-test-pw"  # a throwaway cluster on loopback, deleted after the test
USER = "mlflow"
DATABASE = "mlflow"


@dataclass
class Postgres:
    port: int
    env: dict[str, str]  # what libpq needs besides host, port and database

    def uri(self) -> str:
        return f"postgresql+psycopg2://127.0.0.1:{self.port}/{DATABASE}"


def _binaries() -> dict[str, str] | None:
    found = {}
    for name in ("initdb", "pg_ctl"):
        path = shutil.which(name) or next(
            iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[-1:]), None
        )
        if path is None:
            return None
        found[name] = path
    return found


def _runner() -> tuple[list[str], str | None]:
    """The command prefix that runs PostgreSQL's tools, and the user they run as (None: us)."""
    if os.geteuid() != 0:
        return [], None
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip(
            "running as root, PostgreSQL refuses root, and there is no runuser to run it as another user"
        )
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        return [runuser, "-u", user, "--"], user
    pytest.skip("running as root, PostgreSQL refuses root, and there is no 'postgres' or 'nobody' user")


def _stop(pg_ctl: list[str], data: Path) -> None:
    done = subprocess.run(
        [*pg_ctl, "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop"], capture_output=True
    )
    pid_file = data / "postmaster.pid"
    if done.returncode != 0 and pid_file.exists():  # pg_ctl could not stop it: kill our postmaster
        pid = int(pid_file.read_text().split()[0])
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    binaries = _binaries()
    if binaries is None:
        pytest.skip(
            "PostgreSQL's initdb and pg_ctl are not installed (on PATH or in /usr/lib/postgresql/*/bin)"
        )
    psycopg2 = pytest.importorskip(
        "psycopg2", reason="the psycopg2 driver is not installed (pip install psycopg2-binary)"
    )
    prefix, user = _runner()
    # Not pytest's tmp_path: its parents are private to us, and PostgreSQL may run as another user.
    folder = Path(tempfile.mkdtemp(prefix="raymix-pg-"))
    try:
        (folder / "pw").write_text(PASSWORD + "\n")
        if user is not None:
            for path in (folder, folder / "pw"):
                shutil.chown(path, user)
        data, log = folder / "data", folder / "postgres.log"
        init = subprocess.run(
            [*prefix, binaries["initdb"], "-D", str(data), "-U", USER, "--auth=scram-sha-256",
             f"--pwfile={folder / 'pw'}", "-E", "UTF8", "--no-sync"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert init.returncode == 0, init.stdout + init.stderr
        port = free_port()
        pg_ctl = [*prefix, binaries["pg_ctl"]]
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        start = subprocess.run(
            [*pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"],
            capture_output=True, text=True,
        )  # fmt: skip
        if start.returncode != 0:
            _stop(pg_ctl, data)
            raise AssertionError(start.stdout + start.stderr + (log.read_text() if log.exists() else ""))
        try:
            env = {"PGUSER": USER, "PGPASSWORD": PASSWORD}
            db = psycopg2.connect(
                host="127.0.0.1", port=port, dbname="postgres", user=USER, password=PASSWORD
            )
            try:
                db.autocommit = True  # CREATE DATABASE runs outside a transaction
                db.cursor().execute(f"CREATE DATABASE {DATABASE}")
            finally:
                db.close()
            yield Postgres(port=port, env=env)
        finally:
            _stop(pg_ctl, data)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_mlflow_server_script_keeps_runs_in_postgres(postgres, tmp_path, monkeypatch):
    import psycopg2
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    started = time.monotonic()
    # The password only in the environment, as the KubeRay manifest gives it.
    with mlflow_server_with(tmp_path, "--backend-store-uri", postgres.uri(), env=postgres.env) as url:
        client = MlflowClient(tracking_uri=url)
        experiment = client.create_experiment("postgres-backend")
        run = client.create_run(experiment, run_name="trial-0")
        client.log_param(run.info.run_id, "optim.lr", "0.003")
        for step, loss in enumerate([2.5, 1.75, 1.25]):
            client.log_metric(run.info.run_id, "train/loss", loss, step=step)
        client.set_terminated(run.info.run_id)

        back = client.get_run(run.info.run_id)
        assert back.data.params == {"optim.lr": "0.003"}
        assert back.data.metrics == {"train/loss": 1.25}
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert [(m.step, m.value) for m in history] == [(0, 2.5), (1, 1.75), (2, 1.25)]
        assert back.info.status == "FINISHED"

    # The rows are in PostgreSQL, not in a SQLite file beside the server.
    with psycopg2.connect(
        host="127.0.0.1", port=postgres.port, dbname=DATABASE, **_credentials(postgres)
    ) as db:
        cursor = db.cursor()
        cursor.execute("SELECT key, value FROM params WHERE run_uuid = %s", (run.info.run_id,))
        assert cursor.fetchall() == [("optim.lr", "0.003")]
        cursor.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s", (run.info.run_id,))
        assert cursor.fetchone() == (3,)
    db.close()
    assert not (tmp_path / "mlflow" / "mlflow.db").exists()
    log = (tmp_path / "mlflow-server.log").read_text()
    assert f"backend {postgres.uri()}" in log and PASSWORD not in log
    assert time.monotonic() - started < 120


def _credentials(postgres: Postgres) -> dict[str, str]:
    return {"user": postgres.env["PGUSER"], "password": postgres.env["PGPASSWORD"]}
