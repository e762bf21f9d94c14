"""Learner step throughput with post-rollout packing vs without, and soft self-context cost, side by side.

For the smoke leaves' effective batch (16 samples per optimizer step), tiny text and VL models, Channel A and
Channel B (segments from the model's own greedy rollouts, made once), the forward+backward time of one step:
- ``unpacked x16``: 16 micro-steps of one sample (what per_device_train_batch_size 1 does without packing);
- ``padded x1``: one right-padded micro-batch of 16 (per_device_train_batch_size 16);
- ``packed``: next-fit packs of ``packing_length`` tokens (the real ``Stage2ABTrainer`` pack path);
and Channel A with ``n_softctx_iter`` 2 vs 1 (packed). Interleaved repeats, medians.

Run: python tests/benchmarks/bench_packing.py [--device cuda] [repeats] [packing_length] [leaf ...]
(leaves default to both smoke leaves; ``--device cuda`` runs the same steps on the first GPU)
Target: packed >= 1.5x unpacked x16 in samples/s.
"""

from __future__ import annotations

import statistics
import sys
import time
from types import SimpleNamespace

import torch

from coordexp.config.contract import rollout_contract
from coordexp.config.load import compose, to_train_config
from coordexp.data.jsonl import load_jsonl
from coordexp.data.prompt import PromptSpec
from coordexp.data.synthetic import write_synthetic_split
from coordexp.rollout.batch import generate_rollouts
from coordexp.rollout.hf_backend import HFRolloutBackend
from coordexp.rollout.scoring import TokenizerAdapter
from coordexp.telemetry.metrics import MetricBuffer
from coordexp.trainer.channels import channel_a_sequence, channel_b_sequence
from coordexp.trainer.learner import load_model
from coordexp.trainer.packing import plan_packs, segment_length
from coordexp.trainer.stage2_trainer import Stage2ABTrainer


def trainer_view(ab, adapter, prompts, device: torch.device):
    fake = SimpleNamespace(stage2_ab=ab, adapter=adapter, metric_buffer=MetricBuffer(), prompts=prompts,
                           args=SimpleNamespace(device=device),
                           _coord_ids=torch.tensor(adapter.coord_token_ids), _keeps_logits=None,
                           _forward_tokens=0,
                           accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    for name in ("_logits", "_forward_losses", "_weighted", "_sample_losses", "_mean_loss", "_pack_loss"):
        setattr(fake, name, getattr(Stage2ABTrainer, name).__get__(fake))
    return fake


def step_time(model, fake, seqs, mode: str, soft: bool, capacity: int) -> float:
    model.zero_grad()
    t0 = time.perf_counter()
    n = len(seqs)
    if mode == "unpacked x16":
        for q in seqs:
            (fake._weighted(fake._sample_losses(model, [q], soft)).sum() / n).backward()
    elif mode == "padded x1":
        (fake._weighted(fake._sample_losses(model, seqs, soft)).sum() / n).backward()
    else:
        for members in plan_packs([segment_length(q) for q in seqs], capacity):
            fake._pack_loss(model, [seqs[i] for i in members], n, soft).backward()
    if fake.args.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def setup(leaf: str, softctx: int, device: torch.device):
    cfg = to_train_config(compose([f"+experiment={leaf}", "rollout=hf", f"stage2_ab.n_softctx_iter={softctx}",
                                   "hydra.run.dir=/tmp/coordexp-bench-packing"]))
    model, tok, _, prompts = load_model(cfg)
    model.to(device).train()
    adapter, ab = TokenizerAdapter(tok), cfg.stage2_ab
    path = write_synthetic_split(f"/tmp/coordexp-bench-packing/{leaf.replace('/', '_')}.jsonl",
                                 cfg.data.synthetic, "val")
    samples = list(load_jsonl(path, PromptSpec()))[:16]
    encoded = [prompts.encode(s) for s in samples]
    seqs_a = [channel_a_sequence(s, p, adapter, "desc_first", ab) for s, p in zip(samples, encoded)]
    backend = HFRolloutBackend(lambda: model, tok, rollout_contract(cfg), prompts.image_token_id)
    batch = generate_rollouts(backend, samples, encoded, seed=0)
    model.train()
    seqs_b = [q for q in (channel_b_sequence(s, p, r, adapter, rollout_contract(cfg), ab)[0]
                          for s, p, r in zip(samples, encoded, batch.rollouts)) if q is not None]
    return model, trainer_view(ab, adapter, prompts, device), seqs_a, seqs_b


def main() -> None:
    args = sys.argv[1:]
    device = torch.device("cpu")
    if args[:1] == ["--device"]:
        device, args = torch.device(args[1]), args[2:]
    repeats = int(args[0]) if args else 5
    capacity = int(args[1]) if len(args) > 1 else 1024
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
    print(f"{device} ({where}); packing_length {capacity}; 16 samples per step; median of {repeats}")
    for leaf in args[2:] or ("smoke/ab_mixed", "smoke/ab_mixed_vl"):
        model, fake, seqs_a, seqs_b = setup(leaf, 1, device)
        lengths = [segment_length(q) for q in seqs_a]
        print(f"\n{leaf}: segment tokens A mean {statistics.mean(lengths):.0f} (max {max(lengths)}), "
              f"packs A {len(plan_packs(lengths, capacity))}, "
              f"packs B {len(plan_packs([segment_length(q) for q in seqs_b], capacity))}")
        for channel, seqs in (("A", seqs_a), ("B", seqs_b)):
            times = {m: [] for m in ("unpacked x16", "padded x1", "packed")}
            for _ in range(repeats):
                for mode, runs in times.items():
                    runs.append(step_time(model, fake, seqs, mode, False, capacity))
            med = {m: statistics.median(v) for m, v in times.items()}
            base = len(seqs) / med["unpacked x16"]
            print("  channel " + channel + ": " + "  ".join(
                f"{m} {len(seqs) / t:6.1f} samples/s ({len(seqs) / t / base:.2f}x)" for m, t in med.items()))
        soft = {1: [], 2: []}
        model.stage2_ab = fake.stage2_ab
        for _ in range(repeats):
            for n in (1, 2):
                fake.stage2_ab.n_softctx_iter = n
                soft[n].append(step_time(model, fake, seqs_a, "packed", True, capacity))
        r1, r2 = statistics.median(soft[1]), statistics.median(soft[2])
        print(f"  soft self-context, channel A packed: N=1 {r1:.3f} s, N=2 {r2:.3f} s ({r2 / r1:.2f}x)")


if __name__ == "__main__":
    main()
