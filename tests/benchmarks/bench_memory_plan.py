"""Planner accuracy on CPU: the preflight memory plan of a learner rank vs the measured peak RSS of a training
step, for the wide tiny model (Qwen2 architecture, hidden 512, 8 layers, 8 heads / 2 KV heads, MLP 1024, the
tiny tokenizer's 1420-token vocabulary), with and without activation checkpointing, in float32 and under
bfloat16 autocast.

Measured: each variant runs in a fresh process (``--child``): build the model from its config, then 2
optimizer steps of 2 accumulated micro-batches of one ``tokens``-token row (so gradients coexist with the
second micro-batch's activations, as under gradient accumulation), the learner's CE
(``coordexp.trainer.losses.token_ce_per_segment`` over every position), torch AdamW; its peak RSS
(``ru_maxrss``) minus the peak RSS of a baseline process that imports and does the same except the model (a
one-parameter AdamW step warms up autograd and the optimizer). Planned: ``memory_plan`` of the config that
describes the same run (``training.packing_length = tokens``, 1 rank, no soft self-context),
``learner.total``. Variants are interleaved over the repeats; medians.

Two allocator settings, side by side: ``live``: ``MALLOC_MMAP_THRESHOLD_=65536`` (every tensor above 64 KiB
gets its own mapping, returned at free, so RSS follows the live tensors: the planner's quantity, and what a
caching GPU allocator's peak tracks); ``default``: glibc's dynamic mmap threshold, which rises to 32 MiB
after the first frees, so freed tensor memory stays in the heap and RSS grows by fragmentation from step to
step (what a CPU learner's RSS really reaches).

Run: python tests/benchmarks/bench_memory_plan.py [repeats] [tokens]
Target: planned / measured within 1 +- 0.2 for every variant.

On one GPU: python tests/benchmarks/bench_memory_plan.py --gpu (a few minutes): a random ~1B Qwen2 model
from a config (hidden 2048, 20 layers, vocabulary 32000), bf16 autocast over fp32 weights, 2 optimizer steps
of 2 micro-batches of 4 x 2048 tokens, checkpointing off / on, each in a fresh process: the plan against
``torch.cuda.max_memory_allocated`` (live tensors of the caching allocator; the CUDA context is in neither).
Target +- 10%.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HIDDEN, LAYERS, HEADS, KV_HEADS, MLP, VOCAB = 512, 8, 8, 2, 1024, 1420
VARIANTS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def model_config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=True,
                       attn_implementation="sdpa")


def child(precision: str, checkpointing: bool, tokens: int, baseline: bool) -> dict:
    import torch
    from transformers import Qwen2ForCausalLM

    from coordexp.trainer.losses import token_ce_per_segment

    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, tokens))
    weights, segments = torch.ones_like(ids, dtype=torch.float32), torch.zeros_like(ids)
    if baseline:
        p = torch.nn.Parameter(torch.ones(1))
        opt = torch.optim.AdamW([p], lr=1e-4)
        (p * 2).sum().backward()
        opt.step()
    else:
        model = Qwen2ForCausalLM(model_config())
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for _ in range(2):
            for _ in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    logits = model(input_ids=ids, use_cache=False).logits
                    loss = token_ce_per_segment(logits, ids, weights, segments, 1).sum()
                loss.backward()
                del logits, loss
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {"maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def planned(precision: str, checkpointing: bool, tokens: int, folder: Path) -> int:
    from coordexp.config.load import compose, to_train_config
    from coordexp.planning.memory import memory_plan

    cfg = to_train_config(compose([
        "+experiment=smoke/a_only", "model=local", f"model.path={folder}", "model.dtype=float32",
        "rollout=hf",
        f"training.precision={precision}", f"training.gradient_checkpointing={str(checkpointing).lower()}",
        "training.packing=true", f"training.packing_length={tokens}", f"vllm.max_model_len={tokens}",
        "rollout_matching.max_new_tokens=64", "stage2_ab.n_softctx_iter=1", "training.nproc_per_node=1"]))
    return memory_plan(cfg).learner.total


ALLOCATORS = {"live": {"MALLOC_MMAP_THRESHOLD_": "65536"}, "default": {}}


def run_child(allocator: str, *args: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | ALLOCATORS[allocator]
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                         timeout=1800, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["maxrss"]


def main(repeats: int = 2, tokens: int = 2048) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "wide-tiny"
        model_config().save_pretrained(folder)
        plans = {v: planned(*v, tokens, folder) for v in VARIANTS}
    samples: dict[tuple[str, tuple[str, bool]], list[int]] = {
        (a, v): [] for a in ALLOCATORS for v in VARIANTS}
    for r in range(repeats):
        for allocator in ALLOCATORS:  # interleaved: each repeat runs every variant next to a fresh baseline
            base = run_child(allocator, "fp32", "0", str(tokens), "1")
            for v in VARIANTS:
                peak = run_child(allocator, v[0], str(int(v[1])), str(tokens), "0")
                samples[allocator, v].append(peak - base)
        print(f"repeat {r + 1}/{repeats} done", file=sys.stderr)
    print(f"wide tiny Qwen2 (hidden {HIDDEN}, {LAYERS} layers, vocab {VOCAB}), {tokens} tokens/micro-batch, "
          f"{repeats} repeat(s); measured = median peak-RSS delta vs a no-model process")
    print(f"{'variant':<24}{'planned MiB':>12}{'live MiB':>10}{'planned/live':>14}{'default MiB':>13}"
          f"{'planned/default':>17}")
    for v in VARIANTS:
        live = statistics.median(samples["live", v])
        default = statistics.median(samples["default", v])
        name = f"{v[0]}{' + checkpointing' if v[1] else ''}"
        print(f"{name:<24}{plans[v] / 2**20:>12.1f}{live / 2**20:>10.1f}{plans[v] / live:>14.2f}"
              f"{default / 2**20:>13.1f}{plans[v] / default:>17.2f}")


GPU_MODEL = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 20,
             "num_attention_heads": 16, "num_key_value_heads": 4}  # ~1B parameters (Qwen2 architecture)
GPU_BATCH, GPU_SEQ = 4, 2048


def gpu_child(checkpointing: bool) -> dict:
    """One variant on the GPU: bf16 autocast over fp32 weights, 2 optimizer steps of 2 accumulated
    micro-batches of GPU_BATCH x GPU_SEQ tokens; the peak of torch.cuda.max_memory_allocated (the caching
    allocator's live tensors; the CUDA context is not in it, nor in the plan)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from coordexp.trainer.losses import token_ce_per_segment

    torch.manual_seed(0)
    dev = torch.device("cuda")
    ids = torch.randint(0, GPU_MODEL["vocab_size"], (GPU_BATCH, GPU_SEQ), device=dev)
    weights, segments = torch.ones_like(ids, dtype=torch.float32), torch.zeros_like(ids)
    model = Qwen2ForCausalLM(Qwen2Config(**GPU_MODEL, tie_word_embeddings=True,
                                         attn_implementation="sdpa")).to(dev)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(input_ids=ids, use_cache=False).logits
                loss = token_ce_per_segment(logits, ids, weights, segments, 1).sum()
            loss.backward()
            del logits, loss
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"peak": torch.cuda.max_memory_allocated()}


