"""Issue 14 items 1 and 2 with the real server: ``kill -9`` of ``python -m coordexp.train ...
rollout=vllm_server`` mid-training leaves no process of the run 15 s later (vLLM's EngineCore/Worker
grandchildren included), checked by process tree and by command line; and the port the killed server used
is not "in use" for the next run (the kill leaves TIME_WAIT sockets on it), which starts on it at once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordexp.launch.process import port_in_use
from tests.conftest import free_port
from tests.integration.test_launcher_faults import FAST, launcher_meta, run_processes, wait_for_first_metrics

REPO = Path(__file__).resolve().parents[2]


def proc_info(pid: int) -> tuple[str, bytes, str] | None:
    """(start time ticks, cmdline, state) of a live process, None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
    except OSError:
        return None
    return None if fields[0] == "Z" else (fields[19], cmdline, fields[0])


def tree(root: int) -> dict[int, tuple[str, bytes, str]]:
    """Every live process below ``root`` (and ``root``), with its start time and command line."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        info = proc_info(pid)
        if info:
            out[pid] = info
        todo += children.get(pid, [])
    return out


def survivors(snapshot: dict[int, tuple[str, bytes, str]], run_id: str, markers: list[bytes]) -> list[str]:
    """What of the run is still alive: a snapshot pid that is the same process (same start time), any
    process carrying the run's COORDEXP_RUN_ID, any process whose command line names the run dir or port."""
    left = [f"{pid} {info[1][:120]!r}" for pid, info in snapshot.items()
            if (now := proc_info(pid)) and now[0] == info[0]]
    left += [f"{pid} (COORDEXP_RUN_ID)" for pid in run_processes(run_id) if pid not in snapshot]
    for d in os.listdir("/proc"):
        info = proc_info(int(d)) if d.isdigit() and int(d) not in snapshot else None
        if info and any(m in info[1] for m in markers):
            left.append(f"{d} {info[1][:120]!r} (command line)")
    return left


def train(run_dir: Path, port: int, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "coordexp.train", f"hydra.run.dir={run_dir}", *FAST,
           f"vllm.server.base_urls=[http://127.0.0.1:{port}]", "vllm.server.startup_timeout_s=300",
           "vllm.server.infer_timeout_s=60", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def time_wait_sockets(port: int) -> int:
    """TCP sockets in TIME_WAIT on local ``port`` (from /proc/net/tcp)."""
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        n += int(local.rsplit(":", 1)[1], 16) == port and state == "06"
    return n


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_kill_9_of_the_orchestrator_leaves_nothing_and_frees_the_port(tmp_path, nproc):
    port = free_port()
    run_dir = tmp_path / "run"
    proc = train(run_dir, port, "training.max_steps=400", f"training.nproc_per_node={nproc}",
                 "training.effective_batch_size=8")
    try:
        wait_for_first_metrics(proc, run_dir, timeout_s=400)
        while len((run_dir / "metrics.jsonl").read_text().splitlines()) < 3:  # mid-training: step 3
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        run_id = launcher_meta(run_dir)["run_id"]
        snapshot = tree(proc.pid)
        cmdlines = b"\n".join(info[1] for info in snapshot.values())
        # the grandchildren the issue is about are in the tree: ms-swift's engine process (a multiprocessing
        # child of `swift rollout`; vLLM's EngineCore/Worker processes on a GPU server)
        assert b"swift.cli.rollout" in cmdlines and b"multiprocessing.spawn" in cmdlines, cmdlines
        if nproc > 1:
            assert b"coordexp.trainer.learner" in cmdlines
        markers = [str(run_dir).encode(), f"--port\0{port}".encode()]
        os.kill(proc.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        gone_after = None
        while time.monotonic() - t_kill < 15:
            if gone_after is None and not survivors(snapshot, run_id, markers):
                gone_after = time.monotonic() - t_kill
            time.sleep(0.2)
        left = survivors(snapshot, run_id, markers)
        print(f"[hard kill, nproc={nproc}] {len(snapshot)} processes in the tree; all gone after "
              f"{gone_after} s; alive 15 s after kill -9: {len(left)}")
        assert left == [], left
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in run_processes(locals().get("run_id", "-")):
            os.kill(pid, signal.SIGKILL)
    if nproc == 1:
        return  # the port check below is the same after either kill: run it once (CI time)
    # item 2: the killed server's port is free for the next run right away, TIME_WAIT sockets or not
    waiting = time_wait_sockets(port)
    print(f"[hard kill, nproc={nproc}] TIME_WAIT sockets on port {port}: {waiting}")
    again = train(tmp_path / "again", port, "training.max_steps=1")
    try:
        out, _ = again.communicate(timeout=600)
    finally:
        if again.poll() is None:
            os.killpg(again.pid, signal.SIGKILL)
    assert again.returncode == 0, out[-3000:]
    assert "already in use" not in out
    # a server that ended cleanly leaves TIME_WAIT connections on its port: still free for the next run
    waiting = time_wait_sockets(port)
    print(f"[hard kill, nproc={nproc}] TIME_WAIT sockets on port {port} after a clean run: {waiting}")
    assert port_in_use("127.0.0.1", port) is False
    if waiting:
        with socket.socket() as plain, pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))  # what the old check did, and why it said "in use" for ~60 s
