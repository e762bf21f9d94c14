"""End to end: a real (short) smoke training run (``rollout=hf``), then `coordexp.plot` on its metrics.jsonl
and `coordexp.eval` on its checkpoint, in-process (``rollout=hf``) and through a real ``swift rollout`` server
(the smoke leaf's default, ``rollout=vllm_server``). Also the CLIs' error paths, and the eval server's
teardown on failure and on SIGTERM (a fake server program, as in test_launcher_faults.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.integration.test_launcher_faults import FAKE_SERVER, HARNESS, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def _env(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2", **extra}


def _run(args, timeout=300, **env):
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def _ok(proc):
    assert proc.returncode == 0, (f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                                  f"--- stderr\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def smoke_run(small_run) -> Path:
    """The session's small run (tests/integration/conftest.py; made once per suite)."""
    return small_run[0]


@pytest.mark.slow
def test_smoke_run_writes_eval_artifacts_and_picks_a_best_checkpoint(smoke_run):
    records = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_rollout/f1" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        for key in ("eval_rollout/f1_iou50", "eval_rollout/f1_iou50_95", "eval_rollout/precision_iou50",
                    "eval_rollout/recall_iou50", "eval_rollout/duplicate_rate",
                    "eval_rollout/forced_eos_rate", "eval_rollout/desc_match_iou50"):
            assert 0.0 <= r[key] <= 1.0, key
        assert not any("/_f1@" in k for k in r)
    state = json.loads((smoke_run / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] is not None
    assert Path(state["best_model_checkpoint"]).name in ("checkpoint-2", "checkpoint-4")
    assert state["best_metric"] == max(r["eval_rollout/f1"] for r in evals)
    for step in (2, 4):
        md = (smoke_run / "qualitative" / f"step-{step}.md").read_text()
        assert md.startswith(f"# in-training eval, step {step}")
        assert md.count("\n## val.jsonl:") == 8  # one rank holds all 8 samples
        pngs = sorted((smoke_run / "viz" / f"step-{step}").glob("*.png"))
        assert len(pngs) == 4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(smoke_run / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("eval_viz/0")] == [2, 4]


@pytest.mark.slow
def test_plot_on_the_smoke_run(smoke_run):
    proc = _ok(_run(["-m", "coordexp.plot", str(smoke_run)], timeout=120))
    out = smoke_run / "training_curves.png"
    assert proc.stdout.strip() == str(out)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (1300, 850)


@pytest.mark.slow
def test_eval_cli_on_the_smoke_checkpoint(smoke_run, tmp_path):
    out = tmp_path / "eval"
    proc = _ok(_run(["-m", "coordexp.eval", "+experiment=smoke/ab_mixed", "rollout=hf", "model.kind=local",
                     f"model.path={smoke_run / 'checkpoint-4'}", "data.synthetic.val_samples=8",
                     "rollout_matching.decode_batch_size=8", "rollout_matching.max_new_tokens=48",
                     f"hydra.run.dir={out}"]))
    assert "IoU 0.5:" in proc.stdout and "COCO AP:" in proc.stdout
    report = json.loads((out / "eval_report.json").read_text())
    assert report["checkpoint"].endswith("checkpoint-4") and report["global_step"] == 4
    assert report["split"]["samples"] == 8
    for key in ("precision@0.5", "recall@0.5", "f1@0.5", "desc_match@0.5", "f1@[.5:.95]", "AP_score_constant",
                "AP_score_coord_prob", "invalid_rollout_rate", "parse_truncated_rate", "duplicate_rate",
                "forced_eos_rate"):
        assert key in report["summary"], key
    assert set(report["detection"]["per_threshold"]) == {f"{0.5 + 0.05 * i:.2f}" for i in range(10)}
    assert report["counts"]["rollouts"] == 8 and report["counts"]["unscored_predictions"] == 0
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8
    assert report["counts"]["pred_objects"] == sum(len(p["pred"]) for p in predictions)
    assert all(p["score"] is not None and 0 <= p["score"] <= 1 for r in predictions for p in r["pred"])
    assert (out / "qualitative" / "eval.md").is_file() and len(list((out / "viz").glob("*.png"))) == 4
    # same checkpoint, same greedy decode, same held-out samples: the CLI reproduces the in-training eval
    last = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()
            if '"eval_rollout/f1"' in line][-1]
    assert report["detection"]["training_gate"]["f1"] == pytest.approx(last["eval_rollout/f1"])
    assert report["summary"]["f1@0.5"] == pytest.approx(last["eval_rollout/f1_iou50"])
    assert report["summary"]["f1@[.5:.95]"] == pytest.approx(last["eval_rollout/f1_iou50_95"])
    summary = report["summary"]
    assert summary["invalid_rollout_rate"] == pytest.approx(last["eval_rollout/invalid_rollout_rate"])
    assert report["gen_new_tokens"]["mean"] == pytest.approx(last["eval_rollout/gen_new_tokens_mean"])
    assert summary["desc_match@0.5"] == pytest.approx(last["eval_rollout/desc_match_iou50"])
    assert report["settings"]["backend"] == "hf" and "server" not in report


