"""Issue 14: SIGTERM as a preemption (the learner checkpoints at the end of its step, exits 143, and the run
resumes from that checkpoint), a step deaf to SIGTERM (the process still ends within the signal grace and
nothing of the run is left), and a full disk while the run writes checkpoints (exit 2, a clear message).
Real orchestrator and learner (rollout=hf: in-process generate; the deaf step also with the real server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from coordexp.launch.process import SIGNAL_GRACE_S
from tests.conftest import free_port, read_jsonl
from tests.integration.test_hard_kill import survivors, tree
from tests.integration.test_launcher_faults import FAST

REPO = Path(__file__).resolve().parents[2]
HF = [o for o in FAST if not o.startswith(("rollout=", "vllm."))] + ["rollout=hf"]

# A step in native code for minutes: the main thread blocks SIGTERM/SIGINT (so no Python handler can run in
# it, as during a long attention kernel) and sleeps. Fault injection around the production entry point.
DEAF = textwrap.dedent("""
    import os, runpy, signal, sys, time
    from coordexp.trainer.stage2_trainer import Stage2ABTrainer
    _step = Stage2ABTrainer.training_step
    def training_step(self, *args, **kwargs):
        if self.state.global_step == 3:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
            open(os.environ["DEAF_MARKER"], "w").close()
            time.sleep(600)
        return _step(self, *args, **kwargs)
    Stage2ABTrainer.training_step = training_step
    sys.argv = ["coordexp.train"] + sys.argv[1:]
    runpy.run_module("coordexp.train", run_name="__main__", alter_sys=True)
""")


def start(run_dir: Path, *overrides: str, script: Path | None = None, env: dict | None = None):
    entry = [str(script)] if script else ["-m", "coordexp.train"]
    cmd = [sys.executable, *entry, f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for_steps(proc, run_dir: Path, n: int, timeout_s: float = 400) -> None:
    deadline = time.monotonic() + timeout_s
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= n):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)


def exit_code_in_metadata(run_dir: Path):
    return json.loads((run_dir / "run_metadata.json").read_text())["launcher"]["exit_code"]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_saves_a_checkpoint_at_the_end_of_the_step_and_the_run_resumes_there(tmp_path, nproc):
    """nproc 1: the orchestrator's handler hands the signal to the in-process learner; nproc 2: the
    orchestrator stops the torchrun group, and the ranks agree on the step they save."""
    run_dir = tmp_path / "run"
    ddp = [f"training.nproc_per_node={nproc}", f"training.effective_batch_size={4 * nproc}"]
    proc = start(run_dir, *HF, *ddp, "training.max_steps=500", "training.save_strategy=steps",
                 "training.save_steps=1000")
    try:
        wait_for_steps(proc, run_dir, 3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=SIGNAL_GRACE_S + 10)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, out[-3000:]
    if nproc == 1:
        assert "SIGTERM: checkpoint saved at the end of the step; exiting" in out
    else:  # torchrun's SignalException becomes one line (coordexp.launch.quiet_torchrun)
        assert "coordexp: torchrun got SIGTERM: the learner ranks are stopped" in out
    assert "Traceback" not in out, out[-3000:]
    (ckpt,) = run_dir.glob("checkpoint-*")
    saved = json.loads((ckpt / "trainer_state.json").read_text())["global_step"]
    last = read_jsonl(run_dir / "metrics.jsonl")[-1]["step"]
    assert ckpt.name == f"checkpoint-{saved}" and saved >= last  # the step the signal arrived in
    assert exit_code_in_metadata(run_dir) == 143
    print(f"[preemption, nproc={nproc}] SIGTERM -> exit in {took:.1f} s, checkpoint at step {saved} (last "
          f"logged step {last})")
    resumed = tmp_path / "resumed"
    last = saved
    out = subprocess.run([sys.executable, "-m", "coordexp.train", f"hydra.run.dir={resumed}", *HF, *ddp,
                          f"training.max_steps={last + 2}", f"training.resume_from_checkpoint={ckpt}"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(resumed / "metrics.jsonl") if "loss" in r] == [last + 1, last + 2]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["hf", "vllm_server"])
def test_a_step_deaf_to_sigterm_ends_within_the_grace_and_leaves_nothing(tmp_path, backend):
    run_dir = tmp_path / "run"
    script = tmp_path / "deaf_train.py"
    script.write_text(DEAF)
    marker = tmp_path / "deaf"
    overrides = (HF if backend == "hf" else
                 [*FAST, f"vllm.server.base_urls=[http://127.0.0.1:{free_port()}]",
                  "vllm.server.startup_timeout_s=300", "vllm.server.infer_timeout_s=60"])
    proc = start(run_dir, *overrides, "training.max_steps=50", "training.save_strategy=steps",
                 "training.save_steps=1000", script=script, env={"DEAF_MARKER": str(marker)})
    try:
        deadline = time.monotonic() + 400
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.1)
        run_id = json.loads((run_dir / "run_metadata.json").read_text())["launcher"]["run_id"]
        snapshot = tree(proc.pid)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=SIGNAL_GRACE_S + 30)
        took = time.monotonic() - t0
        markers = [str(run_dir).encode()]
        while survivors(snapshot, run_id, markers) and time.monotonic() - t0 < SIGNAL_GRACE_S + 10:
            time.sleep(0.2)
        gone = time.monotonic() - t0
        left = survivors(snapshot, run_id, markers)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"[deaf step, {backend}] SIGTERM -> exit in {took:.1f} s; every process of the run gone after "
          f"{gone:.1f} s ({len(snapshot)} in the tree)")
    assert proc.returncode == 143, out[-3000:]
    assert f"SIGTERM not handled within {SIGNAL_GRACE_S:g} s (the main thread is busy in native code)" in out
    assert SIGNAL_GRACE_S - 1 < took < SIGNAL_GRACE_S + 5
    assert left == [], left


def mount_small_disk(path: Path, size: str) -> None:
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root / CAP_SYS_ADMIN)")


CHECKPOINT_FULL = ("error: no space left on the disk while writing checkpoints, metrics or weight-sync files "
                   "under {run} (")


@pytest.mark.slow
@pytest.mark.parametrize("size,where,needle", [
    ("8k", "before anything starts", "  - hydra.run.dir: '{run}' is not writable (nothing can be created in "
                                     "'{disk}'): No space left on device"),
    ("400k", "at the first checkpoint", CHECKPOINT_FULL),
    ("1m", "at the first checkpoint", CHECKPOINT_FULL),
])
def test_a_full_disk_is_exit_2_with_a_clear_message(tmp_path, size, where, needle):
    disk = tmp_path / "small_disk"
    mount_small_disk(disk, size)
    try:
        run_dir = disk / "run"
        out = subprocess.run([sys.executable, "-m", "coordexp.train", f"hydra.run.dir={run_dir}", *HF,
                              "training.max_steps=6", "training.save_strategy=steps",
                              "training.save_steps=2"], cwd=REPO, capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    assert out.returncode == 2, out.stderr[-3000:]
    assert needle.format(run=run_dir, disk=disk) in out.stderr, (where, out.stderr[-3000:])
    assert "Traceback" not in out.stderr
