"""Benchmark: two rollout servers vs one on the same total cores (issue 16).

Run: ``python tests/benchmarks/bench_two_servers.py [--no-wide] [--rounds N] [--tokens N] [--batch N]``.

For each model (the tiny model; a wider tiny variant unless ``--no-wide``), measured side by side in one
run, one configuration at a time:

* **one server** on every core this process may use (not pinned, as the launcher starts a single server);
* **two servers, pinned**: each pinned to its half of the same cores (``server_spec.cpu_slice``, as the
  launcher places them), started concurrently, the batch split over both by ``RolloutClient`` (1 : 1);
* **two servers, shared**: the same, not pinned (both on every core; what the launcher does when there are
  fewer cores than servers).

Same prompts (synthetic-task prompts), greedy, repeat-terminate off for the request and no stop words, so
every sequence runs to ``--tokens`` new tokens; one warm-up batch, then the median of ``--rounds`` batches.
Prints generated tokens/s for both and the ratio two/one. On a 2-core machine expect <= 1: each server
gets one core, and the per-request overhead (HTTP, ms-swift, the scheduler) is paid twice.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.benchmarks.bench_launch import CPU_ENV, prompts_for, table
from tests.conftest import free_port


def start_servers(model_dir: Path, work: Path, n: int, pinned: bool = True) -> list:
    from coordexp.config.schema import RepeatTerminateConfig
    from coordexp.launch.rollout_server import RolloutServer
    from coordexp.launch.server_spec import ServerLaunchSpec, cpu_slice

    cores = sorted(os.sched_getaffinity(0))
    servers = []
    for i in range(n):
        port = free_port()
        spec = ServerLaunchSpec(model_dir=str(model_dir), port=port, max_model_len=512, model_type="qwen2",
                                template="chatml", repeat_terminate=RepeatTerminateConfig(enabled=True),
                                cpus=cpu_slice(cores, i, n) if n > 1 and pinned else [])
        spec.extra_env.update(CPU_ENV)
        log = work / f"{model_dir.name}.{n}.{int(pinned)}.{i}.log"
        servers.append(RolloutServer(spec, f"http://127.0.0.1:{port}", log_path=log, startup_timeout_s=600,
                                     progress=lambda m: None))
    try:
        for s in servers:
            s.spawn()
        with ThreadPoolExecutor(len(servers)) as ex:
            for f in [ex.submit(s.ready) for s in servers]:
                f.result()
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


def measure(servers: list, msgs, batch: int, tokens: int, rounds: int) -> tuple[float, int, dict]:
    from coordexp.protocol import XARGS_KEY
    from coordexp.rollout.server_client import DecodeParams, InferRequest, RolloutClient

    client = RolloutClient([s.base_url for s in servers], decode_batch_size=batch,
                           repeat_terminate_enabled=True, infer_timeout_s=600)
    reqs = [InferRequest(messages=m, vllm_xargs={XARGS_KEY: {"enabled": False}}) for m in msgs[:batch]]
    params = DecodeParams(max_tokens=tokens, temperature=0.0, seed=0, stop=())
    client.infer(reqs, params)  # warm-up
    times, ntok = [], 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        res = client.infer(reqs, params)
        times.append(time.perf_counter() - t0)
        ntok = sum(len(r.token_ids) for r in res)
    return statistics.median(times), ntok, dict(client.request_counts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-wide", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    os.environ.update(CPU_ENV)
    from transformers import AutoTokenizer

    from coordexp.models.tiny import TinyModelSpec, ensure_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench_two_servers."))
    cores = sorted(os.sched_getaffinity(0))
    print(f"bench_two_servers: {len(cores)} cores {cores}; load average {os.getloadavg()[0]:.1f}; "
          f"batch {a.batch} x {a.tokens} new tokens, median of {a.rounds}\n")
    cache = REPO / ".cache" / "bench-tiny"
    models = [("tiny (h64, 2 layers)", Path(ensure_tiny_model(cache, arch="qwen2")).resolve())]
    if not a.no_wide:
        wide = TinyModelSpec(hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=2, head_dim=64)
        models.append(("wide (h512, 4 layers)", Path(ensure_tiny_model(cache, spec=wide)).resolve()))
    msgs, _ = prompts_for(AutoTokenizer.from_pretrained(models[0][1]), a.batch)
    rows = []
    for label, model_dir in models:
        result = {}
        for name, n, pinned in (("one", 1, False), ("pinned", 2, True), ("shared", 2, False)):
            servers = start_servers(model_dir, work, n, pinned)
            try:
                secs, ntok, counts = measure(servers, msgs, a.batch, a.tokens, a.rounds)
            finally:
                for s in servers:
                    s.stop()
            result[name] = ntok / secs
            print(f"{label}: {name}: {n} server(s) {ntok} tokens in {secs:.3f} s = {ntok / secs:.1f} tok/s; "
                  f"requests per server {list(counts.values())}", flush=True)
        one = result["one"]
        rows.append([label, f"{one:.1f}", f"{result['pinned']:.1f}", f"{result['pinned'] / one:.2f}",
                     f"{result['shared']:.1f}", f"{result['shared'] / one:.2f}"])
    print()
    table(rows, ["model", "1 server tok/s", "2 pinned tok/s", "ratio", "2 shared tok/s", "ratio"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
