"""``hydra/launcher=coordexp`` keeps one rollout server across the jobs of a sweep (fake ``swift rollout``
program from test_launcher_faults; real orchestrator, real Hydra multirun, real learners).

Three jobs: ``vllm.max_model_len=512,512,600``. Jobs 0 and 1 have equal server settings, so job 1 keeps
job 0's server (same process group) and its learner pushes its weights before its first rollout (step 0),
because the server still holds job 0's weights. Job 2 changes a server setting, so the launcher stops
that server and starts a fresh one (no step-0 sync: it holds the initial checkpoint). After the sweep
nothing is left.
The real-server sweep (two jobs against a real ``swift rollout``) is in test_launcher_weight_sync.py.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.integration.test_launcher_faults import FAST, free_port, harness, orchestrate  # noqa: F401

pytestmark = pytest.mark.slow


def test_sweep_shares_the_server_between_equal_jobs_and_restarts_on_change(
    harness,  # noqa: F811 - the fixture imported above
    tmp_path,
    group_members,
):
    sweep = tmp_path / "sweep"
    port = free_port()
    t0 = time.monotonic()
    out = orchestrate(
        harness,
        tmp_path / "unused",
        "-m",
        "hydra/launcher=coordexp",
        f"hydra.sweep.dir={sweep}",
        "training.max_steps=1",
        "vllm.max_model_len=512,512,600",
        port=port,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-5000:]
    metas = [json.loads((sweep / str(j) / "run_metadata.json").read_text())["launcher"] for j in range(3)]
    assert [m["entry"] for m in metas] == ["hydra_launcher:coordexp"] * 3
    assert [m["server_fresh"] for m in metas] == [True, False, True]
    pgids = [m["servers"][0]["pgid"] for m in metas]
    assert pgids[0] == pgids[1] != pgids[2]
    assert "keeping the sweep's rollout server(s)" in text and "server settings changed" in text
    # only job 1 (kept server, foreign weights) syncs at step 0
    assert len(re.findall(r"\[coordexp weight sync\] step 0:", text)) == 1
    rows = [json.loads(line) for line in (sweep / "1" / "metrics.jsonl").read_text().splitlines()]
    assert "time/weight_sync_s" in next(r for r in rows if "loss" in r)
    shared_log = (sweep / "0" / "server" / "swift_rollout.log").read_text()
    assert str(sweep / "1" / "weight_sync" / "step-00000000.safetensors") in shared_log
    for g in pgids:
        assert not group_members(g)
    print(f"\nsweep of 3 jobs: {time.monotonic() - t0:.1f} s")
