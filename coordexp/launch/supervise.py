"""``python -m coordexp.launch.supervise [--grace S] -- CMD ...``: run CMD so that nothing it starts outlives
the process that started the supervisor, whatever kills that process (SIGKILL included).

Why: a parent-death signal reaches only a direct child. ms-swift's engine process (and on a GPU server
vLLM's ``EngineCore`` and ``Worker`` processes) are grandchildren of the orchestrator (descendants of
``swift rollout``), so when the orchestrator was SIGKILLed they were re-parented to init and kept their
memory for minutes. The supervisor sits between the
orchestrator and the command and owns the whole tree:

- it is a *child subreaper* (``PR_SET_CHILD_SUBREAPER``): every process of the tree whose parent dies is
  re-parented to the supervisor instead of init, so the tree never leaves it, whatever the processes do
  with their sessions or process groups;
- it gets SIGTERM when its parent dies (``PR_SET_PDEATHSIG``, also checked by polling ``getppid``, which
  closes the race of a parent that dies before the flag is set);
- on that, on SIGTERM/SIGINT/SIGHUP, or when CMD exits, it sends SIGTERM to every process below it (found
  through ``/proc``, so grandchildren in other process groups count), waits up to ``--grace`` seconds
  (``ORPHAN_GRACE_S`` when the parent is gone), SIGKILLs what is left, reaps everything and exits with
  CMD's status (a CMD killed by signal N ends the supervisor by signal N, so callers see the same
  ``returncode``).

Stdlib only and Linux only (``prctl``); elsewhere it runs CMD and forwards signals without the subreaper.
The orchestrator starts every server (the launcher's and the server CLI's, on any node) and a torchrun
learner through :func:`supervised_command`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
#: Seconds the tree gets between SIGTERM and SIGKILL.
DEFAULT_GRACE_S = 10.0
#: The same when the parent is gone (nobody waits for a clean shutdown: the run is over).
ORPHAN_GRACE_S = 2.0
_POLL_S = 0.1

__all__ = ["DEFAULT_GRACE_S", "descendants", "supervised_command"]


def supervised_command(cmd: list[str], grace_s: float = DEFAULT_GRACE_S) -> list[str]:
    """``cmd`` wrapped in the supervisor (same interpreter)."""
    return [sys.executable, "-m", "coordexp.launch.supervise", "--grace", str(grace_s),
            "--parent", str(os.getpid()), "--", *cmd]


def _prctl(option: int, value: int) -> bool:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except OSError:  # not Linux
        return False


def descendants(root: int) -> list[int]:
    """Pids of every process below ``root`` (children first), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:  # gone meanwhile
            continue
        ppid = int(stat.rsplit(b")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _reap() -> dict[int, int]:
    """Reap every exited child (re-parented ones included): {pid: wait status}."""
    done = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return done
        if pid == 0:
            return done
        done[pid] = status


def _stop_tree(grace_s: float, statuses: dict[int, int], parent: int | None = None) -> None:
    """TERM the tree, wait ``grace_s`` (``ORPHAN_GRACE_S`` as soon as ``parent`` is gone: the death signal
    also comes when only the thread that started us ended, before the whole parent process is gone), KILL."""
    me = os.getpid()
    _signal_all(descendants(me), signal.SIGTERM)
    start = time.monotonic()
    while time.monotonic() - start < (ORPHAN_GRACE_S if parent is not None and os.getppid() != parent
                                      else grace_s):
        statuses.update(_reap())
        if not descendants(me):
            return
        time.sleep(_POLL_S)
    while True:  # whatever ignored SIGTERM, and anything it started meanwhile
        left = descendants(me)
        if not left:
            return
        _signal_all(left, signal.SIGKILL)
        time.sleep(_POLL_S)
        statuses.update(_reap())


def _exit_like(status: int | None, default: int) -> None:
    if status is None:
        sys.exit(default)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        with contextlib.suppress(OSError, ValueError):  # SIGKILL/SIGSTOP have no handler to reset
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        time.sleep(1)
        sys.exit(128 + sig)
    sys.exit(os.waitstatus_to_exitcode(status))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m coordexp.launch.supervise")
    ap.add_argument("--grace", type=float, default=DEFAULT_GRACE_S)
    ap.add_argument("--parent", type=int, default=None, help="pid whose death stops the tree (default: ppid)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    ns = ap.parse_args(sys.argv[1:] if argv is None else argv)
    cmd = ns.cmd[1:] if ns.cmd[:1] == ["--"] else ns.cmd
    if not cmd:
        ap.error("no command")
    parent = ns.parent if ns.parent is not None else os.getppid()
    stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        sys.exit(128 + signal.SIGTERM)
    child = subprocess.Popen(cmd)  # same session and process group: a group signal reaches it too
    statuses: dict[int, int] = {}
    while not stop and child.pid not in statuses:
        statuses.update(_reap())
        if os.getppid() != parent:
            stop.append(signal.SIGTERM)
        time.sleep(_POLL_S)
    left = len(descendants(os.getpid()))
    if stop or left or os.getppid() != parent:  # a command that ended alone and cleanly needs no line
        status = statuses.get(child.pid)
        why = ("the parent is gone" if os.getppid() != parent else f"signal {stop[0]}" if stop
               else f"the command exited with code {os.waitstatus_to_exitcode(status)}")
        print(f"[coordexp supervise pid={os.getpid()}] {why}: stopping {left} process(es) below (TERM, up "
              f"to {ns.grace:g} s or {ORPHAN_GRACE_S:g} s once the parent is gone, KILL)", file=sys.stderr,
              flush=True)
    _stop_tree(ns.grace, statuses, parent)
    statuses.update(_reap())
    child.returncode = 0  # reaped here, not by Popen: keep Popen from waiting on it at exit
    _exit_like(statuses.get(child.pid), 128 + (stop[0] if stop else signal.SIGTERM))


if __name__ == "__main__":
    main()
