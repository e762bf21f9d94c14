"""The end-of-run summary: where the run is, which checkpoint is best and by how much, the final eval
numbers, and how to look at the curves. Printed at the end of a training run and written to
``<run_dir>/summary.txt``. Pure formatting (the learner hands in the Trainer's state)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from coordexp.config.cwd import KEYWORDS, PATH_FIELDS, absolute_path

SUMMARY_NAME = "summary.txt"

#: The eval numbers the summary shows (when the eval logged them), in this order.
FINAL_EVAL_KEYS = ("eval_rollout/f1", "eval_rollout/precision", "eval_rollout/recall",
                   "eval_rollout/f1_iou50", "eval_rollout/f1_iou50_95", "eval_rollout/parse_truncated_rate",
                   "eval_rollout/forced_eos_rate")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def final_eval(log_history: Sequence[Mapping[str, Any]], metric: str) -> Mapping[str, Any] | None:
    """The last eval record of a Trainer's ``log_history`` (the one carrying ``metric``)."""
    evals = [r for r in log_history if metric in r or "eval_rollout/f1" in r]
    return evals[-1] if evals else None


_HYDRA_PLAIN = re.compile(r"[A-Za-z0-9_/.+:~-]*\Z")  # a value Hydra reads unquoted, as it is


def hydra_override(key: str, value: str) -> str:
    """``key=value`` that Hydra reads back as ``value`` exactly: unquoted when plain ASCII path characters,
    else in Hydra's single quotes (non-ASCII, spaces, commas)."""
    if _HYDRA_PLAIN.match(value):
        return f"{key}={value}"
    return f"{key}='" + value.replace("'", "\\'") + "'"  # Hydra: a backslash escapes only a quote


def shell_word(word: str) -> str:
    """``word`` as one shell word: as it is when nothing in it is special to the shell, else in the shell's
    double quotes when nothing in it is special to them, else in its single quotes."""
    if shlex.quote(word) == word:
        return word
    if not re.search(r"[\"$`\\!]", word):
        return f'"{word}"'
    return shlex.quote(word)


def shell_override(key: str, value: str) -> str:
    """``key=value`` as one shell word whose value Hydra reads back exactly."""
    return shell_word(hydra_override(key, value))


def _why_no_best(log_history: Sequence[Mapping[str, Any]], metric: str) -> str:
    """Why a run has no best checkpoint: no eval ran, or the best eval (highest ``metric``: every
    metric_for_best_model is higher-is-better) fell on a step that saved no checkpoint."""
    evals = [r for r in log_history if isinstance(r.get(metric), (int, float))]
    if not evals:
        return "none (no eval ran: training.eval_strategy, or no held-out split)"
    best = max(evals, key=lambda r: r[metric])
    return (f"none: the best eval ({metric} {_fmt(best[metric])} at step {best.get('step', '?')}) fell on a "
            f"step without a checkpoint (a checkpoint at every eval needs training.eval_steps to be a "
            f"multiple of training.save_steps)")


#: Overrides of a run that do not shape its evaluation (or that the eval command sets itself). The
#: adapter comes from the checkpoint's adapter_config.json, not from model.adapter; freezing is training-only.
_NOT_FOR_EVAL = ("experiment", "rollout", "training", "stage2_ab", "hydra", "model.path", "model.kind",
                 "model.adapter", "model.freeze_llm", "model.freeze_vit", "model.freeze_aligner")


def eval_overrides(overrides: Sequence[str]) -> list[str]:
    """The run's command-line overrides an evaluation of its checkpoint repeats (its data, seed, model,
    decoding and server settings: the held-out split and the rollouts the run's own evals saw). Relative
    data paths become absolute (coordexp.config.cwd), so the command works from any directory."""
    keep = []
    for override in overrides:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if any(key == k or key.startswith((k + ".", k + "/")) for k in _NOT_FOR_EVAL):
            continue
        if key in PATH_FIELDS and value and value[0] not in "'\"~$/" and value not in KEYWORDS:
            override = hydra_override(override.partition("=")[0], absolute_path(value))  # pasted anywhere
        keep.append(override)
    return keep


def run_summary(*, run_dir: Path, logging_dir: str | None, global_step: int, max_steps: int,
                log_history: Sequence[Mapping[str, Any]], metric: str, best_checkpoint: str | None,
                best_metric: float | None, last_checkpoint: str | None, resumed_from: str | None = None,
                trackers: Sequence[str] = ("tensorboard",), console_record: Path | None = None,
                stopped_by: str | None = None, experiment: str = "<leaf>",
                rollout: str | None = None, overrides: Sequence[str] = ()) -> str:
    """The summary text (one screen). ``rollout``: the run's rollout config group (``hf`` / ``vllm_server``),
    and ``overrides`` (the run's command-line overrides, :func:`eval_overrides` of them) are carried into the
    suggested eval command so it evaluates the way the run did."""
    run_dir = Path(run_dir)
    width = 17
    lines = ["coordexp run summary"]

    def row(label: str, text: str) -> None:
        lines.append(f"  {label + ':':<{width}} {text}")

    row("run dir", str(run_dir))
    steps = f"{global_step}/{max_steps}"
    if stopped_by:
        steps += f" (stopped by {stopped_by}; resume with training.resume_from_checkpoint=latest)"
    if resumed_from:
        steps += f" (resumed from {resumed_from})"
    row("steps", steps)
    if best_checkpoint:
        shown = f" ({metric} {_fmt(best_metric)})" if best_metric is not None else ""
        row("best checkpoint", f"{best_checkpoint}{shown}")
    else:
        row("best checkpoint", _why_no_best(log_history, metric))
    row("last checkpoint", last_checkpoint or "none (training.save_strategy: no)")
    record = final_eval(log_history, metric)
    if record is None:
        row("final eval", "none (training.eval_strategy: no, or no held-out split)")
    else:
        numbers = " | ".join(f"{k.split('/', 1)[1]} {_fmt(record[k])}"
                             for k in FINAL_EVAL_KEYS if k in record)
        row(f"final eval @{record.get('step', '?')}", numbers)
    row("metrics", str(run_dir / "metrics.jsonl"))
    if console_record is not None and Path(console_record).is_file():
        row("console record", str(console_record))
    if "tensorboard" in trackers and logging_dir:
        row("TensorBoard", f"tensorboard --logdir {shlex.quote(str(logging_dir))}")
    if "wandb" in trackers:
        row("wandb", f"wandb sync {shlex.quote(str(run_dir / 'wandb'))}/offline-run-* (offline run; "
                     f"uploading needs a login)")
    if "mlflow" in trackers:
        row("mlflow", f"mlflow ui --backend-store-uri {shlex.quote((run_dir / 'mlruns').resolve().as_uri())}")
    row("plot", f"python -m coordexp.plot {shlex.quote(str(run_dir))}")
    if best_checkpoint or last_checkpoint:  # the best one, else the last one
        extra = ([f"rollout={rollout}"] if rollout else []) + eval_overrides(overrides)
        row("evaluate", " ".join([f"python -m coordexp.eval +experiment={experiment} model.kind=local",
                                  shell_override("model.path", str(best_checkpoint or last_checkpoint)),
                                  *map(shell_word, extra)]))
    return "\n".join(lines)


def write_summary(text: str, run_dir: Path) -> Path:
    path = Path(run_dir) / SUMMARY_NAME
    path.write_text(text + "\n", encoding="utf-8")
    return path
