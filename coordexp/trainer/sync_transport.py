"""Weight-sync transports, learner side: how rank 0 pushes the full weights to every rollout server.

* :class:`FileTransport` (CPU and GPU): writes the unique parameters (HF names, cast to the server dtype) as
  one safetensors file into ``<run_dir>/weight_sync/`` and POSTs
  :data:`~coordexp.protocol.LOAD_WEIGHTS_ROUTE` ``{"path": ...}`` to each server; the plugin route
  makes every vLLM worker load it with vLLM's ``Worker.reload_weights``
  (:mod:`coordexp.rollout.server.worker`). The file must be readable by the server: same host or a shared
  filesystem.
* :class:`NcclTransport` (GPU only): ms-swift's own routes (``/init_communicator/``,
  ``/update_flattened_params/``, ``/process_weights_after_loading/``) with a timeout on every HTTP call and
  on every broadcast. Not testable on CPU (see docs/runbook.md for how to verify it on a GPU node).

Every HTTP call gets the time left before the push's deadline and carries the servers' API key
(:data:`~coordexp.protocol.ENV_SERVER_API_KEY`) when one is set. torch, safetensors and vLLM are imported when
a push runs, so the orchestrator can import this module without them.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests

from coordexp.protocol import ENV_NCCL_GROUP_PORT, LOAD_WEIGHTS_ROUTE, auth_headers
from coordexp.rollout.server_client import get_world_size, resolve_api_key

__all__ = ["SHARD_INDEX_NAME", "FileBucketWriter", "FileTransport", "NcclTransport", "SyncReport",
           "WeightSyncError", "flatten_bucket", "named_weights", "write_weights_file"]


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


def server_weights(model, dtype: str | None = None, gather=None) -> Iterator[tuple[str, Any]]:
    """``(HF name, tensor)`` of what the server loads: the model's unique parameters (tied weights once), a
    peft model's base weights with its adapters folded in without touching the trained copy
    (:func:`coordexp.trainer.merged_weights.merged_named_weights`), detached, floating-point ones cast to
    ``dtype`` (a torch dtype name: the server's) when given. The one cast of a sync."""
    from coordexp.trainer.merged_weights import merged_named_weights  # torch: only when a sync runs

    yield from merged_named_weights(model, dtype, gather)


def named_weights(model, dtype: str | None = None) -> dict[str, Any]:
    """:func:`server_weights` as a dict of contiguous CPU tensors (what the file transport writes)."""
    return {name: t.to("cpu").contiguous() for name, t in server_weights(model, dtype)}


def write_weights_file(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` as safetensors, atomically (temp file + rename). Returns the file size."""
    from safetensors.torch import save_file  # see server_weights

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path.stat().st_size


def flatten_bucket(named: Sequence[tuple]) -> tuple:
    """``(metadatas, uint8 tensor)`` in the layout of ms-swift's ``FlattenedTensorBucket`` (what its
    ``/update_flattened_params/`` route expects): per tensor ``name, shape, dtype, start_idx, end_idx,
    numel`` over the bytes of the flattened tensors, concatenated."""
    import torch  # see server_weights

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
    left = _left(deadline, f"POST {url}")
    s = session or requests
    try:
        r = s.post(url, json=payload, timeout=(min(10.0, left), left),
                   headers=auth_headers(resolve_api_key()))
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
            f"coordexp/rollout/server/swift_plugin.py and COORDEXP_ENABLE_VLLM_REPEAT_TERMINATE_INJECTION=1"
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
        self._loaded(path)
        rep = SyncReport(step, time.monotonic() - t0, nbytes, self.name, servers)
        rep.servers["_write_s"] = round(write_s, 4)
        return rep

    def begin(self, step: int, deadline: float | None = None) -> FileBucketWriter:
        """A bucketed push (the sharded learner's, :mod:`coordexp.trainer.sharded_sync`): each bucket is
        written as one shard file as it comes, then one load of the whole set (:class:`FileBucketWriter`)."""
        return FileBucketWriter(self, step)

    def _loaded(self, path: Path) -> None:
        """Remember a pushed file or shard folder; remove the ones older than ``keep_last``."""
        self._written.append(path)
        while len(self._written) > self.keep_last:
            old = self._written.pop(0)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)


#: Name of a sharded push's index (the Hugging Face sharded-checkpoint layout: ``weight_map`` name -> shard).
SHARD_INDEX_NAME = "model.safetensors.index.json"


class FileBucketWriter:
    """One bucketed file push: ``add(bucket)`` writes ``<sync_dir>/step-N/weights-0000k.safetensors`` at once
    (the bucket can then be dropped); ``finish(deadline)`` writes :data:`SHARD_INDEX_NAME` (Hugging Face's
    sharded-checkpoint index: ``weight_map`` name -> shard file, shards in push order) and POSTs its path to
    every server, whose workers stream the shards into *one* ``reload_weights`` pass
    (:mod:`coordexp.rollout.server.worker`).

    Why one load of all shards and not one load per bucket: vLLM's layer-wise reload treats a layer that got
    no weights in a pass as failed (it puts the old kernel tensors back, with a warning per layer), and a
    fused layer that got only part of its checkpoint tensors in a pass (``qkv_proj`` from ``q_proj`` /
    ``k_proj`` / ``v_proj``, ``gate_up_proj``) is processed with the missing parts left uninitialized
    (``vllm.model_executor.model_loader.reload.layerwise.finalize_layerwise_processing``: "Delayed
    processing"). Bucket boundaries fall anywhere, so each load must see every weight."""

    def __init__(self, transport: FileTransport, step: int):
        self.transport, self.step = transport, step
        self.folder = transport.sync_dir / f"step-{step:08d}"
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        self.weight_map: dict[str, str] = {}
        self.bytes = 0
        self.shards = 0
        self.t0 = time.monotonic()

    def add(self, bucket: Sequence[tuple[str, Any]]) -> None:
        self.shards += 1
        name = f"weights-{self.shards:05d}.safetensors"
        tensors = {n: t for n, t in bucket}
        self.bytes += write_weights_file(tensors, self.folder / name,
                                         metadata={"coordexp_step": str(self.step)})
        self.weight_map.update({n: name for n in tensors})

    def abort(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def finish(self, deadline: float) -> SyncReport:
        index = self.folder / SHARD_INDEX_NAME
        tmp = index.with_name(f".{index.name}.tmp")
        tmp.write_text(json.dumps({"metadata": {"total_size": self.bytes, "coordexp_step": self.step,
                                                "shards": self.shards},
                                   "weight_map": self.weight_map}))
        os.replace(tmp, index)
        write_s = time.monotonic() - self.t0
        servers: dict[str, Any] = {}
        for url in self.transport.base_urls:
            left = _left(deadline, f"loading weights on {url}")
            servers[url] = _post(url + LOAD_WEIGHTS_ROUTE, {"path": str(index), "step": self.step,
                                                            "timeout_s": left},
                                 deadline, f"load {self.shards} shard(s) of step {self.step}")
            _post(url + "/reset_prefix_cache/", None, deadline, "reset prefix cache after weight sync")
        self.transport._loaded(self.folder)
        rep = SyncReport(self.step, time.monotonic() - self.t0, self.bytes, self.transport.name, servers)
        rep.servers["_write_s"] = round(write_s, 4)
        rep.servers["_shards"] = self.shards
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
        port = group_port or int(os.environ.get(ENV_NCCL_GROUP_PORT, "51216"))
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
        import torch  # torch and vLLM's NCCL communicator: only on a GPU learner that syncs over NCCL
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

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
        """Broadcast the weights bucket by bucket as they are read (at most one bucket held)."""
        writer = self.begin(step, deadline)
        bucket, size = [], 0
        for name, t in server_weights(model, self.dtype):
            bucket.append((name, t))
            size += t.numel() * t.element_size()
            if size >= self.bucket_bytes:
                writer.add(bucket)
                bucket, size = [], 0
        if bucket:
            writer.add(bucket)
        return writer.finish(deadline)

    def begin(self, step: int, deadline: float) -> _NcclBucketWriter:
        """A bucketed push (the sharded learner's): each bucket is broadcast to every server as it comes."""
        return _NcclBucketWriter(self, step, deadline)


class _NcclBucketWriter:  # pragma: no cover - needs CUDA + NCCL on both ends; see docs/runbook.md
    """``add(bucket)``: announce and broadcast one flattened bucket to every server (ms-swift's
    ``/update_flattened_params/`` loads a subset of the weights per call, then ``finish`` runs
    ``/process_weights_after_loading/`` once)."""

    def __init__(self, transport: NcclTransport, step: int, deadline: float):
        self.transport, self.step, self.bytes, self.t0 = transport, step, 0, time.monotonic()
        self.deadline = deadline

    def add(self, bucket: Sequence[tuple[str, Any]]) -> None:
        tr = self.transport
        deadline = self.deadline
        if tr._comms is None:
            tr._comms = tr._init(deadline)
        metas, flat = flatten_bucket(bucket)
        self.bytes += flat.numel()
        for url, comm in zip(tr.base_urls, tr._comms):
            _post(url + "/update_flattened_params/", {"metadatas": metas}, deadline, "announce bucket")
            flat_dev = flat.to(comm.device)

            def send(comm=comm, flat_dev=flat_dev):
                comm.broadcast(flat_dev, src=comm.rank)
                comm.group.barrier()

            tr._run_with_timeout(send, deadline, f"broadcast to {url}")

    def abort(self) -> None:
        pass

    def finish(self, deadline: float) -> SyncReport:
        for url in self.transport.base_urls:
            _post(url + "/process_weights_after_loading/", None, deadline, "process weights after loading")
            _post(url + "/reset_prefix_cache/", None, deadline, "reset prefix cache after weight sync")
        return SyncReport(self.step, time.monotonic() - self.t0, self.bytes, self.transport.name, {})
