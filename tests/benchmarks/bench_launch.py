"""Benchmark of the launch path, weight sync and server rollouts.

Run: ``python tests/benchmarks/bench_launch.py``.

Measured side by side in one run (one server at a time; every server is torn down before the next):

1. **Startup**: ``python -m coordexp.train +experiment=smoke/ab_mixed rollout=vllm_server`` (random tiny
   model, Channel B on step 0, one step) from command start to the end of the first learner step, split into
   config (process start -> task function), model dir, server spawn, ``/health/`` wait, activation probe,
   learner start -> first step done; next to the same command with ``rollout=hf`` (no server).
2. **Weight sync** (``file`` transport, ``WeightSync`` as the learner runs it: write safetensors, POST
   ``/coordexp/load_weights/``, every vLLM worker reloads in place, ``/reset_prefix_cache/``) vs model size:
   the tiny model and a wider tiny variant (``--no-wide`` skips the second server start).
3. **Rollout throughput**, same prompts (synthetic-task prompts), greedy, repeat-terminate off for the
   request (the random tiny model rarely stops, so sequences run to ``max_tokens``; tokens/s counts what was
   really generated), batch sizes 1 / 4 / 16: the server through
   ``RolloutClient`` (HTTP + ms-swift + vLLM) vs the in-process HF backend (``HFRolloutBackend``) vs an
   offline vLLM engine (``LLM.generate`` on the same token ids, run after the server stopped). Target on
   CPU: server time <= offline-engine time + HTTP overhead (the per-call overhead is printed).

Options: ``--quick`` (fewer rounds), ``--no-wide``, ``--skip-startup``, ``--tokens N``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from coordexp.launch.server_spec import cpu_server_env
from tests.conftest import free_port

CPU_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MODELSCOPE_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_PLUGINS": "none",
    "TORCHINDUCTOR_CACHE_DIR": str(REPO / ".cache" / "torchinductor"),
}


def table(rows, header):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


# ----------------------------------------------------------------------------------------------- 1. startup


def startup(backend: str, work: Path) -> dict:
    run_dir = work / f"startup-{backend}"
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "coordexp.train",
        "+experiment=smoke/ab_mixed",
        f"rollout={backend}",
        f"hydra.run.dir={run_dir}",
        "model.tiny_stage1_steps=0",
        "training.max_steps=1",
        "stage2_ab.schedule.b_ratio=1.0",
        "training.eval_strategy=no",
        "training.save_strategy=no",
        "data.synthetic.train_samples=64",
        "rollout_matching.max_new_tokens=64",
    ]
    if backend == "vllm_server":
        cmd += [f"vllm.server.base_urls=[http://127.0.0.1:{port}]", "vllm.max_model_len=512"]
    t_cmd = time.time()
    log = open(work / f"startup-{backend}.log", "w")  # noqa: SIM115 - closed after the process ends
    proc = subprocess.Popen(
        cmd, cwd=REPO, env={**os.environ, **CPU_ENV}, stdout=log, stderr=subprocess.STDOUT
    )
    metrics = run_dir / "metrics.jsonl"
    t_first = None
    while proc.poll() is None:
        if t_first is None and metrics.is_file() and metrics.stat().st_size > 0:
            t_first = time.time()
        time.sleep(0.05)
    log.close()
    if proc.returncode != 0:
        raise SystemExit(
            f"startup run ({backend}) failed:\n{(work / f'startup-{backend}.log').read_text()[-3000:]}"
        )
    t_first = t_first or metrics.stat().st_mtime
    tl = json.loads((run_dir / "run_metadata.json").read_text())["launcher"]["timeline"]
    marks = tl["marks"]
    out = {"process_start_gap": round(tl["start"] - t_cmd, 3)}
    out.update({k: v for k, v in tl["phases_s"].items() if k not in ("end", "server_ready")})
    out["server_misc"] = tl["phases_s"].get("server_ready", 0.0)
    out["learner_to_first_step"] = round(t_first - marks["learner_start"], 3)
    out["total_to_first_step"] = round(t_first - t_cmd, 3)
    return out


# ----------------------------------------------------------------------------------------------- servers


def start_server(model_dir: Path, log: Path):
    from coordexp.config.schema import RepeatTerminateConfig
    from coordexp.launch.rollout_server import RolloutServer
    from coordexp.launch.server_spec import ServerLaunchSpec

    port = free_port()
    spec = ServerLaunchSpec(
        model_dir=str(model_dir),
        port=port,
        max_model_len=512,
        model_type="qwen2",
        template="chatml",
        repeat_terminate=RepeatTerminateConfig(enabled=True),
        weights_root=str(log.parent),  # bench_sync writes its files next to the log
    )
    spec.extra_env.update(CPU_ENV)
    srv = RolloutServer(
        spec, f"http://127.0.0.1:{port}", log_path=log, startup_timeout_s=600, progress=lambda m: None
    )
    return srv.start()


def bench_sync(srv, model_dir: Path, work: Path, rounds: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from coordexp.trainer.sync_transport import FileTransport, named_weights
    from coordexp.trainer.weight_sync import WeightSync

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n_params = sum(t.numel() for t in named_weights(model).values())
    sync = WeightSync(
        FileTransport([srv.base_url], work / f"ws-{model_dir.name}"), timeout_s=300, log=lambda m: None
    )
    totals, writes, loads = [], [], []
    for step in range(rounds + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
        rep = sync.maybe_sync(lambda: model, step)
        if step == 0:
            continue  # first call pays one-time costs (route, imports in the worker)
        totals.append(rep.seconds)
        writes.append(rep.servers["_write_s"])
        loads.append(rep.servers[srv.base_url]["workers"][0]["seconds"])
    mib = rep.bytes / 2**20
    med = statistics.median(totals)
    return {
        "params": n_params,
        "MiB": round(mib, 2),
        "sync_s": round(med, 4),
        "write_s": round(statistics.median(writes), 4),
        "worker_load_s": round(statistics.median(loads), 4),
        "http_and_rest_s": round(med - statistics.median(writes) - statistics.median(loads), 4),
        "MiB_per_s": round(mib / med, 1),
    }


def prompts_for(tok, n: int):
    from coordexp.data.prompt import PromptSpec, build_messages
    from coordexp.data.synthetic import generate_records

    msgs = [build_messages(r, PromptSpec(scene="text")) for r in generate_records(n, 5)]
    ids = [
        list(
            tok(
                tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                add_special_tokens=False,
            )["input_ids"]
        )
        for m in msgs
    ]
    return msgs, ids


def bench_server_rollouts(srv, msgs, batch_sizes, tokens: int, rounds: int) -> dict:
    from coordexp.protocol import XARGS_KEY
    from coordexp.rollout.server_client import DecodeParams, InferRequest, RolloutClient

    out = {}
    for bs in batch_sizes:
        client = RolloutClient(
            [srv.base_url], decode_batch_size=bs, repeat_terminate_enabled=True, infer_timeout_s=300
        )
        reqs = [InferRequest(messages=m, vllm_xargs={XARGS_KEY: {"enabled": False}}) for m in msgs[:bs]]
        params = DecodeParams(max_tokens=tokens, temperature=0.0, seed=0, stop=())
        client.infer(reqs, params)  # warm-up
        times, ntok = [], 0
        for _ in range(rounds):
            t0 = time.perf_counter()
            res = client.infer(reqs, params)
            times.append(time.perf_counter() - t0)
            ntok = sum(len(r.token_ids) for r in res)
        out[bs] = (statistics.median(times), ntok)
    return out


def bench_hf_rollouts(model_dir: Path, ids, batch_sizes, tokens: int, rounds: int) -> dict:
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from coordexp.config.contract import rollout_contract
    from coordexp.config.load import compose, to_train_config
    from coordexp.rollout.hf_backend import HFRolloutBackend

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    for bs in batch_sizes:
        cfg = to_train_config(
            compose(
                [
                    "+experiment=smoke/ab_mixed",
                    f"rollout_matching.decode_batch_size={bs}",
                    f"rollout_matching.max_new_tokens={tokens}",
                ]
            )
        )
        c = rollout_contract(cfg)
        c = dataclasses.replace(c, repeat_terminate=dataclasses.replace(c.repeat_terminate, enabled=False))
        backend = HFRolloutBackend(lambda: model, tok, c)
        backend.generate(ids[:bs], [None] * bs, 0)
        times, ntok = [], 0
        for _ in range(rounds):
            batch = backend.generate(ids[:bs], [None] * bs, 0)
            times.append(batch.seconds)
            ntok = sum(len(r.token_ids) for r in batch.rollouts)
        out[bs] = (statistics.median(times), ntok)
    return out


OFFLINE = textwrap.dedent("""
    import json, statistics, sys, time
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        model, ids, sizes = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
        tokens, rounds = int(sys.argv[4]), int(sys.argv[5])
        llm = LLM(model=model, dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
        sp = SamplingParams(max_tokens=tokens, temperature=0.0)
        out = {}
        for bs in sizes:
            prompts = [{"prompt_token_ids": p} for p in ids[:bs]]
            llm.generate(prompts, sp, use_tqdm=False)
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                res = llm.generate(prompts, sp, use_tqdm=False)
                times.append(time.perf_counter() - t0)
            out[bs] = [statistics.median(times), sum(len(r.outputs[0].token_ids) for r in res)]
        print("RESULT " + json.dumps(out), flush=True)
""")


def bench_offline(model_dir: Path, ids, batch_sizes, tokens: int, rounds: int, work: Path) -> dict:
    script = work / "offline_engine.py"
    script.write_text(OFFLINE)
    out = subprocess.run(
        [
            sys.executable,
            str(script),
            str(model_dir),
            json.dumps(ids),
            json.dumps(batch_sizes),
            str(tokens),
            str(rounds),
        ],
        cwd=work,
        # the engine layout and threads of the server (vLLM in-process, coordexp.launch.server_spec)
        env={**os.environ, **CPU_ENV, **cpu_server_env(len(os.sched_getaffinity(0)))},
        capture_output=True,
        text=True,
        timeout=900,
    )
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        raise SystemExit(f"offline engine failed:\n{out.stderr[-3000:]}")
    return {int(k): tuple(v) for k, v in json.loads(line[0][7:]).items()}


# ----------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-wide", action="store_true")
    ap.add_argument("--skip-startup", action="store_true")
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    os.environ.update(CPU_ENV)
    rounds = 3 if a.quick else 5
    batch_sizes = [1, 4, 16]
    work = Path(tempfile.mkdtemp(prefix="bench_launch."))
    print(f"bench_launch: work dir {work}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")

    if not a.skip_startup:
        srv_t = startup("vllm_server", work)
        hf_t = startup("hf", work)
        print("## 1. Command start -> first learner step done (seconds)\n")
        keys = [
            "process_start_gap",
            "config",
            "model",
            "server_spawn",
            "server_health",
            "server_probe",
            "server_misc",
            "learner_start",
            "learner_to_first_step",
            "total_to_first_step",
        ]
        table(
            [[k, srv_t.get(k, "-"), hf_t.get(k, "-")] for k in keys],
            ["phase", "rollout=vllm_server", "rollout=hf"],
        )
        total = srv_t["total_to_first_step"]
        server_start = srv_t["server_spawn"] + srv_t["server_health"] + srv_t["server_probe"]
        print(f"\nratio server/hf to first step: {total / hf_t['total_to_first_step']:.2f}; "
              f"server start share: {server_start / total:.0%}\n")

    from transformers import AutoTokenizer

    from coordexp.models.tiny import TinyModelSpec, ensure_tiny_model

    cache = REPO / ".cache" / "bench-tiny"
    tiny = Path(ensure_tiny_model(cache, arch="qwen2")).resolve()
    sizes = [("tiny (h64, 2 layers)", tiny)]
    if not a.no_wide:
        wide = Path(
            ensure_tiny_model(
                cache,
                spec=TinyModelSpec(
                    hidden_size=512,
                    intermediate_size=2048,
                    num_hidden_layers=4,
                    num_attention_heads=8,
                    num_key_value_heads=2,
                    head_dim=64,
                ),
            )
        ).resolve()
        sizes.append(("wide (h512, 4 layers)", wide))
    tok = AutoTokenizer.from_pretrained(tiny)
    msgs, ids = prompts_for(tok, max(batch_sizes))

    sync_rows, server_roll = [], None
    for label, model_dir in sizes:
        srv = start_server(model_dir, work / f"server-{model_dir.name}.log")
        try:
            print(
                f"server for {label}: healthy in {srv.timings['health']:.1f} s, "
                f"probe {srv.timings['probe']:.2f} s"
            )
            sync_rows.append([label, *bench_sync(srv, model_dir, work, rounds).values()])
            if model_dir == tiny:
                server_roll = bench_server_rollouts(srv, msgs, batch_sizes, a.tokens, rounds)
        finally:
            srv.stop()
    print(f"\n## 2. Weight sync, file transport (median of {rounds} syncs after one warm-up)\n")
    table(sync_rows, ["model", "params", "MiB", "sync s", "write s", "worker load s", "http+rest s", "MiB/s"])

    hf_roll = bench_hf_rollouts(tiny, ids, batch_sizes, a.tokens, rounds)
    off_roll = bench_offline(tiny, ids, batch_sizes, a.tokens, rounds, work)
    print(f"\n## 3. Rollouts, tiny model, greedy, {a.tokens} new tokens per sequence (median of {rounds})\n")
    rows = []
    for bs in batch_sizes:
        (ts, ns), (th, nh), (to, no) = server_roll[bs], hf_roll[bs], off_roll[bs]
        rows.append(
            [
                bs,
                f"{ns / ts:.0f}",
                f"{nh / th:.0f}",
                f"{no / to:.0f}",
                f"{th / ts:.1f}x",
                f"{ts / to:.2f}",
                f"{(ts - to) * 1000:.0f}",
            ]
        )
    table(
        rows,
        [
            "batch",
            "server tok/s",
            "HF tok/s",
            "offline vLLM tok/s",
            "server speed-up vs HF",
            "server/offline time",
            "server overhead ms/call",
        ],
    )
    print(f"\nwork dir kept for logs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
