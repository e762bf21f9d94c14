"""Issue 14 item 5 (the deaf step): within ``terminate_on_signals`` no SIGTERM/SIGINT waits longer than the
grace, even while the main thread cannot run a Python handler; a deferral hook (the preemption checkpoint)
takes the first SIGTERM over, bounded by the same grace. Real processes and signals."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

SCRIPT = textwrap.dedent("""
    import signal, sys, time
    from coordexp.launch.process import defer_signal, terminate_on_signals
    mode = sys.argv[1]
    requests = []
    with terminate_on_signals(grace_s=2.0):
        with defer_signal(lambda signum: mode.startswith("defer") and not requests.append(signum)):
            print("ready", flush=True)
            if mode in ("deaf", "defer_deaf"):
                # a step in native code: the main thread cannot run the Python handler (the signal is
                # blocked here and lands on another thread, as it does while a long kernel runs)
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
                time.sleep(60)
                sys.exit(0)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not requests:
                time.sleep(0.05)
            if requests:
                time.sleep(0.5)  # "finish the step and checkpoint"
                print("checkpointed", flush=True)
                sys.exit(128 + requests[0])
    sys.exit(0)
""")


def run_and_signal(mode: str, sig: int) -> tuple[int, float, str]:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    t0 = time.monotonic()
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, time.monotonic() - t0, out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_raises_at_once_when_the_main_thread_is_free(sig):
    code, took, _ = run_and_signal("plain", sig)
    assert code == 128 + sig and took < 1.5


@pytest.mark.parametrize("mode", ["deaf", "defer_deaf"])
def test_a_deaf_main_thread_ends_at_the_grace(mode):
    code, took, out = run_and_signal(mode, signal.SIGTERM)
    assert code == 143
    assert 1.8 < took < 4.0, took
    assert ("[coordexp] SIGTERM not handled within 2 s (the main thread is busy in native code): exiting "
            "now with 143") in out


def test_a_deferral_hook_takes_the_first_sigterm_over():
    code, took, out = run_and_signal("defer", signal.SIGTERM)
    assert code == 143 and "checkpointed" in out and took < 2.0
    assert "[coordexp] SIGTERM: finishing the current step first (checkpoint), at most 2 s" in out


def test_sigint_is_never_deferred():
    code, took, out = run_and_signal("defer", signal.SIGINT)
    assert code == 130 and took < 1.5 and "checkpointed" not in out
