"""The shipped launch files, checked as the tools that read them would: ``launch/cluster.yaml``
against the cluster schema inside the installed Ray and every command in it through
``bash -n``; ``launch/rayjob.yaml`` parsed, its PostgreSQL-backed MLflow wired consistently
(Secret keys, Services, volumes, ports) and its shell scripts through ``bash -n``;
``launch/mlflow_server.sh``'s PostgreSQL refusals.

The broader checks of these files (Ray's own ``validate_config``, the entrypoint, the token
auth) are in ``tests/integrations/test_cluster.py``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import ray.autoscaler
import yaml
from jsonschema import Draft7Validator

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"

# The lists of bash command lines in a cluster-launcher config (top level; a node type may
# override the worker ones). `docker.run_options` and friends are `docker run` arguments.
COMMAND_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
NODE_TYPE_COMMAND_LISTS = ("initialization_commands", "worker_setup_commands")


def bash_syntax_error(script: str) -> str | None:
    """``bash -n``'s complaint about ``script``, or None when it parses."""
    done = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    if done.returncode == 0:
        return None
    return done.stderr.strip() or f"bash -n exit {done.returncode}"


def cluster_commands(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, command) for every shell command of a cluster-launcher config."""
    found = [(f"{key}[{i}]", c) for key in COMMAND_LISTS for i, c in enumerate(config.get(key) or [])]
    for name, node in (config.get("available_node_types") or {}).items():
        for key in NODE_TYPE_COMMAND_LISTS:
            found += [(f"{name}.{key}[{i}]", c) for i, c in enumerate(node.get(key) or [])]
    return found


def cluster_problems(text: str) -> list[str]:
    """What makes a cluster-launcher YAML unusable: schema errors and shell syntax errors."""
    config = yaml.safe_load(text)
    schema = json.loads(RAY_SCHEMA.read_text())
    problems = [
        f"schema: {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in Draft7Validator(schema).iter_errors(config)
    ]
    for where, command in cluster_commands(config):
        if not isinstance(command, str):
            problems.append(f"{where}: not a string: {command!r}")
        elif error := bash_syntax_error(command):
            problems.append(f"{where}: {command!r}: {error}")
    return problems


# ---------------------------------------------------------------- launch/cluster.yaml


def test_rays_cluster_schema_is_where_the_test_reads_it():
    schema = json.loads(RAY_SCHEMA.read_text())
    assert "setup_commands" in schema["properties"] and "docker" in schema["properties"]


def test_cluster_yaml_passes_rays_schema_and_bash_n():
    text = (LAUNCH / "cluster.yaml").read_text()
    assert cluster_problems(text) == []
    assert len(cluster_commands(yaml.safe_load(text))) >= 5  # the commands were found and checked


def test_a_comment_eaten_command_is_caught():
    # The old setup line: YAML read ` # raymix venv' >> ~/.bashrc` as a comment and left bash
    # an unterminated quote; the schema alone accepts it.
    broken = (
        "cluster_name: x\nprovider: {type: aws, region: us-west-2}\nsetup_commands:\n"
        "  - grep -q 'raymix venv' ~/.bashrc || echo 'export PATH=$HOME/venv/bin:$PATH"
        "  # raymix venv' >> ~/.bashrc\n"
    )
    problems = cluster_problems(broken)
    assert len(problems) == 1 and problems[0].startswith("setup_commands[0]:")
    assert "unexpected EOF" in problems[0] or "syntax" in problems[0]
    assert cluster_problems("cluster_name: x\nprovider: {type: aws, region: us-west-2}\nbogus: 1\n")


def test_cluster_runs_the_projects_image_on_a_current_ami():
    config = yaml.safe_load((LAUNCH / "cluster.yaml").read_text())
    docker = config["docker"]
    images = {docker.get(k) or docker["image"] for k in ("head_image", "worker_image")}
    project = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M)
    assert project
    for image in images:  # the image of launch/Dockerfile, as its header builds it
        assert re.fullmatch(rf"([^/\s]+/)*raymix:{re.escape(project[1])}", image), image
    base = re.search(r"^FROM rayproject/ray:[\w.]+-py3(\d+)", (LAUNCH / "Dockerfile").read_text(), re.M)
    assert base and int(base[1]) >= 10  # the project needs Python >= 3.10
    # GPUs reach the workers' containers; the head has none to pass.
    assert any("--gpus" in o for o in docker.get("worker_run_options", []))
    assert not any("--gpus" in o for o in docker.get("run_options", []) + docker.get("head_run_options", []))
    # Every node names its AMI: without one Ray falls back to its Ubuntu 18.04 Deep Learning AMI.
    for name, node in config["available_node_types"].items():
        ami = node["node_config"].get("ImageId", "")
        assert ami and ami.lower() != "latest_dlami", name
        assert ami.startswith(("ami-", "resolve:ssm:")) and "18.04" not in ami, ami


def test_cluster_commands_do_not_rely_on_a_host_virtualenv():
    config = yaml.safe_load((LAUNCH / "cluster.yaml").read_text())
    commands = " ".join(c for _, c in cluster_commands(config))
    assert "~/venv" not in commands and "$HOME/venv" not in commands  # the image has the stack
    assert "pip install" in commands and "-e ~/raymix" in commands  # the synced code, not /app's


# ---------------------------------------------------------------- launch/rayjob.yaml

# The KubeRay release whose ray.io/v1 CRDs first have each RayJob field that the manifest
# may use (read from the tagged ray-operator/apis/ray/v1/*_types.go of ray-project/kuberay).
KUBERAY_FIELD_SINCE = {
    "entrypoint": (1, 0, 0),
    "runtimeEnvYAML": (1, 0, 0),
    "shutdownAfterJobFinishes": (1, 0, 0),
    "ttlSecondsAfterFinished": (1, 0, 0),
    "rayClusterSpec": (1, 0, 0),
    "clusterSelector": (1, 0, 0),
    "submitterPodTemplate": (1, 0, 0),
    "suspend": (1, 0, 0),
    "submissionMode": (1, 1, 0),
    "activeDeadlineSeconds": (1, 1, 0),
    "backoffLimit": (1, 2, 0),
    "deletionStrategy": (1, 5, 0),
    "rayClusterSpec.authOptions": (1, 6, 0),
}


def manifest() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((LAUNCH / "rayjob.yaml").read_text()) if d is not None]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} in launch/rayjob.yaml"
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every Deployment and of the RayJob's head and worker groups."""
    pods = [
        (f"Deployment/{d['metadata']['name']}", d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] == "Deployment"
    ]
    for job in (d for d in docs if d["kind"] == "RayJob"):
        cluster = job["spec"]["rayClusterSpec"]
        pods.append(("RayJob head", cluster["headGroupSpec"]["template"]["spec"]))
        pods += [(f"RayJob {w['groupName']}", w["template"]["spec"]) for w in cluster["workerGroupSpecs"]]
    return pods


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def secret_ref(container: dict[str, Any], name: str) -> tuple[str, str]:
    ref = env_of(container)[name]["secretKeyRef"]
    return ref["name"], ref["key"]


