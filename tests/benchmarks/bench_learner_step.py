"""Per-optimizer-step cost of the learner on the tiny model (CPU): rollout, Channel-B bookkeeping
(parse + match + target), forward+backward for Channel A and Channel B.

Run: python tests/benchmarks/bench_learner_step.py [steps]
Target: Channel-B bookkeeping < 5% of a Channel-B step. Uses the smoke leaf's settings (16 samples per
step, decode_batch_size 16, max_new_tokens 96) and its Stage-1 tiny model (built and cached on first use).
"""

import statistics
import sys
import time

import torch

from coordexp.config.contract import rollout_contract
from coordexp.config.load import compose, to_train_config
from coordexp.data.jsonl import load_jsonl
from coordexp.data.synthetic import SyntheticSpec, write_synthetic_jsonl
from coordexp.trainer.batch import collate
from coordexp.trainer.channels import TokenizerAdapter, channel_a_sequence, channel_b_sequence
from coordexp.trainer.learner import load_model
from coordexp.trainer.losses import coord_distribution, coord_gate, geometry_losses, slot_logits, weighted_token_ce
from coordexp.trainer.rollouts import HFRolloutBackend


def loss_of(model, seqs, adapter, ab):
    batch = collate(seqs, adapter.pad_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    slots = slot_logits(logits, batch["geometry_slots"])
    coord_ids = torch.tensor(adapter.coord_token_ids)
    sl1, ciou, cce = geometry_losses(coord_distribution(slots, coord_ids), batch["geometry_bins"], 0.05)
    return (weighted_token_ce(logits, batch["input_ids"], batch["ce_weights"]) + sl1 + ciou + cce
            + coord_gate(slots, coord_ids))


def main(steps: int = 5) -> None:
    cfg = to_train_config(compose(["+experiment=smoke/ab_mixed", "hydra.run.dir=/tmp/coordexp-bench"]))
    model, tok, model_dir = load_model(cfg)
    adapter, contract, ab = TokenizerAdapter(tok), rollout_contract(cfg), cfg.stage2_ab
    path = write_synthetic_jsonl("/tmp/coordexp-bench/data.jsonl", 16 * steps, 5, SyntheticSpec())
    samples = list(load_jsonl(path))
    backend = HFRolloutBackend(lambda: model, tok, contract)
    times = {k: [] for k in ("rollout", "bookkeeping", "fwd_bwd_B", "fwd_bwd_A")}
    for step in range(steps):
        chunk = samples[16 * step: 16 * (step + 1)]
        prompts = [adapter.prompt_ids(list(s.messages)) for s in chunk]
        t0 = time.perf_counter()
        batch = backend.generate(prompts, [list(s.messages) for s in chunk], seed=step)
        t1 = time.perf_counter()
        seqs = [channel_b_sequence(s, p, r, adapter, contract, ab)[0] for s, p, r in zip(chunk, prompts, batch.rollouts)]
        t2 = time.perf_counter()
        loss_of(model, [q for q in seqs if q is not None], adapter, ab).backward()
        t3 = time.perf_counter()
        loss_of(model, [channel_a_sequence(s, p, adapter, "desc_first", ab) for s, p in zip(chunk, prompts)],
                adapter, ab).backward()
        t4 = time.perf_counter()
        for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[key].append(value)
    med = {k: statistics.median(v) for k, v in times.items()}
    b_step = med["rollout"] + med["bookkeeping"] + med["fwd_bwd_B"]
    print(f"tiny model {model_dir.name}, 16 samples/step, median of {steps} steps")
    print(f"{'part':<34}{'seconds':>10}{'share of B step':>18}")
    for key in ("rollout", "bookkeeping", "fwd_bwd_B"):
        print(f"{key:<34}{med[key]:>10.3f}{med[key] / b_step:>17.1%}")
    print(f"{'Channel-B step total':<34}{b_step:>10.3f}")
    print(f"{'Channel-A step (fwd_bwd_A)':<34}{med['fwd_bwd_A']:>10.3f}")
    print(f"bookkeeping share of a Channel-B step: {med['bookkeeping'] / b_step:.1%} (target < 5%)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
