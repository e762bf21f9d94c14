"""Weight sync from a sharded learner (FSDP2): every rank takes part in gathering the full, adapter-merged
weights, in bounded buckets; rank 0 hands each bucket to the transport, which pushes it to every server.

Why every rank: under FSDP2 (``torch.distributed.fsdp.fully_shard``, what accelerate's FSDP2 plugin applies)
each parameter is a ``DTensor`` holding 1/world of the rows on each rank; ``DTensor.full_tensor()`` is an
all-gather, a collective every rank of the mesh must enter in the same order. The order comes from
:func:`coordexp.trainer.merged_weights.merged_named_weights` (one depth-first walk of the modules, the same on
every rank; peft adapters folded in one module at a time), called with :func:`full_tensor` as its ``gather``.

Memory bound (per rank, on top of the sharded model): rank 0 keeps at most ``bucket_bytes`` of gathered
weights in the current bucket plus the module being gathered (its full weight and, with LoRA/DoRA, its
adapter matrices); when the next tensor would overflow the bucket, the bucket goes to the transport first
and is dropped. The other ranks drop each gathered tensor at once (one module at a time).
:class:`GatherStats` records the largest amount held, so tests and logs can check the bound.

Timeouts: :class:`~coordexp.trainer.weight_sync.WeightSync` runs the gathers on a process group of its own
whose timeout is ``vllm.sync.timeout_s`` (+ grace), through :func:`timed_gather` (the parameter's local
shard re-wrapped on a 1-D mesh over that group; a mesh of another shape, e.g. HSDP, falls back to the FSDP
mesh's own group, whose timeout is the learner's ``ddp_timeout``); the HTTP calls keep the push deadline.
A rank 0 whose transport fails mid-way keeps gathering (dropping the buckets) so the other ranks never wait
in a collective rank 0 skipped; the error is reported after the last gather.

Names: activation checkpointing under FSDP wraps each layer in torch's ``CheckpointWrapper`` (parameter
names gain ``_checkpoint_wrapped_module.``) and ``torch.compile`` adds ``_orig_mod.``; :func:`server_name`
removes both, so the server gets the checkpoint's names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from coordexp.trainer.merged_weights import merged_named_weights

__all__ = ["DEFAULT_BUCKET_BYTES", "GatherStats", "full_tensor", "gathered_buckets", "is_sharded",
           "push_sharded", "server_name", "timed_gather"]

#: vllm.sync.bucket_mib's default, in bytes.
DEFAULT_BUCKET_BYTES = 512 << 20
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: ``DTensor.full_tensor()`` (an all-gather: collective) for a sharded one, else
    ``t``."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def timed_gather(group) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``gather`` for :func:`merged_named_weights` that all-gathers each sharded parameter over ``group``
    (a process group over every rank, created with the sync's timeout) instead of the FSDP mesh's group: the
    local shard is re-wrapped as a DTensor with the same placements and global shape on a 1-D mesh over
    ``group`` (``DeviceMesh.from_group``), then ``full_tensor()``. A parameter whose mesh is not 1-D over the
    same ranks is gathered on its own mesh (:func:`full_tensor`)."""
    meshes: dict[str, DeviceMesh] = {}
    ranks = dist.get_process_group_ranks(group)

    def gather(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, DTensor):
            return t
        own = t.device_mesh
        if own.ndim != 1 or own.mesh.flatten().tolist() != ranks:
            return t.full_tensor()
        mesh = meshes.get(own.device_type)
        if mesh is None:
            mesh = meshes[own.device_type] = DeviceMesh.from_group(group, own.device_type)
        return DTensor.from_local(t.to_local(), mesh, t.placements, shape=t.shape,
                                  stride=t.stride()).full_tensor()

    return gather


def is_sharded(model) -> bool:
    """True when any parameter of ``model`` is a ``DTensor`` (FSDP2 applied): the sync must then gather on
    every rank."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def server_name(name: str) -> str:
    """``name`` without the wrapper prefixes activation checkpointing / compile / FSDP1 insert."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


@dataclass
class GatherStats:
    """What one bucketed gather did on this rank. ``peak_held_bytes``: the most bytes of gathered weights held
    at once (the bucket being filled plus the tensor just gathered); ``largest_bytes``: the largest single
    gathered tensor."""

    buckets: int = 0
    tensors: int = 0
    bytes: int = 0
    peak_held_bytes: int = 0
    largest_bytes: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


Gather = Callable[[torch.Tensor], torch.Tensor]


def gathered_buckets(model, bucket_bytes: int, dtype: str | None = None, keep: bool = True,
                     stats: GatherStats | None = None, gather: Gather = full_tensor,
                     ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Buckets ``[(server name, full tensor on CPU, contiguous)]`` of at most ``bucket_bytes`` each (a single
    larger tensor is a bucket of its own), in :func:`merged_named_weights` order, floating-point tensors cast
    to ``dtype`` (a torch dtype name; None keeps each tensor's). Collective when the model is sharded: every
    rank must run the generator to its end. ``keep=False`` (ranks other than 0): each tensor is dropped once
    gathered and nothing is yielded. ``stats`` is updated as tensors arrive. ``gather``: :func:`full_tensor`
    (the FSDP mesh's group) or :func:`timed_gather`."""
    stats = stats if stats is not None else GatherStats()
    bucket: list[tuple[str, torch.Tensor]] = []
    held = 0
    for name, t in merged_named_weights(model, dtype=dtype, gather=gather):
        n = _nbytes(t)
        stats.tensors += 1
        stats.bytes += n
        stats.largest_bytes = max(stats.largest_bytes, n)
        stats.peak_held_bytes = max(stats.peak_held_bytes, held + n)
        if not keep:
            del t
            continue
        if bucket and held + n > bucket_bytes:
            stats.buckets += 1
            yield bucket
            bucket, held = [], 0
        bucket.append((server_name(name), t.to("cpu").contiguous()))
        held += n
    if bucket:
        stats.buckets += 1
        yield bucket


def push_sharded(model, transport, step: int, deadline: float, rank: int,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 gather: Gather = full_tensor) -> tuple[Any, GatherStats]:
    """Gather ``model``'s full weights on every rank in buckets (:func:`gathered_buckets`); rank 0 passes
    each bucket to ``transport.begin(step, deadline)``'s writer (``add(bucket)``) and finally
    ``finish(deadline)``, which loads the weights on every server. Returns ``(SyncReport, GatherStats)``; the
    report is None on ranks other than 0.
    Raises on rank 0 whatever the writer raised (after the last gather, see the module doc)."""
    stats = GatherStats()
    writer = transport.begin(step, deadline) if rank == 0 else None
    error: BaseException | None = None
    for bucket in gathered_buckets(model, bucket_bytes, transport.dtype, keep=writer is not None,
                                   stats=stats, gather=gather):
        if writer is not None and error is None:
            try:
                writer.add(bucket)
            except Exception as exc:  # noqa: BLE001 - reported after the last collective
                error = exc
        del bucket
    if writer is None:
        return None, stats
    if error is not None:
        writer.abort()
        raise error
    report = writer.finish(deadline)
    report.servers["_gather"] = stats.to_dict()
    return report, stats
