"""Process utilities shared by the orchestrator, the server lifecycle and the server CLI: stop a process
group, die with the parent, turn SIGTERM/SIGINT into ``SystemExit``, check a port."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

__all__ = ["port_in_use", "set_parent_death_signal", "stop_group", "terminate_on_signals"]


def port_in_use(host: str, port: int) -> bool:
    """True if something already listens on (host, port) or the port cannot be bound."""
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.settimeout(0.5)
        if s.connect_ex((probe_host, port)) == 0:
            return True
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        try:
            s.bind((host or "0.0.0.0", port))
        except OSError:
            return True
    return False


def stop_group(proc: subprocess.Popen | None, timeout_s: float = 15.0) -> None:
    """TERM the process group led by ``proc`` (a session leader, so its pid is the group id), wait up to
    ``timeout_s`` for the group to empty, then KILL and wait up to 5 s. Stops the server and the learner."""
    if proc is None:
        return
    pgid = proc.pid
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader so it does not count as a member
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            continue
        break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def set_parent_death_signal() -> None:
    """In a child between fork and exec (``preexec_fn``): die with SIGTERM when the parent dies."""
    with contextlib.suppress(Exception):  # not Linux: no parent-death signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Terminated(SystemExit):
    pass


@contextlib.contextmanager
def terminate_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise ``SystemExit`` (exit code 128+signum) in the main thread,
    so every ``finally``/``__exit__`` (server teardown) runs. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise _Terminated(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
