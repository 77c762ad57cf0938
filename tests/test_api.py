"""The Python API: ``raymix.fit`` and ``raymix.tune``, exported lazily by ``import raymix``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import raymix
from raymix import api
from raymix.config import Config, ConfigError, load_config

ROOT = Path(__file__).parents[1]
DIGITS = ROOT / "launch" / "experiments" / "digits.yaml"
# One short epoch on the bundled digits (a tenth of them for training), in this process,
# recorded nowhere but the run folder.
TINY = {
    "data.test_fraction": 0.9,
    "training.epochs": 1,
    "training.batch_size": 64,
    "training.progress": False,
    "backbone.depth": 1,
    "head.hidden_dim": 32,
    "head.out_dim": 16,
    "eval.knn_k": [5],
    "tracking.enabled": False,
    "scaling.backend": "local",
}
HEAVY = ("torch", "torchvision", "timm", "ray", "mlflow", "optuna")


def test_import_raymix_imports_no_heavy_module():
    code = (
        "import sys, raymix\n"
        "assert callable(raymix.fit) and callable(raymix.tune)\n"  # the lazy exports resolve
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_exports():
    assert raymix.fit is api.fit and raymix.tune is api.tune and raymix.FitResult is api.FitResult
    assert {"fit", "tune"} <= set(raymix.__all__) and "fit" in dir(raymix)
    assert "Example::" in (api.fit.__doc__ or "") and "Example::" in (api.tune.__doc__ or "")
    with pytest.raises(AttributeError, match="no attribute 'fitt'"):
        raymix.fitt  # noqa: B018


def test_every_way_of_giving_config_and_overrides_is_the_same():
    expected = load_config(DIGITS, ["training.epochs=2", "optim.lr=0.001", "eval.knn_k=[5]"])
    raw = expected.to_dict()
    same = [
        api.resolve_config(DIGITS, {"training.epochs": 2, "optim.lr": 1e-3, "eval.knn_k": [5]}),
        api.resolve_config(str(DIGITS), ["training.epochs=2", "optim.lr=0.001", "eval.knn_k=[5]"]),
        api.resolve_config(DIGITS, training__epochs=2, optim__lr=1e-3, eval__knn_k=[5]),
        api.resolve_config(raw),
        api.resolve_config(expected),
        api.resolve_config(load_config(DIGITS), {"training.epochs": 2}, optim__lr=1e-3, eval__knn_k=[5]),
    ]
    for cfg in same:
        assert isinstance(cfg, Config) and cfg == expected
    assert api.resolve_config() == Config()


@pytest.mark.parametrize(
    "config, overrides, keywords, message",
    [
        (DIGITS, {"optim.lrr": 1}, {}, "optim.lrr"),
        (DIGITS, None, {"training__epochz": 1}, "training.epochz"),
        (DIGITS, ["method.name=simclr"], {}, "unknown method 'simclr'"),
        ({"data": {"name": "imagenet"}}, None, {}, "data.name"),
        (ROOT / "nope.yaml", None, {}, "does not exist"),
        (42, None, {}, "expected a YAML path, a dict or a raymix Config"),
    ],
)
def test_bad_input_is_a_config_error_naming_the_key(tmp_path, config, overrides, keywords, message):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        raymix.fit(config, overrides, training__output_dir=str(out), **keywords)
    assert not out.exists()  # refused before anything is written


def test_fit_trains_one_epoch_on_the_digits_and_writes_the_run(tmp_path):
    lines: list[str] = []
    result = raymix.fit(DIGITS, TINY, training__output_dir=str(tmp_path / "run"), log=lines.append)
    assert isinstance(result, raymix.FitResult) and result.backend == "local"
    assert result.output_dir == tmp_path / "run"
    assert result.metrics["epoch"] == 1
    assert 0.0 <= result.metrics["knn_top1"] <= 1.0 and "knn_top1_init" in result.metrics
    assert result.best_checkpoint == result.output_dir / "checkpoints" / "best.pt"
    assert result.best_checkpoint.is_file()
    history = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1]
    assert (result.output_dir / "config.yaml").is_file()
    assert result.config.training.epochs == 1 and result.config.backbone.depth == 1


def test_the_cli_trains_through_the_api(tmp_path, monkeypatch, capsys):
    """``raymix train`` is a thin layer: it calls ``raymix.api.fit`` with the file and overrides."""
    from raymix.cli import main

    seen: dict[str, Any] = {}

    def fake_fit(config: Any, overrides: Any = None, **options: Any) -> api.FitResult:
        seen.update(config=config, overrides=overrides, **options)
        cfg = api.resolve_config(config, overrides)
        metrics = {"epoch": 1, "knn_top1": 0.5, "knn_top1_init": 0.25}
        return api.FitResult(metrics, cfg.output_dir, cfg.output_dir / "best.pt", cfg)

    monkeypatch.setattr(api, "fit", fake_fit)
    assert main(["train", str(DIGITS), "training.epochs=1", "--no-progress"]) == 0
    assert seen == {"config": str(DIGITS), "overrides": ["training.epochs=1"], "progress": False}
    assert "final: knn_top1 0.5000 (at initialisation 0.2500)" in capsys.readouterr().out


def test_tune_passes_options_to_the_sweep_and_returns_its_board(monkeypatch):
    """``raymix.tune`` (and so ``raymix tune``) is ``run_sweep`` with the options as sweep controls."""
    from raymix.integrations import sweep

    calls: list[dict[str, Any]] = []

    def fake_run_sweep(space: Any, overrides: Any, **options: Any) -> str:
        calls.append({"space": space, "overrides": overrides, **options})
        return "board"

    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    board = raymix.tune(
        "search_spaces/quickstart.yaml", {"training.epochs": 2}, num_samples=3, time_budget="2m",
        stop={"knn_top1": 0.9}, name="q", eval__knn_k=[5, 20], log=print,
    )  # fmt: skip
    assert board == "board"
    (call,) = calls
    assert call["space"] == Path("search_spaces/quickstart.yaml") and call["name"] == "q"
    assert call["overrides"] == ["training.epochs=2", "eval.knn_k=[5, 20]"]
    assert call["controls"] == {"num_samples": 3, "time_budget": 120.0, "stop": {"knn_top1": 0.9}}
    with pytest.raises(ConfigError, match="time_budget 'soon'"):
        raymix.tune("search_spaces/quickstart.yaml", time_budget="soon")
