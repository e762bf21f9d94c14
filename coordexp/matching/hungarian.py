"""Candidate gating + Hungarian assignment of predicted boxes to GT boxes, with FP/FN costs.

Per prediction, only its `top_k` GT boxes by IoU are candidates, and a candidate with IoU below `iou_gate`
is rejected (counted in `gating_rejections`). The assignment is solved on a square (P + G) matrix:

                 GT columns          P dummy columns
    P preds      1 - IoU | INF       fp_cost
    G dummies    fn_cost             0

so every prediction either takes one feasible GT or becomes a false positive, and every GT left over is a
false negative. Desc text plays no part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from coordexp.matching.boxes import as_boxes, box_iou


class MatchedPair(NamedTuple):
    pred_index: int
    gt_index: int
    iou: float


@dataclass(frozen=True)
class MatchResult:
    pairs: tuple[MatchedPair, ...]  # sorted by pred_index
    false_positives: tuple[int, ...]  # unmatched prediction indices
    false_negatives: tuple[int, ...]  # unmatched GT indices
    gating_rejections: int  # top-k candidate pairs whose IoU fell below the gate
    candidate_pairs: int  # top-k candidate pairs examined (P * min(top_k, G))
    total_cost: float  # sum(1 - IoU) + fp_cost * #FP + fn_cost * #FN

    @property
    def index_pairs(self) -> list[tuple[int, int]]:
        """(pred_index, gt_index) of every match, the form the target builders take."""
        return [(p.pred_index, p.gt_index) for p in self.pairs]


def gate_candidates(iou: np.ndarray, *, top_k: int, iou_gate: float) -> tuple[np.ndarray, int, int]:
    """Feasible (P, G) mask: each prediction's top_k GTs by IoU (ties: lower GT index) with IoU >= iou_gate.

    Returns (feasible, gating_rejections, candidate_pairs).
    """
    num_pred, num_gt = iou.shape
    k = min(top_k, num_gt)
    candidates = np.zeros(iou.shape, dtype=bool)
    if k == 0 or num_pred == 0:
        return candidates, 0, 0
    if k < num_gt:
        top = np.argsort(-iou, axis=1, kind="stable")[:, :k]
        np.put_along_axis(candidates, top, True, axis=1)
    else:
        candidates[:] = True
    feasible = candidates & (iou >= iou_gate)
    return feasible, int(candidates.sum() - feasible.sum()), int(num_pred * k)


def match_boxes(
    pred_boxes: object,
    gt_boxes: object,
    *,
    top_k: int,
    iou_gate: float,
    fp_cost: float,
    fn_cost: float,
) -> MatchResult:
    """Optimal one-to-one assignment of predictions to GT boxes (both (N, 4) [x1, y1, x2, y2])."""
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if not 0.0 <= iou_gate <= 1.0:
        raise ValueError(f"iou_gate must be in [0, 1], got {iou_gate}")
    for name, cost in (("fp_cost", fp_cost), ("fn_cost", fn_cost)):
        if not (math.isfinite(cost) and cost >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {cost}")
    preds, gts = as_boxes(pred_boxes), as_boxes(gt_boxes)
    num_pred, num_gt = len(preds), len(gts)
    iou = box_iou(preds, gts)
    feasible, rejections, candidates = gate_candidates(iou, top_k=top_k, iou_gate=iou_gate)

    # Any infeasible pair costs more than leaving both ends unmatched, so the optimum never uses one.
    infeasible = 2.0 * (fp_cost + fn_cost) + 2.0
    cost = np.zeros((num_pred + num_gt, num_pred + num_gt))
    cost[:num_pred, :num_gt] = np.where(feasible, 1.0 - iou, infeasible)
    cost[:num_pred, num_gt:] = fp_cost
    cost[num_pred:, :num_gt] = fn_cost
    rows, cols = linear_sum_assignment(cost)
    real = (rows < num_pred) & (cols < num_gt)
    rows, cols = rows[real], cols[real]
    kept = feasible[rows, cols]
    rows, cols = rows[kept], cols[kept]
    ious = iou[rows, cols].tolist()
    pairs = [MatchedPair(r, c, v) for r, c, v in zip(rows.tolist(), cols.tolist(), ious, strict=True)]
    matched_preds = {p.pred_index for p in pairs}
    matched_gts = {p.gt_index for p in pairs}
    false_positives = tuple(i for i in range(num_pred) if i not in matched_preds)
    false_negatives = tuple(j for j in range(num_gt) if j not in matched_gts)
    total = sum(1.0 - p.iou for p in pairs) + fp_cost * len(false_positives) + fn_cost * len(false_negatives)
    return MatchResult(
        pairs=tuple(sorted(pairs)),
        false_positives=false_positives,
        false_negatives=false_negatives,
        gating_rejections=rejections,
        candidate_pairs=candidates,
        total_cost=float(total),
    )
