"""coordexp.launch.nodes: a node's torchrun arguments, the waits of the nodes other than 0 (rendezvous,
servers) and their watch of node 0's servers, against real sockets and a real HTTP server."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from coordexp.launch import nodes
from tests.conftest import free_port


def test_torchrun_arguments_of_each_node():
    assert nodes.torchrun_node_args(2, 0, "10.0.0.1:29400", "/shared/run", 300.0) == [
        "--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=10.0.0.1:29400",
        f"--rdzv_id={nodes.rdzv_id('/shared/run')}", "--rdzv_conf=is_host=1,join_timeout=300",
        "--max_restarts=0"]
    other = nodes.torchrun_node_args(2, 1, "10.0.0.1:29400", "/shared/run", 300.0)
    assert "--rdzv_conf=is_host=0,join_timeout=300" in other
    assert nodes.rdzv_id("/shared/run") == nodes.rdzv_id("/shared/run") != nodes.rdzv_id("/shared/run2")


def test_rendezvous_wait_names_the_endpoint_and_the_fix():
    port = free_port()
    msg = nodes.wait_for_rendezvous(f"127.0.0.1:{port}", 0.5, 1, say=lambda m: None, poll_s=0.1)
    assert msg.startswith(f"node 1 could not reach node 0's rendezvous at 127.0.0.1:{port} within "
                          "training.rdzv_timeout_s=0.5 s")
    assert "training.node_rank=0" in msg and f"port {port} open" in msg


def test_both_waits_say_they_wait_every_30_s_and_give_up_after_the_timeout(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(nodes.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(nodes.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    said: list[str] = []
    msg = nodes._poll(lambda: "refused", 95, 10, failed=lambda why: f"gave up: {why}",
                      waiting=lambda s: f"waiting {s:.0f} s", say=said.append)
    assert msg == "gave up: refused" and said == ["waiting 30 s", "waiting 60 s", "waiting 90 s"]
    answers = iter(["no", "no", None])
    assert nodes._poll(lambda: next(answers), 95, 10, failed=str, waiting=str, say=said.append) is None
    assert clock[0] == 100 + 20  # checks every 10 s: the first gave up at 100 s, the second slept twice


class _Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health/" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_server_wait_and_watch(health_server, monkeypatch):
    srv, url = health_server
    gone = f"http://127.0.0.1:{free_port()}"
    assert nodes.wait_for_servers([url], 1.0, 1, say=lambda m: None, poll_s=0.1) is None
    msg = nodes.wait_for_servers([url, gone], 0.3, 2, say=lambda m: None, poll_s=0.1)
    assert msg.startswith("node 2 could not reach the rollout server(s) node 0 starts within "
                          "vllm.server.startup_timeout_s=0.3 s")
    assert gone in msg and url + " (" not in msg and "not 127.0.0.1" in msg

    monkeypatch.setattr(nodes, "WATCH_INTERVAL_S", 0.0)
    watch = nodes.RemoteServers([url])
    assert watch.dead() is None and watch.dead() is None
    srv.shutdown()
    srv.server_close()
    assert watch.dead() is None  # one failure is not enough
    dead = watch.dead()
    assert dead is not None and dead[0].base_url == url and dead[1].startswith("unreachable (")
