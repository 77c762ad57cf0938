"""Joining clusters, token authentication, job submission and shared storage on several nodes."""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

from raymix.cli import main
from raymix.config import ConfigError, load_config
from raymix.integrations import cluster, jobs, ray_train, sweep
from tests.integrations.servers import REPO, free_port
from tests.integrations.test_sweep import write_space

QUICKSTART = "search_spaces/quickstart.yaml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.chdir(REPO)  # the job's working directory is the repository
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # restored after each test
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI", cluster.STORAGE_ENV):
        monkeypatch.delenv(key, raising=False)


# ---------------------------------------------------------------- token authentication


def test_auth_mode_follows_ray_start(tmp_path):
    token = tmp_path / "token"
    assert cluster.auth_mode({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "x"}) == "disabled"
    assert cluster.auth_mode({"RAY_AUTH_TOKEN": "x"}) == "token"
    assert cluster.auth_mode({"RAY_AUTH_TOKEN_PATH": str(token)}) is None  # no such file
    token.write_text("secret")
    assert cluster.auth_mode({"RAY_AUTH_TOKEN_PATH": str(token)}) == "token"
    env = {"RAY_AUTH_TOKEN_PATH": str(token)}
    cluster.apply_auth_mode(env)
    assert env["RAY_AUTH_MODE"] == "token"


