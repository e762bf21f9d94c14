"""Deterministic Channel-A/B schedule: optimizer step s runs Channel B iff floor((s+1)r) > floor(sr).

No RNG and no communication, so every rank agrees, and a resumed run continues at the same position.
"""

import math


def is_channel_b(step: int, b_ratio: float) -> bool:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return math.floor((step + 1) * b_ratio) > math.floor(step * b_ratio)


def realized_b_ratio(steps_done: int, b_ratio: float) -> float:
    """Fraction of the first ``steps_done`` optimizer steps that ran Channel B (0 before the first step)."""
    if steps_done <= 0:
        return 0.0
    return math.floor(steps_done * b_ratio) / steps_done
