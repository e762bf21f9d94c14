"""Detection metrics of parsed rollouts (pure: numpy + ``coordexp.matching``, no torch).

Definitions (docs/evaluation.md has the full table):

- **Matching at IoU threshold t**: ``match_boxes`` with ``iou_gate = t`` and the run's ``candidate_top_k``,
  ``fp_cost`` and ``fn_cost``, per sample, class-agnostic (desc plays no part, as in training).
  TP = matched pairs, FP = unmatched valid predictions, FN = unmatched GT objects.
- **precision / recall / F1 at t** are ratios of sums over all samples: TP / pred, TP / GT,
  2 TP / (pred + GT); 0 when the denominator is 0 (the rule of the training metrics).
- **@[.5:.95]**: the mean of the per-threshold values over ``IOU_THRESHOLDS`` (0.50, 0.55, ..., 0.95).
- **duplicate**: a valid prediction whose box has IoU >= ``DUPLICATE_IOU`` with an *earlier* valid
  prediction of the same rollout. duplicate_rate = duplicates / all valid predictions.
- **desc_match@0.5**: matched pairs at IoU 0.5 whose predicted desc equals the GT desc (exact string,
  surrounding whitespace ignored) / matched pairs: the class-agnostic numbers say nothing about desc.
- Rollout-level rates are over rollouts: invalid_rollout (strict parse fell back), parse_truncated (the
  objects array never closed), forced_eos (repeat-terminate forced EOS), hit_max_new_tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from coordexp.matching import box_iou, match_boxes

#: COCO's ten IoU thresholds 0.50:0.05:0.95 (rounded so keys print cleanly).
IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
#: IoU at or above which a later prediction duplicates an earlier one of the same rollout.
DUPLICATE_IOU = 0.95

Box = Sequence[float]


@dataclass(frozen=True)
class MatchSettings:
    """The run's matching knobs (rollout_matching.*); the IoU gate is set per threshold."""

    top_k: int = 5
    fp_cost: float = 0.5
    fn_cost: float = 2.0


@dataclass(frozen=True)
class ThresholdMatch:
    """Outcome of one sample at one IoU threshold."""

    threshold: float
    pairs: tuple[tuple[int, int, float], ...]  # (pred_index, gt_index, iou)
    false_positives: tuple[int, ...]
    false_negatives: tuple[int, ...]

    @property
    def tp(self) -> int:
        return len(self.pairs)

    @property
    def fp(self) -> int:
        return len(self.false_positives)

    @property
    def fn(self) -> int:
        return len(self.false_negatives)


def match_at_threshold(pred_boxes: Sequence[Box], gt_boxes: Sequence[Box], threshold: float,
                       settings: MatchSettings = MatchSettings()) -> ThresholdMatch:
    """Hungarian matching with ``iou_gate = threshold``."""
    m = match_boxes(list(pred_boxes), list(gt_boxes), top_k=settings.top_k, iou_gate=float(threshold),
                    fp_cost=settings.fp_cost, fn_cost=settings.fn_cost)
    return ThresholdMatch(float(threshold), tuple((p.pred_index, p.gt_index, float(p.iou)) for p in m.pairs),
                          tuple(m.false_positives), tuple(m.false_negatives))


def match_at_thresholds(pred_boxes: Sequence[Box], gt_boxes: Sequence[Box],
                        thresholds: Sequence[float] = IOU_THRESHOLDS,
                        settings: MatchSettings = MatchSettings()) -> list[ThresholdMatch]:
    return [match_at_threshold(pred_boxes, gt_boxes, t, settings) for t in thresholds]


def duplicate_flags(pred_boxes: Sequence[Box], iou_threshold: float = DUPLICATE_IOU) -> list[bool]:
    """flags[i] is True iff prediction i has IoU >= iou_threshold with some prediction j < i."""
    n = len(pred_boxes)
    if n < 2:
        return [False] * n
    iou = box_iou(pred_boxes, pred_boxes)
    earlier = np.tril(iou >= iou_threshold, k=-1)  # [i, j] with j < i
    return [bool(v) for v in earlier.any(axis=1)]