def test_submit_uses_the_same_auth_mode_and_sends_the_token_as_a_header(tmp_path):
    token = tmp_path / "token"
    token.write_text("secret")
    job = jobs.prepare_job(
        ["tune", QUICKSTART], ("tune", QUICKSTART, ["tracking.enabled=false"]),
        address="head:8265", storage=str(tmp_path), tracking_uri=None,
    )  # fmt: skip
    for environ, mode in [
        ({"RAY_AUTH_TOKEN_PATH": str(token)}, "token"),
        ({"RAY_AUTH_TOKEN_PATH": str(token), "RAY_AUTH_MODE": "disabled"}, "disabled"),
        ({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")}, None),
    ]:
        lines: list[str] = []
        assert jobs.submit(job, dry_run=True, log=lines.append, environ=environ) == 0
        assert json.loads(lines[0])["auth"] == mode and "secret" not in lines[0]
        assert jobs.auth_headers(environ) == ({"Authorization": "Bearer secret"} if mode == "token" else {})


# ---------------------------------------------------------------- addresses with nothing behind them


def test_host_port_forms():
    assert cluster.host_port("10.0.0.5:6379", 1) == ("10.0.0.5", 6379)
    assert cluster.host_port("ray://head", 10001) == ("head", 10001)
    assert cluster.host_port("http://[::1]:8265/", 1) == ("::1", 8265)
    with pytest.raises(ConfigError, match="port must be a number"):
        cluster.host_port("head:abc", 1)


def test_a_cluster_address_with_no_ray_exits_2_at_once_naming_it(tmp_path, monkeypatch, capsys):
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    start = time.monotonic()
    assert main(["train", "launch/experiments/digits.yaml", f"training.output_dir={tmp_path / 'run'}"]) == 2
    assert time.monotonic() - start < 30  # ray.init alone waits minutes
    err = capsys.readouterr().err
    assert f"RAY_ADDRESS={address}: no Ray cluster answers" in err
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert main(["tune", QUICKSTART, "tracking.enabled=false"]) == 2
    assert "job server (dashboard) address" in capsys.readouterr().err


def test_submit_to_an_address_with_no_ray_exits_2_naming_it(tmp_path, capsys):
    address = f"http://127.0.0.1:{free_port()}"
    argv = [
        "submit",
        "--address",
        address,
        "--storage",
        str(tmp_path / "s"),
        "--tracking-uri",
        "http://x:5000",
    ]
    assert main([*argv, "--", "tune", QUICKSTART]) == 2
    err = capsys.readouterr().err
    assert f"--address {address}: no Ray job server answers there" in err
    assert "Traceback" not in err


def test_an_unreachable_tracking_server_stops_the_sweep_before_any_trial(tmp_path, monkeypatch, capsys):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started although the tracking server is down")

    monkeypatch.setattr(sweep.ray_train, "init_ray", no_ray)
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    assert main(["tune", str(write_space(tmp_path))]) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert f"MLFLOW_TRACKING_URI {uri}: no working MLflow server answers there (Connection refused)" in err
    assert not (tmp_path / "sweeps").exists()


# ---------------------------------------------------------------- raymix submit


def _dry_run(capsys, *argv: str) -> dict:
    assert main(["submit", "--address", "head:8265", "--dry-run", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_submit_builds_the_job_request(tmp_path, capsys):
    request = _dry_run(
        capsys, "--storage", "s3://bucket/raymix", "--tracking-uri", "http://mlflow:5000", "--env", "A=b=c",
        "--", "tune", QUICKSTART, "training.epochs=4", "--name", "q",
    )  # fmt: skip
    assert request["address"] == "http://head:8265"
    assert request["entrypoint"] == f"raymix tune {QUICKSTART} training.epochs=4 --name q"
    runtime_env = request["runtime_env"]
    assert runtime_env["env_vars"] == {  # --env values are masked in what is printed
        "A": "***", "MLFLOW_TRACKING_URI": "http://mlflow:5000", cluster.STORAGE_ENV: "s3://bucket/raymix"
    }  # fmt: skip
    assert runtime_env["working_dir"] == "."
    assert "/.venv" in runtime_env["excludes"] and "/data" in runtime_env["excludes"]
    assert request["submission_id"].startswith("raymix-tune-")


@pytest.mark.parametrize("item, shown", [("1X=y", "'1X'"), ("A-B=y", "'A-B'"), ("=y", "''")])
def test_submit_refuses_a_bad_env_name(capsys, item, shown):
    argv = ["submit", "--address", "head:8265", "--dry-run", "--storage", "/s", "--env", item]
    assert main([*argv, "--", "tune", QUICKSTART, "tracking.enabled=false"]) == 2
    err = capsys.readouterr().err
    assert f"--env {shown}: expected KEY=VALUE" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--", "tune", QUICKSTART, "tracking.enabled=false"], "pass --storage"),
        (["--storage", "rel/dir", "--", "tune", QUICKSTART, "tracking.enabled=false"], "must be absolute"),
        (
            ["--storage", "/abs", "--", "tune", QUICKSTART],
            "the sweep's MLflow records need a tracking server",
        ),
        (
            ["--storage", "/abs", "--", "train", "launch/experiments/digits.yaml"],
            "the run's MLflow records need a tracking server",
        ),
        (["--storage", "/abs", "--", "tune", "search_spaces/nope.yaml"], "does not exist"),
        (["--storage", "/abs", "--", "tune", QUICKSTART, "optim.lrr=1"], "optim.lrr"),
        (["--storage", "/abs", "--", "eval", "x.pt"], "expected -- tune SPACE"),
        (["--storage", "/abs", "--", "train", "launch/experiments/digits.yaml", "--bogus"], "--bogus"),
        (
            ["--storage", "/abs", "--env", "=value", "--", "train", "launch/experiments/digits.yaml"],
            "--env",
        ),
    ],
)
def test_submit_refuses_bad_jobs_before_submitting(capsys, argv, message):
    assert main(["submit", "--address", "http://127.0.0.1:1", *argv]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- storage on several nodes


@pytest.fixture(scope="module")
def two_nodes():
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    saved = dict(os.environ)
    os.environ["RAY_ADDRESS"] = nodes.address
    try:
        assert cluster.init_ray()  # joins by RAY_ADDRESS, as a job's entrypoint does
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def test_storage_must_be_named_and_seen_by_every_node(two_nodes, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="storage_path is required on a cluster of 2 nodes"):
        cluster.check_shared_storage(str(tmp_path), False, "storage_path")
    cluster.check_shared_storage(str(tmp_path / "shared"), True, "storage_path")  # both nodes see it
    assert list((tmp_path / "shared").iterdir()) == []  # the marker is gone
    cluster.check_shared_storage("s3://bucket/x", True, "storage_path")

    head = ray.get_runtime_context().get_node_id()

    @ray.remote(num_cpus=0)
    def only_on_head(path: str) -> bool:  # as if the other node mounted something else there
        return ray.get_runtime_context().get_node_id() == head and Path(path).is_file()

    monkeypatch.setattr(cluster, "_sees", only_on_head)
    with pytest.raises(ConfigError, match=r"is not shared: 1 of the cluster's 2 nodes \("):
        cluster.check_shared_storage(str(tmp_path / "shared"), True, "storage_path")


def test_sweeps_and_runs_refuse_unshared_storage_on_two_nodes(two_nodes, tmp_path, monkeypatch):
    space = write_space(tmp_path, storage_path=None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="storage_path is required on a cluster of 2 nodes"):
        sweep.run_sweep(space, ["tracking.enabled=false"])
    assert not (tmp_path / "sweeps" / "space" / "sweep.yaml").exists()
    cfg = load_config(None, ["training.epochs=1", f"training.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="scaling.storage_path is required on a cluster of 2 nodes"):
        ray_train.run(cfg)
    monkeypatch.setenv(cluster.STORAGE_ENV, str(tmp_path / "shared"))
    assert ray_train.run_location(cfg) == (str(tmp_path / "shared"), cfg.run_name)
    assert sweep.prepare(space).storage_path == str(tmp_path / "shared")


# ---------------------------------------------------------------- the shipped launch files


def test_cluster_yaml_is_a_valid_ray_cluster_config_with_gpu_workers(capsys):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "launch" / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))  # Ray's own schema and checks, as `ray up` runs them
    workers = {k: v for k, v in raw["available_node_types"].items() if k != raw["head_node_type"]}
    assert workers and all(node["resources"].get("GPU", 0) >= 1 for node in workers.values())
    assert raw["file_mounts"]["~/raymix"] == "."
    assert any("pip install" in c and "-e ~/raymix" in c for c in raw["setup_commands"])
    head = " ".join(raw["head_start_ray_commands"])
    assert "launch/mlflow_server.sh" in head and "--dashboard-host=127.0.0.1" in head
    # The submit line in the header is a command that raymix accepts.
    line = next(
        ln for ln in (REPO / "launch" / "cluster.yaml").read_text().splitlines() if "raymix submit" in ln
    )
    argv = shlex.split(line.lstrip("# "))[1:]
    assert argv[0] == "submit"
    _dry_run(capsys, *argv[3:])  # without its --address


def test_rayjob_manifest_runs_an_entrypoint_that_exists(capsys):
    docs = list(yaml.safe_load_all((REPO / "launch" / "rayjob.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    entrypoint = shlex.split(job["spec"]["entrypoint"])
    assert entrypoint[0] == "raymix"
    _dry_run(
        capsys, "--storage", env[cluster.STORAGE_ENV], "--tracking-uri", env["MLFLOW_TRACKING_URI"],
        "--", *entrypoint[1:],
    )  # fmt: skip
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = [
        c["resources"]["limits"]["nvidia.com/gpu"]
        for w in workers
        for c in w["template"]["spec"]["containers"]
    ]
    assert gpus and all(int(g) >= 1 for g in gpus)
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # storage every node sees
    mlflow = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert mlflow["command"] == ["/app/launch/mlflow_server.sh"]
    # The dashboard listens on the pod's address only behind token auth, from a Secret.
    auth = job["spec"]["rayClusterSpec"]["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]
    assert (
        f"secret generic {auth['secretName']} --from-literal=auth_token="
        in (REPO / "launch" / "rayjob.yaml").read_text()
    )
    # MLflow (no login) has no address outside the cluster and admits only the Ray pods.
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app": "mlflow"}
    assert policy["spec"]["policyTypes"] == ["Ingress"] and policy["spec"]["ingress"][0]["from"]
    submitter = policy["spec"]["ingress"][0]["from"][1]["podSelector"]["matchLabels"]
    assert submitter == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    dockerfile = (REPO / "launch" / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-" in dockerfile
    for line in dockerfile.splitlines():
        if line.startswith("COPY"):
            for source in line.split()[2:-1]:
                assert (REPO / source).exists(), line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "99999"], "--port 99999"),
        (["--bogus"], "unknown option --bogus"),
        (["--dir"], "--dir needs a value"),
    ],
)
def test_mlflow_server_script_refuses_bad_options(argv, message):
    import subprocess

    done = subprocess.run([str(REPO / "launch" / "mlflow_server.sh"), *argv], capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr


def test_num_samples_must_be_positive(capsys):
    assert main(["tune", QUICKSTART, "--num-samples", "0", "tracking.enabled=false"]) == 2
    assert "--num-samples 0: must be at least 1" in capsys.readouterr().err
