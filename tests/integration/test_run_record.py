"""What a real run shows and leaves (issue 17, items 3 and 4), on the session's small run
(tests/integration/conftest.py): TensorBoard tags are the registry's names (docs/metrics.md), train.log holds
the lines the console showed and no bar redraw, the end-of-run summary is printed and written; then two
resumes of it: from its last checkpoint (already complete: exit 0, nothing trained) and from its middle
checkpoint (the console and run_metadata.json name it, no missing-lm_head warning for the tied tiny model,
the same steps as the original)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from coordexp.config.metric_names import is_registered
from tests.integration.conftest import REPO_ROOT, SMALL_RUN


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(*args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "coordexp.train", *SMALL_RUN, *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_tensorboard_shows_the_registry_names(small_run):
    run_dir, _ = small_run
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"rollout/f1", "eval_rollout/f1", "train/samples", "loss/total", "stage2/channel_b"} <= tags
    assert [t for t in tags if not is_registered(t)] == []
    assert not [t for t in tags if t.startswith(("train/rollout", "eval/", "train/train", "train/loss"))]
    logged = {k for r in records(run_dir) for k in r if k != "step"}
    assert [k for k in logged if not is_registered(k)] == []
    assert tags == logged  # every logged key, under its own name
    # the Trainer's eval timing and its FLOP estimate (docs/metrics.md, "End of training and eval timing")
    assert {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "total_flos"} <= logged
    assert [r["total_flos"] for r in records(run_dir) if "total_flos" in r][-1] > 0
    # the value TensorBoard holds is the logged one
    last_eval = [r for r in records(run_dir) if "eval_rollout/f1" in r][-1]
    assert events.Scalars("eval_rollout/f1")[-1].value == pytest.approx(last_eval["eval_rollout/f1"])
    assert events.Scalars("eval_rollout/f1")[-1].step == last_eval["step"] == 4


@pytest.mark.slow
def test_train_log_is_what_the_console_showed(small_run):
    run_dir, proc = small_run
    log = (run_dir / "train.log").read_text()
    assert "\r" not in log and "it/s]" not in log and "s/it]" not in log  # no progress-bar redraws
    lines = log.splitlines()
    # this run's step lines (a cold cache also records the tiny Stage-1 build's own "step k/300" lines)
    steps = [line for line in lines if line.startswith("step ") and line.split(" |")[0].endswith("/4")]
    assert [s.split(" |")[0] for s in steps] == ["step 1/4", "step 2/4", "step 2/4", "step 3/4", "step 4/4",
                                                 "step 4/4", "step 4/4"]
    summary = (run_dir / "summary.txt").read_text().splitlines()
    assert lines[-len(summary):] == summary and summary[0] == "coordexp run summary"
    console = proc.stdout + proc.stderr.replace("\r", "\n")
    assert all(line in console for line in lines)  # every recorded line was on the console
    # and every step line of this run on the console is recorded
    shown = [line for line in proc.stdout.splitlines()
             if line.startswith("step ") and line.split(" |")[0].endswith("/4")]
    assert shown == steps


@pytest.mark.slow
def test_a_redirected_console_has_no_progress_bars(small_run):
    _, proc = small_run  # stdout and stderr are pipes, as with nohup or a batch scheduler's log
    console = proc.stdout + proc.stderr
    assert "\r" not in console and "\x1b[" not in console, console[-3000:]
    assert "it/s]" not in console and "s/it]" not in console and "Loading weights" not in console


@pytest.mark.slow
def test_end_of_run_summary_printed_and_written(small_run):
    run_dir, proc = small_run
    state = json.loads((run_dir / "checkpoint-4" / "trainer_state.json").read_text())
    last_eval = [r for r in records(run_dir) if "eval_rollout/f1" in r][-1]
    text = (run_dir / "summary.txt").read_text()
    assert proc.stdout.endswith(text)  # the last thing the run printed
    lines = text.splitlines()
    assert lines[:5] == [
        "coordexp run summary",
        f"  run dir:          {run_dir}",
        "  steps:            4/4",
        f"  best checkpoint:  {state['best_model_checkpoint']} (eval_rollout/f1 {state['best_metric']:.4f})",
        f"  last checkpoint:  {run_dir}/checkpoint-4",
    ]
    assert lines[5].startswith(f"  final eval @4:    f1 {last_eval['eval_rollout/f1']:.4f} | precision "
                               f"{last_eval['eval_rollout/precision']:.4f} | recall ")
    assert f"  TensorBoard:      tensorboard --logdir {run_dir}/tb" in lines
    assert f"  console record:   {run_dir}/train.log" in lines


@pytest.mark.slow
def test_a_checkpoint_at_max_steps_is_already_complete(small_run, tmp_path):
    run_dir, _ = small_run
    out = tmp_path / "again"
    proc = train(f"training.resume_from_checkpoint={run_dir}/checkpoint-4", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = (f"[coordexp launch] already complete: {run_dir}/checkpoint-4 is at step 4, training.max_steps is "
            f"4; nothing to train (to train on: the same command with a higher training.max_steps and "
            f"training.resume_from_checkpoint=latest)")
    assert line in proc.stderr.splitlines() and "step 1/4" not in proc.stdout
    assert not list(out.glob("checkpoint-*")) and not (out / "metrics.jsonl").exists()
    meta = json.loads((out / "run_metadata.json").read_text())
    assert meta["resumed_from"] == {"checkpoint": f"{run_dir}/checkpoint-4", "global_step": 4, "max_steps": 4,
                                    "complete": True}
    assert meta["launcher"]["exit_code"] == 0


@pytest.mark.slow
def test_resume_names_its_checkpoint_and_loads_tied_weights_quietly(small_run, tmp_path):
    run_dir, _ = small_run
    out = tmp_path / "resumed"
    proc = train(f"training.resume_from_checkpoint={run_dir}/checkpoint-2", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"[coordexp launch] resuming from {run_dir}/checkpoint-2 (step 2 of 4)" in proc.stderr.splitlines()
    assert "lm_head" not in proc.stderr and "missing keys" not in proc.stderr
    meta = json.loads((out / "run_metadata.json").read_text())
    assert meta["resumed_from"] == {"checkpoint": f"{run_dir}/checkpoint-2", "global_step": 2, "max_steps": 4,
                                    "complete": False}
    assert f"  steps:            4/4 (resumed from {run_dir}/checkpoint-2)" in proc.stdout.splitlines()
    # the resumed steps are the original's (weights, optimizer, data position and schedule restored)
    original = {r["step"]: r["loss/total"] for r in records(run_dir) if "loss/total" in r}
    resumed = {r["step"]: r["loss/total"] for r in records(out) if "loss/total" in r}
    assert resumed == pytest.approx({3: original[3], 4: original[4]})


@pytest.mark.slow
def test_latest_finds_the_run_of_the_same_command(small_run):
    """`latest` from a new run dir next to the small run, same overrides (Hydra's own .hydra/overrides.yaml):
    the lineage is the small run, whose last checkpoint is complete; a run with other overrides next to it
    finds nothing."""
    run_dir, _ = small_run
    proc = train("training.resume_from_checkpoint=latest", f"hydra.run.dir={run_dir.parent / 'requeued'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"[coordexp launch] already complete: {run_dir}/checkpoint-4 is at step 4" in proc.stderr
    other = train("training.resume_from_checkpoint=latest", "stage2_ab.schedule.b_ratio=0.5",
                  f"hydra.run.dir={run_dir.parent / 'other'}")
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert ("error: training.resume_from_checkpoint=latest: no checkpoint-* in this run's lineage"
            in other.stderr)
    assert str(run_dir) not in other.stderr
