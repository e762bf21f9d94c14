"""Weight sync, learner side: what is written, what is posted, when a sync happens, how it fails, and the
DDP choreography (barrier, rank-0 push, outcome broadcast) on a real 2-process gloo group. The server side
(real vLLM worker loading the file) is proven in tests/integration/test_launcher_weight_sync.py."""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from coordexp.protocol import ENV_INITIAL_WEIGHTS, LOAD_WEIGHTS_ROUTE
from coordexp.trainer.sync_transport import (
    FileTransport,
    SyncReport,
    WeightSyncError,
    flatten_bucket,
    named_weights,
    write_weights_file,
)
from coordexp.trainer.weight_sync import WeightSync
from tests.conftest import free_port


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_named_weights_dedups_tied_and_casts():
    m = Tied()
    w = named_weights(m, "bfloat16")
    assert set(w) == {"embed.weight", "proj.weight", "proj.bias"}  # the tied head once
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in w.values())
    assert named_weights(m)["proj.weight"].dtype == torch.float32


def test_weights_file_roundtrip_is_atomic(tmp_path):
    from safetensors.torch import load_file

    w = named_weights(Tied())
    path = tmp_path / "ws" / "step-00000001.safetensors"
    n = write_weights_file(w, path, metadata={"coordexp_step": "1"})
    assert n == path.stat().st_size and sorted(p.name for p in path.parent.iterdir()) == [path.name]
    back = load_file(str(path))
    assert set(back) == set(w) and all(torch.equal(back[k], w[k]) for k in w)


def test_flatten_bucket_matches_ms_swift_layout():
    from swift.rlhf_trainers import utils  # ms-swift: the layout its NCCL route expects

    named = [
        ("a", torch.randn(3, 4)),
        ("b", torch.arange(5, dtype=torch.int64)),
        ("c", torch.randn(2).half()),
    ]
    metas, flat = flatten_bucket(named)
    ref = utils.FlattenedTensorBucket(named_tensors=named)
    assert torch.equal(flat, ref.get_flattened_tensor())
    assert metas == [{**m.model_dump(), "shape": list(m.shape)} for m in ref.get_metadata()]
    rebuilt = utils.FlattenedTensorBucket(
        metadata=[utils.FlattenedTensorMetadata(**m) for m in metas], flattened_tensor=flat
    ).reconstruct_tensors()
    assert all(torch.equal(rebuilt[k], v) for k, v in named)


# ----------------------------------------------------------------------------------------------- HTTP side


