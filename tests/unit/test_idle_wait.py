"""The CPU server's vLLM worker stops busy-waiting soon after a command (coordexp.rollout.server.idle_wait),
checked on vLLM's own shared-memory queue condition in a fresh interpreter (the patch is process-wide)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import threading, time, zmq
from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
from coordexp.rollout.server import idle_wait

ctx = zmq.Context()

def pair(name):
    writer = SpinCondition(is_reader=False, context=ctx, notify_address=f"inproc://{name}")
    reader = SpinCondition(is_reader=True, context=ctx, notify_address=f"inproc://{name}")
    time.sleep(0.05)  # the subscription reaches the publisher
    return writer, reader

def wait_after_read(reader, gap_s, timeout_ms=300):
    reader.record_read()
    time.sleep(gap_s)
    t = time.monotonic()
    reader.wait(timeout_ms=timeout_ms)
    return time.monotonic() - t

_, before = pair("before")
print("unpatched", round(wait_after_read(before, 0.02), 3))  # inside vLLM's 1 s busy window: no sleep
print("gpu", idle_wait.apply({"COORDEXP_SERVER_DEVICE": "cuda"}))
print("cpu", idle_wait.apply({"COORDEXP_SERVER_DEVICE": "cpu"}))
print("again", idle_wait.apply({"COORDEXP_SERVER_DEVICE": "cpu"}))
writer, reader = pair("after")
print("idle", round(wait_after_read(reader, 0.06), 3))  # past 20 ms: sleeps on the socket until the timeout
print("busy", round(wait_after_read(reader, 0.0), 3))  # right after a read: still spins
threading.Timer(0.16, writer.notify).start()  # 0.1 s into the wait below
print("woken", round(wait_after_read(reader, 0.06, timeout_ms=5000), 3))  # a notification wakes it
"""


def test_a_cpu_servers_worker_sleeps_after_the_short_busy_window_and_wakes_on_notify():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    got = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert float(got["unpatched"]) < 0.05
    assert got["gpu"] == "False" and got["cpu"] == "True" and got["again"] == "True"
    assert out.stdout.count("coordexp: vLLM worker idle wait 20 ms") == 1
    assert 0.25 <= float(got["idle"]) < 1.0
    assert float(got["busy"]) < 0.05
    assert 0.08 <= float(got["woken"]) < 1.0
