"""The evaluation pipeline: roll out a held-out split through any RolloutBackend, score it and build the
report. Shared by ``python -m coordexp.eval``; the in-training eval reuses its scoring and artifacts."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from coordexp.evaluation.detection import IOU_THRESHOLDS
from coordexp.evaluation.report import build_report
from coordexp.evaluation.scoring import Scorer, score_rollouts
from coordexp.rollout.batch import generate_rollouts

__all__ = ["EvalResult", "evaluate_rollouts"]


@dataclass
class EvalResult:
    report: dict[str, Any]
    records: list[dict[str, Any]]


def evaluate_rollouts(samples: Sequence, backend, adapter, prompts, contract, *, seed: int,
                      scorer: Scorer | None = None, thresholds: Sequence[float] = IOU_THRESHOLDS,
                      meta: dict[str, Any] | None = None) -> EvalResult:
    """Roll out ``samples`` through ``backend`` and evaluate them (see the module docstring)."""
    start = time.perf_counter()
    batch = generate_rollouts(backend, samples, [prompts.encode(s) for s in samples], seed)
    if len(batch.rollouts) != len(samples):
        raise RuntimeError(f"rollout backend returned {len(batch.rollouts)} rollouts for "
                           f"{len(samples)} prompts")
    rollout_s = time.perf_counter() - start
    start = time.perf_counter()
    records, agg, gate = score_rollouts(samples, batch.rollouts, adapter, contract, scorer=scorer,
                                        thresholds=thresholds)
    score_s = time.perf_counter() - start
    report = build_report(records, agg, gate, contract, with_coord_prob=scorer is not None,
                          meta={**(meta or {}), "repeat_terminate_active": batch.repeat_terminate_active},
                          timing={"rollout_s": round(rollout_s, 3), "parse_match_score_s": round(score_s, 3)})
    return EvalResult(report, records)
