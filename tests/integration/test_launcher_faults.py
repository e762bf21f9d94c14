"""Orchestrator-level faults: ``python -m coordexp.train ... rollout=vllm_server`` as a user runs it.

Real orchestrator, real learner (in-process or a torchrun group), and - for the faults that need a server
to misbehave - a *fake* ``swift rollout`` program: a small HTTP server that speaks the routes the learner
uses (``/health/``, ``/get_world_size/``, ``/infer/`` answering the learner's own chat-template prompt ids,
``/coordexp/load_weights/``, ``/reset_prefix_cache/``) and can crash, hang, answer garbage or stall a weight
sync. The harness only swaps the program the orchestrator execs (``rollout_server.build_command``);
everything else is the production path. Faults that need no server (bad model path, port in use) run
against the unmodified entry point.

Each case checks: non-zero exit, a message naming the cause, and that no process of the run is left
(process groups recorded in ``run_metadata.json`` plus a scan of /proc for the run's ``COORDEXP_RUN_ID``).
The real-server counterpart (repeat-terminate probe, real weight sync, torchrun E2E) is in
``test_launcher_e2e.py`` and ``test_launcher_weight_sync.py``; RolloutServer-level faults are in
``test_swift_rollout_server.py``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]

FAKE_SERVER = textwrap.dedent("""
    import json, os, sys, time, subprocess
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    args = sys.argv[1:]
    port = int(args[args.index("--port") + 1])
    model = args[args.index("--model") + 1]
    mode = os.environ.get("FAKE_MODE", "ok")
    print("fake swift rollout starting:", mode, flush=True)
    child = subprocess.Popen(["sleep", "600"])  # a grandchild in the server's process group
    if mode == "crash":
        print("boom: simulated engine failure while loading the model", flush=True)
        sys.exit(7)
    if mode == "hang":
        time.sleep(600)
    first_start = not os.path.exists(__file__ + ".started")
    open(__file__ + ".started", "a").close()
    if mode == "port_taken" or (mode == "port_race" and first_start):
        import socket
        engine_port = socket.socket()  # what vLLM's engine does with an ephemeral port: bind it
        engine_port.bind(("127.0.0.1", port))
        try:
            ThreadingHTTPServer(("127.0.0.1", port), BaseHTTPRequestHandler)
        except OSError as e:  # uvicorn's own line for a failed bind
            print(f"ERROR:    [Errno {e.errno}] error while attempting to bind on address "
                  f"{('127.0.0.1', port)!r}: {e.strerror.lower()}", flush=True)
            sys.exit(3)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model)
    EOS = tok.eos_token_id
    ANSWER = tok('{"objects": []}', add_special_tokens=False)["input_ids"] + [EOS]
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *a):
            pass
        def _send(self, obj, code=200):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        def do_GET(self):
            if self.path.startswith("/coordexp/identity"):
                return self._send({"nonce": os.environ.get("COORDEXP_SERVER_NONCE"), "pid": os.getpid(),
                                   "model": None, "weights_root": os.environ.get("COORDEXP_WEIGHTS_ROOT"),
                                   "loaded": None})
            self._send({"status": "ok"} if self.path.startswith("/health") else {"world_size": 1})
        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n) or b"null")
            if self.path.startswith("/coordexp/load_weights"):
                print("load_weights", body["path"], flush=True)
                if mode == "sync_hang":
                    time.sleep(600)
                return self._send({"workers": [{"tensors": 1, "how": "fake"}], "seconds": 0.0})
            if self.path.startswith("/reset_prefix_cache"):
                return self._send({"message": "ok"})
            if mode == "malformed":
                return self._send({"oops": "this is not a list of outputs"})
            out = []
            for req in body["infer_requests"]:
                text = tok.apply_chat_template(req["messages"], tokenize=False, add_generation_prompt=True)
                ids = tok(text, add_special_tokens=False)["input_ids"]
                choice = {"index": 0, "message": {"role": "assistant", "content": tok.decode(ANSWER)},
                          "finish_reason": "stop", "token_ids": ANSWER}
                chat = {"prompt_token_ids": ids, "choices": [choice]}
                out.append({"response": {"response": chat, "rollout_infos": {}},
                            "coordexp": {"repeat_terminate_triggered": 0}})
            print("infer", len(out), flush=True)
            self._send(out)
    ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
