"""The CPU smoke experiment as a user runs it (the README's main command: rollouts from a real
``swift rollout`` server that the launcher starts, probes, syncs weights into and stops): it learns,
writes every artifact, and resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from coordexp.trainer.schedule import is_channel_b
from tests.conftest import REPO_ROOT, free_port, read_jsonl
from tests.integration.test_launcher_faults import assert_nothing_left

pytestmark = pytest.mark.slow


def train_cmd(run_dir, *overrides):
    return [sys.executable, "-m", "coordexp.train", f"hydra.run.dir={run_dir}", *overrides]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The leaf as it is; only the server port is a free one (8000 may be taken by a server of the user's)."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    out = subprocess.run(train_cmd(run_dir, "+experiment=smoke/ab_mixed",
                                   f"vllm.server.base_urls=[http://127.0.0.1:{free_port()}]"),
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run_dir.parent / "stderr.txt").write_text(out.stderr)
    return run_dir


def test_smoke_learns(smoke_run):
    rows = read_jsonl(smoke_run / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_rollout/f1" in r]
    first, last = train[:10], train[-10:]
    mean = lambda rs: sum(r["loss"] for r in rs) / len(rs)
    assert mean(last) < 0.9 * mean(first), (mean(first), mean(last))  # measured: 2.91 -> 2.36
    # The random tiny model's rollouts never parse (F1 0; the resume test checks it). A Stage-2-only run
    # from random weights reached 0.25 held-out F1 after 300 steps in our measurements, copying the format
    # but rarely the prompt's objects; with the Stage-1 warmup the final held-out F1 measured ~0.5 and up.
    # 0.4 therefore shows the model reads the prompt, with margin for run-to-run noise.
    assert evals[-1]["eval_rollout/f1"] >= 0.4, [e["eval_rollout/f1"] for e in evals]
    assert max(r.get("stage2/channel_b", 0) for r in train) == 1.0
    b_rows = [r for r in train if r["stage2/channel_b"] == 1.0]
    assert all(r["rollout/repeat_terminate_active"] == 1.0 for r in b_rows)
    assert train[-1]["stage2_ab/b_ratio_realized"] == pytest.approx(0.85, abs=0.01)


def test_smoke_rolls_out_through_the_real_server(smoke_run, group_members):
    launcher = json.loads((smoke_run / "run_metadata.json").read_text())["launcher"]
    assert (launcher["rollout_backend"], launcher["exit_code"], launcher["server_fresh"]) == ("vllm", 0, True)
    (srv,) = launcher["servers"]
    assert srv["started_here"] and srv["probe"]["passed"] and srv["device"] == "cpu"
    assert srv["command"][1:3] == ["-m", "swift.cli.rollout"] and "--external_plugins" in srv["command"]
    rows = read_jsonl(smoke_run / "metrics.jsonl")
    # the server started from the initial checkpoint; every later rollout (Channel-B step or rollout eval)
    # runs on the weights of its optimizer step, pushed over the file transport first
    rollout_steps = {r["step"] - 1 for r in rows if r.get("stage2/channel_b") == 1.0}
    rollout_steps |= {r["step"] for r in rows if "eval_rollout/f1" in r}
    syncs = len(rollout_steps - {0})
    assert syncs > 100 and any("time/weight_sync_s" in r for r in rows)
    assert (smoke_run / "server" / "swift_rollout.log").read_text().count("loaded weights from") == syncs
    assert all(r["eval_rollout/repeat_terminate_active"] == 1.0 for r in rows if "eval_rollout/f1" in r)
    # the first sync is logged, then one line per 50
    assert ((smoke_run.parent / "stderr.txt").read_text().count("[coordexp weight sync]")
            == 1 + (syncs - 1) // 50)
    assert_nothing_left(smoke_run, group_members)


def test_smoke_writes_every_artifact(smoke_run):
    meta = json.loads((smoke_run / "run_metadata.json").read_text())
    assert meta["experiment"] == "smoke/ab_mixed"
    assert set(meta["git"]) == {"sha", "dirty"} and meta["seed"] == 17
    assert (smoke_run / "resolved_config.yaml").is_file()
    assert list((smoke_run / "tb").glob("events.out.tfevents.*"))
    assert (smoke_run / "checkpoint-150" / "trainer_state.json").is_file()
    assert (smoke_run / "rollout_samples.rank0.jsonl").stat().st_size > 0


def test_killed_run_resumes_at_the_same_step_and_schedule_position(tmp_path):
    common = ["+experiment=smoke/ab_mixed", "rollout=hf", "model.tiny_stage1_steps=0",
              "stage2_ab.schedule.b_ratio=0.5",
              "training.max_steps=12", "training.save_steps=4", "training.eval_strategy=no",
              "rollout_matching.max_new_tokens=24", "data.synthetic.train_samples=256"]
    first = tmp_path / "first"
    proc = subprocess.Popen(train_cmd(first, *common), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (first / "checkpoint-4" / "trainer_state.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "first run ended before checkpoint-4"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run: at step 4, or a few steps later on a fast machine
    proc.wait()
    saved = [c for c in first.glob("checkpoint-*") if (c / "trainer_state.json").is_file()]
    resumed_at = max(json.loads((c / "trainer_state.json").read_text())["global_step"] for c in saved)
    assert resumed_at in (4, 8)
    second = tmp_path / "second"
    out = subprocess.run(train_cmd(second, *common, f"training.resume_from_checkpoint={first}"),
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [r for r in read_jsonl(second / "metrics.jsonl") if "loss" in r]
    assert all(r["rollout/f1"] == 0.0 for r in rows if r["stage2/channel_b"]), "random weights never parse"
    steps = [r["step"] for r in rows]
    # the newest checkpoint, step by step
    assert steps == list(range(resumed_at + 1, 13)), (resumed_at, steps)
    for r in rows:
        assert r["stage2/channel_b"] == float(is_channel_b(r["step"] - 1, 0.5))
    state = json.loads((second / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["global_step"] == 12
