"""The bucketed gather of a sharded peft model: a real 2-rank gloo group, torch's ``fully_shard`` on every
decoder layer and the root of a LoRA/DoRA model with trainable coordinate rows and ``modules_to_save``; the
gathered, adapter-merged weights (coordexp.trainer.sharded_sync.gathered_buckets) equal peft's own
``merge_and_unload()`` of the unsharded model, under the base names, in buckets of at most the bound."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.slow

BUCKET_BYTES = 8 << 10
ATOL = 1e-6  # the same fp32 ops on the same values (tests/unit/test_merged_weights.py)


def _worker(rank, world, port, kind, tied, out, mode):
    import time
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from coordexp.trainer.sharded_sync import (
        GatherStats,
        full_tensor,
        gathered_buckets,
        is_sharded,
        timed_gather,
    )
    from tests.unit.test_merged_weights import adapted

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = adapted(kind, tied)  # same seeds on both ranks
    expected = dict(copy.deepcopy(model).merge_and_unload().named_parameters()) if rank == 0 else {}
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    if mode == "timeout":  # rank 1 is late: rank 0's gather on the timed group gives up after its timeout
        group = dist.new_group(timeout=timedelta(seconds=2))
        t0 = time.monotonic()
        if rank == 0:
            try:
                list(gathered_buckets(model, BUCKET_BYTES, gather=timed_gather(group)))
                error = None
            except RuntimeError as exc:
                error = str(exc)
            Path(out).write_text(json.dumps({"error": error, "seconds": time.monotonic() - t0}))
        else:
            time.sleep(8)  # alive (its sockets open) but not gathering
        os._exit(0)  # the group is broken now; the late rank must not enter it
    gather = timed_gather(dist.new_group(timeout=timedelta(seconds=60))) if mode == "timed" else full_tensor
    stats, got, sizes = GatherStats(), {}, []
    for bucket in gathered_buckets(model, BUCKET_BYTES, keep=rank == 0, stats=stats, gather=gather):
        sizes.append(sum(t.numel() * t.element_size() for _, t in bucket))
        got.update(bucket)
    if rank == 0:
        res = {"sharded": is_sharded(model), "names_equal": list(got) == list(expected),
               "max_diff": max((got[n] - expected[n].detach()).abs().max().item() for n in expected),
               "stats": stats.to_dict(), "sizes": sizes}
        Path(out).write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("kind,tied,mode", [("dora", False, "mesh"), ("lora", True, "timed")])
def test_sharded_peft_gather_equals_merge_and_unload(tmp_path, kind, tied, mode):
    """``mesh``: full_tensor on the FSDP mesh's group; ``timed``: on a group of the sync's own (timed_gather,
    what WeightSync uses)."""
    import torch.multiprocessing as mp

    out = tmp_path / "r0.json"
    mp.start_processes(_worker, args=(2, free_port(), kind, tied, str(out), mode), nprocs=2, join=True,
                       start_method="spawn")
    res = json.loads(out.read_text())
    assert res["sharded"] and res["names_equal"]
    assert res["max_diff"] <= ATOL, res
    st = res["stats"]
    assert st["buckets"] == len(res["sizes"]) >= 3
    assert max(res["sizes"]) <= max(BUCKET_BYTES, st["largest_bytes"])
    assert st["peak_held_bytes"] <= BUCKET_BYTES + st["largest_bytes"]


def test_a_rank_missing_from_the_gather_times_out_on_the_sync_group(tmp_path):
    """The gather runs on a group with the sync's timeout (2 s here), not the learner's 300 s: a rank that
    never joins makes rank 0 fail within seconds instead of hanging."""
    import torch.multiprocessing as mp

    out = tmp_path / "r0.json"
    mp.start_processes(_worker, args=(2, free_port(), "lora", True, str(out), "timeout"), nprocs=2, join=True,
                       start_method="spawn")
    res = json.loads(out.read_text())
    print(f"\nrank 0 gave up after {res['seconds']:.1f} s: {(res['error'] or '')[:200]}")
    assert res["error"] is not None and res["seconds"] < 7, res
