"""AdamW optimizer state of a full fine-tune vs LoRA / DoRA (coordexp.trainer.adapters: r 16, alpha 32 on the
language model's projections, the 1000 coordinate rows trainable), on the wider random Qwen2-VL of
bench_memory.py (text hidden 512, 8 layers, vocabulary 4096; vision tower and aligner frozen under the
adapter, as attach_adapter leaves them without full_groups).

State bytes are counted, not timed: one AdamW step on zero gradients allocates ``exp_avg`` and
``exp_avg_sq`` for every trainable parameter, so the state is 8 bytes per trainable fp32 parameter and the
adapter/full ratio should equal the trainable fraction exactly (the target of issue 15: "LoRA cuts optimizer
state by its trainable fraction"). Deterministic; no repeats needed.

Run: python tests/benchmarks/bench_adapter_state.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch
from bench_memory import COORD_IDS, build_model

from coordexp.config.schema import AdapterConfig, AdapterKind
from coordexp.trainer.adapters import attach_adapter


def adam_state(model) -> tuple[int, int, int]:
    """(optimizer state bytes, trainable parameters, all parameters) after one AdamW step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    return state, sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())


def main() -> None:
    full, full_trainable, _ = adam_state(build_model())
    print(f"full       AdamW state {full / 2**20:8.2f} MiB  trainable {full_trainable:>11,d}")
    for kind in (AdapterKind.lora, AdapterKind.dora):
        model = attach_adapter(build_model(), AdapterConfig(kind=kind, r=16, alpha=32), COORD_IDS)
        state, trainable, _ = adam_state(model)
        rows = len(COORD_IDS) * model.get_input_embeddings().token_adapter.base_layer.embedding_dim
        print(f"{kind.value:<10} AdamW state {state / 2**20:8.2f} MiB  trainable {trainable:>11,d} "
              f"(coordinate rows {rows:,d})  state ratio {state / full:.4f}  trainable fraction "
              f"{trainable / full_trainable:.4f}")


if __name__ == "__main__":
    main()
