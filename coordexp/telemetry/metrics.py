"""Metric buffers with one aggregation rule per key, so every logged value is global.

A rank fills a ``MetricBuffer`` over the micro-steps of a logging window; at log time the buffers of
all ranks are gathered and reduced with ``reduce_buffers``:

- ``sum``:   counters; global value = sum over micro-steps and ranks
- ``max``:   wall times and flags; global value = max
- ``ratio``: rates and means; global value = (sum of numerators) / (sum of denominators)
- ``p99``:   tail of a per-sample quantity; global value = max over ranks of the rank-local p99

The reduction is pure Python (no torch), so tests can recompute any logged value in one process.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


@dataclass
class MetricBuffer:
    sums: dict[str, float] = field(default_factory=dict)
    maxes: dict[str, float] = field(default_factory=dict)
    ratios: dict[str, tuple[float, float]] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)

    def add_sum(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def add_max(self, key: str, value: float) -> None:
        self.maxes[key] = max(self.maxes.get(key, -math.inf), float(value))

    def add_ratio(self, key: str, numerator: float, denominator: float) -> None:
        num, den = self.ratios.get(key, (0.0, 0.0))
        self.ratios[key] = (num + float(numerator), den + float(denominator))

    def add_mean(self, key: str, value: float, weight: float = 1.0) -> None:
        """A mean over micro-steps and ranks: a ratio with the weights as denominator."""
        self.add_ratio(key, float(value) * weight, weight)

    def add_samples(self, key: str, values: Iterable[float]) -> None:
        self.samples.setdefault(key, []).extend(float(v) for v in values)

    def to_payload(self) -> dict:
        """Rank-local summary to gather: p99 is computed here, before the max over ranks."""
        return {"sums": dict(self.sums), "maxes": dict(self.maxes), "ratios": dict(self.ratios),
                "p99": {k: percentile(v, 99) for k, v in self.samples.items() if v}}


def reduce_buffers(payloads: Sequence[dict]) -> dict[str, float]:
    """Global metrics from every rank's ``to_payload()`` (keys present on any rank are kept)."""
    out: dict[str, float] = {}
    for p in payloads:
        for k, v in p["sums"].items():
            out[k] = out.get(k, 0.0) + v
    maxes: dict[str, float] = {}
    for p in payloads:
        for kind in ("maxes", "p99"):
            for k, v in p[kind].items():
                maxes[k] = max(maxes.get(k, -math.inf), v)
    out.update(maxes)
    ratios: dict[str, tuple[float, float]] = {}
    for p in payloads:
        for k, (num, den) in p["ratios"].items():
            n0, d0 = ratios.get(k, (0.0, 0.0))
            ratios[k] = (n0 + num, d0 + den)
    out.update({k: (num / den if den else 0.0) for k, (num, den) in ratios.items()})
    return out


def gather_and_reduce(buffer: MetricBuffer) -> dict[str, float]:
    """All ranks call this together (it is a collective under torch.distributed)."""
    payload = buffer.to_payload()
    try:
        import torch.distributed as dist  # torch only where ranks gather: the pure metric math needs none
    except ImportError:  # pragma: no cover - torch is always there in the learner
        return reduce_buffers([payload])
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return reduce_buffers([payload])
    gathered: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, payload)
    return reduce_buffers(gathered)
