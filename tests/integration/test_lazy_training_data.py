"""Issue 18 (scale), end to end: `python -m coordexp.train` with data=jsonl stops before training on a bad
record far down the file (exit 2, its file:line, no traceback), and with two learner ranks each rank checks
its own share, both stop together and rank 0 lists the other rank's errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from coordexp.data.synthetic import generate_records
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_train_cli_stops_before_training_on_a_bad_line_far_down(tmp_path):
    lines = [json.dumps(r) for r in generate_records(20_000, 6)]
    lines[19_000] = '{"width": 10, "height": 10, "objects": []}'
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "coordexp.train", "+experiment=smoke/a_only", "rollout=hf", "data=jsonl",
         f"data.train_jsonl={path}", "model.tiny_stage1_steps=0", "training.max_steps=1",
         "training.effective_batch_size=1", "training.eval_strategy=no", "training.save_strategy=no",
         "training.report_to=[]", f"training.output_dir={run_dir}", f"hydra.run.dir={tmp_path}/hydra"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert (f"error: {path}:19001: empty objects (Stage-2 needs at least one ground-truth object per "
            f"sample)") in out
    assert "Traceback" not in out and not (run_dir / "metrics.jsonl").exists()
    # training.output_dir apart from hydra.run.dir: said once, with the one-folder fix
    note = f"note: training.output_dir={run_dir} is not the run dir Hydra made ({tmp_path}/hydra)"
    assert out.count(note) == 1
    assert f"set hydra.run.dir={run_dir} instead" in out


def test_two_ranks_each_check_their_share_and_stop_together(tmp_path):
    """A bad record in rank 1's share: both ranks stop before training, rank 0 prints rank 1's list; the
    same file with the record fixed trains 2 steps on 2 ranks."""
    lines = [json.dumps(r) for r in generate_records(2000, 6)]
    good = lines[1501]
    lines[1501] = '{"width": 10, "height": 10, "objects": []}'  # index 1501: rank 1 of 2
    path = tmp_path / "train.jsonl"

    def train(run: str, steps: int):
        path.write_text("\n".join(lines) + "\n")
        return subprocess.run(
            [sys.executable, "-m", "coordexp.train", "+experiment=smoke/a_only", "rollout=hf", "data=jsonl",
             f"data.train_jsonl={path}", "model.tiny_stage1_steps=0", f"training.max_steps={steps}",
             "training.nproc_per_node=2", "training.effective_batch_size=2", "training.eval_strategy=no",
             "training.save_strategy=no", "training.report_to=[]", f"training.output_dir={tmp_path / run}",
             f"hydra.run.dir={tmp_path / run}-hydra"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)

    proc = train("bad", 1)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out  # the failed rank's exit code (coordexp.launch.quiet_torchrun)
    assert "Traceback" not in out and "coordexp: learner rank " in out, out
    assert "failed (exitcode" not in out, out  # torch elastic's own line for it is dropped
    # the two ranks write to one pipe at the same moment: their lines can land on one line, so the two
    # messages are matched in the output, not line by line
    expected = [
        f"error: rank 1 (records 1, 3, ... of the file): {path}:1502: empty objects (Stage-2 needs at least "
        "one ground-truth object per sample)",
        "error: the training data check failed on rank(s) 1; rank 0 lists the errors"]
    assert all(out.count(message) == 1 for message in expected), out
    assert out.count("error: ") == 2, out
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
    lines[1501] = good
    proc = train("good", 2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = (tmp_path / "good" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in metrics]
    assert steps[:2] == [1, 2]
