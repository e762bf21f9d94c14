"""The one registry of metric names: every key a run logs, spelled as metrics.jsonl, TensorBoard (no prefix
added: ``coordexp.telemetry.tensorboard``) and docs/metrics.md show it, and the keys
``training.metric_for_best_model`` may name, checked before anything starts. Pure Python: the config layer
imports it.

Tests keep the three in step: the eval's metric producers emit exactly :data:`EVAL_METRICS`; the keys
docs/metrics.md documents are exactly :func:`documented_names`; every tag a real run writes to TensorBoard
and every key of its metrics.jsonl is :func:`is_registered`. Keys that appear only when non-zero
(``<prefix>/parse_dropped/<reason>``) are patterns (:data:`PATTERNS`), never a best-model metric.
"""

from __future__ import annotations

import re

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

#: Keys ``transformers.Trainer`` logs itself (every log step; the end-of-training record; an eval's own).
HF_KEYS: tuple[str, ...] = ("loss", "grad_norm", "learning_rate", "epoch")
HF_END_KEYS: tuple[str, ...] = ("train_runtime", "train_samples_per_second", "train_steps_per_second",
                                "total_flos", "train_loss")
HF_EVAL_KEYS: tuple[str, ...] = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")

#: Keys of every training step (both channels); ``packing/*`` only with ``training.packing``.
STEP_KEYS: tuple[str, ...] = (
    "loss/total", "loss/ce", "loss/bbox_smoothl1", "loss/bbox_ciou", "loss/coord_ce", "loss/coord_gate",
    "stage2/channel_a", "stage2/channel_b", "stage2_ab/b_ratio_realized",
    "stage2/geometry_groups_prefix", "stage2/geometry_groups_appended", "stage2/supervised_tokens",
    "train/samples", "time/forward_s", "time/step_s",
    "packing/segments", "packing/packs", "packing/fill", "packing/underfilled_steps",
)

#: Keys of Channel-B steps: ``rollout/<ROLLOUT_KEYS>`` plus these.
CHANNEL_B_KEYS: tuple[str, ...] = (
    *(f"rollout/{k}" for k in ROLLOUT_KEYS),
    "rollout/repeat_terminate_active", "rollout/gen_tokens_per_s", "stage2/rollout_pipelined",
    "time/rollout_generate_s", "time/rollout_parse_match_s", "time/rollout_wait_s", "time/weight_sync_s",
)

#: Keys present only when non-zero (``<reason>``: a drop reason of the strict parser, docs/channel_b.md).
PATTERNS: tuple[str, ...] = ("rollout/parse_dropped/<reason>", f"{EVAL_PREFIX}/parse_dropped/<reason>")

#: Every fixed key a run logs.
ALL_METRICS: frozenset[str] = frozenset(
    (*HF_KEYS, *HF_END_KEYS, *HF_EVAL_KEYS, *STEP_KEYS, *CHANNEL_B_KEYS, *EVAL_METRICS))

#: The keys docs/metrics.md documents: every key a run logs.
DOCUMENTED: frozenset[str] = frozenset((*ALL_METRICS, *PATTERNS))

_PATTERN_RES = [re.compile(re.escape(p).replace(re.escape("<reason>"), r"[a-z0-9_]+") + "$")
                for p in PATTERNS]


def is_registered(name: str) -> bool:
    """Whether ``name`` is a key of the registry (a fixed key or an instance of a pattern)."""
    return name in ALL_METRICS or any(r.match(name) for r in _PATTERN_RES)


def documented_names(markdown: str) -> set[str]:
    """The metric keys a metrics doc documents: the backticked names in the first column of its tables
    (``a``, ``b`` rows count as two), and ``<prefix>/<reason>`` patterns as written."""
    names: set[str] = set()
    for line in markdown.splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split("|")[1]
        names.update(re.findall(r"`([^`]+)`", first))
    return names
