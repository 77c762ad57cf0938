"""A sweep's leaderboard, read back from its folder: ranks, outcomes, the best config, plots.

Trials are ranked by their last reported value of the sweep's metric (the value at the
epoch they ended: the last one, or the one where ASHA stopped them); failed trials and
trials without a value come last. Works on a finished or an interrupted sweep.

A multi-objective sweep (``objectives`` in the space) also has a Pareto front: the completed
trials no other completed trial dominates (as good on every objective, better on one; as
Optuna's ``study.best_trials``). Its members rank first, by the first objective; the best
config is the front's best on the first objective. ``leaderboard.csv`` has every objective
and a ``pareto`` column, ``pareto_front.csv`` the front alone, ``plots/pareto_front.png`` the
trade-off.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import yaml
from ray.tune import ExperimentAnalysis

from raymix.engine.loop import fresh
from raymix.integrations.search_space import (
    Objective,
    SearchSpace,
    config_for,
    decode_point,
    encode_point,
    encoded_choices,
)

SWEEP_FILE = "sweep.yaml"  # the resolved space and base config a sweep started with
LEADERBOARD_FILE = "leaderboard.csv"
BEST_CONFIG_FILE = "best_config.yaml"
PARETO_FILE = "pareto_front.csv"  # multi-objective sweeps: the front's trials
PLOTS = ("optimization_history", "parallel_coordinate", "param_importances")
PARETO_PLOT = "pareto_front"


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
    values: dict[str, float] = field(default_factory=dict)  # every objective at the last report
    history: dict[int, float] = field(default_factory=dict)  # epoch -> the metric measured then

    def value(self, metric: str) -> float:
        """An objective's value at the trial's last report (nan: none)."""
        return self.values.get(metric, math.nan)


@dataclass
class Board:
    space: SearchSpace
    base: dict[str, Any]
    path: str
    rows: list[Row] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return self.space.metric

    @property
    def objectives(self) -> list[Objective]:
        return self.space.targets

    def objective_values(self, row: Row) -> list[float]:
        """The row's value of every objective (the first is :attr:`Row.last`)."""
        return [row.last if o.metric == self.metric else row.value(o.metric) for o in self.objectives]

    def front(self) -> list[Row]:
        """Multi-objective sweeps: the Pareto front of the completed trials (none otherwise)."""
        if not self.space.multi_objective:
            return []
        signs = [1.0 if o.mode == "max" else -1.0 for o in self.objectives]
        scored = [
            (row, [s * v for s, v in zip(signs, self.objective_values(row), strict=True)])
            for row in self.rows
            if row.outcome == "completed" and all(math.isfinite(v) for v in self.objective_values(row))
        ]
        return [row for row, mine in scored if not any(dominates(other, mine) for _, other in scored)]

    def ranked(self) -> list[Row]:
        sign = -1.0 if self.space.mode == "max" else 1.0
        on_front = {row.trial_id for row in self.front()}

        def key(row: Row) -> tuple[int, int, float]:
            missing = row.outcome == "failed" or math.isnan(row.last)
            return (int(missing), int(row.trial_id not in on_front), 0.0 if missing else sign * row.last)

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

    def _others(self) -> list[str]:
        """The objectives besides the metric (multi-objective sweeps)."""
        return [o.metric for o in self.objectives if o.metric != self.metric]

    def csv(self) -> str:
        keys = sorted(self.space.params)
        multi = self.space.multi_objective
        others = self._others()
        on_front = {row.trial_id for row in self.front()}
        out = io.StringIO()
        writer = csv.writer(out)
        extra = [*others, "pareto"] if multi else []
        scores = [self.metric, f"best_{self.metric}", *extra]
        writer.writerow(["rank", "trial_id", "outcome", "epochs", *scores, *keys, "error"])
        for i, row in enumerate(self.ranked(), 1):
            values = [row.point.get(k, "") for k in keys]
            cells = [*(row.value(m) for m in others), row.trial_id in on_front] if multi else []
            writer.writerow(
                [i, row.trial_id, row.outcome, row.epochs, row.last, row.best, *cells, *values, row.error]
            )
        return out.getvalue()

    def pareto_csv(self) -> str:
        """The front's trials: their objectives and sampled values (multi-objective sweeps)."""
        keys = sorted(self.space.params)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["trial_id", *(o.metric for o in self.objectives), *keys])
        on_front = {row.trial_id for row in self.front()}
        for row in self.ranked():
            if row.trial_id in on_front:
                values = [row.point.get(k, "") for k in keys]
                writer.writerow([row.trial_id, *self.objective_values(row), *values])
        return out.getvalue()

    def format(self) -> str:
        keys = sorted(self.space.params)
        multi = self.space.multi_objective
        others = self._others()
        on_front = {row.trial_id for row in self.front()}
        header = ["#", "trial", "outcome", "ep", self.metric, *others, *(["pareto"] if multi else []), *keys]
        lines = [header]
        for i, row in enumerate(self.ranked(), 1):
            shown = "-" if math.isnan(row.last) else f"{row.last:.4f}"
            extra = [
                *("-" if math.isnan(row.value(m)) else _short(row.value(m)) for m in others),
                "*" if row.trial_id in on_front else "",
            ]
            lines.append(
                [
                    str(i),
                    row.trial_id,
                    row.outcome,
                    str(row.epochs),
                    shown,
                    *(extra if multi else []),
                    *(_short(row.point.get(k, "")) for k in keys),
                ]
            )
        widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
        table = "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines
        )
        return f"{table}\n{self.front_summary()}" if multi else table

    def front_summary(self) -> str:
        """What the Pareto front is and how the best config was picked (multi-objective sweeps)."""
        goals = ", ".join(f"{o.metric} ({o.mode})" for o in self.objectives)
        front = self.front()
        if not front:
            return (
                f"Pareto front on {goals}: none yet (no completed trial reported every objective); "
                f"the best config is the best trial on {self.metric}"
            )
        completed = sum(row.outcome == "completed" for row in self.rows)
        return (
            f"Pareto front on {goals}: {len(front)} of {completed} completed trials (pareto *, "
            f"{PARETO_FILE}); the best config is the front's best on {self.metric}"
        )


