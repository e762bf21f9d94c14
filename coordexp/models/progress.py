"""transformers' progress bars (loading and saving weights) only on a terminal."""

from __future__ import annotations

import sys

from transformers.utils import logging as hf_logging

__all__ = ["progress_bars_on_a_terminal_only"]


def progress_bars_on_a_terminal_only() -> None:
    """Turn transformers' tqdm bars off when stderr is not a terminal: a console redirected to a file (nohup,
    a scheduler's log) gets no carriage-return redraws. Every command that loads or writes a checkpoint calls
    it first."""
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
