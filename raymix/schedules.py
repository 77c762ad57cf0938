"""Learning-rate, weight-decay and EMA-momentum schedules as pure functions of the step.

They hold no state, so a resumed run only needs the step counter to land on the same value.
"""

from __future__ import annotations

import math


def cosine_schedule(
    step: int,
    total_steps: int,
    start: float,
    end: float,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> float:
    """Linear warm-up followed by a half-cosine decay (SGDR, Loshchilov & Hutter 2017; as in MoCo v3 / DINO).

    For ``step < warmup_steps`` the value rises linearly from ``warmup_start`` (at step 0) towards
    ``start`` (reached at ``step == warmup_steps``). Afterwards, with ``t = step - warmup_steps`` and
    ``T = total_steps - warmup_steps``::

        value = end + 0.5 * (start - end) * (1 + cos(pi * t / T))

    so the value is ``start`` at the end of warm-up and ``end`` at ``total_steps``. Any
    ``step >= total_steps`` returns ``end``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step >= total_steps:
        return float(end)
    if step < warmup_steps:
        # warmup_steps > step >= 0, so the division is safe.
        return float(warmup_start + (start - warmup_start) * step / warmup_steps)
    # Here warmup_steps <= step < total_steps, hence decay_steps >= 1.
    decay_steps = total_steps - warmup_steps
    progress = (step - warmup_steps) / decay_steps  # in [0, 1)
    return float(end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress)))


def momentum_schedule(step: int, total_steps: int, base: float) -> float:
    """EMA momentum rising from ``base`` to 1 along a half cosine (BYOL, Grill et al. 2020; MoCo v3).

    ``m_t = 1 - 0.5 * (1 + cos(pi * t / T)) * (1 - base)``, so ``m_0 = base`` and ``m_T = 1``.
    Steps past ``total_steps`` are clamped to ``T`` (momentum stays at 1).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    progress = min(step, total_steps) / total_steps  # in [0, 1]
    return float(1.0 - 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - base))
