"""The console writer of a run: every line a run shows goes through :func:`say`.

:func:`say` writes through tqdm's writer (``tqdm.write``), which lifts a progress bar of this process off the
terminal, prints the line and redraws the bar below it, so no message breaks the bar. Every process of a
run (orchestrator, in-process learner, torchrun ranks) also appends each line to the run's console record,
``<run_dir>/train.log`` (the file named by ``COORDEXP_CONSOLE_LOG``, set by the entry point to Hydra's job
log file): the lines the console showed, without the bar's redraws. Light on purpose (stdlib + tqdm): the
launcher and the CLIs import it.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from coordexp.protocol import ENV_CONSOLE_LOG

__all__ = ["ENV_CONSOLE_LOG", "say"]


def say(message: str, file: TextIO | None = None) -> None:
    """Show ``message`` (one or more lines) on the console (``file``: stderr by default) through tqdm's
    writer, and append it to the run's console record when there is one."""
    from tqdm import tqdm  # here: the config commands (--cfg, errors) never load it

    out = file if file is not None else sys.stderr
    tqdm.write(message, file=out)
    out.flush()
    record = os.environ.get(ENV_CONSOLE_LOG)
    if record:
        try:
            with open(record, "a", encoding="utf-8", errors="backslashreplace") as fh:
                fh.write(message.rstrip("\n") + "\n")
        except OSError:
            pass  # the record is a copy; the console line was shown
