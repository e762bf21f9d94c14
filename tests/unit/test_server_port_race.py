"""Which early server exits count as a port lost during the start (the launcher then starts the server once
more: ``coordexp.launch.rollout_server.start_all``; end to end in ``test_launcher_faults.py``), and which
known failures name their fix."""

from __future__ import annotations

from pathlib import Path

from coordexp.launch.process import ephemeral_port_range
from coordexp.launch.server_log import lost_port_in_log, start_failure_fix

UVICORN = "ERROR:    [Errno 98] error while attempting to bind on address {addr}: address already in use"


def test_uvicorns_bind_error_for_the_port_counts_ipv4_and_ipv6():
    assert lost_port_in_log("INFO: x\n" + UVICORN.format(addr="('127.0.0.1', 42161)") + "\n", 42161)
    assert lost_port_in_log(UVICORN.format(addr="('::1', 42161, 0, 0)"), 42161)


def test_another_port_or_another_error_does_not_count():
    assert not lost_port_in_log(UVICORN.format(addr="('127.0.0.1', 421610)"), 42161)
    assert not lost_port_in_log(UVICORN.format(addr="('127.0.0.1', 4216)"), 42161)
    assert not lost_port_in_log("[Errno 98] address already in use (port 42161 of the engine)", 42161)
    assert not lost_port_in_log("RuntimeError: CUDA out of memory", 42161)


def test_the_ephemeral_range_is_the_kernels():
    low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert ephemeral_port_range() == (low, high) and 1024 <= low <= high <= 65535


def test_known_start_failures_name_their_fix():
    # ms-swift's messages (swift/template/register.py, swift/model/model_meta.py), for a renamed folder
    template = ("ValueError: Failed to automatically match `template_type` for `/ckpt/stage1.5`. Multiple "
                "possible types found: ['qwen2_5_vl', 'mimo_vl']. Please specify `template_type` manually "
                "via `--template`. See documentation: https://swift.readthedocs.io/")
    assert start_failure_fix("INFO x\n" + template + "\n") == (
        "Fix: ms-swift cannot tell which chat template the checkpoint uses (ms-swift offers ['qwen2_5_vl', "
        "'mimo_vl']); name it: vllm.server.template=<the checkpoint's family>")
    model = ("ValueError: Failed to automatically match `model_type` for `/ckpt/x`. Multiple possible types "
             "found: ['a', 'b']. Please specify `model_type` manually.")
    assert start_failure_fix(model).startswith(
        "Fix: ms-swift cannot tell the checkpoint's model type (ms-swift offers ['a', 'b']); rename the")
    assert "pip install 'coordexp[server-gpu]'" in start_failure_fix(
        "ModuleNotFoundError: No module named 'qwen_vl_utils'")
    assert start_failure_fix("RuntimeError: CUDA out of memory") is None


def test_a_server_whose_command_died_is_named_before_its_supervisor_exits(tmp_path):
    """kill -9 of the server mid-run: the learner fails on the dropped connection at once, while the
    supervisor still stops the engine processes (up to its grace); its line in the log names the death."""
    import subprocess
    import threading

    from coordexp.launch.rollout_server import RolloutServer
    from coordexp.launch.servers import ServerSet

    log = tmp_path / "swift_rollout.log"
    log.write_text("INFO: serving\n")
    srv = RolloutServer(None, "http://127.0.0.1:8600", reuse_existing=True, log_path=log)
    srv.proc = subprocess.Popen(["sleep", "30"])  # the supervisor, still tearing down
    try:
        servers = ServerSet([srv], "key", tmp_path)
        assert srv.command_exit_code() is None and servers.ended() is None
        line = "[coordexp supervise pid=4242] the command exited with code -9: stopping 2 process(es) below\n"
        threading.Timer(0.3, lambda: log.write_text(log.read_text() + line)).start()
        assert servers.ended(wait_s=3.0) == (srv, -9)
        assert srv.exit_code() is None  # the supervisor itself has not exited yet
    finally:
        srv.proc.kill()
        srv.proc.wait()
