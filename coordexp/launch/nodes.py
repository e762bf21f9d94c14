"""Multi-node learner (``training.nnodes > 1``): the torchrun arguments of one node, and what a node other
than node 0 checks before its learner ranks join.

The same ``python -m coordexp.train ...`` runs on every node (``training.node_rank`` differs). Node 0's
orchestrator starts the rollout servers, writes the run metadata and then its torchrun; every torchrun joins
one c10d rendezvous at ``training.rdzv_endpoint`` (node 0 hosts its store: ``is_host``). The other nodes start
no server: they wait until node 0's servers answer ``/health/`` (up to ``vllm.server.startup_timeout_s``) and
node 0's rendezvous accepts connections (up to ``training.rdzv_timeout_s``), then start their own ranks, and
watch node 0's servers while training (gone -> the node stops its ranks at once). Every check fails with a
message that names the address and the fix.

Global rank 0 (metrics, checkpoints, the weight-sync push) is whichever rank the c10d rendezvous ranks first
(torch sorts the nodes by host name, then process id), so it may run on any node: everything it writes goes to
the shared run dir, and every node must reach the servers anyway (each rank requests its own rollouts).
Stdlib only (the orchestrator imports it before torch).
"""

from __future__ import annotations

import hashlib
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["RemoteServers", "rdzv_id", "torchrun_node_args", "wait_for_rendezvous", "wait_for_servers"]

#: Seconds between the other nodes' /health/ checks of node 0's servers while training, and how many
#: failures in a row count as gone.
WATCH_INTERVAL_S = 3.0
WATCH_FAILURES = 2


def rdzv_id(output_dir: str) -> str:
    """The rendezvous id every node derives alike: a hash of the run dir (the same explicit hydra.run.dir on
    every node)."""
    return "coordexp-" + hashlib.sha1(str(output_dir).encode()).hexdigest()[:12]


def torchrun_node_args(nnodes: int, node_rank: int, endpoint: str, output_dir: str, timeout_s: float
                       ) -> list[str]:
    """torchrun's multi-node arguments: c10d rendezvous at ``endpoint`` hosted by node 0, no restarts (a
    failed rank ends the run on every node), ``join_timeout`` = ``timeout_s``."""
    return [f"--nnodes={nnodes}", "--rdzv_backend=c10d",  # c10d ranks nodes itself (no --node_rank)
            f"--rdzv_endpoint={endpoint}", f"--rdzv_id={rdzv_id(output_dir)}",
            f"--rdzv_conf=is_host={1 if node_rank == 0 else 0},join_timeout={max(1, int(timeout_s))}",
            "--max_restarts=0"]


def _split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def _poll(check: Callable[[], str | None], timeout_s: float, poll_s: float, failed: Callable[[str], str],
          waiting: Callable[[float], str], say: Callable[[str], None]) -> str | None:
    """Call ``check`` (None = ready, else why not) every ``poll_s`` until it passes (None) or ``timeout_s``
    has passed (``failed(why)``); ``waiting(seconds)`` is said every 30 s meanwhile."""
    start = last_note = time.monotonic()
    while True:
        why = check()
        if why is None:
            return None
        now = time.monotonic()
        if now - start >= timeout_s:
            return failed(why)
        if now - last_note >= 30:
            say(waiting(now - start))
            last_note = now
        time.sleep(poll_s)


def wait_for_rendezvous(endpoint: str, timeout_s: float, node_rank: int,
                        say: Callable[[str], None] = print, poll_s: float = 1.0) -> str | None:
    """Wait until node 0's rendezvous store accepts TCP connections at ``endpoint``; None when it does, else
    the error text (after ``timeout_s``)."""
    host, port = _split(endpoint)

    def check() -> str | None:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, poll_s + 1.0)):
                return None
        except OSError as err:
            return err.strerror or str(err)

    return _poll(
        check, timeout_s, poll_s, say=say,
        failed=lambda why: (
            f"node {node_rank} could not reach node 0's rendezvous at {endpoint} within "
            f"training.rdzv_timeout_s={timeout_s:g} s ({why}). Fix: start node 0 with the same "
            f"command and training.node_rank=0; training.rdzv_endpoint must be node 0's address as "
            f"this node reaches it, with port {port} open between the nodes"),
        waiting=lambda s: (f"node {node_rank}: waiting for node 0's rendezvous at {endpoint} ... {s:.0f} s "
                           f"(training.rdzv_timeout_s={timeout_s:g})"))


def _healthy(url: str, timeout_s: float = 5.0) -> str | None:
    """None when ``url``/health/ answers 200, else why not."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health/", timeout=timeout_s) as r:
            return None if r.status == 200 else f"HTTP {r.status}"
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}"
    except (OSError, ValueError) as err:
        return str(getattr(err, "reason", None) or err)


def wait_for_servers(urls: Sequence[str], timeout_s: float, node_rank: int,
                     say: Callable[[str], None] = print, poll_s: float = 2.0) -> str | None:
    """Wait until every server answers ``/health/`` (node 0 starts them); None when they do, else the error
    text naming the servers that did not (after ``timeout_s``)."""
    bad: dict[str, str] = {}

    def check() -> str | None:
        bad.clear()
        bad.update({u: why for u in urls if (why := _healthy(u)) is not None})
        return "; ".join(f"{u} ({why})" for u, why in bad.items()) or None

    return _poll(
        check, timeout_s, poll_s, say=say,
        failed=lambda listed: (
            f"node {node_rank} could not reach the rollout server(s) node 0 starts within "
            f"vllm.server.startup_timeout_s={timeout_s:g} s: {listed}. Fix: start node 0 (it owns "
            f"the servers); vllm.server.base_urls must be addresses every node reaches (node 0's "
            f"host name or IP, not 127.0.0.1, with vllm.server.host=0.0.0.0 and an API key)"),
        waiting=lambda s: (f"node {node_rank}: waiting for node 0's rollout server(s) {', '.join(bad)} ... "
                           f"{s:.0f} s"))


@dataclass
class _Gone:
    base_url: str


class RemoteServers:
    """Node 0's servers as another node's orchestrator sees them: ``dead()`` (called about once a second)
    checks ``/health/`` every :data:`WATCH_INTERVAL_S` and returns ``(server, reason)`` once one failed
    :data:`WATCH_FAILURES` times in a row (node 0 ended or was lost), else None."""

    def __init__(self, urls: Sequence[str]):
        self.urls = list(urls)
        self.failures = dict.fromkeys(self.urls, 0)
        self.next_check = time.monotonic() + WATCH_INTERVAL_S

    def dead(self) -> tuple[_Gone, str] | None:
        if time.monotonic() < self.next_check:
            return None
        self.next_check = time.monotonic() + WATCH_INTERVAL_S
        for url in self.urls:
            why = _healthy(url, timeout_s=max(WATCH_INTERVAL_S, 1.0))
            self.failures[url] = 0 if why is None else self.failures[url] + 1
            if self.failures[url] >= WATCH_FAILURES:
                return _Gone(url), f"unreachable ({why})"
        return None
