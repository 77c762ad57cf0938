"""The command line: help, bad input (one line, exit 2, nothing written), train and eval."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raymix.cli import main

ROOT = Path(__file__).parents[1]
DIGITS = ROOT / "launch" / "experiments" / "digits.yaml"


def test_help_lists_every_config_key(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for key in (
        "data.name",
        "method.temperature",
        "optim.weight_decay_end",
        "training.batch_size",
        "eval.knn_k",
    ):
        assert key in out
    assert "one of: digits, synthetic, cifar10" in out


def test_top_level_help_names_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "train" in out and "eval" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["method.name=simclr"], "unknown method 'simclr'"),
        (["backbone.name=vit_giant"], "backbone.name"),
        (["data.name=imagenet"], "data.name"),
        (["backbone.patch_size=3"], "backbone.patch_size=3 does not divide data.image_size=16"),
        (["training.batch_size=4096"], "training.batch_size"),
        (["data.name=cifar10", "data.root=/nonexistent/cifar"], "data.root"),
        (["optim.lr=fast"], "optim.lr"),
        (["training.epochs=1000000000000"], "training.epochs: Input should be less than or equal to 100000"),
        (["training.run_name=.."], "training.run_name '..': a name must be one folder name"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, args, message):
    out_dir = tmp_path / "run"
    code = main(["train", str(DIGITS), f"training.output_dir={out_dir}", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and err.startswith("raymix: error:") and "\n" not in err
    assert not out_dir.exists()


def test_malformed_yaml_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: {epochs: 3\n")
    assert main(["train", str(bad), f"training.output_dir={tmp_path / 'run'}"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_eval_missing_checkpoint_exit_2(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_module_entry_point_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "raymix", "train", str(DIGITS), "method.name=nope"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "method.name" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A short quickstart run through the CLI (shared by the tests below)."""
    out = tmp_path_factory.mktemp("digits") / "run"
    command = ["train", str(DIGITS), "training.epochs=6", f"training.output_dir={out}"]
    proc = subprocess.run(
        [sys.executable, "-m", "raymix", *command], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def test_short_digits_run_beats_initialisation(digits_run):
    out, stdout = digits_run
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(7))
    initial, final = history[0]["knn_top1"], history[-1]["knn_top1"]
    assert final > initial + 0.05, (initial, final)
    assert "(initialisation)" in stdout and f"final: knn_top1 {final:.4f}" in stdout


def test_eval_reports_knn_and_linear_of_a_checkpoint(digits_run, capsys):
    out, _ = digits_run
    assert (
        main(["eval", str(out / "checkpoints" / "last.pt"), "--knn", "--linear", "eval.linear_epochs=5"]) == 0
    )
    metrics = json.loads(capsys.readouterr().out)
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["epoch"] == 6
    assert metrics["knn_top1"] == pytest.approx(final["knn_top1"])
    assert (
        0.1 < metrics["linear_top1_best"] <= 1.0
        and metrics["linear_top1_last"] <= metrics["linear_top1_best"]
    )


def test_running_again_resumes_instead_of_restarting(digits_run, capsys):
    out, _ = digits_run
    before = (out / "metrics.jsonl").read_text()
    assert (
        main(["train", str(DIGITS), "training.epochs=6", f"training.output_dir={out}", "--no-progress"]) == 0
    )
    assert "resuming" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text() == before
    changed = ["training.epochs=6", "optim.lr_scaling=none", f"training.output_dir={out}"]
    assert main(["train", str(DIGITS), *changed]) == 2
    assert "different config (optim.lr_scaling)" in capsys.readouterr().err


def test_backend_choice(monkeypatch):
    from raymix.cli import uses_ray
    from raymix.config import load_config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not uses_ray(load_config())
    assert uses_ray(load_config(None, ["scaling.num_workers=2"]))
    assert uses_ray(load_config(None, ["scaling.backend=ray"]))
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert uses_ray(load_config())
    assert not uses_ray(load_config(None, ["scaling.backend=local"]))


def test_local_backend_refuses_several_workers(capsys):
    assert main(["train", str(DIGITS), "scaling.backend=local", "scaling.num_workers=2"]) == 2
    assert "scaling.num_workers=2 needs scaling.backend=ray" in capsys.readouterr().err


