"""transformers' console output in coordexp's commands (coordexp.models.progress): no false alarm when two
checkpoints were written within a second, which any fast run does."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT

SORT_TWO_CHECKPOINTS = """
import os, sys, tempfile
if sys.argv[1] == "coordexp":
    from coordexp.models.progress import progress_bars_on_a_terminal_only
    progress_bars_on_a_terminal_only()
from transformers.trainer_utils import sort_checkpoints
d = tempfile.mkdtemp()
for step in (2, 4):
    os.mkdir(os.path.join(d, f"checkpoint-{step}"))
print([os.path.basename(p) for p in sort_checkpoints(d, use_mtime=True)])
"""


def test_the_checkpoint_time_alarm_is_silenced_and_the_order_kept():
    def run(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", SORT_TWO_CHECKPOINTS, mode], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=120)

    plain, ours = run("plain"), run("coordexp")
    assert "mtime may not be reliable" in plain.stderr  # transformers' own behaviour: the alarm
    assert "mtime may not be reliable" not in ours.stderr
    assert plain.stdout == ours.stdout == "['checkpoint-2', 'checkpoint-4']\n"
