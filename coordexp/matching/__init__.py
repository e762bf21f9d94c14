"""Box matching: exact IoU, top-k IoU candidate gating, Hungarian assignment with FP/FN costs (pure core)."""

from coordexp.matching.boxes import as_boxes, box_iou
from coordexp.matching.hungarian import MatchedPair, MatchResult, gate_candidates, match_boxes

__all__ = ["MatchResult", "MatchedPair", "as_boxes", "box_iou", "gate_candidates", "match_boxes"]
