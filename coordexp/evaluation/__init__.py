"""Detection evaluation of rollouts: pure metrics (``detection``), COCO AP (``coco``), the report
pipeline and its files (``report``). ``python -m coordexp.eval`` is the CLI; docs/evaluation.md the guide."""

from coordexp.evaluation.coco import CocoImage, CocoObject, coco_ap
from coordexp.evaluation.detection import (
    DUPLICATE_IOU,
    IOU_THRESHOLDS,
    DetectionAggregate,
    MatchSettings,
    SampleOutcome,
    ThresholdMatch,
    duplicate_flags,
    match_at_threshold,
    match_at_thresholds,
    prf,
    summarize,
)

__all__ = [
    "DUPLICATE_IOU",
    "IOU_THRESHOLDS",
    "CocoImage",
    "CocoObject",
    "DetectionAggregate",
    "MatchSettings",
    "SampleOutcome",
    "ThresholdMatch",
    "coco_ap",
    "duplicate_flags",
    "match_at_threshold",
    "match_at_thresholds",
    "prf",
    "summarize",
]
