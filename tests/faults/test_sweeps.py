"""Faults of sweeps: failing trials, a killed driver, concurrent sweeps on one MLflow store,
tracking servers that are down, failing or slow, storage that cannot be written."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raymix.cli import main
from raymix.integrations import leaderboard, sweep
from tests.faults.helpers import alive_in_session, space_file, sweep_runs


def _duplicate_steps(client: MlflowClient, runs: list) -> int:
    """Metric points logged twice for the same epoch, over all runs."""
    extra = 0
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "knn_top1")]
        extra += len(steps) - len(set(steps))
    return extra


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for input that should have been refused")

    monkeypatch.setattr(sweep.ray_train, "init_ray", refuse)


# ---------------------------------------------------------------- failing trials, concurrent sweeps


def test_concurrent_sweeps_on_one_store_with_a_diverging_trial(tmp_path, fault):
    """Two drivers at once on one SQLite store; one sweep's first trial diverges. Each ends with
    its leaderboard and best config (built with Ray shut down), and MLflow holds every run once,
    closed."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    diverging = space_file(
        tmp_path, "diverging", num_samples=2,
        points_to_evaluate=[{"optim.lr": 1000.0}, {"optim.lr": 0.004}],
    )  # fmt: skip
    other = space_file(tmp_path, "other", points_to_evaluate=[{"optim.lr": 0.004}])
    drivers = [
        subprocess.Popen(
            [sys.executable, "-m", "raymix", "tune", str(path)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for path in (diverging, other)
    ]
    outputs = [driver.communicate(timeout=600)[0] for driver in drivers]
    codes = [driver.returncode for driver in drivers]
    assert codes == [0, 0], "\n".join(out[-3000:] for out in outputs)

    folder = tmp_path / "sweeps" / "diverging"
    board = leaderboard.load(str(folder))
    outcomes = sorted(row.outcome for row in board.rows)
    failed = next(row for row in board.rows if row.outcome == "failed")
    written = all(
        (folder / f).is_file() for f in (leaderboard.LEADERBOARD_FILE, leaderboard.BEST_CONFIG_FILE)
    )
    client, parents, children = sweep_runs(uri)
    statuses = sorted(r.info.status for r in [*parents, *children])
    best = main(["best", str(folder), "--out", str(tmp_path / "best.yaml")])  # Ray is down here
    duplicates = _duplicate_steps(client, children)
    ok = (
        outcomes == ["completed", "failed"] and "not finite" in failed.error and written and best == 0
        and "RUNNING" not in statuses
    )  # fmt: skip
    fault("a trial that diverges (lr 1000), the sweep then ends with Ray shut down",
          "sweep exits 0 with leaderboard.csv and best_config.yaml; `raymix best` works without Ray",
          f"exit {codes[0]}; outcomes {outcomes}; files written {written}; `raymix best` exit {best}",
          ok)  # fmt: skip
    ok = len(parents) == 2 and len(children) == 3 and duplicates == 0 and "RUNNING" not in statuses
    fault("two sweeps at once on one SQLite MLflow store",
          "2 parents and 3 trial runs, each once and closed; no duplicate metric",
          f"{len(parents)} parents, {len(children)} trial runs, statuses {statuses}, "
          f"{duplicates} duplicate points", ok)  # fmt: skip


# ---------------------------------------------------------------- a killed driver


def _finished_trials(db: Path) -> list[str]:
    """Run ids of finished trial runs, read straight from SQLite: an MLflow client here would
    race the driver's creation of the database."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            rows = conn.execute(
                "select r.run_uuid from runs r join tags t on r.run_uuid = t.run_uuid "
                "where r.status = 'FINISHED' and t.key = 'raymix.trial_id'"
            ).fetchall()
    except sqlite3.Error:  # tables not created yet
        return []
    return [row[0] for row in rows]


def test_a_killed_driver_resumes_without_running_or_logging_finished_trials_again(tmp_path, fault):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = space_file(tmp_path, "space", num_samples=2)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    command = [sys.executable, "-m", "raymix", "tune", str(path)]
    with (tmp_path / "first.log").open("w") as log:
        driver = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
        try:
            finished: list = []
            deadline = time.monotonic() + 240
            while not finished and time.monotonic() < deadline and driver.poll() is None:
                time.sleep(1)
                finished = _finished_trials(tmp_path / "mlflow.db")
            time.sleep(2)  # past Tune's next snapshot of its state
        finally:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert len(finished) == 1, (tmp_path / "first.log").read_text()[-3000:]
    finished = [MlflowClient(uri).get_run(run_id) for run_id in finished]
    deadline = time.monotonic() + 30  # Ray's processes notice the driver's death within seconds
    while alive_in_session(driver.pid) and time.monotonic() < deadline:
        time.sleep(1)
    assert alive_in_session(driver.pid) == []
    done_id = finished[0].data.tags["raymix.trial_id"]

    resumed = subprocess.run([*command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    client, parents, children = sweep_runs(uri)
    again = next(r for r in children if r.data.tags["raymix.trial_id"] == done_id)
    closed_twice = again.info.end_time != finished[0].info.end_time
    progress = (tmp_path / "sweeps" / "space" / f"trial_{done_id}" / "progress.csv").read_text()
    rerun = len(progress.strip().splitlines()) - 1 - 2  # epochs reported beyond its 2
    statuses = sorted(r.info.status for r in [*parents, *children])
    duplicates = _duplicate_steps(client, children)
    board = leaderboard.load(str(tmp_path / "sweeps" / "space"))
    ok = (
        len(parents) == 1 and len(children) == 2 and statuses == ["FINISHED"] * 3 and duplicates == 0
        and not closed_twice and rerun == 0
        and sorted(row.outcome for row in board.rows) == ["completed"] * 2
    )  # fmt: skip
    fault("sweep driver killed (SIGKILL) after its first trial, then `--resume`",
          "0 finished trials rerun; 0 duplicate or RUNNING runs",
          f"{rerun} epochs rerun of the finished trial; {len(parents)} parent, {len(children)} trial "
          f"runs, statuses {statuses}, {duplicates} duplicate points", ok)  # fmt: skip


# ---------------------------------------------------------------- tracking servers that misbehave


class _Handler(BaseHTTPRequestHandler):
    mode = "503"

    def _answer(self) -> None:
        if self.mode == "slow":
            time.sleep(20)
        status, body = (503, b"Service Unavailable") if self.mode == "503" else (200, b"<html>hello</html>")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def bad_server(request) -> Iterator[str]:
    if request.param == "down":
        with ThreadingHTTPServer(("127.0.0.1", 0), _Handler) as server:
            port = server.server_address[1]
        yield f"http://127.0.0.1:{port}"  # closed: nothing listens
        return
    handler = type("Handler", (_Handler,), {"mode": request.param})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("bad_server", ["down", "503", "not mlflow", "slow"], indirect=True)
def test_a_tracking_server_that_does_not_work_is_refused_at_once(
    tmp_path, monkeypatch, capsys, no_ray, bad_server, fault, request
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", bad_server)
    path = space_file(tmp_path, "space")
    start = time.monotonic()
    code = main(["tune", str(path)])
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    kind = request.node.callspec.params["bad_server"]
    ok = (
        code == 2 and "no working MLflow server answers there" in err and err.count("\n") == 1
        and seconds < 15 and not (tmp_path / "sweeps").exists()
    )  # fmt: skip
    reason = err[err.index("(") + 1 : err.index(")")] if "(" in err else err.strip()
    fault(f"tracking server {kind}", "refused before Ray starts: exit 2, one line, nothing written",
          f"exit {code} in {seconds:.1f} s ({reason}); sweep folder written: "
          f"{(tmp_path / 'sweeps').exists()}", ok)  # fmt: skip


# ---------------------------------------------------------------- storage


@pytest.mark.parametrize("source", ["storage_path", "RAYMIX_STORAGE_PATH"])
def test_sweep_storage_that_cannot_be_written_is_refused_naming_its_setting(
    tmp_path, monkeypatch, capsys, no_ray, fault, source
):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    path = space_file(tmp_path, "space", storage_path=str(blocker / "sweeps"))
    if source == "RAYMIX_STORAGE_PATH":
        monkeypatch.setenv("RAYMIX_STORAGE_PATH", str(blocker / "elsewhere"))
    code = main(["tune", str(path)])
    err = capsys.readouterr().err
    ok = code == 2 and err.startswith(f"raymix: error: {source}: cannot write to ") and err.count("\n") == 1
    fault(f"sweep storage that cannot be written (from {source})", "exit 2, one line naming the setting",
          f"exit {code}: '{err.strip()[15:].replace(str(tmp_path), '...')}'", ok)  # fmt: skip