""")

HARNESS = textwrap.dedent("""
    import sys
    import coordexp.launch.rollout_server as server
    _orig = server.build_command
    server.build_command = lambda spec: [sys.executable, {fake!r}] + _orig(spec)[3:]
    import os, runpy
    module = os.environ.get("HARNESS_MODULE", "coordexp.train")
    sys.argv = [module] + sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
""")

# Small and fast: random tiny model (no Stage-1 build), tiny data, Channel B every step, no eval/checkpoints.
FAST = [
    "+experiment=smoke/ab_mixed",
    "rollout=vllm_server",
    "model.tiny_stage1_steps=0",
    "stage2_ab.schedule.b_ratio=1.0",
    "training.eval_strategy=no",
    "training.save_strategy=no",
    "data.synthetic.train_samples=64",
    "rollout_matching.max_new_tokens=16",
    "training.effective_batch_size=4",
    "training.per_device_train_batch_size=4",
    "rollout_matching.decode_batch_size=4",
    "rollout_matching.repeat_terminate.enabled=false",
    "vllm.server.startup_timeout_s=60",
    "vllm.server.infer_timeout_s=10",
]


def run_processes(run_id: str) -> list[int]:
    """Live PIDs whose environment carries COORDEXP_RUN_ID=<run_id> (the server and learner processes)."""
    needle = f"COORDEXP_RUN_ID={run_id}".encode()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    with open(f"/proc/{d}/stat") as st:
                        if st.read().rsplit(")", 1)[1].split()[0] != "Z":
                            out.append(int(d))
        except OSError:
            continue
    return out


@pytest.fixture
def harness(tmp_path):
    fake = tmp_path / "fake_swift_rollout.py"
    fake.write_text(FAKE_SERVER)
    script = tmp_path / "orchestrator.py"
    script.write_text(HARNESS.format(fake=str(fake)))
    return script


def orchestrate(script, run_dir, *overrides, port=None, mode="ok", popen=False, timeout=300):
    port = port or free_port()
    flags = [o for o in overrides if o.startswith("-")]  # e.g. -m: before the overrides (argparse)
    overrides = [o for o in overrides if not o.startswith("-")]
    cmd = [
        sys.executable,
        str(script) if script else "-m",
        *([] if script else ["coordexp.train"]),
        *flags,
        f"hydra.run.dir={run_dir}",
        *FAST,
        f"vllm.server.base_urls=[http://127.0.0.1:{port}]",
        *overrides,
    ]
    env = {**os.environ, "FAKE_MODE": mode, "PYTHONUNBUFFERED": "1"}
    if popen:
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    t0 = time.monotonic()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out.seconds = time.monotonic() - t0
    out.all = out.stdout + out.stderr
    return out


def launcher_meta(run_dir: Path) -> dict:
    return json.loads((run_dir / "run_metadata.json").read_text())["launcher"]


def assert_nothing_left(run_dir: Path, group_members, wait_s: float = 20.0) -> None:
    meta = launcher_meta(run_dir) if (run_dir / "run_metadata.json").is_file() else {}
    pgids = [s.get("pgid") for s in meta.get("servers", [])] + [meta.get("learner", {}).get("pgid")]
    run_id = meta.get("run_id")
    deadline = time.monotonic() + wait_s
    while True:
        left = {g: group_members(g) for g in pgids if g}
        left = {g: m for g, m in left.items() if m}
        procs = run_processes(run_id) if run_id else []
        if not left and not procs:
            return
        assert time.monotonic() < deadline, (
            f"processes of the run still alive: groups {left}, run pids {procs}"
        )
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------ no server needed


def test_bad_model_path_fails_before_anything_starts(tmp_path):
    run_dir = tmp_path / "run"
    out = orchestrate(
        None, run_dir, "model=local", "model.path=/nonexistent/checkpoint", "model.dtype=float32"
    )
    assert out.returncode == 2, out.all[-3000:]
    assert "model.path '/nonexistent/checkpoint' is not a checkpoint directory" in out.all
    assert "nothing was started" in out.all and "starting rollout server" not in out.all


def test_port_in_use_fails_fast_and_names_the_port(tmp_path, group_members):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        out = orchestrate(None, tmp_path / "run", port=port)
    assert out.returncode == 3, out.all[-3000:]
    assert f"port {port} on 127.0.0.1 is already in use" in out.all
    assert "reuse_existing=true" in out.all


# ----------------------------------------------------------------------------------------------- fake server


@pytest.mark.slow
def test_server_exiting_during_start_reports_code_and_log_tail(harness, tmp_path):
    out = orchestrate(harness, tmp_path / "run", mode="crash")
    assert out.returncode == 3, out.all[-3000:]
    assert re.search(r"rollout server http://127\.0\.0\.1:\d+ exited with code 7 before becoming healthy",
                     out.all)
    assert "boom: simulated engine failure while loading the model" in out.all  # the server log tail


@pytest.mark.slow
def test_a_port_lost_during_the_start_starts_the_server_once_more(harness, tmp_path, group_members):
    run_dir = tmp_path / "run"
    out = orchestrate(harness, run_dir, "training.max_steps=1", mode="port_race")
    assert out.returncode == 0, out.all[-3000:]
    lines = out.all.splitlines()
    (i,) = [i for i, ln in enumerate(lines) if "lost port" in ln]
    assert re.fullmatch(r"\[coordexp server\] http://127\.0\.0\.1:(\d+) lost port \1 to another process "
                        r"during its start", lines[i]), lines[i]
    assert lines[i + 1] == "[coordexp server] starting the rollout server(s) once more", lines[i + 1]
    log = (run_dir / "server" / "swift_rollout.log").read_text()
    assert log.count("fake swift rollout starting") == 2 and log.count("address already in use") == 1
    assert_nothing_left(run_dir, group_members)


@pytest.mark.slow
def test_a_port_lost_twice_fails_with_the_fix(harness, tmp_path, group_members):
    run_dir = tmp_path / "run"
    out = orchestrate(harness, run_dir, mode="port_taken")
    assert out.returncode == 3, out.all[-3000:]
    assert out.all.count("once more") == 1
    assert "Fix: choose a port below that range in vllm.server.base_urls (8000 is)" in out.all
    assert "Traceback" not in out.all
    assert_nothing_left(run_dir, group_members)


@pytest.mark.slow
def test_server_never_healthy_hits_the_deadline(harness, tmp_path, group_members):
    out = orchestrate(harness, tmp_path / "run", "vllm.server.startup_timeout_s=5", mode="hang")
    assert out.returncode == 3, out.all[-3000:]
    assert "not healthy within vllm.server.startup_timeout_s=5 s" in out.all
    assert "waiting for http://127.0.0.1:" in out.all or out.seconds < 20  # progress lines every 10 s
    assert out.seconds < 60


@pytest.mark.slow
def test_malformed_infer_response_fails_the_learner_with_the_field(harness, tmp_path, group_members):
    run_dir = tmp_path / "run"
    out = orchestrate(harness, run_dir, "training.max_steps=2", mode="malformed")
    assert out.returncode == 2, out.all[-3000:]
    assert re.search(r"error: rollout server failure: malformed /infer/ response: body must be a JSON list.*"
                     r"\(optimizer step 0\)", out.all), out.all[-3000:]
    assert launcher_meta(run_dir)["exit_code"] == 2
    assert_nothing_left(run_dir, group_members)


@pytest.mark.slow
def test_weight_sync_timeout_fails_with_the_timeout(harness, tmp_path, group_members):
    run_dir = tmp_path / "run"
    out = orchestrate(harness, run_dir, "training.max_steps=3", "vllm.sync.timeout_s=4", mode="sync_hang")
    assert out.returncode == 2, out.all[-3000:]
    assert "coordexp/load_weights/" in out.all and "timed out after" in out.all
    assert "vllm.sync.timeout_s" in out.all and "(optimizer step 1)" in out.all
    # step 0 needed no sync (fresh server, initial weights); step 1 did and stalled
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1]
    assert_nothing_left(run_dir, group_members)


def wait_for_first_metrics(proc, run_dir: Path, timeout_s: float = 240) -> None:
    """Until the learner logged its first step (the run is in full flight); fails if the run ends first."""
    deadline = time.monotonic() + timeout_s
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.3)


@pytest.mark.slow
def test_server_killed_mid_training_stops_the_learner_quickly(harness, tmp_path, group_members):
    run_dir = tmp_path / "run"
    proc = orchestrate(harness, run_dir, "training.max_steps=200", popen=True)
    try:
        wait_for_first_metrics(proc, run_dir)
        pgid = launcher_meta(run_dir)["servers"][0]["pgid"]
        os.killpg(pgid, signal.SIGKILL)
        t_kill = time.monotonic()
        code = proc.wait(timeout=60)
        elapsed = time.monotonic() - t_kill
        text = proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 2, text[-3000:]
    assert elapsed < 2 * 10, elapsed  # within 2x vllm.server.infer_timeout_s
    assert ("rollout server failure" in text and "/infer/" in text) or "weight sync: POST" in text, text[
        -3000:
    ]
    assert "exited with code -9" in text  # the orchestrator names the dead server
    assert_nothing_left(run_dir, group_members)


@pytest.mark.slow
@pytest.mark.parametrize("sig, nproc", [(signal.SIGINT, 1), (signal.SIGTERM, 2)])
def test_signal_to_orchestrator_tears_down_the_whole_run(harness, tmp_path, group_members, sig, nproc):
    run_dir = tmp_path / "run"
    proc = orchestrate(
        harness,
        run_dir,
        "training.max_steps=500",
        f"training.nproc_per_node={nproc}",
        "training.effective_batch_size=8",
        popen=True,
    )
    try:
        wait_for_first_metrics(proc, run_dir)
        meta = launcher_meta(run_dir)
        assert meta["learner"]["mode"] == ("torchrun" if nproc > 1 else "in_process")
        assert run_processes(meta["run_id"]), "the run's processes must be visible before the signal"
        proc.send_signal(sig)
        code = proc.wait(timeout=40)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 128 + sig, proc.stdout.read()[-3000:]
    assert launcher_meta(run_dir)["exit_code"] == 128 + sig  # recorded although the run ended by a signal
    assert_nothing_left(run_dir, group_members, wait_s=20)
    assert not group_members(proc.pid)


@pytest.mark.slow
def test_server_cli_serves_until_signal_and_a_run_reuses_it(harness, tmp_path, group_members):
    """``python -m coordexp.launch.server`` (same lifecycle code) keeps a server up; a run with
    ``reuse_existing=true`` uses it, pushes its weights before its first rollout (the server's weights are
    unknown to it) and leaves it running; SIGTERM then stops the server's whole group."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "FAKE_MODE": "ok",
        "HARNESS_MODULE": "coordexp.launch.server",
        "PYTHONUNBUFFERED": "1",
    }
    cli = subprocess.Popen(
        [
            sys.executable,
            str(harness),
            "--log",
            str(tmp_path / "cli.log"),
            "--weights-root",  # the run dir below is under it: the reusing run is accepted
            str(tmp_path),
            "+experiment=smoke/ab_mixed",
            "rollout=vllm_server",
            "model.tiny_stage1_steps=0",
            f"vllm.server.base_urls=[{url}]",
            "rollout_matching.repeat_terminate.enabled=false",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        lines = []
        for line in cli.stdout:
            lines.append(line)
            if "SIGINT/SIGTERM stops it" in line:
                break
        assert cli.poll() is None, "".join(lines)[-3000:]
        pgid = int(line.split("process group ")[1].split(",")[0])
        assert group_members(pgid)
        run_dir = tmp_path / "run"
        out = orchestrate(
            harness, run_dir, "training.max_steps=2", "vllm.server.reuse_existing=true", port=port
        )
        assert out.returncode == 0, out.all[-3000:]
        meta = launcher_meta(run_dir)
        assert meta["servers"][0]["started_here"] is False and meta["server_fresh"] is False
        assert "[coordexp weight sync] step 0:" in out.all  # a reused server's weights are unknown
        assert group_members(pgid), "the run must not stop a server it reused"
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 20
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not group_members(pgid)
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)


def test_server_cli_on_a_busy_port_names_its_own_way_out(harness, tmp_path):
    """The server CLI never reuses a server (it forces vllm.server.reuse_existing=false): its busy-port error
    names what it can do instead, not the runs' reuse switch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        out = subprocess.run(
            [sys.executable, str(harness), "+experiment=smoke/ab_mixed", "rollout=vllm_server",
             "model.tiny_stage1_steps=0", f"vllm.server.base_urls=[http://127.0.0.1:{port}]"],
            cwd=REPO, env={**os.environ, "FAKE_MODE": "ok", "HARNESS_MODULE": "coordexp.launch.server"},
            capture_output=True, text=True, timeout=300)
    assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-2000:]
    assert (f"port {port} on 127.0.0.1 is already in use: stop whatever listens there (a coordexp server "
            "already running there serves runs with vllm.server.reuse_existing=true as it is), or serve "
            "another port with --base-url") in out.stdout + out.stderr