def dominates(a: list[float], b: list[float]) -> bool:
    """``a`` Pareto-dominates ``b`` (values signed so that larger is better)."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


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
        last = {}
        for o in space.targets:
            if frame is not None and o.metric in getattr(frame, "columns", []):
                column = frame[o.metric].dropna()
                if len(column):
                    last[o.metric] = float(column.iloc[-1])
        board.rows.append(
            Row(
                trial_id=trial.trial_id,
                outcome=_outcome(str(trial.status), epochs, planned),
                epochs=epochs,
                last=values[-1] if values else math.nan,
                best=pick(values) if values else math.nan,
                point=decode_point(space, dict(trial.config)),
                error=trial_error(trial) if trial.status == "ERROR" else "",
                values=last,
                history=_history(frame, space.metric),
            )
        )
    return board


def _history(frame: Any, metric: str) -> dict[int, float]:
    """Epoch -> the metric, at the epochs it was measured (not repeated from an earlier one)."""
    if frame is None or metric not in getattr(frame, "columns", []) or "epoch" not in frame.columns:
        return {}
    found: dict[int, float] = {}
    for record in frame.to_dict("records"):
        value = fresh(record).get(metric)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            found[int(record["epoch"])] = float(value)
    return found


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
    multi = board.space.multi_objective
    directions = [
        optuna.study.StudyDirection.MAXIMIZE if o.mode == "max" else optuna.study.StudyDirection.MINIMIZE
        for o in board.objectives
    ]
    study = optuna.create_study(directions=directions)
    State = optuna.trial.TrialState
    # Trials the scheduler stopped are PRUNED, with the values they had when stopped: Optuna's
    # history and importances then use completed trials only, as the study itself does.
    for row in board.rows:
        if row.outcome not in ("completed", "pruned") or math.isnan(row.last):
            continue
        values = board.objective_values(row)
        complete = row.outcome == "completed"
        if complete and not all(math.isfinite(v) for v in values):
            continue
        params = encode_point(board.space, row.point)
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={k: dists[k] for k in params},
                state=State.COMPLETE if complete else State.PRUNED,
                values=values if complete else None,
                intermediate_values=None if multi else row.history or {row.epochs: row.last},
            )
        )
    if not any(t.state == State.COMPLETE for t in study.trials):
        return {name: "no completed trial" for name in (*PLOTS, *([PARETO_PLOT] if multi else []))}
    first: dict[str, Any] = {"target": lambda t: t.values[0], "target_name": board.metric} if multi else {}
    drawn: dict[str, Callable[[], Any]] = {
        name: functools.partial(getattr(optuna.visualization.matplotlib, f"plot_{name}"), study, **first)
        for name in PLOTS
    }
    if multi:
        names = [o.metric for o in board.objectives]
        drawn[PARETO_PLOT] = functools.partial(
            optuna.visualization.matplotlib.plot_pareto_front, study, target_names=names
        )
    skipped: dict[str, str] = {}
    for name, draw in drawn.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = draw()
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
    if board.space.multi_objective:
        (folder / PARETO_FILE).write_text(board.pareto_csv())
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
