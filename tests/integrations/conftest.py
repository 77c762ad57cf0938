"""Fixtures shared by the integration tests: a local Ray per module and a private MLflow store."""

import pytest
import ray


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """An MLflow SQLite store in the test's folder, named by MLFLOW_TRACKING_URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
