"""One short console line per log step, written through :func:`coordexp.telemetry.record.say` (the full
record goes to metrics.jsonl and TensorBoard)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm
from transformers.trainer_callback import ProgressCallback

from coordexp.telemetry.record import say

__all__ = ["CompactProgressCallback", "say", "summary_line"]

_FIELDS = (  # (key, label, format)
    ("loss", "loss", "{:.3f}"),
    ("loss/ce", "ce", "{:.3f}"),
    ("loss/bbox_ciou", "1-ciou", "{:.3f}"),
    ("rollout/f1", "f1", "{:.3f}"),
    ("rollout/parse_truncated_rate", "trunc", "{:.2f}"),
    ("rollout/repeat_terminate_triggered_sequences", "forced_eos", "{:.0f}"),
    ("eval_rollout/f1", "eval_f1", "{:.3f}"),
    ("eval_rollout/precision", "eval_p", "{:.3f}"),
    ("eval_rollout/recall", "eval_r", "{:.3f}"),
    ("train_runtime", "runtime_s", "{:.1f}"),
)


def summary_line(step: int, max_steps: int, logs: dict) -> str:
    parts = [f"step {step}/{max_steps}"]
    if "stage2/channel_b" in logs:
        parts.append("B" if logs["stage2/channel_b"] else "A")
    parts += [f"{label} {fmt.format(logs[key])}" for key, label, fmt in _FIELDS if key in logs]
    return " | ".join(parts)


class CompactProgressCallback(ProgressCallback):
    """transformers' progress bar, on a terminal only (``tqdm(disable=None)``: a redirected console log gets
    the step lines without the bar's redraws), and one summary line per log step."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True, disable=None)
        self.current_step = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            say(summary_line(state.global_step, state.max_steps, logs), file=sys.stdout)