@pytest.mark.slow
def test_eval_cli_through_the_rollout_server(smoke_run, tmp_path, group_members):
    """The smoke leaf's default backend: the eval starts a real server for the checkpoint, rolls out through
    it without weight sync (it serves the checkpoint itself), reproduces the in-training eval (greedy,
    float32) and leaves no process behind."""
    out, port = tmp_path / "eval", free_port()
    proc = _ok(_run(["-m", "coordexp.eval", "+experiment=smoke/ab_mixed", "model.kind=local",
                     f"model.path={smoke_run / 'checkpoint-4'}", "data.synthetic.val_samples=8",
                     "rollout_matching.decode_batch_size=8", "rollout_matching.max_new_tokens=48",
                     f"vllm.server.base_urls=[http://127.0.0.1:{port}]", f"hydra.run.dir={out}"],
                    timeout=600, TORCHINDUCTOR_CACHE_DIR=str(REPO_ROOT / ".cache" / "torchinductor")))
    assert "COCO AP:" in proc.stdout and "repeat-terminate probe passed" in proc.stderr
    assert "[coordexp weight sync]" not in proc.stderr and not (out / "weight_sync").exists()
    report = json.loads((out / "eval_report.json").read_text())
    assert report["settings"]["backend"] == "vllm" and report["repeat_terminate_active"] == 1
    srv = report["server"]
    assert srv["started_here"] and srv["probe"]["passed"] and srv["base_url"] == f"http://127.0.0.1:{port}"
    assert Path(srv["model"]) == (smoke_run / "checkpoint-4").resolve()
    assert srv["command"][-4:] == ["--model_type", "qwen2", "--template", "chatml"]  # a tiny-model checkpoint
    assert "repeat-terminate injection active" in Path(srv["log"]).read_text()
    assert Path(srv["log"]) == out / "server" / "swift_rollout.log"
    assert report["counts"]["rollouts"] == 8 and report["counts"]["unscored_predictions"] == 0
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 8
    last = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()
            if '"eval_rollout/f1"' in line][-1]
    assert report["detection"]["training_gate"]["f1"] == pytest.approx(last["eval_rollout/f1"])
    assert report["summary"]["f1@0.5"] == pytest.approx(last["eval_rollout/f1_iou50"])
    assert report["gen_new_tokens"]["mean"] == pytest.approx(last["eval_rollout/gen_new_tokens_mean"])
    assert group_members(srv["pgid"]) == []


@pytest.fixture
def fake_server_eval(tmp_path):
    """``python -m coordexp.eval`` with the server program swapped for test_launcher_faults' fake one."""
    fake, script = tmp_path / "fake_swift_rollout.py", tmp_path / "eval_harness.py"
    fake.write_text(FAKE_SERVER)
    script.write_text(HARNESS.format(fake=str(fake)))

    def start(mode, out):
        cmd = [sys.executable, str(script), "+experiment=smoke/ab_mixed", "model.tiny_stage1_steps=0",
               "data.synthetic.val_samples=4", "rollout_matching.max_new_tokens=16",
               "rollout_matching.repeat_terminate.enabled=false", "vllm.server.startup_timeout_s=120",
               f"vllm.server.base_urls=[http://127.0.0.1:{free_port()}]", f"hydra.run.dir={out}"]
        return subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(FAKE_MODE=mode, HARNESS_MODULE="coordexp.eval"),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    return start


