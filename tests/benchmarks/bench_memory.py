"""Peak CPU memory and step time of one training step: full fine-tune vs frozen vision tower vs LoRA, each
with and without activation checkpointing, on a wider random Qwen2-VL (text: hidden 512, 8 layers; vision: 4
blocks of width 256; vocabulary 4096) built from its config (no download).

Each variant runs in a fresh process (``--child``): build the model, apply the variant with coordexp's own
code (``coordexp.trainer.optim`` freezing, ``coordexp.trainer.adapters.attach_adapter`` LoRA r 16 on the
language model with the 1000 coordinate rows trainable, non-reentrant checkpointing as the Trainer enables
it), AdamW;
one warm step on a short input (gradients and optimizer state allocated); freed heap returned to the OS and
the peak RSS reset (``/proc/self/clear_refs``), **baseline** = RSS then; then ``STEPS`` steps on one image
(224x224: 256 patches, 64 merged tokens) + text, ``seq`` tokens in all. **Activation memory** = the steps'
peak RSS (``VmHWM``) - baseline; **peak** = the process's peak RSS (``ru_maxrss``: weights, gradients,
optimizer state and activations). Step time: wall and CPU time of the process (CPU time is the steadier
figure on a shared machine). Variants are interleaved (the order rotates every repeat); medians.

Run: python tests/benchmarks/bench_memory.py [repeats] [seq]  (one torch thread unless OMP_NUM_THREADS is set)
Targets: activation checkpointing cuts activation memory >= 2x at a step time <= 1.4x; LoRA cuts the
optimizer state by its trainable fraction.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("full", "full+ckpt", "frozen_vit", "frozen_vit+ckpt", "lora", "lora+ckpt")
STEPS = 2
VOCAB = 4096
IMAGE_TOKEN, VSTART, VEND = 4093, 4094, 4095
COORD_IDS = list(range(3000, 4000))


def rss_mib() -> float:
    """Peak RSS of this process so far (``ru_maxrss``; Linux: KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def settle_and_reset_peak() -> bool:
    """Return freed heap to the OS (glibc ``malloc_trim``) and reset the peak RSS (``VmHWM``) to the current
    RSS (Linux ``/proc/self/clear_refs`` 5), so the next peak measures the step alone; False where the kernel
    refuses (then ``ru_maxrss`` is used)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build_model():
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = {"vocab_size": VOCAB, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
            "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [16, 8, 8]},
            "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": 1, "pad_token_id": 0}
    vision = {"depth": 4, "embed_dim": 256, "hidden_size": 512, "num_heads": 4, "mlp_ratio": 4,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                           video_token_id=IMAGE_TOKEN - 1, vision_start_token_id=VSTART,
                           vision_end_token_id=VEND, tie_word_embeddings=True)
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).float()


def batch(seq: int):
    import torch

    g = torch.Generator().manual_seed(1)
    grid = torch.tensor([[1, 16, 16]])                          # 224x224 image: 16x16 patches of 14 px
    pixels = torch.randn(256, 3 * 2 * 14 * 14, generator=g)     # (patches, C x T x P x P)
    image = [VSTART] + [IMAGE_TOKEN] * 64 + [VEND]              # 2x2 merge: 64 tokens
    text = torch.randint(2, 3000, (seq - len(image),), generator=g).tolist()
    ids = torch.tensor([image + text])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "pixel_values": pixels, "image_grid_thw": grid, "mm_token_type_ids": (ids == IMAGE_TOKEN).long()}


def child(variant: str, seq: int) -> dict:
    import torch

    from coordexp.config.schema import AdapterConfig, AdapterKind
    from coordexp.trainer.adapters import attach_adapter
    from coordexp.trainer.optim import GroupPlan, apply_freezing

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = build_model()
    kind, _, ckpt = variant.partition("+")
    if kind == "frozen_vit":
        apply_freezing(model, GroupPlan("qwen2_vl", {"llm": 1e-5, "vit": 1e-5, "aligner": 1e-5},
                                        frozenset({"vit"}), ("llm", "vit")))
    elif kind == "lora":
        model = attach_adapter(model, AdapterConfig(kind=AdapterKind.lora, r=16, alpha=32, dropout=0.0),
                               COORD_IDS)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        embed = model.get_input_embeddings()
        if not any(p.requires_grad for p in embed.parameters()):
            model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step(inputs) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradient buffers: part of the baseline
        return time.perf_counter() - t0, time.process_time() - c0

    step(batch(80))  # warm: gradients and AdamW state exist from here on
    inputs = batch(seq)
    reset = settle_and_reset_peak()
    baseline = status_mib("VmRSS") if reset else rss_mib()
    times = [step(inputs) for _ in range(STEPS)]
    step_peak = status_mib("VmHWM") if reset else rss_mib()
    peak = rss_mib()
    n_total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in params)
    return {"variant": variant, "baseline_mib": baseline, "peak_mib": peak, "act_mib": step_peak - baseline,
            "step_s": statistics.median(t for t, _ in times), "cpu_s": statistics.median(c for _, c in times),
            "params": n_total, "trainable": n_train, "hwm_reset": reset,
            "optimizer_state_mib": sum(s.numel() * s.element_size() for st in opt.state.values()
                                       for s in st.values() if hasattr(s, "numel")) / 2**20}


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--child":
        print(json.dumps(child(argv[1], int(argv[2]))))
        return 0
    repeats = int(argv[0]) if argv else 3
    seq = int(argv[1]) if len(argv) > 1 else 512
    # one thread by default: the process's CPU time is then its work alone (several OpenMP threads spin while
    # they wait, which inflates CPU time on a loaded machine); OMP_NUM_THREADS=2 measures with both cores
    # glibc keeps freed heap (RSS then tracks the allocator, not the live tensors, and differs by variant):
    # every allocation above 64 KiB gets its own mapping, returned when freed (the measure of
    # bench_memory_plan.py's "live" setting, and what torch.cuda.max_memory_allocated measures on a GPU)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "OMP_WAIT_POLICY": "PASSIVE",
           "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(repeats):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for variant in order:
            out = subprocess.run([sys.executable, __file__, "--child", variant, str(seq)], env=env,
                                 capture_output=True, text=True, timeout=900)
            if out.returncode:
                print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
                return out.returncode
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[variant].append(res)
            print(f"  repeat {r + 1} {variant:<16} peak {res['peak_mib']:8.0f} MiB  act "
                  f"{res['act_mib']:7.0f} MiB  step {res['step_s']:6.2f} s (cpu {res['cpu_s']:6.2f} s)",
                  flush=True)
    med = {v: {k: statistics.median(x[k] for x in rs) for k in ("baseline_mib", "peak_mib", "act_mib",
                                                                 "step_s", "cpu_s", "optimizer_state_mib")}
           | {"params": rs[0]["params"], "trainable": rs[0]["trainable"]} for v, rs in results.items()}
    print(f"\nseq {seq} tokens (64 image tokens), {repeats} repeats, medians; {STEPS} measured steps per "
          "process")
    print(f"{'variant':<16} {'trainable':>10} {'opt state':>10} {'baseline':>9} {'peak':>9} {'act':>9} "
          f"{'step wall':>9} {'step cpu':>9}")
    for v, m in med.items():
        print(f"{v:<16} {m['trainable'] / m['params']:10.1%} {m['optimizer_state_mib']:6.0f} MiB "
              f"{m['baseline_mib']:5.0f} MiB {m['peak_mib']:5.0f} MiB {m['act_mib']:5.0f} MiB "
              f"{m['step_s']:7.2f} s {m['cpu_s']:7.2f} s")
    print("\nactivation checkpointing (target: activation memory >= 2x lower at <= 1.4x step time):")
    for kind in ("full", "frozen_vit", "lora"):
        a, b = med[kind], med[kind + "+ckpt"]
        print(f"  {kind:<11} activation memory {a['act_mib'] / max(b['act_mib'], 1e-9):5.2f}x lower, "
              f"peak {a['peak_mib'] / b['peak_mib']:4.2f}x lower, step time "
              f"{b['step_s'] / a['step_s']:4.2f}x wall, {b['cpu_s'] / a['cpu_s']:4.2f}x cpu")
    full = med["full"]
    for kind in ("frozen_vit", "lora"):
        m = med[kind]
        print(f"  {kind:<11} vs full: trainable {m['trainable'] / full['trainable']:6.1%}, optimizer state "
              f"{m['optimizer_state_mib'] / full['optimizer_state_mib']:6.1%}, peak "
              f"{m['peak_mib'] / full['peak_mib']:4.2f}x, step time "
              f"{m['step_s'] / full['step_s']:4.2f}x wall, {m['cpu_s'] / full['cpu_s']:4.2f}x cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
