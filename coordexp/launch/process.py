"""Process utilities shared by the orchestrator, the server lifecycle and the server CLI: stop a process
group, die with the parent, turn SIGTERM/SIGINT into ``SystemExit`` within a bounded time, check a port.

Children that must not outlive the orchestrator (every rollout server, a torchrun learner) are started
through :mod:`coordexp.launch.supervise`, which owns their whole process tree (vLLM's engine processes are
grandchildren a parent-death signal does not reach)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["SIGNAL_GRACE_S", "defer_signal", "ephemeral_port_range", "port_in_use", "set_parent_death_signal",
           "stop_group", "terminate_on_signals"]

#: Seconds from the first SIGTERM/SIGINT to the end of the process, whatever the main thread is doing (a step
#: in native code cannot run a Python signal handler): past it the process exits at once with 128 + signal,
#: and the supervisors stop every child process within their own grace.
SIGNAL_GRACE_S = 20.0


def ephemeral_port_range() -> tuple[int, int] | None:
    """The kernel's range for ``bind(0)`` ports (``/proc/sys/net/ipv4/ip_local_port_range``, inclusive), None
    where it cannot be read. A server port inside it can be taken by any process's ``bind(0)`` -- vLLM's
    engine takes its internal ports so -- between a free-port check and the server's own bind."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return None


def port_in_use(host: str, port: int) -> bool:
    """True when binding (host, port) the way the server will -- with SO_REUSEADDR, as uvicorn does -- fails:
    something listens there or holds it bound. TIME_WAIT connections a finished server left do not count."""
    family = socket.AF_INET6 if ":" in (host or "") else socket.AF_INET
    with contextlib.closing(socket.socket(family, socket.SOCK_STREAM)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


#: Hooks that may take the first SIGTERM over (see :func:`defer_signal`).
_DEFERRALS: list[Callable[[int], bool]] = []
_RECEIVED: list[int] = []
_DEPTH = [0]


@contextlib.contextmanager
def defer_signal(hook: Callable[[int], bool]) -> Iterator[None]:
    """Within the block, the first SIGTERM goes to ``hook(signum)`` first; if it returns True (e.g. the
    learner will checkpoint at the end of its step and return), no ``SystemExit`` is raised. The signal grace
    still bounds the process; a second signal, and SIGINT, raise as usual."""
    _DEFERRALS.append(hook)
    try:
        yield
    finally:
        _DEFERRALS.remove(hook)


class _Watchdog:
    """Ends the process ``grace_s`` after the first SIGTERM/SIGINT unless the guarded block ended first.

    The interpreter's C-level handler writes each signal number to the wakeup fd at once, even while the main
    thread sits in native code for minutes; this thread reads it there."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.done = threading.Event()
        self.r, self.w = os.pipe()
        os.set_blocking(self.w, False)
        self.old_fd = signal.set_wakeup_fd(self.w, warn_on_full_buffer=False)
        self.thread = threading.Thread(target=self._watch, name="coordexp-signal-watchdog", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self.r, 64)
            except OSError:
                return
            sigs = [b for b in data if b in (signal.SIGTERM, signal.SIGINT)]
            if not data or self.done.is_set():
                return
            if sigs:
                break
        if self.done.wait(self.grace_s):
            return
        name = signal.Signals(sigs[0]).name
        with contextlib.suppress(OSError):  # os.write: the main thread may hold sys.stderr's lock
            os.write(2, f"[coordexp] {name} not handled within {self.grace_s:g} s (the main thread is busy "
                        f"in native code): exiting now with {128 + sigs[0]}; child processes stop with this "
                        f"process\n".encode())
        os._exit(128 + sigs[0])

    def close(self) -> None:
        self.done.set()
        signal.set_wakeup_fd(self.old_fd)
        os.close(self.w)  # the thread's read returns b"" and it ends
        self.thread.join(timeout=1.0)
        os.close(self.r)


@contextlib.contextmanager
def terminate_on_signals(grace_s: float = SIGNAL_GRACE_S) -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise ``SystemExit`` (exit code 128+signum) in the main thread,
    so every ``finally``/``__exit__`` (server teardown) runs -- unless a :func:`defer_signal` hook takes the
    first SIGTERM over. Bounded: ``grace_s`` after the first signal, a process that is still in the block
    exits at once (:class:`_Watchdog`). Nested blocks share the outermost one's watchdog. A no-op outside
    the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        first = not _RECEIVED
        _RECEIVED.append(signum)
        if first and signum == signal.SIGTERM and any(hook(signum) for hook in list(_DEFERRALS)):
            print(f"[coordexp] {signal.Signals(signum).name}: finishing the current step first (checkpoint), "
                  f"at most {grace_s:g} s", file=sys.stderr, flush=True)
            return
        raise _Terminated(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    watchdog = _Watchdog(grace_s) if _DEPTH[0] == 0 else None
    _DEPTH[0] += 1
    if watchdog is not None:
        _RECEIVED.clear()
    try:
        yield
    finally:
        _DEPTH[0] -= 1
        if watchdog is not None:
            watchdog.close()
        for s, h in old.items():
            signal.signal(s, h)
