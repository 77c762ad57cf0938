"""The command line: help, bad input (one line, exit 2, nothing written), train and eval."""

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
