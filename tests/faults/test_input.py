"""Hostile input: names that would write outside their folder, absurd counts."""

from __future__ import annotations

import pytest

from raymix.cli import main
from raymix.integrations import sweep
from tests.faults.helpers import DIGITS, TINY, space_file


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for input that should have been refused")

    monkeypatch.setattr(sweep.ray_train, "init_ray", refuse)


def test_names_are_single_folder_names(tmp_path, monkeypatch, capsys, no_ray, fault):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    space = space_file(tmp_path, "space")
    attempts = {
        "tune --name ../../x": ["tune", str(space), "--name", "../../x"],
        "tune --name .": ["tune", str(space), "--name", "."],
        "tune --name ''": ["tune", str(space), "--name", ""],
        "space name: '..'": ["tune", str(space_file(tmp_path, "dots", name=".."))],
        "training.run_name=..": ["train", str(DIGITS), *TINY, "training.run_name=.."],
        "training.run_name=a/b": ["train", str(DIGITS), *TINY, "training.run_name=a/b"],
        "training.run_name=''": ["train", str(DIGITS), *TINY, "training.run_name="],
    }
    before = sorted(p.name for p in tmp_path.iterdir())
    results = {}
    for what, argv in attempts.items():
        code = main(argv)
        err = capsys.readouterr().err
        results[what] = code == 2 and err.count("\n") == 1 and "a name must be one folder name" in err
    written = sorted(set(p.name for p in tmp_path.iterdir()) - set(before))
    ok = all(results.values()) and written == [] and not (tmp_path.parent / "x").exists()
    fault("names with `..`, `.`, `/` or nothing (`--name`, space `name`, `training.run_name`)",
          "exit 2, one line each, nothing written",
          f"{sum(results.values())}/{len(results)} refused so; written: {written or 'nothing'}",
          ok)  # fmt: skip


@pytest.mark.parametrize(
    "override, key",
    [
        ("training.epochs=1000000000000", "training.epochs"),
        ("training.batch_size=10000000000", "training.batch_size"),
        ("training.seed=99999999999999999999", "training.seed"),
        ("eval.knn_k=[100000000000]", "eval.knn_k"),
        ("method.queue_size=100000000000", "method.queue_size"),
    ],
)
def test_absurd_counts_are_refused(tmp_path, capsys, fault, override, key):
    code = main(["train", str(DIGITS), f"training.output_dir={tmp_path / 'run'}", override])
    err = capsys.readouterr().err
    ok = code == 2 and err.startswith(f"raymix: error: {key}") and err.count("\n") == 1
    ok = ok and not (tmp_path / "run").exists()
    fault(f"`{override}`", "exit 2, one line naming the key and the bound",
          f"exit {code}: '{err.strip()[15:]}'", ok)  # fmt: skip
