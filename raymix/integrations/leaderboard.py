"""A sweep's leaderboard, read back from its folder: ranks, outcomes, the best config, plots.

Trials are ranked by their last reported value of the sweep's metric (the value at the
epoch they ended: the last one, or the one where ASHA stopped them); failed trials and
trials without a value come last. Works on a finished or an interrupted sweep.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import yaml
from ray.tune import ExperimentAnalysis

from raymix.integrations.search_space import (
    SearchSpace,
    config_for,
    decode_point,
    encode_point,
    encoded_choices,
)

SWEEP_FILE = "sweep.yaml"  # the resolved space and base config a sweep started with
LEADERBOARD_FILE = "leaderboard.csv"
BEST_CONFIG_FILE = "best_config.yaml"
PLOTS = ("optimization_history", "parallel_coordinate", "param_importances")


# ---------------------------------------------------------------- files on a path or URI


def file_system(location: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The filesystem of a local path or URI (s3://, gs://, ...) and the path within it."""
    if "://" in location:
        return pyarrow.fs.FileSystem.from_uri(location)
    return pyarrow.fs.LocalFileSystem(), location


def read_text(location: str) -> str:
    fs, path = file_system(location)
    try:
        with fs.open_input_stream(path) as f:
            return bytes(f.read()).decode()
    except FileNotFoundError:
        raise FileNotFoundError(f"{location} does not exist") from None


def write_text(location: str, text: str) -> None:
    fs, path = file_system(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


# ---------------------------------------------------------------- the board


@dataclass
class Row:
    trial_id: str
    outcome: str  # completed | pruned | failed | running | pending
    epochs: int
    last: float  # the metric at the trial's last report (nan: none)
    best: float  # the best value over its reports
    point: dict[str, Any]  # decoded sampled values
    error: str = ""


@dataclass
class Board:
    space: SearchSpace
    base: dict[str, Any]
    path: str
    rows: list[Row] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return self.space.metric

    def ranked(self) -> list[Row]:
        sign = -1.0 if self.space.mode == "max" else 1.0

        def key(row: Row) -> tuple[int, float]:
            missing = row.outcome == "failed" or math.isnan(row.last)
            return (int(missing), 0.0 if missing else sign * row.last)

        return sorted(self.rows, key=key)

    def best_row(self) -> Row | None:
        top = self.ranked()[:1]
        return top[0] if top and not math.isnan(top[0].last) and top[0].outcome != "failed" else None

    def best_config(self) -> dict[str, Any]:
        row = self.best_row()
        if row is None:
            raise ValueError(f"{self.path}: no trial has reported {self.metric} yet")
        raw = config_for(self.base, row.point).to_dict()
        raw["training"]["run_name"] = f"{Path(self.path).name}-{row.trial_id}"
        raw["training"]["output_dir"] = None
        return raw

    def csv(self) -> str:
        keys = sorted(self.space.params)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(
            ["rank", "trial_id", "outcome", "epochs", self.metric, f"best_{self.metric}", *keys, "error"]
        )
        for i, row in enumerate(self.ranked(), 1):
            values = [row.point.get(k, "") for k in keys]
            writer.writerow(
                [i, row.trial_id, row.outcome, row.epochs, row.last, row.best, *values, row.error]
            )
        return out.getvalue()

    def format(self) -> str:
        keys = sorted(self.space.params)
        header = ["#", "trial", "outcome", "ep", self.metric, *keys]
        lines = [header]
        for i, row in enumerate(self.ranked(), 1):
            shown = "-" if math.isnan(row.last) else f"{row.last:.4f}"
            lines.append(
                [
                    str(i),
                    row.trial_id,
                    row.outcome,
                    str(row.epochs),
                    shown,
                    *(_short(row.point.get(k, "")) for k in keys),
                ]
            )
        widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
        return "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines
        )


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _outcome(status: str, epochs: int, planned: int) -> str:
    if status == "ERROR":
        return "failed"
    if status == "TERMINATED":
        return "completed" if epochs >= planned else "pruned"
    return status.lower()


