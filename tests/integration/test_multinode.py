"""Multi-node learner on one machine: two orchestrators on 127.0.0.1 as node 0 and node 1 (one rank each, c10d
rendezvous), the same command but training.node_rank.

- a few steps including Channel B through a real ``swift rollout`` server give the same metrics as a
  single-node 2-rank run with the same seed;
- ``kill -9`` (or SIGTERM) of either node's orchestrator ends the whole run: the other orchestrator exits
  non-zero with a message saying why, and no process of either node is left;
- node 1 without node 0 fails fast with a message naming the rendezvous; nnodes > 1 without an explicit
  hydra.run.dir is refused before anything starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordexp.launch.supervise import descendants
from tests.conftest import REPO_ROOT, free_port, read_jsonl
from tests.integration.conftest import tiny_rollout_server

#: Metrics that are wall times or rates of them (differ between any two runs).
TIMING = ("time/", "rollout/gen_tokens_per_s")


def _train_cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "coordexp.train", "+experiment=smoke/ab_mixed", f"hydra.run.dir={run_dir}",
            "model.tiny_stage1_steps=0", "training.per_device_train_batch_size=2",
            "training.effective_batch_size=4", "training.eval_strategy=no", "training.save_strategy=no",
            "rollout_matching.decode_batch_size=2", "rollout_matching.max_new_tokens=16",
            "data.synthetic.train_samples=32", "data.synthetic.val_samples=4", *extra]


def _two_nodes(run_dir: Path, *extra: str) -> tuple[subprocess.Popen, subprocess.Popen]:
    """Node 1 first (it waits for node 0's rendezvous), then node 0."""
    common = _train_cmd(run_dir, "training.nnodes=2", f"training.rdzv_endpoint=127.0.0.1:{free_port()}",
                        "training.nproc_per_node=1", *extra)
    procs = []
    for node in (1, 0):
        procs.append(subprocess.Popen([*common, f"training.node_rank={node}"], cwd=REPO_ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return procs[1], procs[0]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, cpu_env_vars, group_members):
    yield from tiny_rollout_server(tiny_model_dir, tmp_path_factory, cpu_env_vars, group_members,
                                   name="mn-server")


@pytest.fixture(scope="module")
def runs(server, tmp_path_factory):
    """The single-node 2-rank run and the two-node run (3 steps, Channel B at step 2, same seed), against
    the same real server (reuse_existing: each run syncs its weights before its first rollout)."""
    base = tmp_path_factory.mktemp("multinode")
    srv = ["rollout=vllm_server", f"vllm.server.base_urls=[{server.base_url}]",
           "vllm.server.reuse_existing=true", "vllm.max_model_len=512", "training.max_steps=3",
           "stage2_ab.schedule.b_ratio=0.5"]
    single = subprocess.run(_train_cmd(base / "single", "training.nproc_per_node=2", *srv), cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    node0, node1 = _two_nodes(base / "two", *srv)
    out0, _ = node0.communicate(timeout=900)
    out1, _ = node1.communicate(timeout=300)
    assert node0.returncode == 0 and node1.returncode == 0, out0[-3000:] + "\n-----\n" + out1[-3000:]
    return {"single": base / "single", "two": base / "two", "out0": out0, "out1": out1}


def _train_rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)}
            for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row]


@pytest.mark.slow
def test_two_nodes_match_one_node_with_two_ranks(runs):
    single, two = _train_rows(runs["single"]), _train_rows(runs["two"])
    assert [r["stage2/channel_b"] for r in two] == [0.0, 1.0, 0.0]  # Channel B through the server
    assert two[1]["rollout/raw_rollouts"] == 4.0 and two[1]["rollout/repeat_terminate_active"] == 1.0
    assert [sorted(r) for r in two] == [sorted(r) for r in single]
    for a, b in zip(two, single):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9)
    meta = json.loads((runs["two"] / "run_metadata.json").read_text())["launcher"]
    assert meta["learner"]["nnodes"] == 2 and meta["learner"]["node_rank"] == 0 and meta["exit_code"] == 0
    assert "--rdzv_backend=c10d" in meta["learner"]["command"]
    assert "node 1 of 2: this node runs 1 learner rank(s)" in runs["out1"]
    # node 1 wrote no metadata of its own and read its own copy of the config
    assert (runs["two"] / "resolved_config.node1.yaml").is_file()
    # one rank per node, both wrote their per-rank records into the shared run dir
    assert {p.name for p in runs["two"].glob("rollout_samples.rank*.jsonl")} == {
        "rollout_samples.rank0.jsonl", "rollout_samples.rank1.jsonl"}


