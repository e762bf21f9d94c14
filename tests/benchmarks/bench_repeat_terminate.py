"""Benchmark of repeat-aware termination (run: ``python tests/benchmarks/bench_repeat_terminate.py``).

Measured side by side in one run, printed as tables of ratios:

1. Processor cost per decode step: time inside ``apply`` of the real V1 ``RepeatTerminateV1LogitsProcessor``
   after every row got one new token, at batch 1 / 64 / 256 with rows already 256 vs 8192 tokens long
   (median of single steps, lengths interleaved). Target: 8192/256 ratio <= 1.2 (cost independent of length).
2. The same step against a naive rescan implementation (every step recomputes the rules from the whole
   generated sequence, as a post-hoc ``triggered`` would) at 4096 tokens. Target: >= 20x faster.
3. vLLM on the tiny model, CPU, **offline engine** (``LLM(...)``): tokens/s with the processor attached
   (every request tracked with all rules on, thresholds that never fire) vs not attached, same prompts,
   ``ignore_eos`` and fixed ``max_tokens`` (so the same tokens are generated); engines run one after the
   other. Wall clock on a shared 2-core machine is noisy, so one more in-process engine measures the time
   spent inside the processor as a share of ``generate()`` time.

Options: ``--quick``, ``--skip-vllm``, ``--vllm-prompts N``, ``--vllm-tokens M``, ``--vllm-rounds R``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# Typical production thresholds (shipped defaults of the original system, with an object cap).
BENCH_CFG = {
    "enabled": True,
    "min_new_tokens": 32,
    "max_consecutive_token_repeats": 64,
    "ngram_size": 64,
    "ngram_repeats": 2,
    "max_object_keys": 256,
}


def _tokenizer(cache: Path):
    from transformers import AutoTokenizer

    from coordexp.models.tiny import ensure_tiny_model

    path = ensure_tiny_model(cache, arch="qwen2")
    return path, AutoTokenizer.from_pretrained(path)


def _safe_tokens(tok, core, n, rng):
    """Random ids that never complete a rule: no token holding a `{` (no record start), no long runs, no
    tail repeats."""
    banned = {t for t in range(len(tok)) if "{" in core.matcher.piece(t)} | set(core.stop_ids)
    pool = [t for t in range(10, len(tok)) if t not in banned]
    return [rng.choice(pool) for _ in range(n)]


class NaiveRescan:
    """Baseline: every step and row re-derives every rule from the full generated list (no state)."""

    def __init__(self, cfg, matcher, stop_ids):
        self.cfg, self.matcher, self.stop_ids = cfg, matcher, stop_ids
        self.rows = {}

    def add(self, index, out):
        self.rows[index] = out

    def fired(self, ids):
        c = self.cfg
        n = len(ids)
        if n < c.min_new_tokens:
            return False
        k = c.max_consecutive_token_repeats
        if k and n >= k and len(set(ids[n - k :])) == 1:
            return True
        g, r = c.ngram_size, c.ngram_repeats
        if g and r >= 2 and n >= g * r:
            tail = ids[n - g :]
            if all(ids[n - g * (j + 1) : n - g * j] == tail for j in range(1, r)):
                return True
        return c.max_object_keys is not None and self.matcher.count(ids) >= c.max_object_keys

    def apply(self, logits):
        from coordexp.rollout.force_eos import force_eos_rows

        fired = [i for i, out in self.rows.items() if self.fired(out)]
        if fired:
            force_eos_rows(logits, fired, self.stop_ids)
        return logits


def _setup(core, tok, batch, length, naive=False, seed=0):
    import torch
    from vllm.v1.sample.logits_processor import BatchUpdate

    from coordexp.repeat_rules import parse_config
    from coordexp.rollout.vllm_processor import RepeatTerminateV1LogitsProcessor

    rng = random.Random(seed)
    cfg = parse_config(BENCH_CFG)
    base = _safe_tokens(tok, core, length + 4096, rng)
    outs = [list(base[i % 97 : i % 97 + length]) for i in range(batch)]
    if naive:
        proc = NaiveRescan(cfg, core.matcher, core.stop_ids)
        for i, out in enumerate(outs):
            proc.add(i, out)
    else:
        proc = RepeatTerminateV1LogitsProcessor(None, torch.device("cpu"), False, core=core)
        added = [
            (i, SimpleNamespace(extra_args={"coordexp_repeat_terminate": BENCH_CFG}), [1], out)
            for i, out in enumerate(outs)
        ]
        proc.update_state(BatchUpdate(batch_size=batch, removed=[], added=added, moved=[]))
    logits = torch.zeros(batch, 1024)
    proc.apply(logits)  # catch up on the existing `length` tokens (not timed)
    feed = _safe_tokens(tok, core, 4096, rng)
    return proc, outs, logits, feed


def time_steps(proc, outs, logits, feed, steps):
    """Seconds spent in each ``apply`` call; before each call every row gets one new token (as vLLM appends to
    its live output lists; not timed)."""
    times = []
    for i in range(steps):
        t = feed[i % len(feed)]
        for out in outs:
            out.append(t)
        t0 = time.perf_counter()
        proc.apply(logits)
        times.append(time.perf_counter() - t0)
    if logits.isinf().any():
        raise RuntimeError("a rule fired during the benchmark; the measurement is invalid")
    return times


def _interleaved(core, tok, batch, variants, steps, rounds):
    """Median step time of each variant over ``rounds`` rounds. Variants alternate inside every round (fresh
    state, set-up not timed); the median of single steps ignores the steps the OS preempted."""
    times = {key: [] for key in variants}
    for _ in range(rounds):
        for key, (length, naive) in variants.items():
            proc, outs, logits, feed = _setup(core, tok, batch, length, naive=naive)
            times[key] += time_steps(proc, outs, logits, feed, steps)
    return {key: statistics.median(ts) for key, ts in times.items()}


def bench_processor(core, tok, quick):
    rows = []
    for batch in (1, 64, 256):
        steps = {1: 400, 64: 40, 256: 16}[batch]
        per = _interleaved(
            core, tok, batch, {256: (256, False), 8192: (8192, False)}, steps, 3 if quick else 5
        )
        rows.append((batch, per[256], per[8192], per[8192] / per[256]))
    return rows


def bench_naive(core, tok, quick):
    rows = []
    for batch in (1, 64):
        steps = {1: 100, 64: 4}[batch]
        per = _interleaved(
            core, tok, batch, {"inc": (4096, False), "naive": (4096, True)}, steps, 2 if quick else 3
        )
        rows.append((batch, per["inc"], per["naive"], per["naive"] / per["inc"]))
    return rows


_VLLM_CHILD = r"""
import json, os, sys, time
if __name__ == "__main__":
    model, attach, n_prompts, n_tokens = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
    inproc = sys.argv[5] == "inproc"
    if inproc:  # engine core and worker in this process, so the processor's own time can be measured
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    spent = [0.0]
    if attach:
        import coordexp.rollout.vllm_processor as vp
        for name in ("apply", "update_state"):
            orig = getattr(vp.RepeatTerminateV1LogitsProcessor, name)
            def timed(self, *a, _orig=orig, **k):
                t = time.perf_counter()
                try:
                    return _orig(self, *a, **k)
                finally:
                    spent[0] += time.perf_counter() - t
            setattr(vp.RepeatTerminateV1LogitsProcessor, name, timed)
    fqcn = "coordexp.rollout.vllm_processor:RepeatTerminateLogitsProcessor"
    kw = {"logits_processors": [fqcn]} if attach else {}
    if inproc:
        kw["distributed_executor_backend"] = "uni"
    llm = LLM(model=model, dtype="float32", max_model_len=2048, enforce_eager=True, seed=0, **kw)
    # every rule on (run counter, 64-token ring buffer, object automaton) but thresholds never reached
    rt = {"enabled": True, "min_new_tokens": 32, "max_consecutive_token_repeats": 100000, "ngram_size": 64,
          "ngram_repeats": 50, "max_object_keys": 1000000}
    xa = {"coordexp_repeat_terminate": rt} if attach else None
    prompts = [{"prompt_token_ids": [1, 20 + i, 30 + i % 7, 40, 201]} for i in range(n_prompts)]
    sp = SamplingParams(max_tokens=n_tokens, temperature=1.0, seed=1, ignore_eos=True, extra_args=xa)
    llm.generate(prompts[:4], SamplingParams(max_tokens=8, ignore_eos=True, extra_args=xa))  # warm-up
    best, share = None, None
    for _ in range(3):
        spent[0] = 0.0
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        toks = sum(len(o.outputs[0].token_ids) for o in outs)
        if best is None or toks / dt > best:
            best, share = toks / dt, spent[0] / dt
    print("RESULT", json.dumps({"tokens_per_s": best, "tokens": toks, "processor_share": share}), flush=True)