def _server_pgid(tmp_path: Path, deadline_s: float = 120.0) -> int:
    """The process group of the running fake server of ``tmp_path`` (its leader runs the fake program)."""
    fake, log = (str(tmp_path / "fake_swift_rollout.py").encode(),
                 tmp_path / "eval" / "server" / "swift_rollout.log")
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if log.is_file() and "fake swift rollout starting" in log.read_text():
            for d in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{d}/cmdline", "rb") as fh:
                        if fh.read().split(b"\0")[1:2] == [fake]:
                            return os.getpgid(int(d))
                except OSError:
                    continue
        time.sleep(0.1)
    raise AssertionError(f"no fake server wrote {log}")


@pytest.mark.slow
def test_eval_server_failure_is_clear_and_stops_the_server(fake_server_eval, tmp_path, group_members):
    out = tmp_path / "eval"
    proc = fake_server_eval("malformed", out)
    try:
        pgid = _server_pgid(tmp_path)
        code = proc.wait(timeout=240)
        text = proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 2, text[-3000:]
    assert "error: rollout server failure: malformed /infer/ response: body must be a JSON list" in text
    assert "--- last lines of " in text and "fake swift rollout starting: malformed" in text  # the log tail
    assert "Traceback" not in text and not (out / "eval_report.json").exists()
    assert group_members(pgid) == []


@pytest.mark.slow
def test_sigterm_during_eval_stops_the_server(fake_server_eval, tmp_path, group_members):
    out = tmp_path / "eval"
    proc = fake_server_eval("hang", out)  # never healthy: the eval waits for it
    try:
        pgid = _server_pgid(tmp_path)
        assert group_members(pgid)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 128 + signal.SIGTERM, proc.stdout.read()[-3000:]
    assert group_members(pgid) == []


def test_eval_cli_errors_are_clear(tmp_path):
    proc = _run(["-m", "coordexp.eval", "+experiment=smoke/ab_mixed", "model.kind=local",
                 f"model.path={tmp_path / 'nope'}", f"hydra.run.dir={tmp_path / 'out'}"], timeout=120)
    assert proc.returncode == 2
    assert "error: model.path" in proc.stderr and "no config.json" in proc.stderr
    proc = _run(["-m", "coordexp.eval", "model.kind=local"], timeout=120)
    assert proc.returncode != 0 and "no experiment selected" in proc.stderr
    proc = _run(["-m", "coordexp.eval", "+experiment=smoke/ab_mixed", "data.val_jsonl=/nonexistent.jsonl",
                 f"hydra.run.dir={tmp_path / 'out2'}"], timeout=120)
    assert proc.returncode == 2 and "data.val_jsonl: '/nonexistent.jsonl' does not exist" in proc.stderr
    # rollout=vllm_server: problems fail before the server
    assert "starting rollout server" not in proc.stderr
    # your own data: an evaluation needs data.val_jsonl only (data.train_jsonl is a training key)
    proc = _run(["-m", "coordexp.eval", "+experiment=smoke/ab_mixed", "data=jsonl",
                 "model.tiny_stage1_steps=0", "data.val_jsonl=/nonexistent.jsonl",
                 f"hydra.run.dir={tmp_path / 'out4'}"], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "data.val_jsonl: '/nonexistent.jsonl' does not exist" in proc.stderr, proc.stderr
    # the server's port is taken: exit 3, as coordexp.train, before anything starts
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        proc = _run(["-m", "coordexp.eval", "+experiment=smoke/ab_mixed", "model.tiny_stage1_steps=0",
                     f"vllm.server.base_urls=[http://127.0.0.1:{port}]",
                     f"hydra.run.dir={tmp_path / 'out3'}"],
                    timeout=120)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert f"error: port {port} on 127.0.0.1 is already in use" in proc.stderr
    assert "starting rollout server" not in proc.stderr


def test_plot_cli_error_on_a_dir_without_metrics(tmp_path):
    proc = _run(["-m", "coordexp.plot", str(tmp_path)], timeout=120)
    assert proc.returncode == 2 and "no metrics file" in proc.stderr


def test_ctrl_c_during_the_rollouts_ends_the_eval_with_130_and_no_traceback(tmp_path):
    """SIGINT (Ctrl-C) while coordexp.eval rolls out in-process: exit 130, a clean stop, as coordexp.train."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "coordexp.eval", "+experiment=smoke/ab_mixed", "rollout=hf",
         "model.tiny_stage1_steps=0", "data.synthetic.val_samples=400", "data.val_sample_limit=400",
         f"hydra.run.dir={tmp_path / 'eval'}"],
        cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # the rollouts start right after this line
            if line.startswith("coordexp.eval: 400 samples"):
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert not (tmp_path / "eval" / "eval_report.json").exists()
