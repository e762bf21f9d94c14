"""Seeded per-record random streams shared by the synthetic text and image tasks."""

from __future__ import annotations

import hashlib
import random

__all__ = ["record_rng"]


def record_rng(seed: int, index: int) -> random.Random:
    """One independent stream per (seed, index): record i does not depend on how many records are drawn,
    so ``generate_records(5, s) == generate_records(50, s)[:5]``, and it is stable across processes."""
    digest = hashlib.sha256(f"coordexp-synthetic:{seed}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))