def _wait_for_training(run_dir: Path, procs, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and any("loss" in r for r in read_jsonl(metrics)):
            return
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a node ended before training: {p.communicate()[0][-3000:]}")
        time.sleep(0.5)
    raise AssertionError("no training step within the deadline")


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(pid)
        except OSError:
            pass
    return out


@pytest.mark.slow
@pytest.mark.parametrize("victim,sig", [(0, signal.SIGKILL), (1, signal.SIGKILL), (0, signal.SIGTERM)])
def test_killing_either_orchestrator_ends_the_run_on_both_nodes(tmp_path, victim, sig):
    run_dir = tmp_path / "run"
    node0, node1 = _two_nodes(run_dir, "rollout=hf", "training.max_steps=500",
                              "stage2_ab.schedule.b_ratio=0.0")
    try:
        _wait_for_training(run_dir, (node0, node1))
        tree = [node0.pid, node1.pid, *descendants(node0.pid), *descendants(node1.pid)]
        assert len(tree) >= 8  # orchestrator, supervisor, torchrun, rank on each node
        killed, other = (node0, node1) if victim == 0 else (node1, node0)
        t0 = time.monotonic()
        os.kill(killed.pid, sig)
        out, _ = other.communicate(timeout=60)
        ended = time.monotonic() - t0
        killed.communicate(timeout=60)
        deadline = t0 + 60
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _alive(tree)
    finally:
        for p in (node0, node1):
            if p.poll() is None:
                p.kill()
    print(f"\n{signal.Signals(sig).name} to node {victim}'s orchestrator: node {1 - victim} ended after "
          f"{ended:.1f} s (exit {other.returncode})")
    assert not left, f"processes left after 60 s: {left}"
    assert other.returncode != 0
    assert "the learner group ended with exit code" in out and "another node" in out, out[-3000:]
    assert ended < 60


def test_node_without_node_0_fails_fast(tmp_path):
    port = free_port()
    cmd = _train_cmd(tmp_path / "run", "rollout=hf", "training.max_steps=1", "training.nnodes=2",
                     "training.node_rank=1", f"training.rdzv_endpoint=127.0.0.1:{port}",
                     "training.rdzv_timeout_s=3")
    t0 = time.monotonic()
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert (f"node 1 could not reach node 0's rendezvous at 127.0.0.1:{port} within "
            "training.rdzv_timeout_s=3 s") in text
    assert "Traceback" not in text and time.monotonic() - t0 < 60


def test_multinode_needs_an_explicit_shared_run_dir():
    cmd = [sys.executable, "-m", "coordexp.train", "+experiment=smoke/ab_mixed", "rollout=hf",
           "training.nnodes=2", "training.rdzv_endpoint=127.0.0.1:29400"]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "hydra.run.dir: must be given explicitly with training.nnodes=2" in out.stderr


def test_node_without_node_0s_servers_fails_fast(tmp_path):
    port = free_port()
    cmd = _train_cmd(tmp_path / "run", "rollout=vllm_server", f"vllm.server.base_urls=[http://127.0.0.1:{port}]",
                     "training.max_steps=1", "training.nnodes=2", "training.node_rank=1",
                     f"training.rdzv_endpoint=127.0.0.1:{free_port()}", "vllm.server.startup_timeout_s=3")
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert ("node 1 could not reach the rollout server(s) node 0 starts within "
            f"vllm.server.startup_timeout_s=3 s: http://127.0.0.1:{port} (") in text
    assert "Traceback" not in text and not (tmp_path / "run" / "run_metadata.json").exists()
