"""Weight sync: the rollout server rolls out with the learner's *current* weights.

Both ends of the protocol live here, so the file format has one owner:

* learner side, :class:`WeightSync` (used by :class:`coordexp.trainer.server_backend.ServerRolloutBackend`):
  before a rollout (Channel-B step or rollout eval) whose weights changed since the last sync, all ranks
  meet at a barrier, rank 0 pushes the weights, then rank 0 broadcasts the outcome (the second barrier);
  every rank raises :class:`WeightSyncError` if the push failed. The collectives run on a dedicated gloo
  group whose timeout is ``vllm.sync.timeout_s`` (+ a grace for the ranks that wait while rank 0 works);
  rank 0 runs the whole push under a ``vllm.sync.timeout_s`` deadline, and every HTTP call gets the time
  that is left. The prefix cache is reset after every sync (``/reset_prefix_cache/``).
* transport ``file`` (CPU and GPU): rank 0 writes the unique parameters (HF names, cast to the server
  dtype) as one safetensors file into ``<run_dir>/weight_sync/`` and POSTs :data:`LOAD_WEIGHTS_ROUTE`
  ``{"path": ...}`` to each server; the coordexp plugin route sends ``collective_rpc(WORKER_METHOD)`` to
  every rollout worker, and each vLLM worker loads the file in place with vLLM's ``Worker.reload_weights``
  (checkpoint-format HF names; vLLM maps them to its fused layout, shards for TP and re-runs post-load
  processing such as the CPU backend's weight repacking). The file must be readable by the server: same host
  or a shared filesystem.
* transport ``nccl`` (GPU only): ms-swift's own routes (``/init_communicator/``,
  ``/update_flattened_params/``, ``/process_weights_after_loading/``) with a thin client here that puts a
  timeout on every HTTP call and runs each NCCL broadcast on a daemon thread joined with the time left.
  Not testable on CPU (see docs/runbook.md for how to verify it on a GPU node).
* server-worker side, :data:`WORKER_EXTENSION_FQCN`: a vLLM ``worker_extension_cls`` (subclass of ms-swift's
  ``WeightSyncWorkerExtension``, so ms-swift's NCCL routes keep working) that adds :data:`WORKER_METHOD`.
  The coordexp swift plugin installs it through its engine-kwargs hook; it is reached by method name over
  vLLM's ``collective_rpc``, so no pickled callables (no ``VLLM_ALLOW_INSECURE_SERIALIZATION``).

Which weights the server holds: the learner tracks the optimizer step of the weights it last pushed
(weights change only at optimizer steps). Unknown at start, so the first rollout syncs - unless the
orchestrator started the server itself from the very checkpoint the learner loads and says so in
:data:`ENV_INITIAL_WEIGHTS` (the model dir), and the learner is at step 0 (not resumed): then the server is
known to hold step-0 weights and the first sync happens after the first optimizer step.

Importing this module is cheap (no torch, no vLLM, no ms-swift at import time).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ENV_INITIAL_WEIGHTS",
    "LOAD_WEIGHTS_ROUTE",
    "SYNC_DIR_NAME",
    "WORKER_EXTENSION_FQCN",
    "WORKER_METHOD",
    "FileTransport",
    "NcclTransport",
    "SyncReport",
    "WeightSync",
    "WeightSyncError",
    "flatten_bucket",
    "load_weights_file_into",
    "named_weights",
    "write_weights_file",
]

ENV_INITIAL_WEIGHTS = "COORDEXP_SERVER_INITIAL_WEIGHTS"
LOAD_WEIGHTS_ROUTE = "/coordexp/load_weights/"
WORKER_METHOD = "coordexp_load_weights"
WORKER_EXTENSION_FQCN = "coordexp.trainer.weight_sync.CoordexpWorkerExtension"
SYNC_DIR_NAME = "weight_sync"
#: Extra time the non-zero ranks wait at the closing collective beyond vllm.sync.timeout_s (rank 0 needs
#: the whole budget for the push, then still has to reach the collective).
COLLECTIVE_GRACE_S = 30.0
_SERVER_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class WeightSyncError(RuntimeError):
    """A weight sync failed or timed out (the message names the server, the call and the cause)."""


@dataclass
class SyncReport:
    step: int
    seconds: float
    bytes: int = 0
    transport: str = "file"
    servers: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- tensors


def named_weights(model, dtype: str | None = None) -> dict[str, Any]:
    """The model's unique parameters by HF name (tied weights once), detached, contiguous, on CPU, cast to
    ``dtype`` (a torch dtype name) when given."""
    import torch

    target = getattr(torch, dtype) if dtype else None
    out: dict[str, Any] = {}
    for name, p in model.named_parameters():  # named_parameters() already skips tied duplicates
        t = p.detach()
        if target is not None and t.dtype != target and t.is_floating_point():
            t = t.to(target)
        out[name] = t.to("cpu").contiguous()
    return out


def write_weights_file(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` as safetensors, atomically (temp file + rename). Returns the file size."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path.stat().st_size


def load_weights_file_into(worker, path: str) -> dict[str, Any]:
    """Server-worker side: load a weights file written by :func:`write_weights_file` into the vLLM worker's
    model, in place, through vLLM's own reload path (``Worker.reload_weights``: checkpoint-format HF names,
    layer-wise reload that re-runs each layer's post-load processing - needed on CPU, where vLLM repacks
    linear weights after loading, and for quantized layers). Returns what was loaded, for the learner's
    log."""
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    tensors = load_file(path, device="cpu")
    reload = getattr(worker, "reload_weights", None)
    if callable(reload):
        reload(weights_iterator=list(tensors.items()), is_checkpoint_format=True)
        how = "reload_weights"
        tied = _refresh_tied_heads(worker.model_runner.model)
    else:  # older vLLM: plain load_weights, then ms-swift's post-load processing
        model = worker.model_runner.model
        model.load_weights(weights=list(tensors.items()))
        from swift.rlhf_trainers.utils import finish_vllm_weight_reload

        finish_vllm_weight_reload(
            model, model_config=worker.model_runner.model_config, target_device=worker.device, strict=True
        )
        how = "load_weights"
        tied = _refresh_tied_heads(model)
    return {
        "path": path,
        "tensors": len(tensors),
        "how": how,
        "tied_heads_refreshed": tied,
        "seconds": round(time.perf_counter() - t0, 4),
        "pid": os.getpid(),
    }


def _refresh_tied_heads(model) -> int:
    """Re-run post-load processing of an ``lm_head`` tied to the input embeddings.

    vLLM's layer-wise reload copies the new embedding values into the shared tensor, but the tied
    ``lm_head`` receives no weights of its own, so its derived state is not rebuilt: on CPU the oneDNN /
    packed GEMM handle made from the old weights keeps producing the old logits (the server's greedy output
    then differs from the learner's). Returns the number of heads refreshed."""
    try:
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
    except ImportError:
        return 0
    embed_ptrs = {
        m.weight.data_ptr()
        for m in model.modules()
        if isinstance(m, VocabParallelEmbedding)
        and not isinstance(m, ParallelLMHead)
        and getattr(m, "weight", None) is not None
        and not m.weight.is_meta
    }
    n = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        method = getattr(m, "quant_method", None)
        if (
            isinstance(m, ParallelLMHead)
            and w is not None
            and method is not None
            and w.data_ptr() in embed_ptrs
        ):
            method.process_weights_after_loading(m)
            n += 1
    return n


def flatten_bucket(named: Sequence[tuple]) -> tuple:
    """``(metadatas, uint8 tensor)`` in the layout of ms-swift's ``FlattenedTensorBucket`` (what its
    ``/update_flattened_params/`` route expects): per tensor ``name, shape, dtype, start_idx, end_idx,
    numel`` over the bytes of the flattened tensors, concatenated."""
    import torch

    metas, chunks, offset = [], [], 0
    for name, t in named:
        flat = t.contiguous().flatten().view(torch.uint8)
        n = flat.numel()
        metas.append(
            {
                "name": name,
                "shape": list(t.shape),
                "dtype": str(t.dtype),
                "start_idx": offset,
                "end_idx": offset + n,
                "numel": n,
            }
        )
        chunks.append(flat)
        offset += n
    return metas, torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------- HTTP


def _left(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise WeightSyncError(f"weight sync ran out of time (vllm.sync.timeout_s) before {what}")
    return left


def _post(url: str, payload: dict | None, deadline: float, what: str, session=None) -> Any:
    import requests

    left = _left(deadline, f"POST {url}")
    s = session or requests
    try:
        r = s.post(url, json=payload, timeout=(min(10.0, left), left))
    except requests.Timeout:
        raise WeightSyncError(
            f"weight sync: POST {url} ({what}) timed out after {left:.1f} s (vllm.sync.timeout_s); the "
            "server "
            f"is stuck or too slow to load the weights"
        ) from None
    except requests.RequestException as exc:
        raise WeightSyncError(
            f"weight sync: POST {url} ({what}) failed: {exc.__class__.__name__}: {exc}"
        ) from None
    if r.status_code == 404 and LOAD_WEIGHTS_ROUTE in url:
        raise WeightSyncError(
            f"weight sync: {url} does not exist (HTTP 404): the server was started without the coordexp "
            f"plugin (or an older one); start it through coordexp or with --external_plugins "
            f"coordexp/rollout/swift_plugin.py and COORDEXP_ENABLE_VLLM_REPEAT_TERMINATE_INJECTION=1"
        )
    if r.status_code != 200:
        raise WeightSyncError(
            f"weight sync: POST {url} ({what}) returned HTTP {r.status_code}: {r.text[:500]}"
        )
    try:
        return r.json()
    except ValueError:
        raise WeightSyncError(
            f"weight sync: POST {url} ({what}) returned non-JSON: {r.text[:300]!r}"
        ) from None


# ----------------------------------------------------------------------------------------------- transports


class FileTransport:
    """Learner writes safetensors into ``sync_dir``; each server loads it through the plugin route."""

    name = "file"

    def __init__(
        self, base_urls: Sequence[str], sync_dir: Path, dtype: str | None = None, keep_last: int = 1
    ):
        self.base_urls = [u.rstrip("/") for u in base_urls]
        self.sync_dir = Path(sync_dir).resolve()
        self.dtype = dtype
        self.keep_last = max(1, int(keep_last))
        self._written: list[Path] = []

    def push(self, model, step: int, deadline: float) -> SyncReport:
        t0 = time.monotonic()
        path = self.sync_dir / f"step-{step:08d}.safetensors"
        nbytes = write_weights_file(
            named_weights(model, self.dtype), path, metadata={"coordexp_step": str(step)}
        )
        write_s = time.monotonic() - t0
        servers: dict[str, Any] = {}
        for url in self.base_urls:
            left = _left(deadline, f"loading weights on {url}")
            body = _post(
                url + LOAD_WEIGHTS_ROUTE,
                {"path": str(path), "step": step, "timeout_s": left},
                deadline,
                f"load {path.name}",
            )
            _post(url + "/reset_prefix_cache/", None, deadline, "reset prefix cache after weight sync")
            servers[url] = body
        self._written.append(path)
        while len(self._written) > self.keep_last:
            old = self._written.pop(0)
            try:
                old.unlink()
            except OSError:
                pass
        rep = SyncReport(step, time.monotonic() - t0, nbytes, self.name, servers)
        rep.servers["_write_s"] = round(write_s, 4)
        return rep


class NcclTransport:  # pragma: no cover - needs CUDA + NCCL on both ends; see docs/runbook.md
    """ms-swift's NCCL routes with a timeout on every HTTP call and on every broadcast."""

    name = "nccl"

    def __init__(
        self,
        base_urls: Sequence[str],
        dtype: str | None = None,
        group_port: int | None = None,
        bucket_mb: int = 512,
    ):
        self.base_urls = [u.rstrip("/") for u in base_urls]
        self.dtype = dtype
        port = group_port or int(os.environ.get("COORDEXP_NCCL_GROUP_PORT", "51216"))
        self.group_ports = [port + i for i in range(len(self.base_urls))]
        self.bucket_bytes = int(bucket_mb) << 20
        self._comms: list | None = None

    def _run_with_timeout(self, fn: Callable[[], None], deadline: float, what: str) -> None:
        err: list = []

        def target():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001
                err.append(exc)

        th = threading.Thread(target=target, daemon=True, name=f"coordexp-nccl-{what}")
        th.start()
        th.join(_left(deadline, what))
        if th.is_alive():
            raise WeightSyncError(f"weight sync (nccl): {what} did not finish within vllm.sync.timeout_s")
        if err:
            raise WeightSyncError(f"weight sync (nccl): {what} failed: {err[0]!r}")

    def _init(self, deadline: float) -> list:
        from urllib.parse import urlparse

        import torch
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        from coordexp.rollout.server_client import get_world_size

        comms = []
        for url, port in zip(self.base_urls, self.group_ports):
            ws = get_world_size(url, _left(deadline, "get_world_size"))
            host = urlparse(url).hostname
            _post(
                url + "/init_communicator/",
                {"host": "0.0.0.0", "port": port, "world_size": ws + 1},
                deadline,
                "init NCCL communicator",
            )
            holder: list = []

            def connect(host=host, port=port, ws=ws, holder=holder):
                pg = StatelessProcessGroup.create(host=host, port=port, rank=ws, world_size=ws + 1)
                holder.append(PyNcclCommunicator(pg, device=torch.cuda.current_device()))

            self._run_with_timeout(connect, deadline, f"NCCL group with {url} (port {port})")
            comms.append(holder[0])
        return comms

    def push(self, model, step: int, deadline: float) -> SyncReport:
        import torch

        t0 = time.monotonic()
        if self._comms is None:
            self._comms = self._init(deadline)
        target = getattr(torch, self.dtype) if self.dtype else None
        buckets, cur, size = [], [], 0
        for name, p in model.named_parameters():
            t = p.detach()
            if target is not None and t.is_floating_point() and t.dtype != target:
                t = t.to(target)
            cur.append((name, t))
            size += t.numel() * t.element_size()
            if size >= self.bucket_bytes:
                buckets.append(cur)
                cur, size = [], 0
        if cur:
            buckets.append(cur)
        total = 0
        for bucket in buckets:
            metas, flat = flatten_bucket(bucket)
            total += flat.numel()
            for url, comm in zip(self.base_urls, self._comms):
                _post(url + "/update_flattened_params/", {"metadatas": metas}, deadline, "announce bucket")
                flat_dev = flat.to(comm.device)

                def send(comm=comm, flat_dev=flat_dev):
                    comm.broadcast(flat_dev, src=comm.rank)
                    comm.group.barrier()

                self._run_with_timeout(send, deadline, f"broadcast to {url}")
        for url in self.base_urls:
            _post(url + "/process_weights_after_loading/", None, deadline, "process weights after loading")
            _post(url + "/reset_prefix_cache/", None, deadline, "reset prefix cache after weight sync")
        return SyncReport(step, time.monotonic() - t0, total, self.name, {})


# ----------------------------------------------------------------------------------------------- the sync


class WeightSync:
    """Decides when to sync and runs the DDP choreography; the transport does the push."""

    def __init__(
        self,
        transport,
        timeout_s: float,
        initial_step: int | None = None,
        log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
    ):
        self.transport = transport
        self.timeout_s = float(timeout_s)
        self.server_step: int | None = initial_step
        self.log = log
        self.reports: list[SyncReport] = []
        self._pg = None

    @classmethod
    def from_config(
        cls, cfg, run_dir: Path, model_dir: str | None = None, **kwargs
    ) -> WeightSync | None:
        """None for ``vllm.sync.mode: none``. ``model_dir``: the checkpoint the learner loaded (compared with
        :data:`ENV_INITIAL_WEIGHTS`)."""
        v = cfg.vllm
        if getattr(v.sync.mode, "value", v.sync.mode) == "none":
            return None
        transport_name = getattr(v.sync.transport, "value", v.sync.transport)
        dtype = _SERVER_DTYPES.get(getattr(v.dtype, "value", v.dtype))
        urls = list(v.server.base_urls)
        if transport_name == "file":
            transport = FileTransport(urls, Path(run_dir) / SYNC_DIR_NAME, dtype=dtype)
        else:
            transport = NcclTransport(urls, dtype=dtype)
        initial = None
        fresh = os.environ.get(ENV_INITIAL_WEIGHTS)
        if fresh and model_dir and os.path.realpath(fresh) == os.path.realpath(str(model_dir)):
            initial = 0
        return cls(transport, v.sync.timeout_s, initial_step=initial, **kwargs)

    def needed(self, step: int) -> bool:
        return self.server_step != step

    def _group(self, dist):
        if self._pg is None:
            from datetime import timedelta

            self._pg = dist.new_group(
                backend="gloo", timeout=timedelta(seconds=self.timeout_s + COLLECTIVE_GRACE_S)
            )
        return self._pg

    def maybe_sync(self, model_getter: Callable[[], Any], step: int) -> SyncReport | None:
        """Sync if the server's weights are not those of ``step``. Collective under DDP: every rank must
        call it at the same point (all ranks see the same ``step`` and the same history, so they agree)."""
        if not self.needed(step):
            return None
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        rank = dist.get_rank() if distributed else 0
        t0 = time.monotonic()
        if distributed:
            pg = self._group(dist)
            try:
                dist.barrier(group=pg)
            except RuntimeError as exc:
                raise WeightSyncError(
                    f"weight sync at step {step}: rank {rank} gave up at the opening barrier after "
                    f"{time.monotonic() - t0:.0f} s (vllm.sync.timeout_s={self.timeout_s:g} + "
                    f"{COLLECTIVE_GRACE_S:g} s): another rank is stuck or gone ({exc})"
                ) from None
        outcome: list[Any] = [None]
        if rank == 0:
            try:
                report = self.transport.push(model_getter(), step, time.monotonic() + self.timeout_s)
                outcome = [{"ok": True, "seconds": report.seconds, "bytes": report.bytes}]
                self.reports.append(report)
            except WeightSyncError as exc:
                outcome = [{"ok": False, "error": str(exc)}]
            except Exception as exc:  # noqa: BLE001 - any failure must reach every rank
                outcome = [
                    {
                        "ok": False,
                        "error": f"weight sync at step {step} failed on rank 0: "
                        f"{exc.__class__.__name__}: {exc}",
                    }
                ]
        if distributed:
            try:
                dist.broadcast_object_list(outcome, src=0, group=pg)
            except RuntimeError as exc:
                raise WeightSyncError(
                    f"weight sync at step {step}: rank {rank} timed out waiting for rank 0 to push the "
                    f"weights (vllm.sync.timeout_s={self.timeout_s:g} + {COLLECTIVE_GRACE_S:g} s): {exc}"
                ) from None
        result = outcome[0]
        if not result["ok"]:
            raise WeightSyncError(result["error"])
        self.server_step = step
        # rank 0 logs the first sync, then one line per 50 (the metric time/weight_sync_s records every sync)
        n = len(self.reports)
        if rank == 0 and (n - 1) % 50 == 0:
            rep = self.reports[-1]
            note = f" (sync {n})" if n > 1 else "; from now on one line per 50 syncs"
            self.log(
                f"[coordexp weight sync] step {step}: pushed {rep.bytes / 2**20:.2f} MiB over "
                f"{self.transport.name} to {len(getattr(self.transport, 'base_urls', []))} server(s) in "
                f"{rep.seconds:.2f} s{note}"
            )
        return self.reports[-1] if rank == 0 and self.reports else None


# ----------------------------------------------------------------------------------------------- worker side


def _build_worker_extension():
    """The vLLM worker extension class, built on first access (imports ms-swift only in the worker)."""
    try:
        from swift.pipelines.infer.rollout import WeightSyncWorkerExtension as base
    except Exception:  # noqa: BLE001 - ms-swift absent: file-load method only
        base = object

    class CoordexpWorkerExtension(base):  # type: ignore[misc, valid-type]
        """Adds :data:`WORKER_METHOD` to the vLLM worker (keeps ms-swift's NCCL methods)."""

        def coordexp_load_weights(self, path: str) -> dict[str, Any]:
            return load_weights_file_into(self, path)

    CoordexpWorkerExtension.__module__ = __name__
    return CoordexpWorkerExtension


def __getattr__(name: str):  # PEP 562: vLLM resolves WORKER_EXTENSION_FQCN with getattr(module, name)
    if name == "CoordexpWorkerExtension":
        cls = _build_worker_extension()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
