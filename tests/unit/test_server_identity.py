"""The rules that tell a run whether the server answering its URL is the one it needs
(coordexp.launch.server_identity), over answers shaped like those of the /coordexp/identity/ route."""

from __future__ import annotations

from coordexp.launch.server_identity import foreign_server_problem, reuse_problem

URL = "http://127.0.0.1:8000"


def test_a_started_server_must_answer_with_its_starts_nonce():
    assert foreign_server_problem({"nonce": "ab12", "pid": 7, "model": "/m"}, "ab12", URL, 8000) is None
    other = foreign_server_problem({"nonce": "ff00", "pid": 7, "model": "/ckpt"}, "ab12", URL, 8000)
    assert other == (f"{URL} answers, but not as the rollout server this run started: another server holds "
                     "port 8000 (process 7 serving /ckpt). Fix: stop that server or choose a free port in "
                     "vllm.server.base_urls; to use a server that is already running, set "
                     "vllm.server.reuse_existing=true")
    assert "(not a coordexp server)" in foreign_server_problem(None, "ab12", URL, 8000)
    assert foreign_server_problem({"nonce": None}, "ab12", URL, 8000) is not None  # started by hand


def test_a_reused_server_must_load_the_runs_files_or_still_serve_the_checkpoint(tmp_path):
    runs, ckpt = tmp_path / "runs", tmp_path / "ckpt"
    ckpt.mkdir()
    (tmp_path / "link").symlink_to(ckpt)
    fresh = {"model": str(tmp_path / "link"), "weights_root": str(runs), "loaded": None}
    assert reuse_problem(fresh, URL, str(runs / "run1"), None) is None
    assert reuse_problem(fresh, URL, None, str(ckpt)) is None  # the same folder through a symlink
    outside = reuse_problem(fresh, URL, "/elsewhere/run1", None)
    assert outside.startswith(f"vllm.server.reuse_existing: the server at {URL} cannot load this run's "
                              "weight files: /elsewhere/run1 is outside this server's weights root")
    assert "started without COORDEXP_WEIGHTS_ROOT" in reuse_problem({**fresh, "weights_root": None}, URL,
                                                                     str(runs / "run1"), None)
    fix = (f"drop vllm.server.reuse_existing=true to let the eval start a server from the checkpoint, or "
           f"restart that server from {ckpt}")
    pushed = {**fresh, "loaded": "/runs/run1/weight_sync/step-00000005.safetensors"}
    assert reuse_problem(pushed, URL, None, str(ckpt)) == (
        f"vllm.server.reuse_existing: the server at {URL} holds weights a training run pushed into it "
        f"(/runs/run1/weight_sync/step-00000005.safetensors), not {ckpt}, and an eval pushes none: {fix}")
    assert reuse_problem({**fresh, "model": "/other"}, URL, None, str(ckpt)) == (
        f"vllm.server.reuse_existing: the server at {URL} serves /other, not {ckpt}: {fix}")
    unnamed = reuse_problem({**fresh, "model": None}, URL, None, str(ckpt))
    assert unnamed.endswith(f"serves None, not {ckpt}: {fix}")
    assert reuse_problem(pushed, URL, str(runs / "run1"), None) is None  # a run pushes its own weights
