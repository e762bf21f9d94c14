"""Logits only at supervised positions (coordexp.trainer.kept_logits) vs the full ``[B, T, V]`` logits, side
by side: the step's activation peak and its forward+backward time on a production-sized vocabulary.

A Qwen2 causal LM of Qwen2.5-VL's vocabulary (152064; hidden 256, 2 layers, float32, random weights) trains
one packed Channel-A step through the real ``Stage2ABTrainer`` loss path. Each segment is a prompt of
``prompt`` unsupervised tokens (the image placeholders and text of a VL prompt) and a target of ``target``
supervised tokens (objects of 6 text + 4 coordinate tokens); ``segments`` segments per pack. "full" is the
path before kept logits (every position gets logits: the positions are not passed to the model).

Peak: one step in a fresh process per mode, the peak RSS over the RSS before the step (``VmHWM`` after a
``/proc/self/clear_refs`` reset; CUDA: ``torch.cuda.max_memory_allocated`` over the allocated bytes before).
Time: median of ``repeats`` steps, modes interleaved.

Run: python tests/benchmarks/bench_kept_logits.py [--device cuda] [repeats] [prompt] [target] [segments]
(defaults 5, 1200, 300, 4: a Qwen2.5-VL COCO sample has ~1000-1300 image tokens and 200-400 answer tokens)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_memory import settle_and_reset_peak, status_mib

from coordexp.config.load import compose, to_train_config
from coordexp.telemetry.metrics import MetricBuffer
from coordexp.trainer import stage2_trainer
from coordexp.trainer.batch import TrainSequence
from coordexp.trainer.packing import pack

VOCAB, COORDS = 152064, 1000


def build(device: torch.device, prompt: int, target: int, segments: int, n_softctx_iter: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config).to(device).train()
    coord_ids = list(range(VOCAB - COORDS, VOCAB))
    seqs = []
    for _ in range(segments):
        prompt_ids = torch.randint(0, VOCAB - COORDS, (prompt,)).tolist()
        target_ids, slots, bins = [], [], []
        for _ in range(target // 10):
            target_ids += torch.randint(0, VOCAB - COORDS, (6,)).tolist()
            box = torch.randint(0, COORDS, (4,)).tolist()
            slots.append(tuple(range(len(target_ids), len(target_ids) + 4)))
            bins.append(tuple(box))
            target_ids += [coord_ids[b] for b in box]
        seqs.append(TrainSequence(prompt_ids, target_ids, [1.0] * len(target_ids), slots, bins,
                                  [0] * len(slots)))
    ab = to_train_config(compose(["+experiment=smoke/a_only", "rollout=hf",
                                  f"stage2_ab.n_softctx_iter={n_softctx_iter}"])).stage2_ab
    fake = SimpleNamespace(stage2_ab=ab, metric_buffer=MetricBuffer(),
                           args=SimpleNamespace(device=device), _coord_ids=torch.tensor(coord_ids),
                           _keeps_logits=None, _forward_tokens=0,
                           accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    for name in ("_logits", "_forward_losses", "_weighted"):
        setattr(fake, name, getattr(stage2_trainer.Stage2ABTrainer, name).__get__(fake))
    return model, fake, seqs


def step(model, fake, seqs, full: bool) -> float:
    real = stage2_trainer.supervised_positions
    if full:
        stage2_trainer.supervised_positions = lambda *a: (None, None)
    try:
        model.zero_grad(set_to_none=False)
        t0 = time.perf_counter()
        loss = fake._weighted(fake._forward_losses(model, pack(seqs), len(seqs), True)).sum() / len(seqs)
        loss.backward()
        if fake.args.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    finally:
        stage2_trainer.supervised_positions = real


def peak_mib(device: torch.device, mode: str, sizes: list[int], n_softctx_iter: int) -> float:
    """One step in this fresh process (no earlier step's cached blocks): the gradients are allocated first, so
    the peak is the step's activations, logits and loss."""
    model, fake, seqs = build(device, *sizes, n_softctx_iter)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(model, fake, seqs, mode == "full")
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if not settle_and_reset_peak():
        raise SystemExit("this kernel refuses /proc/self/clear_refs: no peak RSS per step")
    before = status_mib("VmRSS")
    step(model, fake, seqs, mode == "full")
    return status_mib("VmHWM") - before


def main() -> None:
    args = sys.argv[1:]
    device = torch.device("cpu")
    if args[:1] == ["--device"]:
        device, args = torch.device(args[1]), args[2:]
    if args[:1] == ["--peak"]:  # the child process of one peak measurement
        mode, n_softctx_iter, sizes = args[1], int(args[2]), [int(a) for a in args[3:6]]
        print(json.dumps(peak_mib(device, mode, sizes, n_softctx_iter)))
        return
    repeats = int(args[0]) if args else 5
    sizes = [int(a) for a in args[1:4]] if len(args) > 1 else [1200, 300, 4]
    prompt, target, segments = sizes
    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
    print(f"{device} ({where}); vocab {VOCAB}; one pack of {segments} segments x ({prompt} prompt + {target} "
          f"supervised tokens) = {segments * (prompt + target)} tokens; median of {repeats}")
    for n_softctx_iter in (1, 2):
        peaks = {}
        for mode in ("full", "kept"):
            out = subprocess.run([sys.executable, __file__, "--device", str(device), "--peak", mode,
                                  str(n_softctx_iter), *map(str, sizes)], capture_output=True, text=True,
                                 check=True)
            peaks[mode] = float(out.stdout.strip().splitlines()[-1])
        model, fake, seqs = build(device, *sizes, n_softctx_iter)
        step(model, fake, seqs, False)  # warm-up
        times = {"full": [], "kept": []}
        for _ in range(repeats):
            for mode, runs in times.items():
                runs.append(step(model, fake, seqs, mode == "full"))
        t = {m: statistics.median(v) for m, v in times.items()}
        print(f"  n_softctx_iter {n_softctx_iter}: step peak full {peaks['full']:7.0f} MiB, kept "
              f"{peaks['kept']:7.0f} MiB ({peaks['full'] / peaks['kept']:.2f}x lower); step time full "
              f"{t['full']:.3f} s, kept {t['kept']:.3f} s ({t['full'] / t['kept']:.2f}x faster)")


if __name__ == "__main__":
    main()