"""


def bench_vllm(model_dir, n_prompts, n_tokens, rounds):
    """Engine runs, one at a time (2 cores): ``rounds`` pairs of multi-process engines (not attached /
    attached, alternating order) for tokens/s, then one in-process attached engine that measures the time
    spent inside the processor. Returns ``{0: [...], 1: [...], "inproc": {...}}``."""
    import subprocess

    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        MODELSCOPE_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_PLUGINS="none",
    )
    res = {0: [], 1: []}
    order = [(a, "mp") for r in range(rounds) for a in ((0, 1) if r % 2 == 0 else (1, 0))] + [(1, "inproc")]
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(_VLLM_CHILD)
        child = fh.name
    try:
        for attach, mode in order:
            p = subprocess.run(
                [sys.executable, child, str(model_dir), str(attach), str(n_prompts), str(n_tokens), mode],
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode != 0 or not line:
                raise RuntimeError(f"vLLM benchmark child failed ({p.returncode}):\n{p.stderr[-3000:]}")
            out = json.loads(line[-1][7:])
            if mode == "inproc":
                res["inproc"] = out
            else:
                res[attach].append(out)
    finally:
        os.unlink(child)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--vllm-prompts", type=int, default=64)
    ap.add_argument("--vllm-tokens", type=int, default=256)
    ap.add_argument("--vllm-rounds", type=int, default=1, help="engine pairs, alternating order")
    ap.add_argument("--cache", default=str(REPO / ".cache" / "bench-tiny"))
    args = ap.parse_args(argv)

    import coordexp.rollout.vllm_processor as vp
    from coordexp.rollout.vllm_processor import ProcessorCore

    vp._announce = lambda msg: None  # one "attached" line per processor instance would drown the tables
    model_dir, tok = _tokenizer(Path(args.cache))
    core = ProcessorCore(tokenizer=tok)
    print(
        f"config: {BENCH_CFG}; stop ids: {core.stop_ids}; "
        f"python {sys.version.split()[0]}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    )

    print("\n[1] processor cost per decode step (time in apply(); every row got one new token)")
    print(f"{'batch':>6} {'len 256 (us)':>14} {'len 8192 (us)':>14} {'8192/256':>9}  target <= 1.2")
    for b, a, c, r in bench_processor(core, tok, args.quick):
        print(f"{b:>6} {a * 1e6:>14.1f} {c * 1e6:>14.1f} {r:>9.2f}  {'ok' if r <= 1.2 else 'MISS'}")

    print("\n[2] incremental vs naive rescan at 4096 generated tokens")
    print(f"{'batch':>6} {'incremental (us)':>17} {'rescan (us)':>12} {'speed-up':>9}  target >= 20x")
    for b, a, c, r in bench_naive(core, tok, args.quick):
        print(f"{b:>6} {a * 1e6:>17.1f} {c * 1e6:>12.1f} {r:>8.0f}x  {'ok' if r >= 20 else 'MISS'}")

    if not args.skip_vllm:
        print(
            f"\n[3] vLLM offline engine on CPU (tiny model), {args.vllm_prompts} prompts x "
            f"{args.vllm_tokens} tokens, ignore_eos, best of 3"
        )
        res = bench_vllm(model_dir, args.vllm_prompts, args.vllm_tokens, args.vllm_rounds)
        a = max(r["tokens_per_s"] for r in res[0])
        b = max(r["tokens_per_s"] for r in res[1])

        def runs(xs):
            return ", ".join(f"{x['tokens_per_s']:.0f}" for x in xs)

        print(f"{'not attached':>14}: {a:10.1f} tok/s  (engine runs: {runs(res[0])})")
        print(f"{'attached':>14}: {b:10.1f} tok/s  (engine runs: {runs(res[1])})")
        print(f"attached / not attached = {b / a:.3f} (best of each; wall clock on a shared CPU is noisy)")
        ip = res["inproc"]
        print(
            f"in-process engine, attached: {ip['tokens_per_s']:.1f} tok/s, of which "
            f"{100 * ip['processor_share']:.2f}% of generate() wall time is spent inside the processor "
            "(update_state + apply)"
        )


if __name__ == "__main__":
    main()
