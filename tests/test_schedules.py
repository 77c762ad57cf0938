"""Tests of the step schedules in raymix.schedules."""

from __future__ import annotations

import math

import pytest

from raymix.schedules import cosine_schedule, momentum_schedule


def test_cosine_exact_values_with_warmup() -> None:
    # total 110, warm-up 10: decay runs over 100 steps, so its midpoint is step 60.
    def lr(step: int) -> float:
        return cosine_schedule(step, 110, start=1.0, end=0.1, warmup_steps=10, warmup_start=0.2)

    assert lr(0) == pytest.approx(0.2)
    assert lr(5) == pytest.approx(0.6)  # halfway up the ramp: 0.2 + (1.0 - 0.2) / 2
    assert lr(10) == pytest.approx(1.0)  # warm-up end = start
    assert lr(60) == pytest.approx(0.55)  # cosine midpoint = (start + end) / 2
    assert lr(110) == pytest.approx(0.1)
    assert lr(10_000) == pytest.approx(0.1)


def test_cosine_quarter_point_matches_formula() -> None:
    # t / T = 1/4: end + (start - end) * (1 + cos(pi/4)) / 2
    expected = 0.0 + 2.0 * (1 + math.cos(math.pi / 4)) / 2
    assert cosine_schedule(25, 100, 2.0, 0.0) == pytest.approx(expected)


def test_cosine_no_warmup_edge() -> None:
    assert cosine_schedule(0, 100, 0.5, 0.0) == pytest.approx(0.5)
    assert cosine_schedule(50, 100, 0.5, 0.0) == pytest.approx(0.25)
    assert cosine_schedule(100, 100, 0.5, 0.0) == 0.0
    # warmup_start is irrelevant without warm-up
    assert cosine_schedule(0, 100, 0.5, 0.0, warmup_steps=0, warmup_start=9.0) == pytest.approx(0.5)


def test_cosine_monotone_decreasing_after_warmup() -> None:
    values = [cosine_schedule(s, 200, 1.0, 1e-3, warmup_steps=20) for s in range(20, 201)]
    assert all(b < a for a, b in zip(values, values[1:], strict=False))
    ramp = [cosine_schedule(s, 200, 1.0, 1e-3, warmup_steps=20) for s in range(0, 21)]
    assert all(b > a for a, b in zip(ramp, ramp[1:], strict=False))


def test_cosine_increasing_when_end_above_start() -> None:
    # e.g. a weight-decay schedule going up (DINO: 0.04 -> 0.4)
    values = [cosine_schedule(s, 50, 0.04, 0.4) for s in range(51)]
    assert values[0] == pytest.approx(0.04) and values[-1] == pytest.approx(0.4)
    assert all(b > a for a, b in zip(values, values[1:], strict=False))


def test_cosine_total_steps_one_edge() -> None:
    assert cosine_schedule(0, 1, 0.3, 0.0) == pytest.approx(0.3)
    assert cosine_schedule(1, 1, 0.3, 0.0) == 0.0
    # warm-up covering the whole run: only the ramp start is ever used before end
    assert cosine_schedule(0, 1, 0.3, 0.0, warmup_steps=1, warmup_start=0.1) == pytest.approx(0.1)
    assert cosine_schedule(5, 1, 0.3, 0.0, warmup_steps=1) == 0.0


def test_cosine_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        cosine_schedule(0, 0, 1.0, 0.0)
    with pytest.raises(ValueError):
        cosine_schedule(-1, 10, 1.0, 0.0)
    with pytest.raises(ValueError):
        cosine_schedule(0, 10, 1.0, 0.0, warmup_steps=-1)


@pytest.mark.parametrize("base", [0.99, 0.996, 0.9])
def test_momentum_schedule_endpoints(base: float) -> None:
    assert momentum_schedule(0, 1000, base) == pytest.approx(base)
    assert momentum_schedule(500, 1000, base) == pytest.approx(1 - (1 - base) / 2)
    assert momentum_schedule(1000, 1000, base) == pytest.approx(1.0)
    assert momentum_schedule(5000, 1000, base) == pytest.approx(1.0)


def test_momentum_schedule_monotone_and_edges() -> None:
    values = [momentum_schedule(s, 100, 0.99) for s in range(101)]
    assert all(b > a for a, b in zip(values, values[1:], strict=False))
    assert momentum_schedule(0, 1, 0.99) == pytest.approx(0.99)
    assert momentum_schedule(1, 1, 0.99) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        momentum_schedule(0, 0, 0.99)
