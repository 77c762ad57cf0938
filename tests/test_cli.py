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
