"""Several launcher-started rollout servers, their API key and the weight route's root (issue 16), without a
real server: the GPU/core split, the config rules (exit-2 problems), what reaches the server's command line
and environment, the client's Authorization header and per-server counts over real HTTP (a stdlib server on
127.0.0.1), and the route's path rule. The real ``swift rollout`` side is
tests/integration/test_several_servers.py."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from coordexp.config.load import compose, to_train_config
from coordexp.config.validate import server_problems
from coordexp.errors import ConfigError, ServerStartError
from coordexp.launch.server_spec import (
    ServerLaunchSpec,
    build_command,
    build_env,
    check_server_python,
    cpu_slice,
    gpu_slice,
)
from coordexp.protocol import ENV_SERVER_API_KEY, ENV_WEIGHTS_ROOT, is_loopback_host
from coordexp.rollout.server.weight_route import outside_root_problem
from coordexp.rollout.server_client import DecodeParams, InferRequest, RolloutClient, RolloutServerError

LEAF = ["+experiment=smoke/b_only", "rollout=vllm_server"]


def cfg_of(*overrides: str):
    return to_train_config(compose([*LEAF, *overrides]))


def problems_of(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        cfg_of(*overrides)
    return err.value.problems


# ---- the split --------------------------------------------------------------------------------------------

def test_gpus_split_into_equal_contiguous_slices():
    assert [gpu_slice([4, 5, 6, 7], i, 2) for i in range(2)] == [[4, 5], [6, 7]]
    assert [gpu_slice([0, 1, 2, 3, 4, 5], i, 3) for i in range(3)] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ServerStartError, match="does not split evenly over 2 servers"):
        gpu_slice([0, 1, 2], 0, 2)


def test_cores_split_contiguously_the_first_slices_taking_the_remainder():
    assert [cpu_slice([0, 1, 2, 3, 4], i, 2) for i in range(2)] == [[0, 1, 2], [3, 4]]
    assert [cpu_slice([0, 1], i, 2) for i in range(2)] == [[0], [1]]
    assert cpu_slice([3, 1, 2], 0, 1) == [1, 2, 3]  # one server: every core
    assert [cpu_slice([0], i, 2) for i in range(2)] == [[0], [0]]  # fewer cores than servers: shared


# ---- the config rules (ConfigError -> exit 2) -----------------------------------------------------------

def test_a_gpu_count_that_does_not_divide_over_the_servers_is_a_config_error():
    urls = "vllm.server.base_urls=[http://127.0.0.1:8001,http://127.0.0.1:8002]"
    cuda = ["vllm.device=cuda", "vllm.sync.transport=file", "vllm.learner_gpus=[]"]
    assert problems_of(urls, *cuda, "vllm.server_gpus=[0,1,2]") == [
        "vllm.server_gpus: 3 GPUs do not split evenly over the 2 servers of vllm.server.base_urls; give 2 "
        "GPUs (2 servers x data_parallel_size 1 x tensor_parallel_size 1)"]
    assert problems_of(urls, *cuda, "vllm.server_gpus=[0,1,2,3]") == [
        "vllm.server_gpus: 2 GPUs per server (4 over 2 server(s)) != data_parallel_size x "
        "tensor_parallel_size (1 x 1)"]


def test_started_servers_need_distinct_ports():
    assert problems_of("vllm.server.base_urls=[http://127.0.0.1:8001,http://localhost:8001]") == [
        "vllm.server.base_urls: port(s) [8001] appear more than once; the launcher starts one server per "
        "URL, each on its own port"]


def test_a_non_loopback_server_without_an_api_key_is_refused(monkeypatch):
    monkeypatch.delenv(ENV_SERVER_API_KEY, raising=False)
    (msg,) = problems_of("vllm.server.host=0.0.0.0")
    assert msg.startswith("vllm.server: vllm.server.host=0.0.0.0 is reachable beyond this machine, so the "
                          f"servers need an API key: export {ENV_SERVER_API_KEY}=<secret>")
    (msg,) = problems_of("vllm.server.reuse_existing=true", "vllm.server.base_urls=[http://10.1.2.3:8000]")
    assert msg.startswith("vllm.server: http://10.1.2.3:8000 is reachable beyond this machine")
    # with the key in the environment both are fine; loopback never needs one
    monkeypatch.setenv(ENV_SERVER_API_KEY, "s3cret")
    cfg = cfg_of("vllm.server.host=0.0.0.0")
    assert server_problems(cfg, environ={}) != [] and server_problems(cfg) == []
    assert server_problems(cfg_of("vllm.server.host=::1"), environ={}) == []
    assert [is_loopback_host(h) for h in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]", "0.0.0.0",
                                          "10.0.0.1", "node7")] == [True] * 5 + [False] * 3


def test_the_server_python_must_be_an_executable(tmp_path):
    assert problems_of(f"vllm.server.python={tmp_path}/nope/python") == [
        f"vllm.server.python: {tmp_path}/nope/python is not an executable file (an absolute path such as "
        "/opt/server-venv/bin/python; null = the learner's Python)"]


def test_a_server_python_without_the_server_stack_fails_fast_naming_what_is_missing(tmp_path):
    fake = tmp_path / "python"  # a real interpreter that finds coordexp but neither swift nor vllm
    fake.write_text(f"#!/bin/sh\nPYTHONPATH={os.getcwd()} exec /usr/bin/python3 -S \"$@\"\n")
    fake.chmod(0o755)
    with pytest.raises(ServerStartError,
                       match=r"the rollout server: it lacks swift vllm; install .*\[server-gpu\]'"):
        check_server_python(str(fake))
    with pytest.raises(ServerStartError, match=r"-m pip install -e '<coordexp checkout>\[server-cpu\]'"):
        check_server_python(str(fake), "cpu")  # a CPU server's stack is the server-cpu extra


# ---- what reaches the server -----------------------------------------------------------------------------

def test_the_key_and_weights_root_reach_the_environment_never_the_command_line(tmp_path):
    spec = ServerLaunchSpec(model_dir=str(tmp_path), port=8001, api_key="s3cret", weights_root=str(tmp_path),
                            cpus=[1], python="/opt/srv/bin/python")
    cmd = build_command(spec)
    env = build_env(spec, base={})
    assert cmd[0] == "/opt/srv/bin/python" and "s3cret" not in " ".join(cmd) and "--api_key" not in cmd
    assert env[ENV_SERVER_API_KEY] == "s3cret" and env[ENV_WEIGHTS_ROOT] == str(tmp_path)
    assert "s3cret" not in repr(spec)


def test_the_launch_specs_of_two_servers_split_the_cores(tmp_path, monkeypatch):
    from coordexp.launch.server_spec import launch_spec_from_config

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    cfg = cfg_of("vllm.server.base_urls=[http://127.0.0.1:8001,http://127.0.0.1:8002]")
    specs = [launch_spec_from_config(cfg, tmp_path, u, index=i, count=2, weights_root=tmp_path)
             for i, u in enumerate(cfg.vllm.server.base_urls)]
    assert [(s.port, s.cpus, s.weights_root) for s in specs] == [
        (8001, [0, 1], str(tmp_path.resolve())), (8002, [2], str(tmp_path.resolve()))]
    one = launch_spec_from_config(cfg_of(), tmp_path)
    assert one.cpus == []  # a single server is not pinned (as before)


# ---- the weight route's root ---------------------------------------------------------------------------

def test_the_weight_route_loads_only_files_under_the_run_dir(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    (run / "weight_sync").mkdir(parents=True)
    other.mkdir()
    (other / "w.safetensors").write_bytes(b"x")
    (run / "weight_sync" / "escape.safetensors").symlink_to(other / "w.safetensors")
    assert outside_root_problem(str(run / "weight_sync" / "step-1.safetensors"), str(run)) is None
    assert outside_root_problem(str(other / "w.safetensors"), str(run)) == (
        f"{other}/w.safetensors is outside this server's weights root {run} ({ENV_WEIGHTS_ROOT}); only files "
        f"under it are loaded: restart the server with --weights-root <a folder that holds the run dir> "
        f"(python -m coordexp.launch.server), or put the run dir under {run}")
    outside = "is outside this server's weights root"
    assert outside in outside_root_problem(str(run / "weight_sync" / "escape.safetensors"), str(run))
    assert outside in outside_root_problem(str(run / ".." / "other" / "w.safetensors"), str(run))
    assert outside_root_problem(f"{run}-sibling/w.safetensors", str(run)) is not None  # not a prefix match
    assert outside_root_problem("/etc/passwd", None).startswith(
        f"this server was started without {ENV_WEIGHTS_ROOT}, so it loads no weight files")


# ---- the client over real HTTP -----------------------------------------------------------------------------

class _Server:
    """A stdlib HTTP server on 127.0.0.1 that answers /get_world_size/ and /infer/ like a rollout server and
    records the Authorization header of every request; 401 without the expected key."""

    def __init__(self, key: str | None, world_size: int = 1):
        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self):
                seen.append((self.path, self.headers.get("Authorization")))
                if key and self.headers.get("Authorization") != f"Bearer {key}":
                    self._send(401, {"detail": "Missing bearer token"})
                    return False
                return True

            def do_GET(self):
                if self._authorized():
                    self._send(200, {"world_size": world_size})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self._authorized():
                    n = len(body["infer_requests"])
                    choice = {"token_ids": [1, 2], "message": {"content": "x"}, "finish_reason": "stop"}
                    item = {"response": {"choices": [choice], "prompt_token_ids": [5]}}
                    self._send(200, [item] * n)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_the_client_sends_the_key_on_every_call_and_counts_requests_per_server(monkeypatch):
    monkeypatch.setenv(ENV_SERVER_API_KEY, "s3cret")
    a, b = _Server("s3cret", world_size=1), _Server("s3cret", world_size=3)
    try:
        client = RolloutClient([a.url, b.url], decode_batch_size=2, repeat_terminate_enabled=False)
        reqs = [InferRequest(messages=[{"role": "user", "content": str(i)}]) for i in range(8)]
        assert len(client.infer(reqs, DecodeParams(max_tokens=4))) == 8
        assert client.request_counts == {a.url: 2, b.url: 6}  # weighted by world size 1 : 3
        assert client.counts_line() == f"{a.url}=2, {b.url}=6"
        for srv in (a, b):
            assert srv.seen and all(h == "Bearer s3cret" for _, h in srv.seen)
        monkeypatch.setenv(ENV_SERVER_API_KEY, "wrong")
        with pytest.raises(RolloutServerError,
                           match=rf"returned HTTP 401.*{ENV_SERVER_API_KEY}.*does not match"):
            RolloutClient([a.url], decode_batch_size=2, repeat_terminate_enabled=False).world_sizes()
    finally:
        a.close()
        b.close()


def test_reuse_existing_without_a_server_names_both_fixes(tmp_path):
    from coordexp.config.load import compose, to_train_config
    from coordexp.launch.rollout_server import RolloutServer
    from tests.conftest import free_port

    port = free_port()
    cfg = to_train_config(compose(["+experiment=smoke/ab_mixed", "vllm.server.reuse_existing=true",
                                   f"vllm.server.base_urls=[http://127.0.0.1:{port}]"]))
    server = RolloutServer.from_config(cfg, model_dir=tmp_path, log_path=tmp_path / "server.log")
    with pytest.raises(ServerStartError) as err:
        server.start()
    assert str(err.value) == (
        f"vllm.server.reuse_existing is true but no healthy server answers http://127.0.0.1:{port}/health/: "
        "start it first (python -m coordexp.launch.server +experiment=<leaf> ..., docs/runbook.md), or set "
        "vllm.server.reuse_existing=false to let the run start its own")


def test_a_reused_server_has_no_log_in_the_run_dir(tmp_path, monkeypatch):
    """Its log is where it was started: a failure with a reused server shows no tail of a file that does not
    exist (it printed "--- last 40 lines of <run>/server/swift_rollout.0.log --- (no server log)")."""
    from coordexp.launch import servers as servers_mod

    monkeypatch.setattr(servers_mod, "start_all", lambda started: None)
    reused = servers_mod.ServerSet.start(cfg_of("vllm.server.reuse_existing=true"), tmp_path, tmp_path, "run")
    assert [(s.log_path, s.describe()["log"]) for s in reused.servers] == [(None, None)]
    assert reused.servers[0]._fail("HTTP 401").args == ("HTTP 401",)
    started = servers_mod.ServerSet.start(cfg_of(), tmp_path, tmp_path, "run")
    assert [s.log_path.name for s in started.servers] == ["swift_rollout.log"]