def safe_ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator else 0.0


def prf(tp: float, n_pred: float, n_gt: float) -> dict[str, float]:
    """precision, recall, F1 from counts (each 0 when its denominator is 0)."""
    return {"precision": safe_ratio(tp, n_pred), "recall": safe_ratio(tp, n_gt),
            "f1": safe_ratio(2 * tp, n_pred + n_gt)}


@dataclass
class SampleOutcome:
    """What the aggregate needs from one rollout (built by the caller from the strict parse)."""

    pred_boxes: list[tuple[int, int, int, int]]
    gt_boxes: list[tuple[int, int, int, int]]
    invalid_rollout: bool = False
    truncated: bool = False
    forced_eos: bool = False
    hit_max_new_tokens: bool = False
    gen_tokens: int = 0
    dropped: Mapping[str, int] = field(default_factory=dict)
    pred_descs: Sequence[str] | None = None   # for desc_match (None: not counted)
    gt_descs: Sequence[str] | None = None


def threshold_key(t: float) -> str:
    return f"{t:.2f}"


@dataclass
class DetectionAggregate:
    """Sums over samples; ``summary()`` turns them into the report's numbers."""

    thresholds: tuple[float, ...] = IOU_THRESHOLDS
    settings: MatchSettings = field(default_factory=MatchSettings)
    rollouts: int = 0
    n_pred: int = 0
    n_gt: int = 0
    duplicates: int = 0
    invalid_rollout: int = 0
    truncated: int = 0
    forced_eos: int = 0
    hit_max_new_tokens: int = 0
    gen_tokens: list[int] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    tp: dict[float, int] = field(default_factory=dict)
    desc_match_50: int = 0   # matched pairs at IoU 0.5 with equal desc
    desc_checked_50: int = 0  # matched pairs at IoU 0.5 whose descs were given

    def add(self, outcome: SampleOutcome) -> tuple[list[ThresholdMatch], list[bool]]:
        """Account one sample; returns its per-threshold matches and duplicate flags."""
        matches = match_at_thresholds(outcome.pred_boxes, outcome.gt_boxes, self.thresholds, self.settings)
        dups = duplicate_flags(outcome.pred_boxes)
        self.rollouts += 1
        self.n_pred += len(outcome.pred_boxes)
        self.n_gt += len(outcome.gt_boxes)
        self.duplicates += sum(dups)
        self.invalid_rollout += int(outcome.invalid_rollout)
        self.truncated += int(outcome.truncated)
        self.forced_eos += int(outcome.forced_eos)
        self.hit_max_new_tokens += int(outcome.hit_max_new_tokens)
        self.gen_tokens.append(int(outcome.gen_tokens))
        for reason, count in outcome.dropped.items():
            if count:
                self.dropped[reason] = self.dropped.get(reason, 0) + int(count)
        for m in matches:
            self.tp[m.threshold] = self.tp.get(m.threshold, 0) + m.tp
            if m.threshold == 0.5 and outcome.pred_descs is not None and outcome.gt_descs is not None:
                self.desc_checked_50 += m.tp
                self.desc_match_50 += sum(outcome.pred_descs[p].strip() == outcome.gt_descs[g].strip()
                                          for p, g, _ in m.pairs)
        return matches, dups

    def at(self, threshold: float) -> dict[str, float]:
        tp = self.tp.get(float(threshold), 0)
        return {**prf(tp, self.n_pred, self.n_gt), "tp": tp, "fp": self.n_pred - tp, "fn": self.n_gt - tp}

    def summary(self) -> dict[str, object]:
        per_t = {threshold_key(t): self.at(t) for t in self.thresholds}
        mean = {k: float(np.mean([v[k] for v in per_t.values()])) if per_t else 0.0
                for k in ("precision", "recall", "f1")}
        gen = sorted(self.gen_tokens)
        n = self.rollouts
        out: dict[str, object] = {
            "counts": {"rollouts": n, "pred_objects": self.n_pred, "gt_objects": self.n_gt,
                       "duplicates": self.duplicates, "invalid_rollout": self.invalid_rollout,
                       "parse_truncated": self.truncated, "forced_eos": self.forced_eos,
                       "hit_max_new_tokens": self.hit_max_new_tokens,
                       "parse_dropped": dict(sorted(self.dropped.items()))},
            "rates": {"invalid_rollout_rate": safe_ratio(self.invalid_rollout, n),
                      "parse_truncated_rate": safe_ratio(self.truncated, n),
                      "duplicate_rate": safe_ratio(self.duplicates, self.n_pred),
                      "forced_eos_rate": safe_ratio(self.forced_eos, n),
                      "hit_max_new_tokens_rate": safe_ratio(self.hit_max_new_tokens, n),
                      "parse_dropped_per_rollout": safe_ratio(sum(self.dropped.values()), n)},
            "gen_new_tokens": {"mean": safe_ratio(sum(gen), n),
                               "p99": float(np.percentile(gen, 99)) if gen else 0.0,
                               "max": int(gen[-1]) if gen else 0},
        }
        if 0.5 in self.thresholds:
            desc_match = safe_ratio(self.desc_match_50, self.desc_checked_50)
            out["iou50"] = {**self.at(0.5), "desc_match": desc_match}
        out["iou50_95"] = mean
        out["per_threshold"] = per_t
        return out