def test_rayjob_manifest_parses_into_named_kubernetes_objects():
    docs = manifest()
    assert len(docs) >= 9
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], doc
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert len(kinds) == len(docs)  # no object defined twice
    for expected in [("Secret", "mlflow-postgres"), ("Deployment", "postgres"), ("Service", "postgres")]:
        assert expected in kinds


def test_every_secret_key_volume_and_selector_in_the_manifest_exists():
    docs = manifest()
    secrets = {
        d["metadata"]["name"]: {*d.get("stringData", {}), *d.get("data", {})}
        for d in docs
        if d["kind"] == "Secret"
    }
    text = (LAUNCH / "rayjob.yaml").read_text()
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in deployments}
    for d in deployments:  # each Deployment owns the pods it creates
        assert d["spec"]["selector"]["matchLabels"].items() <= labels[d["metadata"]["name"]].items()
    for where, pod in pod_specs(docs):
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, where
        names = {v["name"] for v in pod.get("volumes", [])}
        for container in containers(pod):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in names, (where, mount)
            defined = set()
            for name, source in env_of(container).items():
                if isinstance(source, dict) and "secretKeyRef" in source:
                    secret, key = source["secretKeyRef"]["name"], source["secretKeyRef"]["key"]
                    assert secret in secrets, (
                        f"{where}: env {name} reads Secret {secret}, not in the manifest"
                    )
                    assert key in secrets[secret], (
                        f"{where}: env {name} reads key {key} that Secret {secret} lacks"
                    )
                defined.add(name)
            # Kubernetes expands $(NAME) in command and args from the container's own env.
            for word in [*container.get("command", []), *container.get("args", [])]:
                for name in re.findall(r"\$\((\w+)\)", word):
                    assert name in defined, f"{where}: $({name}) in {word!r} is not in its env"
    # The Ray token's Secret is created by hand, as the header shows.
    job = next(d for d in docs if d["kind"] == "RayJob")
    token = job["spec"]["rayClusterSpec"]["authOptions"]["secretName"]
    assert f"kubectl create secret generic {token} --from-literal=auth_token=" in text
    # Each Service selects a Deployment's pods and forwards to a port its container opens.
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        target = [name for name, lab in labels.items() if selector.items() <= lab.items()]
        assert len(target) == 1, service["metadata"]["name"]
        pod = one(docs, "Deployment", target[0])["spec"]["template"]["spec"]
        opened = {p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= opened, service["metadata"]["name"]
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
        guarded = policy["spec"]["podSelector"]["matchLabels"]
        assert any(guarded.items() <= lab.items() for lab in labels.values()), policy["metadata"]["name"]


def test_mlflow_reads_postgres_with_the_credentials_postgres_was_created_with():
    docs = manifest()
    secret = one(docs, "Secret", "mlflow-postgres")
    assert secret["stringData"]["password"] == "CHANGE-ME"  # a placeholder the header says to set
    start = one(docs, "Deployment", "postgres")["spec"]["template"]["spec"]["containers"][0]["command"]
    refused = subprocess.run(start, capture_output=True, text=True, env={"POSTGRES_PASSWORD": "CHANGE-ME"})
    assert refused.returncode == 1 and "set a password" in refused.stderr  # never starts with it
    postgres = one(docs, "Deployment", "postgres")["spec"]["template"]["spec"]["containers"][0]
    mlflow = one(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    # The same Secret keys: the database, user and password that PostgreSQL's first start
    # creates are those that the driver in the MLflow container (libpq's PG* variables) uses.
    assert secret_ref(mlflow, "PGPASSWORD") == secret_ref(postgres, "POSTGRES_PASSWORD")
    assert secret_ref(mlflow, "PGUSER") == secret_ref(postgres, "POSTGRES_USER")
    assert secret_ref(mlflow, "PGDATABASE") == secret_ref(postgres, "POSTGRES_DB")
    args = mlflow["args"]
    uri = args[args.index("--backend-store-uri") + 1]
    service = one(docs, "Service", "postgres")
    port = service["spec"]["ports"][0]["port"]
    assert (
        uri == f"postgresql+psycopg2://{service['metadata']['name']}:{port}/$(PGDATABASE)"
    )  # no password in it
    assert "sqlite" not in " ".join(args)
    # Artifacts on the shared ReadWriteMany volume (the server proxies them).
    directory = args[args.index("--dir") + 1]
    assert any(directory.startswith(m["mountPath"] + "/") for m in mlflow["volumeMounts"])
    # PostgreSQL keeps its data on its own claim, one server at a time.
    data = one(docs, "PersistentVolumeClaim", "mlflow-postgres-data")
    assert data["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert one(docs, "Deployment", "postgres")["spec"]["strategy"]["type"] == "Recreate"
    assert env_of(postgres)["PGDATA"].startswith(postgres["volumeMounts"][0]["mountPath"] + "/")
    # The image that runs the MLflow server has the PostgreSQL driver.
    assert re.search(r"pip install .*psycopg2-binary==", (LAUNCH / "Dockerfile").read_text())


def test_shell_scripts_in_the_manifest_parse():
    docs = manifest()
    scripts = []
    for where, pod in pod_specs(docs):
        for container in containers(pod):
            probes = [
                container.get(p, {}).get("exec", {}).get("command")
                for p in ("readinessProbe", "livenessProbe")
            ]
            for argv in [container.get("command"), *probes]:
                if argv and Path(argv[0]).name in ("sh", "bash") and argv[1:2] == ["-c"]:
                    scripts.append((f"{where}/{container['name']}", argv[2]))
    job = next(d for d in docs if d["kind"] == "RayJob")
    scripts.append(("RayJob entrypoint", job["spec"]["entrypoint"]))
    assert len(scripts) >= 3
    for where, script in scripts:
        assert bash_syntax_error(script) is None, (where, script, bash_syntax_error(script))


def test_the_header_names_the_kuberay_release_that_has_every_field_used():
    job = next(d for d in manifest() if d["kind"] == "RayJob")
    used = set(job["spec"]) | {f"rayClusterSpec.{k}" for k in job["spec"]["rayClusterSpec"]}
    unknown = {f for f in used if "." not in f} - set(KUBERAY_FIELD_SINCE)
    assert not unknown, f"add these RayJob fields to KUBERAY_FIELD_SINCE: {sorted(unknown)}"
    needed = max(KUBERAY_FIELD_SINCE.get(f, (1, 0, 0)) for f in used)
    assert needed == (1, 6, 0)  # authOptions
    named = re.search(r"KubeRay operator (\d+)\.(\d+)\.(\d+) or newer", (LAUNCH / "rayjob.yaml").read_text())
    assert named and tuple(map(int, named.groups())) >= needed


# ---------------------------------------------------------------- launch/mlflow_server.sh


def _script(args: list[str], path: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LAUNCH / "mlflow_server.sh"), "--dir", str(tmp_path / "m"), *args],
        capture_output=True,
        text=True,
        env={"PATH": path, "HOME": str(tmp_path)},
    )


def test_mlflow_server_script_refuses_postgres_without_its_driver(tmp_path):
    # An environment whose mlflow sits beside a Python without psycopg2.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in [("mlflow", "echo started; exit 0"), ("python", "exit 1")]:
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    system = "/usr/bin:/bin"
    done = _script(
        ["--backend-store-uri", "postgresql+psycopg2://db:5432/mlflow"], f"{bin_dir}:{system}", tmp_path
    )
    assert done.returncode == 2 and "pip install psycopg2-binary" in done.stderr, done.stderr
    done = _script(["--backend-store-uri", "postgres://db/mlflow"], f"{bin_dir}:{system}", tmp_path)
    assert done.returncode == 2 and "write postgresql+psycopg2://" in done.stderr, done.stderr
    # With the driver, the server starts; a password in the URI stays out of the log.
    (bin_dir / "python").write_text("#!/bin/sh\nexit 0\n")
    done = _script(
        ["--backend-store-uri", "postgresql+psycopg2://u:s3cret@db/m"], f"{bin_dir}:{system}", tmp_path
    )
    assert done.returncode == 0 and "started" in done.stdout, done.stderr
    assert "backend postgresql+psycopg2://u:***@db/m" in done.stderr and "s3cret" not in done.stderr
    # SQLite needs no driver: the (stub) server starts.
    done = _script([], f"{bin_dir}:{system}", tmp_path)
    assert done.returncode == 0 and "started" in done.stdout, done.stderr


def test_mlflow_server_script_documents_the_postgres_backend():
    done = subprocess.run([str(LAUNCH / "mlflow_server.sh"), "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    assert "--backend-store-uri postgresql+psycopg2://" in done.stdout and "PGPASSWORD" in done.stdout
    assert "set -euo pipefail" not in done.stdout  # the comment only


def test_mlflow_server_script_names_the_driver_a_bare_postgresql_uri_needs(tmp_path):
    # SQLAlchemy 2.1 reads postgresql:// as psycopg 3; this environment has psycopg2 only.
    if importlib.util.find_spec("psycopg") is not None:
        pytest.skip("psycopg 3 is installed here: a bare postgresql:// URI has its driver")
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    done = _script(["--backend-store-uri", "postgresql://db:5432/mlflow"], path, tmp_path)
    assert done.returncode == 2 and "postgresql+psycopg2://" in done.stderr, done.stderr
