"""Weight sync, learner side: the sharded (FSDP2) bucketed gather + shard files vs the unsharded file sync,
seconds per GiB of weights, measured side by side in one run on the same random Qwen2-style model.

* sharded: a real 2-rank gloo group, ``fully_shard`` per decoder layer then the root; every rank gathers
  (``coordexp.trainer.sharded_sync.push_sharded``), rank 0 writes one safetensors shard per bucket and the
  index (``FileTransport.begin``); timed on rank 0 from the first gather to the index written;
* unsharded: the same model unwrapped in one process, ``FileTransport.push`` (every parameter copied into
  one dict, one safetensors file).

No server: the transports get no URL, so only the learner side is timed (the server's load is the same
reload pass either way, see bench_launch.py for it). Peak bytes of gathered weights held are printed too.

Run: python tests/benchmarks/bench_sharded_sync.py [hidden] [layers] [repeats]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _model(hidden: int, layers: int):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                      vocab_size=32000, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _sharded(rank: int, world: int, port: int, hidden: int, layers: int, repeats: int, buckets: list[int],
             out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from coordexp.trainer.sharded_sync import push_sharded, timed_gather
    from coordexp.trainer.sync_transport import FileTransport

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _model(hidden, layers)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    gather = timed_gather(dist.new_group())  # what WeightSync uses (a group with the sync's timeout)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mib in buckets:
            times, stats = [], None
            for i in range(repeats):
                transport = FileTransport([], Path(tmp) / f"b{mib}")
                dist.barrier()
                t0 = time.perf_counter()
                _, stats = push_sharded(model, transport, i, time.monotonic() + 600, rank, mib << 20, gather)
                dist.barrier()
                times.append(time.perf_counter() - t0)
            res[mib] = {"s": statistics.median(times), "stats": stats.to_dict()}
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def main() -> None:
    hidden = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    layers = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    buckets = [16, 64, 512]
    from coordexp.trainer.sync_transport import FileTransport
    from tests.conftest import free_port

    model = _model(hidden, layers)
    gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    with tempfile.TemporaryDirectory() as tmp:
        times = []
        for i in range(repeats):
            t0 = time.perf_counter()
            FileTransport([], Path(tmp)).push(model, i, time.monotonic() + 600)
            times.append(time.perf_counter() - t0)
    unsharded = statistics.median(times)
    del model
    out = Path(tempfile.mkdtemp()) / "sharded.json"
    mp.start_processes(_sharded, args=(2, free_port(), hidden, layers, repeats, buckets, str(out)), nprocs=2,
                       join=True, start_method="spawn")
    res = json.loads(out.read_text())
    print(f"model: hidden {hidden}, {layers} layers, vocab 32000, untied head: {gib * 1024:.0f} MiB fp32; "
          f"median of {repeats}")
    print(f"unsharded file sync (1 process, one file):     {unsharded / gib:6.2f} s/GiB")
    for mib, r in res.items():
        st = r["stats"]
        print(f"sharded 2-rank gloo, bucket {int(mib):4d} MiB ({st['buckets']:3d} shards): "
              f"{r['s'] / gib:6.2f} s/GiB = {r['s'] / unsharded:.2f}x unsharded; rank 0 held at most "
              f"{st['peak_held_bytes'] / 2**20:.0f} MiB (largest tensor "
              f"{st['largest_bytes'] / 2**20:.0f} MiB)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main()
