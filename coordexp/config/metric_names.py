"""The metric keys an in-training rollout eval returns (docs/metrics.md), for checking
``training.metric_for_best_model`` before anything starts. Pure Python: the config layer imports it.

A test runs the eval's metric producers and compares the keys they emit with this table, so the two
cannot drift. Keys that appear only when non-zero (``eval_rollout/parse_dropped/<reason>``) are left out:
a best-model metric must be present at every eval.
"""

from __future__ import annotations

EVAL_PREFIX = "eval_rollout"

#: Per-sample rollout keys, logged as ``rollout/<name>`` on Channel-B steps and ``eval_rollout/<name>`` by
#: the eval; value: True when a higher value is better.
ROLLOUT_KEYS: dict[str, bool] = {
    "raw_rollouts": False,
    "repeat_terminate_triggered_sequences": False,
    "hit_max_new_tokens": False,
    "parse_truncated": False,
    "parse_truncated_rate": False,
    "invalid_rollout": False,
    "invalid_rollout_rate": False,
    "parse_dropped_invalid": False,
    "valid_pred_objects": False,
    "gt_objects": False,
    "matched": True,
    "fp": False,
    "fn": False,
    "precision": True,
    "recall": True,
    "f1": True,
    "matched_iou_mean": True,
    "gating_rejections": False,
    "target_invariant_dropped": False,
    "gen_new_tokens_total": False,
    "gen_new_tokens_mean": False,
    "gen_new_tokens_p99": False,
}

#: Keys only the eval adds (detection metrics at fixed IoU thresholds, activation flag).
EVAL_ONLY_KEYS: dict[str, bool] = {
    "precision_iou50": True,
    "recall_iou50": True,
    "f1_iou50": True,
    "f1_iou50_95": True,
    "desc_match_iou50": True,
    "duplicate_rate": False,
    "forced_eos_rate": False,
    "repeat_terminate_active": False,
}

#: Every key an eval returns -> whether higher is better.
EVAL_METRICS: dict[str, bool] = {
    **{f"{EVAL_PREFIX}/{k}": v for k, v in {**ROLLOUT_KEYS, **EVAL_ONLY_KEYS}.items()},
    "eval_time/rollout_s": False,
}

#: The keys ``training.metric_for_best_model`` may name: the learner keeps the checkpoint with the highest
#: value (``greater_is_better: true``), so only keys where higher is better qualify.
BEST_MODEL_METRICS: tuple[str, ...] = tuple(k for k, higher in EVAL_METRICS.items() if higher)