def gpu_main() -> None:
    from transformers import Qwen2Config

    from coordexp.config.load import compose, to_train_config
    from coordexp.planning.memory import memory_plan

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpu-1b"
        Qwen2Config(**GPU_MODEL, tie_word_embeddings=True).save_pretrained(folder)
        print(f"Qwen2 ~1B {GPU_MODEL}, {GPU_BATCH} x {GPU_SEQ} tokens, bf16 autocast over fp32 weights")
        print(f"{'variant':<24}{'planned GiB':>12}{'measured GiB':>14}{'planned/measured':>18}")
        for ckpt in (False, True):
            cfg = to_train_config(compose([
                "+experiment=smoke/a_only", "model=local", f"model.path={folder}", "model.dtype=float32",
                "rollout=hf", "training.precision=bf16",
                f"training.gradient_checkpointing={str(ckpt).lower()}",
                "training.packing=false", f"training.per_device_train_batch_size={GPU_BATCH}",
                "training.effective_batch_size=16", f"vllm.max_model_len={GPU_SEQ}",
                "rollout_matching.max_new_tokens=64", "stage2_ab.n_softctx_iter=1"]))
            plan = memory_plan(cfg, device_bytes=1 << 50).learner.total
            out = subprocess.run([sys.executable, __file__, "--gpu-child", str(int(ckpt))],
                                 capture_output=True, text=True, timeout=600)
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-2000:])
            peak = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
            name = "bf16" + (" + checkpointing" if ckpt else "")
            print(f"{name:<24}{plan / 2**30:>12.2f}{peak / 2**30:>14.2f}{plan / peak:>18.2f}")

if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        precision, ckpt, tokens, baseline = sys.argv[2:6]
        print(json.dumps(child(precision, ckpt == "1", int(tokens), baseline == "1")))
    elif sys.argv[1:2] == ["--gpu-child"]:
        print(json.dumps(gpu_child(sys.argv[2] == "1")))
    elif sys.argv[1:2] == ["--gpu"]:
        gpu_main()
    else:
        main(*(int(a) for a in sys.argv[1:3]))