def _error_text(trial: Any) -> str | None:
    """A failed trial's error file: in the sweep folder (readable with Ray shut down), else in
    the driver's staging folder (where Tune writes it first, while Ray runs)."""
    name = trial.run_metadata.error_filename
    if not name:
        return None
    try:
        fs = trial.storage.storage_filesystem
        with fs.open_input_stream(f"{trial.path}/{name}") as f:
            return bytes(f.read()).decode(errors="replace")
    except (OSError, AttributeError):
        pass
    if ray.is_initialized():
        try:
            return Path(trial.error_file).read_text(errors="replace") if trial.error_file else None
        except OSError:
            return None
    return None


def trial_error(trial: Any) -> str:
    """The last line of a failed trial's error (its exception)."""
    text = _error_text(trial)
    if text is None:
        return "error (no error file)"
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def is_sweep(folder: Path) -> bool:
    """A local folder that ``raymix tune`` started: its saved space and Tune's state."""
    return (folder / SWEEP_FILE).is_file() and any(folder.glob("experiment_state-*.json"))


def load(sweep_path: str) -> Board:
    """Read a sweep folder (finished or interrupted) into a :class:`Board`."""
    saved = yaml.safe_load(read_text(f"{sweep_path.rstrip('/')}/{SWEEP_FILE}"))
    space = SearchSpace.model_validate(saved["space"])
    base = saved["base"]
    planned = config_for(base, {}).training.epochs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = ExperimentAnalysis(sweep_path)
    board = Board(space, base, sweep_path)
    frames = analysis.trial_dataframes
    for trial in analysis.trials:
        frame = frames.get(trial.trial_id)
        values = []
        if frame is not None and space.metric in getattr(frame, "columns", []):
            values = [float(v) for v in frame[space.metric].dropna()]
        epochs = int(frame["epoch"].max()) if frame is not None and values and "epoch" in frame.columns else 0
        pick = max if space.mode == "max" else min
        board.rows.append(
            Row(
                trial_id=trial.trial_id,
                outcome=_outcome(str(trial.status), epochs, planned),
                epochs=epochs,
                last=values[-1] if values else math.nan,
                best=pick(values) if values else math.nan,
                point=decode_point(space, dict(trial.config)),
                error=trial_error(trial) if trial.status == "ERROR" else "",
            )
        )
    return board


# ---------------------------------------------------------------- outputs


def plots(board: Board, folder: Path) -> dict[str, str]:
    """Optuna's plots of the sweep as PNGs in ``folder``; returns {plot: why not} for any skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dists: dict[str, Any] = {}
    for key, p in board.space.params.items():
        if p.type == "categorical":
            dists[key] = CategoricalDistribution(encoded_choices(p))
        elif p.type == "int":
            dists[key] = IntDistribution(int(p.low or 0), int(p.high or 0), log=p.log, step=int(p.step or 1))
        else:
            dists[key] = FloatDistribution(float(p.low or 0.0), float(p.high or 0.0), log=p.log, step=p.step)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if board.space.mode == "max" else "minimize")

    for row in board.rows:
        if math.isnan(row.last) or row.outcome == "failed":
            continue
        params = encode_point(board.space, row.point)
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions={k: dists[k] for k in params}, value=row.last
            )
        )
    skipped: dict[str, str] = {}
    for name in PLOTS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = getattr(optuna.visualization.matplotlib, f"plot_{name}")(study)
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.set_size_inches(10, 6)
            figure.savefig(folder / f"{name}.png", dpi=100, bbox_inches="tight")
            plt.close(figure)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            skipped[name] = str(exc) or type(exc).__name__
    return skipped


def render(board: Board, folder: Path) -> dict[str, str]:
    """``leaderboard.csv``, ``best_config.yaml`` and ``plots/*.png`` into a local folder.

    Returns {plot: reason} for plots that could not be drawn (e.g. importances of one trial).
    """
    (folder / LEADERBOARD_FILE).write_text(board.csv())
    if board.best_row() is not None:
        (folder / BEST_CONFIG_FILE).write_text(yaml.safe_dump(board.best_config(), sort_keys=False))
    (folder / "plots").mkdir(exist_ok=True)
    return plots(board, folder / "plots")


def publish(folder: Path, sweep_path: str) -> None:
    """Copy what :func:`render` wrote into the sweep folder (a path or URI)."""
    fs, root = file_system(sweep_path.rstrip("/"))
    fs.create_dir(f"{root}/plots", recursive=True)
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            with fs.open_output_stream(f"{root}/{file.relative_to(folder).as_posix()}") as f:
                f.write(file.read_bytes())
