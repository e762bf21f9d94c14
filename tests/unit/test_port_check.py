"""Issue 14 item 2: a port is "in use" when binding it as the server will (SO_REUSEADDR, as uvicorn does)
fails; TIME_WAIT connections a server that just ended left behind do not count. Real sockets."""

from __future__ import annotations

import socket

import pytest

from coordexp.launch.process import port_in_use
from tests.conftest import free_port


def time_wait_on(port: int) -> None:
    """Leave a TIME_WAIT socket on local ``port``: the server side closes first (as a stopped server does)."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen()
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()        # active close on the server side: that socket goes to TIME_WAIT on `port`
    client.recv(1)      # the FIN arrived
    client.close()
    server.close()


def tcp_states(port: int) -> list[str]:
    with open("/proc/net/tcp") as fh:
        rows = [line.split() for line in fh.read().splitlines()[1:]]
    return [r[3] for r in rows if int(r[1].rsplit(":", 1)[1], 16) == port]


def test_time_wait_is_not_in_use():
    port = free_port()
    time_wait_on(port)
    assert "06" in tcp_states(port)  # TIME_WAIT is really there
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # what the old check did: a bind without SO_REUSEADDR fails
    assert port_in_use("127.0.0.1", port) is False
    assert port_in_use("0.0.0.0", port) is False


@pytest.mark.parametrize("listen_on,check_on", [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"),
                                                 ("127.0.0.1", "0.0.0.0")])
@pytest.mark.parametrize("reuse", [True, False])
def test_a_listener_is_in_use(listen_on, check_on, reuse):
    port = free_port()
    with socket.socket() as s:
        if reuse:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((listen_on, port))
        s.listen()
        assert port_in_use(check_on, port) is True
    assert port_in_use(check_on, port) is False


def test_a_free_port_is_free():
    assert port_in_use("127.0.0.1", free_port()) is False
