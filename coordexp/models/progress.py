"""transformers' console output: progress bars (loading and saving weights) only on a terminal, and no
false alarm about checkpoint times."""

from __future__ import annotations

import logging
import sys

from transformers.utils import logging as hf_logging

__all__ = ["progress_bars_on_a_terminal_only"]


class _NoCheckpointTimeAlarm(logging.Filter):
    """transformers warns "mtime may not be reliable on this filesystem" whenever two checkpoints were
    written within a second (any fast run) and then orders them by step, which is right: nothing to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "mtime may not be reliable" not in record.getMessage()


def progress_bars_on_a_terminal_only() -> None:
    """Turn transformers' tqdm bars off when stderr is not a terminal: a console redirected to a file (nohup,
    a scheduler's log) gets no carriage-return redraws. Every command that loads or writes a checkpoint calls
    it first."""
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    logging.getLogger("transformers.trainer_utils").addFilter(_NoCheckpointTimeAlarm())