class FakeServer:
    """A thread HTTP server recording the weight-sync calls; ``delay`` stalls /coordexp/load_weights/."""

    def __init__(self, delay=0.0, status=200):
        calls = self.calls = []

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"null")
                calls.append((self.path, body))
                if self.path == LOAD_WEIGHTS_ROUTE:
                    time.sleep(delay)
                    code, out = status, {"workers": [{"tensors": 3}], "seconds": 0.0}
                else:
                    code, out = 200, {"message": "ok"}
                data = json.dumps(out).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake():
    servers = []

    def make(**kw):
        s = FakeServer(**kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def test_file_transport_writes_posts_resets_and_prunes(fake, tmp_path):
    a, b = fake(), fake()
    sync = WeightSync(FileTransport([a.url, b.url], tmp_path / "ws"), timeout_s=30, log=lambda m: None)
    model = Tied()
    assert sync.needed(0)
    rep = sync.maybe_sync(lambda: model, 0)
    assert not sync.needed(0) and sync.maybe_sync(lambda: model, 0) is None  # no second push for step 0
    for s in (a, b):
        (path, body), (path2, _) = s.calls
        assert path == LOAD_WEIGHTS_ROUTE and path2 == "/reset_prefix_cache/"
        assert Path(body["path"]).is_absolute() and body["step"] == 0 and 0 < body["timeout_s"] <= 30
    assert rep.bytes == (tmp_path / "ws" / "step-00000000.safetensors").stat().st_size
    sync.maybe_sync(lambda: model, 3)
    assert [p.name for p in (tmp_path / "ws").iterdir()] == [
        "step-00000003.safetensors"
    ]  # keep the last only


def test_http_timeout_names_the_route_and_the_setting(fake, tmp_path):
    slow = fake(delay=5.0)
    sync = WeightSync(FileTransport([slow.url], tmp_path / "ws"), timeout_s=1.0, log=lambda m: None)
    t0 = time.monotonic()
    with pytest.raises(
        WeightSyncError, match=r"coordexp/load_weights/ .* timed out after .*vllm\.sync\.timeout_s"
    ):
        sync.maybe_sync(Tied, 1)
    assert time.monotonic() - t0 < 4
    assert sync.needed(1)  # a failed sync does not count


def test_missing_route_says_the_plugin_is_missing(fake, tmp_path):
    s = fake(status=404)
    sync = WeightSync(FileTransport([s.url], tmp_path / "ws"), timeout_s=10, log=lambda m: None)
    with pytest.raises(WeightSyncError, match="started without the coordexp plugin"):
        sync.maybe_sync(Tied, 1)
    dead = "http://127.0.0.1:9"  # nothing listens on the discard port
    sync = WeightSync(FileTransport([dead], tmp_path / "ws2"), timeout_s=10, log=lambda m: None)
    with pytest.raises(WeightSyncError, match=r"POST http://127.0.0.1:9/coordexp/load_weights/ .* failed"):
        sync.maybe_sync(Tied, 1)


def test_log_names_the_first_sync_then_one_in_50():
    class Transport:  # a push that always works, instantly
        name, base_urls = "file", ["http://a:1"]

        def push(self, model, step, deadline):
            return SyncReport(step, 0.01, 2**20, self.name)

    lines = []
    sync = WeightSync(Transport(), timeout_s=10, log=lines.append)
    for step in range(1, 121):
        assert sync.maybe_sync(lambda: None, step).step == step
    assert len(sync.reports) == 120
    assert lines == [
        ("[coordexp weight sync] step 1: pushed 1.00 MiB over file to 1 server(s) in 0.01 s; from now on one "
         "line per 50 syncs"),
        "[coordexp weight sync] step 51: pushed 1.00 MiB over file to 1 server(s) in 0.01 s (sync 51)",
        "[coordexp weight sync] step 101: pushed 1.00 MiB over file to 1 server(s) in 0.01 s (sync 101)",
    ]


def _cfg(mode="full", transport="file", urls=("http://127.0.0.1:1",)):
    """The sync part of a RolloutContract (what WeightSync.from_contract reads)."""
    return SimpleNamespace(sync_mode=mode, sync_transport=transport, sync_timeout_s=7.0, sync_bucket_mib=512,
                           server_dtype="float32", server_base_urls=tuple(urls))


def test_initial_weights_only_when_the_orchestrator_says_so(tmp_path, monkeypatch):
    model_dir = tmp_path / "ckpt"
    model_dir.mkdir()
    monkeypatch.delenv(ENV_INITIAL_WEIGHTS, raising=False)
    assert WeightSync.from_contract(_cfg(), tmp_path, str(model_dir)).server_step is None
    monkeypatch.setenv(ENV_INITIAL_WEIGHTS, str(model_dir))
    ws = WeightSync.from_contract(_cfg(), tmp_path, str(model_dir))
    assert ws.server_step == 0 and not ws.needed(0) and ws.needed(1)  # resumed runs start at step > 0: sync
    assert WeightSync.from_contract(_cfg(), tmp_path, str(tmp_path / "other")).server_step is None
    assert WeightSync.from_contract(_cfg(mode="none"), tmp_path, str(model_dir)) is None
    assert ws.transport.sync_dir == (tmp_path / "weight_sync").resolve() and ws.timeout_s == 7.0


# ----------------------------------------------------------------------------------------------- DDP


def _ddp_worker(rank, world, port, url, outdir, fail):
    import torch.distributed as dist

    import coordexp.trainer.weight_sync as ws_mod

    ws_mod.COLLECTIVE_GRACE_S = 1.0
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    timeout = 1.0 if fail == "stuck" else 10.0
    sync = WeightSync(FileTransport([url], Path(outdir) / "ws"), timeout_s=timeout, log=lambda m: None)
    getter = (lambda: (_ for _ in ()).throw(RuntimeError("boom on rank 0"))) if fail == "error" else Tied
    result = {"rank": rank}
    if fail == "stuck" and rank == 0:
        sync._group(dist)  # group creation is collective; then rank 0 is late to the sync itself
        time.sleep(6)
    t0 = time.monotonic()
    try:
        sync.maybe_sync(getter, 4)
        result["ok"] = True
    except WeightSyncError as exc:
        result["error"] = str(exc)
    result["seconds"] = time.monotonic() - t0
    result["needed"] = sync.needed(4)
    Path(outdir, f"r{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("fail", ["", "error", "stuck"])
def test_ddp_rank0_pushes_between_barriers_and_every_rank_sees_the_outcome(fake, tmp_path, fail):
    import torch.multiprocessing as mp

    s = fake()
    mp.start_processes(
        _ddp_worker, args=(2, free_port(), s.url, str(tmp_path), fail), nprocs=2, join=True,
        start_method="spawn"
    )
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1))
    if fail == "error":
        assert r0["error"] == r1["error"] and "boom on rank 0" in r0["error"]
        assert r0["needed"] and r1["needed"] and s.calls == []
    elif (
        fail == "stuck"
    ):  # rank 1 does not wait forever for a rank that never comes (timeout 1 s + grace 1 s)
        assert "rank 1 gave up at the opening barrier" in r1["error"] and r1["seconds"] < 5
        assert "error" in r0 and r0["needed"] and r1["needed"]
    else:
        assert r0["ok"] and r1["ok"] and not r0["needed"] and not r1["needed"]
        assert [p for p, _ in s.calls] == [LOAD_WEIGHTS_ROUTE, "/reset_prefix_cache/"]  # rank 0 only, once
