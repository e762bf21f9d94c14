"""Per-optimizer-step cost of the learner on the tiny models (CPU): prompt encoding, rollout, Channel-B
bookkeeping (parse + match + target), forward+backward for Channel A and Channel B -- for the text smoke
leaf and the vision-language smoke leaf side by side.

Run: python tests/benchmarks/bench_learner_step.py [steps]
Target: Channel-B bookkeeping < 5% of a Channel-B step. Uses each leaf's settings (16 samples per step,
decode_batch_size 16, max_new_tokens 96) and its Stage-1 tiny model (built and cached on first use).
"""

import statistics
import sys
import time

import torch

from coordexp.config.contract import rollout_contract
from coordexp.config.load import compose, to_train_config
from coordexp.data.jsonl import load_jsonl
from coordexp.data.synthetic import write_synthetic_split
from coordexp.rollout.batch import generate_rollouts
from coordexp.rollout.hf_backend import HFRolloutBackend
from coordexp.rollout.scoring import TokenizerAdapter
from coordexp.trainer.batch import collate
from coordexp.trainer.channels import channel_a_sequence, channel_b_sequence
from coordexp.trainer.learner import load_model
from coordexp.trainer.losses import (
    coord_distribution,
    coord_gate,
    geometry_losses,
    slot_logits,
    weighted_token_ce,
)

PARTS = ("encode_prompts", "rollout", "bookkeeping", "fwd_bwd_B")


def loss_of(model, seqs, adapter, image_token_id):
    batch = collate(seqs, adapter.pad_id, image_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   **batch["model_inputs"]).logits
    slots = slot_logits(logits, batch["geometry_slots"])
    coord_ids = torch.tensor(adapter.coord_token_ids)
    sl1, ciou, cce = geometry_losses(coord_distribution(slots, coord_ids), batch["geometry_bins"], 0.05)
    return (weighted_token_ce(logits, batch["input_ids"], batch["ce_weights"]) + sl1 + ciou + cce
            + coord_gate(slots, coord_ids))


def measure(leaf: str, steps: int) -> dict:
    cfg = to_train_config(compose([f"+experiment={leaf}", "rollout=hf", "hydra.run.dir=/tmp/coordexp-bench"]))
    model, tok, model_dir, prompts = load_model(cfg)
    adapter, contract, ab = TokenizerAdapter(tok), rollout_contract(cfg), cfg.stage2_ab
    syn = cfg.data.synthetic
    syn.train_samples = 16 * steps
    path = write_synthetic_split(f"/tmp/coordexp-bench/{leaf.replace('/', '_')}/train.jsonl", syn, "train")
    samples = list(load_jsonl(path))
    image_token_id = prompts.image_token_id
    backend = HFRolloutBackend(lambda: model, tok, contract, image_token_id)
    times = {k: [] for k in (*PARTS, "fwd_bwd_A")}
    for step in range(steps):
        chunk = samples[16 * step: 16 * (step + 1)]
        t0 = time.perf_counter()
        encoded = [prompts.encode(s) for s in chunk]
        t1 = time.perf_counter()
        batch = generate_rollouts(backend, chunk, encoded, seed=step)
        t2 = time.perf_counter()
        seqs = [channel_b_sequence(s, p, r, adapter, contract, ab)[0]
                for s, p, r in zip(chunk, encoded, batch.rollouts)]
        t3 = time.perf_counter()
        loss_of(model, [q for q in seqs if q is not None], adapter, image_token_id).backward()
        t4 = time.perf_counter()
        loss_of(model, [channel_a_sequence(s, p, adapter, "desc_first", ab) for s, p in zip(chunk, encoded)],
                adapter, image_token_id).backward()
        t5 = time.perf_counter()
        for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            times[key].append(value)
    return {"model": model_dir.name, **{k: statistics.median(v) for k, v in times.items()}}


def main(steps: int = 5) -> None:
    results = {leaf: measure(leaf, steps) for leaf in ("smoke/ab_mixed", "smoke/ab_mixed_vl")}
    print(f"16 samples/step, median of {steps} steps; seconds (share of the Channel-B step)")
    print(f"{'part':<22}" + "".join(f"{leaf:>30}" for leaf in results))
    for key in (*PARTS, "fwd_bwd_A"):
        cells = []
        for med in results.values():
            b_step = sum(med[k] for k in PARTS)
            cells.append(f"{med[key]:.3f} ({med[key] / b_step:.1%})" if key in PARTS else f"{med[key]:.3f}")
        print(f"{key:<22}" + "".join(f"{c:>30}" for c in cells))
    for leaf, med in results.items():
        b_step = sum(med[k] for k in PARTS)
        print(f"{leaf}: Channel-B step {b_step:.3f} s, bookkeeping {med['bookkeeping'] / b_step:.1%} "
              f"(target < 5%), model {med['model']}")
    text, vl = (sum(r[k] for k in PARTS) for r in results.values())
    print(f"VL / text Channel-B step time: {vl / text:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
