"""A private local cluster: its own processes find its State API, whatever the machine recorded."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
import ray

from raymix.integrations import cluster


def test_inherited_env_sets_only_what_is_unset_and_restores(monkeypatch):
    monkeypatch.setenv("RAYMIX_TEST_KEPT", "user")
    monkeypatch.delenv("RAYMIX_TEST_ADDED", raising=False)
    with cluster.inherited_env({"RAYMIX_TEST_KEPT": "ours", "RAYMIX_TEST_ADDED": "ours"}):
        assert os.environ["RAYMIX_TEST_KEPT"] == "user"  # the user's setting wins
        assert os.environ["RAYMIX_TEST_ADDED"] == "ours"
    assert os.environ["RAYMIX_TEST_KEPT"] == "user"
    assert "RAYMIX_TEST_ADDED" not in os.environ


def test_free_port_prefers_the_given_one():
    with socket.socket() as taken:
        taken.bind((cluster.LOCALHOST, 0))
        taken.listen()
        busy = taken.getsockname()[1]
        other = cluster.free_port(busy)
        assert other != busy
    assert cluster.free_port(other) == other


def test_private_cluster_env_names_its_dashboard():
    env = cluster.private_cluster_env(12345)
    assert env[cluster.API_SERVER_ENV] == "http://127.0.0.1:12345"
    assert env.items() >= cluster.PRIVATE_TRAIN_ENV.items()


@ray.remote(num_cpus=0)
def _state_api_probe() -> tuple[int, float, dict[str, str | None]]:
    """From inside the cluster, as Ray Train's placement-group cleaner asks: how many nodes."""
    from ray.util.state import list_nodes

    start = time.monotonic()
    nodes = list_nodes(timeout=10)
    keys = [cluster.API_SERVER_ENV, *cluster.PRIVATE_TRAIN_ENV]
    return len(nodes), time.monotonic() - start, {key: os.environ.get(key) for key in keys}


@pytest.mark.slow
def test_a_stale_ray_start_record_does_not_stall_the_clusters_processes(monkeypatch):
    # Ray's temporary folder with the record a `ray start` cluster leaves when it is killed;
    # nothing answers there (port 9), so a lookup through it waits 40 s for a GCS.
    temp = Path(tempfile.mkdtemp(prefix="rx", dir="/tmp"))  # short: Ray's socket paths live here
    (temp / "ray").mkdir()
    (temp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")
    monkeypatch.setenv("RAY_TMPDIR", str(temp))
    for key in ("RAY_ADDRESS", cluster.API_SERVER_ENV, *cluster.PRIVATE_TRAIN_ENV):
        monkeypatch.delenv(key, raising=False)
    assert cluster.init_ray(num_cpus=1)
    try:
        assert cluster.API_SERVER_ENV not in os.environ  # the driver's environment is as before
        nodes, seconds, env = ray.get(_state_api_probe.remote(), timeout=120)
        assert nodes == 1 and seconds < 10
        assert str(env[cluster.API_SERVER_ENV]).startswith("http://127.0.0.1:")
        assert {key: env[key] for key in cluster.PRIVATE_TRAIN_ENV} == cluster.PRIVATE_TRAIN_ENV
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