def test_diverging_run_exits_1_and_keeps_its_folder(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["optim.lr=1e30", "optim.lr_scaling=none", "optim.warmup_epochs=0", "training.epochs=2"]
    code = main(["train", str(DIGITS), f"training.output_dir={out}", "--no-progress", *args])
    assert code == 1
    err = capsys.readouterr().err
    assert "loss is not finite" in err and "no checkpoint was written" in err  # none to name yet
    assert (out / "metrics.jsonl").exists()  # the initial evaluation is kept


# ---------------------------------------------------------------- --help answers at once

HEAVY = ("torch", "torchvision", "timm", "ray", "mlflow", "optuna")
COMMANDS = ("train", "eval", "tune", "submit", "best", "preview")


def test_help_imports_no_heavy_module():
    """Every --help is answered from the config models alone: a count of modules, not a timing."""
    code = (
        "import contextlib, io, sys\n"
        "from raymix.cli import main\n"
        f"for argv in [['--help'], *([c, '--help'] for c in {COMMANDS!r})]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "    assert 'usage: raymix' in out.getvalue(), argv\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_module_help_imports_no_heavy_module():
    """``python -m raymix --help``, as -X importtime records every module it imports."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "raymix", "train", "--help"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0 and "method.name" in done.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "raymix.cli" in imported
    assert not {name.split(".")[0] for name in imported} & set(HEAVY)


def test_train_help_lists_each_methods_keys_under_its_heading(capsys):
    from raymix.config import METHOD_CONFIGS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert 'method.name = "moco"  one of: moco, patchmix, unmix, snclr, selfcon' in out
    headings = [out.index(f"[{name}] method.name={name}") for name in METHOD_CONFIGS]
    assert headings == sorted(headings)
    ends = [*headings[1:], out.index("optim.name =")]
    for (name, model), start, end in zip(METHOD_CONFIGS.items(), headings, ends, strict=True):
        section = out[start:end]
        for key in model.model_fields:
            if key != "name":
                assert f"    method.{key} = " in section, (name, key)
    assert "method.mix_num" in out and "method.num_neighbors" in out and "method.exit_size" in out


# ---------------------------------------------------------------- raymix submit (no cluster)

QUICKSTART = "search_spaces/quickstart.yaml"


@pytest.fixture
def no_cluster_env(monkeypatch):
    monkeypatch.chdir(ROOT)  # the job's working directory is the repository
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI", "RAYMIX_STORAGE_PATH"):
        monkeypatch.delenv(key, raising=False)


def test_submit_dry_run_prints_the_request_without_an_address(no_cluster_env, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:pa55word@mlflow:5000")
    argv = [
        "submit", "--dry-run", "--storage", "s3://bucket/raymix", "--env", "TOKEN=hunter2secret",
        "--env", "HF_TOKEN", "--", "tune", QUICKSTART, "training.epochs=4", "--name", "q",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "hunter2secret" not in out and "pa55word" not in out
    request = json.loads(out)
    assert request["address"] is None
    assert request["entrypoint"] == f"raymix tune {QUICKSTART} training.epochs=4 --name q"
    assert request["submission_id"].startswith("raymix-tune-")
    env = request["runtime_env"]
    assert env["working_dir"] == "." and "/.venv" in env["excludes"] and "/data" in env["excludes"]
    assert env["env_vars"] == {
        "TOKEN": "***", "HF_TOKEN": "${HF_TOKEN}", "MLFLOW_TRACKING_URI": "http://bob:***@mlflow:5000",
        "RAYMIX_STORAGE_PATH": "s3://bucket/raymix",
    }  # fmt: skip
    assert (
        request["metadata"]["raymix.command"] == "tune" and request["metadata"]["raymix.file"] == QUICKSTART
    )
    # A named address is shown as the job server's URL.
    assert main([*argv[:1], "--address", "head:8265", *argv[1:]]) == 0
    assert json.loads(capsys.readouterr().out)["address"] == "http://head:8265"


def test_submit_without_dry_run_needs_an_address(no_cluster_env, capsys):
    argv = ["submit", "--storage", "/abs", "--", "tune", QUICKSTART, "tracking.enabled=false"]
    assert main(argv) == 2
    assert "--address: no Ray job server named" in capsys.readouterr().err


class FakeClient:
    """The part of Ray's JobSubmissionClient that raymix uses: refuses ``refusals`` submissions
    (as Ray does while the head's job agent is not ready), then accepts; its job logs
    ``logs`` and ends with ``status``."""

    def __init__(self, refusals=0, status="SUCCEEDED", logs=(), created=False, error=RuntimeError):
        self.refusals, self.status, self.logs, self.created, self.error = (
            refusals,
            status,
            logs,
            created,
            error,
        )
        self.submitted: list[dict] = []
        self.jobs: list[object] = []

    def submit_job(self, **request):
        self.submitted.append(request)
        if len(self.submitted) <= self.refusals:
            if self.created:  # the job was created although the request failed
                self.jobs.append(type("Details", (), {"submission_id": request["submission_id"]})())
            raise self.error("Request failed with status code 500: ...")
        return request["submission_id"]

    def list_jobs(self):
        return self.jobs

    def get_job_status(self, job_id):
        return self.status

    def get_job_info(self, job_id):
        return type("Info", (), {"message": "Job entrypoint command failed with exit code 1"})()

    async def tail_job_logs(self, job_id):
        for chunk in self.logs:
            yield chunk


def _job(**kwargs):
    from raymix.integrations import jobs

    return jobs.Job(address="http://head:8265", entrypoint=["tune", QUICKSTART], **kwargs)


def test_retry_decision_is_by_exception_type_and_job_status():
    from ray.exceptions import AuthenticationError

    from raymix.integrations.jobs import should_retry

    assert should_retry(RuntimeError("500"), job_created=False)  # refused, never created: again
    assert not should_retry(RuntimeError("500"), job_created=True)  # it exists: never twice
    assert not should_retry(RuntimeError("500"), job_created=None)  # cannot tell: do not guess
    for error in (ConnectionError("refused"), AuthenticationError("401"), ValueError("bad env")):
        assert not should_retry(error, job_created=False)


@pytest.mark.parametrize(
    "refusals, created, calls, ok",
    [(0, False, 1, True), (2, False, 3, True), (9, False, 3, False), (1, True, 1, False)],
)
def test_submit_asks_again_only_while_the_job_agent_is_not_ready(refusals, created, calls, ok):
    from raymix.errors import RunFailedError
    from raymix.integrations import jobs

    client = FakeClient(refusals=refusals, created=created)
    clock = iter(range(0, 1000, 30))  # each look at the clock: 30 s later; gives up after 90 s
    lines: list[str] = []
    job = _job()
    kwargs = {"log": lines.append, "clock": lambda: float(next(clock)), "sleep": lambda s: None}
    if ok:
        assert jobs.submit_job(client, job, **kwargs) == job.submission_id
    else:
        with pytest.raises(RunFailedError, match="the job server refused the job"):
            jobs.submit_job(client, job, **kwargs)
    assert len(client.submitted) == calls
    assert {r["submission_id"] for r in client.submitted} == {job.submission_id}  # one id throughout
    assert sum("not ready yet" in line for line in lines) == calls - 1


def test_submit_does_not_retry_a_refused_token_or_request():
    from ray.exceptions import AuthenticationError

    from raymix.config import ConfigError
    from raymix.errors import RunFailedError
    from raymix.integrations import jobs

    client = FakeClient(refusals=5, error=AuthenticationError)
    with pytest.raises(ConfigError, match="refused the request"):
        jobs.submit_job(client, _job(), log=lambda line: None, sleep=lambda s: None)
    assert len(client.submitted) == 1
    client = FakeClient(refusals=5, error=ValueError)  # the SDK's own check of the request
    with pytest.raises(RunFailedError, match="the job server refused the job"):
        jobs.submit_job(client, _job(), log=lambda line: None, sleep=lambda s: None)
    assert len(client.submitted) == 1


@pytest.mark.parametrize("status, code", [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 1)])
def test_submit_prints_id_link_logs_and_ends_with_the_status(capsys, status, code):
    from raymix.integrations import jobs

    logs = ["epoch 1 token=hunter2sec", "ret\nepoch 2\n", "last line"]  # a secret split over chunks
    client = FakeClient(status=status, logs=logs)
    job = _job(env_vars={"TOKEN": "hunter2secret"})
    lines: list[str] = []
    assert jobs.submit(job, log=lines.append, environ={}, client=client) == code
    out = capsys.readouterr().out
    assert out == "epoch 1 token=***\nepoch 2\nlast line\n"
    request = client.submitted[0]
    assert request["entrypoint"] == f"raymix tune {QUICKSTART}"
    assert request["runtime_env"]["env_vars"] == {"TOKEN": "hunter2secret"}  # unmasked to the cluster
    assert lines[0] == f"job {job.submission_id} submitted to http://head:8265"
    assert lines[1] == f"dashboard: http://head:8265/#/jobs/{job.submission_id}"
    assert lines[-1].startswith(f"job {job.submission_id} {status.lower()}")
    assert ("exit code 1" in lines[-1]) == (status != "SUCCEEDED")


def test_submit_no_wait_returns_once_submitted(capsys):
    from raymix.integrations import jobs

    client = FakeClient(status="RUNNING", logs=["never read"])
    lines: list[str] = []
    assert jobs.submit(_job(no_wait=True), log=lines.append, environ={}, client=client) == 0
    assert capsys.readouterr().out == "" and "not waiting" in lines[-1]


def test_token_goes_in_the_authorization_header(tmp_path):
    from raymix.integrations.jobs import auth_headers

    token = tmp_path / "token"
    token.write_text("s3cr3t\n")
    assert auth_headers({"RAY_AUTH_TOKEN_PATH": str(token)}) == {"Authorization": "Bearer s3cr3t"}
    assert auth_headers({"RAY_AUTH_TOKEN": "abc"}) == {"Authorization": "Bearer abc"}
    assert auth_headers({"RAY_AUTH_TOKEN": "abc", "RAY_AUTH_MODE": "disabled"}) == {}
    assert auth_headers({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")}) == {}
