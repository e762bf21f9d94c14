"""Weight sync, learner side: the rollout server rolls out with the learner's *current* weights.

:class:`WeightSync` (owned by the Stage-2 trainer, run before every rollout: Channel-B steps and rollout
evals): when the weights changed since the last sync, all ranks meet at a barrier, rank 0 pushes the weights
through a transport (:mod:`coordexp.trainer.sync_transport`), then rank 0 broadcasts the outcome (the second
barrier); every rank raises :class:`~coordexp.trainer.sync_transport.WeightSyncError` if the push failed. The
collectives run on a dedicated gloo group whose timeout is ``vllm.sync.timeout_s`` (+ a grace for the ranks
that wait while rank 0 works); rank 0 runs the whole push under a ``vllm.sync.timeout_s`` deadline. The prefix
cache is reset after every sync (``/reset_prefix_cache/``).

Which weights the server holds: the learner tracks the optimizer step of the weights it last pushed
(weights change only at optimizer steps). Unknown at start, so the first rollout syncs - unless the
orchestrator started the server itself from the very checkpoint the learner loads and says so in
:data:`~coordexp.protocol.ENV_INITIAL_WEIGHTS` (the model dir), and the learner is at step 0 (not
resumed): then the server is known to hold step-0 weights and the first sync happens after the first
optimizer step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from coordexp.config.contract import RolloutContract
from coordexp.protocol import ENV_INITIAL_WEIGHTS
from coordexp.telemetry.record import say
from coordexp.trainer.sync_transport import FileTransport, NcclTransport, SyncReport, WeightSyncError

__all__ = ["SYNC_DIR_NAME", "WeightSync", "WeightSyncError"]

SYNC_DIR_NAME = "weight_sync"
#: Extra time the non-zero ranks wait at the closing collective beyond vllm.sync.timeout_s (rank 0 needs
#: the whole budget for the push, then still has to reach the collective).
COLLECTIVE_GRACE_S = 30.0


class WeightSync:
    """Decides when to sync and runs the DDP choreography; the transport does the push (under FSDP2 every
    rank gathers the sharded weights, :mod:`coordexp.trainer.sharded_sync`)."""

    def __init__(
        self,
        transport,
        timeout_s: float,
        initial_step: int | None = None,
        log: Callable[[str], None] = say,  # through the progress bar's writer (tqdm.write)
        bucket_bytes: int = 512 << 20,
    ):
        self.transport = transport
        self.timeout_s = float(timeout_s)
        self.bucket_bytes = int(bucket_bytes)
        self.server_step: int | None = initial_step
        self.log = log
        self.reports: list[SyncReport] = []
        self._pg = None
        self._gather_pg = None
        self._gather = None

    @classmethod
    def from_contract(cls, contract: RolloutContract, run_dir: Path, model_dir: str | None = None,
                      **kwargs) -> WeightSync | None:
        """None for ``vllm.sync.mode: none``. ``model_dir``: the checkpoint the learner loaded (compared with
        :data:`~coordexp.protocol.ENV_INITIAL_WEIGHTS`)."""
        if contract.sync_mode == "none":
            return None
        urls = list(contract.server_base_urls)
        if contract.sync_transport == "file":
            transport = FileTransport(urls, Path(run_dir) / SYNC_DIR_NAME, dtype=contract.server_dtype)
        else:
            transport = NcclTransport(urls, dtype=contract.server_dtype, bucket_mb=contract.sync_bucket_mib)
        initial = None
        fresh = os.environ.get(ENV_INITIAL_WEIGHTS)
        if fresh and model_dir and os.path.realpath(fresh) == os.path.realpath(str(model_dir)):
            initial = 0
        return cls(transport, contract.sync_timeout_s, initial_step=initial,
                   bucket_bytes=contract.sync_bucket_mib << 20, **kwargs)

    def _timed_gather(self, dist):
        """The sharded gather on a group of its own with the sync's timeout (created once, collectively; the
        default backend: gloo on CPU, NCCL on GPU)."""
        from coordexp.trainer.sharded_sync import timed_gather

        if self._gather_pg is None:
            self._gather_pg = dist.new_group(timeout=timedelta(seconds=self.timeout_s + COLLECTIVE_GRACE_S))
            self._gather = timed_gather(self._gather_pg)
        return self._gather

    @staticmethod
    def _sharded(model) -> bool:
        from coordexp.trainer.sharded_sync import is_sharded

        return is_sharded(model)

    def needed(self, step: int) -> bool:
        return self.server_step != step

    def _group(self, dist):
        if self._pg is None:
            self._pg = dist.new_group(
                backend="gloo", timeout=timedelta(seconds=self.timeout_s + COLLECTIVE_GRACE_S)
            )
        return self._pg

    def maybe_sync(self, model_getter: Callable[[], Any], step: int) -> SyncReport | None:
        """Sync if the server's weights are not those of ``step``. Collective under DDP: every rank must
        call it at the same point (all ranks see the same ``step`` and the same history, so they agree)."""
        if not self.needed(step):
            return None
        import torch.distributed as dist  # torch only when a sync runs (the orchestrator imports this module)

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
        model, sharded, failed = None, False, None
        if distributed:  # FSDP2 (DTensor parameters): every rank gathers, rank 0 pushes the buckets
            try:
                model = model_getter()
                sharded = self._sharded(model)
            except Exception as exc:  # noqa: BLE001 - rank 0 reports it to every rank below
                failed = exc
        deadline = time.monotonic() + self.timeout_s
        gather = self._timed_gather(dist) if sharded else None
        if sharded and rank != 0:
            from coordexp.trainer.sharded_sync import push_sharded

            try:
                push_sharded(model, self.transport, step, deadline, rank, self.bucket_bytes, gather)
            except Exception as exc:  # noqa: BLE001 - a gather collective failed or timed out
                raise WeightSyncError(f"weight sync at step {step}: rank {rank} failed while gathering the "
                                      f"sharded weights: {exc.__class__.__name__}: {exc}") from None
        if rank == 0:
            try:
                if failed is not None:
                    raise failed
                if sharded:
                    from coordexp.trainer.sharded_sync import push_sharded

                    report, _ = push_sharded(model, self.transport, step, deadline, 0, self.bucket_bytes,
                                             gather)
                else:
                    report = self.transport.push(model if distributed else model_getter(), step, deadline)
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
            gather = rep.servers.get("_gather")
            sharded = (f", gathered from FSDP shards in {gather['buckets']} bucket(s) (at most "
                       f"{gather['peak_held_bytes'] / 2**20:.2f} MiB held)" if gather else "")
            self.log(
                f"[coordexp weight sync] step {step}: pushed {rep.bytes / 2**20:.2f} MiB over "
                f"{self.transport.name} to {len(getattr(self.transport, 'base_urls', []))} server(s) in "
                f"{rep.seconds:.2f} s{sharded}{note}"
            )
        return self.reports[-1] if rank == 0 and self.reports else None
