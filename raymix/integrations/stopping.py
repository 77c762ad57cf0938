"""When a whole sweep stops early: its time budget, or a trial reaching a target value.

:class:`SweepStop` is a Tune ``Stopper``. When it fires, Tune stops every running trial
and starts no new one; trials that finished stay as they are, and the sweep ends like any
other (leaderboard, MLflow records). The trial that reached a target is stopped through
Tune's usual path; the others are terminated by Tune without ``on_trial_complete``, which
:class:`raymix.integrations.tracking.TrialRecorder` handles at the end of Tune's step.
"""

from __future__ import annotations

import math
import time
from typing import Any

import ray.tune

from raymix.integrations.search_space import SearchSpace


def format_duration(seconds: float) -> str:
    """``5400`` -> ``1h30m``; ``45`` -> ``45s``."""
    rest = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts) or f"{seconds:g}s"


def reached(value: float, target: float, mode: str) -> bool:
    """``value`` is at or beyond ``target`` in the direction of ``mode``."""
    return value >= target if mode == "max" else value <= target


class SweepStop(ray.tune.Stopper):
    """Ends the whole sweep ``budget_s`` seconds after its first step, or once a trial reports
    a metric of ``targets`` at or beyond its value (``modes``: metric -> max/min).

    ``reason`` says why it fired (None: it has not). Counting starts again when Tune
    restores the stopper (a resumed sweep), as Ray's own ``TimeoutStopper`` does.
    """

    def __init__(self, budget_s: float | None, targets: dict[str, float], modes: dict[str, str]) -> None:
        self.budget_s, self.targets, self.modes = budget_s, dict(targets), dict(modes)
        self.reason: str | None = None
        self._start: float | None = None

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        for metric, target in self.targets.items():
            value = result.get(metric)
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                continue
            if reached(float(value), target, self.modes.get(metric, "max")):
                if self.reason is None:
                    side = ">=" if self.modes.get(metric, "max") == "max" else "<="
                    self.reason = (
                        f"trial {trial_id} reached {metric} {value:.4g} (stop: {metric} {side} {target:g})"
                    )
                return True
        return False

    def stop_all(self) -> bool:
        if self.reason is not None:
            return True
        if self.budget_s is None:
            return False
        now = time.monotonic()
        if self._start is None:
            self._start = now
        if now - self._start >= self.budget_s:
            self.reason = f"time budget of {format_duration(self.budget_s)} reached"
            return True
        return False

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({**state, "_start": None})


def sweep_stopper(space: SearchSpace) -> SweepStop | None:
    """The stopper of a space's ``time_budget`` and ``stop``; None when it has neither."""
    if space.time_budget is None and not space.stop:
        return None
    return SweepStop(space.time_budget, space.stop, space.stop_modes())


def describe(space: SearchSpace) -> str:
    """``time budget 2h or knn_top1 >= 0.9``: when a space's sweep stops early."""
    modes = space.stop_modes()
    parts = [f"time budget {format_duration(space.time_budget)}"] if space.time_budget else []
    parts += [f"{m} {'>=' if modes.get(m) == 'max' else '<='} {v:g}" for m, v in space.stop.items()]
    return " or ".join(parts)
