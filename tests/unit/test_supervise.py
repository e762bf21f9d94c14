"""The supervisor (coordexp.launch.supervise): nothing below it outlives the process that started it, even
grandchildren that left its session and ignore SIGTERM; it exits like the command it ran. Real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from coordexp.launch.supervise import descendants, supervised_command

# A command whose child escapes into its own session (as an engine process may) and ignores SIGTERM.
TREE = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    tag = sys.argv[1]
    grandchild = subprocess.Popen([sys.executable, "-c",
        "import os, signal, time; os.setsid(); signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "time.sleep(600)", tag])
    print(grandchild.pid, flush=True)
    time.sleep(600)
""")


def pids_with(tag: str) -> list[int]:
    """Processes whose command line carries ``tag``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if tag.encode() in fh.read():
                        out.append(int(entry))
            except OSError:
                pass
    return [p for p in out if p != os.getpid()]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(cond, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if cond():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s")


@pytest.mark.parametrize("how", ["kill -9 of the parent", "SIGTERM to the supervisor"])
def test_nothing_outlives_the_parent_or_the_supervisor(how):
    tag = f"coordexp-supervise-test-{uuid.uuid4().hex}"
    # the "orchestrator": starts the supervised tree and waits; the test kills it with SIGKILL
    orchestrator = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys, time
        from coordexp.launch.supervise import supervised_command
        cmd = supervised_command([sys.executable, "-c", {TREE!r}, {tag!r}], grace_s=2.0)
        sup = subprocess.Popen(cmd, start_new_session=True)
        print(sup.pid, flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        supervisor = int(orchestrator.stdout.readline())
        wait_until(lambda: len(descendants(supervisor)) >= 2, 30)  # the child and its escaped grandchild
        tree = [supervisor, *descendants(supervisor)]
        assert set(tree) | {orchestrator.pid} == set(pids_with(tag))  # every process carrying the tag
        if how == "kill -9 of the parent":
            orchestrator.kill()
        else:
            os.kill(supervisor, signal.SIGTERM)
        # the grandchild ignores SIGTERM: SIGKILL at the 2 s grace takes it; everything goes within seconds
        took = wait_until(lambda: not any(alive(p) for p in tree)
                          and not set(pids_with(tag)) - {orchestrator.pid}, 10)
        assert took < 6
    finally:
        orchestrator.kill()
        orchestrator.wait()
        for pid in pids_with(tag):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("code", [0, 3])
def test_exit_status_is_the_commands(code):
    out = subprocess.run(supervised_command([sys.executable, "-c", f"import sys; sys.exit({code})"]),
                         start_new_session=True, timeout=30)
    assert out.returncode == code


def test_a_command_killed_by_a_signal_ends_the_supervisor_by_that_signal():
    cmd = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    assert subprocess.run(supervised_command(cmd), start_new_session=True, timeout=30).returncode == -9


def test_children_left_behind_by_a_command_that_exits_are_stopped():
    tag = f"coordexp-supervise-test-{uuid.uuid4().hex}"
    cmd = [sys.executable, "-c", "import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
           f"'import time; time.sleep(600)', {tag!r}], start_new_session=True)"]
    out = subprocess.run(supervised_command(cmd, grace_s=2.0), start_new_session=True, timeout=30)
    assert out.returncode == 0
    assert pids_with(tag) == []
