"""Shared by the method tests: a short training run on the bundled digits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from raymix.config import Config, load_config
from raymix.engine.run import fit

DIGITS = Path(__file__).parents[2] / "launch" / "experiments" / "digits.yaml"


@pytest.fixture
def digits_run(tmp_path: Path) -> Callable[..., tuple[Config, dict[str, Any], str]]:
    """``run(*overrides)`` trains the quickstart config with them in this test's folder and
    returns (config, the last epoch's metrics, metrics.jsonl's text)."""

    def run(*overrides: str) -> tuple[Config, dict[str, Any], str]:
        out = tmp_path / "run"
        cfg = load_config(DIGITS, [*overrides, "training.progress=false", f"training.output_dir={out}"])
        result = fit(cfg, log=lambda _: None, progress=False)
        return cfg, result, (out / "metrics.jsonl").read_text()

    return run