def summarize(outcomes: Sequence[SampleOutcome], thresholds: Sequence[float] = IOU_THRESHOLDS,
              settings: MatchSettings | None = None) -> dict[str, object]:
    """One-call form: aggregate ``outcomes`` and summarize."""
    agg = DetectionAggregate(tuple(float(t) for t in thresholds), settings or MatchSettings())
    for o in outcomes:
        agg.add(o)
    return agg.summary()


# ---- in-training eval: the same numbers as global (all-rank) metrics ----------------------------------
def add_detection_metrics(buf, agg: DetectionAggregate, prefix: str = "eval_rollout") -> None:
    """Put ``agg``'s counts into a ``MetricBuffer`` as ratio-of-sums keys (reduced over ranks by
    ``gather_and_reduce``); call ``finish_detection_metrics`` on the reduced dict afterwards."""
    if 0.5 in agg.thresholds:
        tp50 = agg.tp.get(0.5, 0)
        buf.add_ratio(f"{prefix}/precision_iou50", tp50, agg.n_pred)
        buf.add_ratio(f"{prefix}/recall_iou50", tp50, agg.n_gt)
        buf.add_ratio(f"{prefix}/f1_iou50", 2 * tp50, agg.n_pred + agg.n_gt)
    for t in agg.thresholds:
        buf.add_ratio(f"{prefix}/_f1@{threshold_key(t)}", 2 * agg.tp.get(t, 0), agg.n_pred + agg.n_gt)
    buf.add_ratio(f"{prefix}/desc_match_iou50", agg.desc_match_50, agg.desc_checked_50)
    buf.add_ratio(f"{prefix}/duplicate_rate", agg.duplicates, agg.n_pred)
    buf.add_ratio(f"{prefix}/forced_eos_rate", agg.forced_eos, agg.rollouts)


def finish_detection_metrics(metrics: dict[str, float], prefix: str = "eval_rollout") -> dict[str, float]:
    """Replace the per-threshold helper keys by their mean, ``<prefix>/f1_iou50_95`` (in place)."""
    helper = f"{prefix}/_f1@"
    values = [metrics.pop(k) for k in [k for k in metrics if k.startswith(helper)]]
    if values:
        metrics[f"{prefix}/f1_iou50_95"] = float(np.mean(values))
    return metrics
