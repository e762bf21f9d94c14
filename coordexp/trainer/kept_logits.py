"""Logits only where a loss reads them: the positions that predict a supervised token.

A training forward of a causal LM computes ``[B, T, V]`` logits by default: with Qwen's 152k vocabulary that
is about 0.3 MB per token in bf16 (0.9 MB with the float32 copy the loss takes), most of a step's activation
memory at long sequences, and almost all of it for prompt tokens no loss reads (a vision-language prompt is
mostly image placeholders). coordexp asks the model for the logits of the supervised positions only:
transformers' causal-LM heads take ``logits_to_keep`` as a 1-D index tensor and run ``lm_head`` on
``hidden_states[:, logits_to_keep]`` (transformers >= 4.50, e.g. ``Qwen2ForCausalLM.forward``). A model
whose forward has no such argument gets the full logits, and the kept columns are selected from them: the
same values, without the saving.

Convention: ``positions [K]`` ascending sequence positions; ``logits[:, k]`` are the model's logits at
position ``positions[k]``, which predict the token at ``positions[k] + 1``. ``positions=None`` stands for
every position (full ``[B, T, V]`` logits).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["accepts_logits_to_keep", "forward_logits", "predicting_logits", "supervised_positions"]


def supervised_positions(ce_weights: torch.Tensor, geometry_slots: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(every predicting position, the coordinate slots' predicting positions), each ``[K]`` ascending.

    ``ce_weights [B, T]`` (the weight of predicting each token), ``geometry_slots [N, 4, 2]`` (row, position)
    of each coordinate slot. A position is kept when the token after it has CE weight > 0 in any row or is a
    coordinate slot (a padded batch keeps the union over its rows)."""
    device = ce_weights.device
    ce = (ce_weights[:, 1:] > 0).any(0).nonzero().squeeze(1)
    slots = (geometry_slots[..., 1].reshape(-1).to(device) - 1).unique()
    return torch.cat([ce, slots]).unique(), slots


def predicting_logits(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
    """The logits that predict the tokens at ``(rows, targets)`` (each ``[M]``, targets >= 1): ``[M, V]``.

    ``logits [B, K, V]`` at ``positions [K]`` (None: ``[B, T, V]``, every position). Raises ValueError when a
    target's predicting position was not kept (a caller's bug: the loss would read another token's logits)."""
    before = targets - 1
    if positions is None:
        return logits[rows, before]
    cols = torch.searchsorted(positions, before).clamp(max=max(len(positions) - 1, 0))
    if before.numel() and not bool((positions[cols] == before).all()):
        raise ValueError("a target's predicting position is not among the kept logits positions")
    return logits[rows, cols]


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (the causal-LM heads of transformers >= 4.50).
    A peft model is asked about the model it wraps (its own forward passes every keyword through)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def forward_logits(run: Callable[..., Any], positions: torch.Tensor | None, keeps: bool,
                   **kwargs: Any) -> torch.Tensor:
    """``run(**kwargs).logits`` at ``positions`` (``[B, K, V]``; None: every position, ``[B, T, V]``).
    ``keeps``: the model computes only those (:func:`accepts_logits_to_keep`), else they are selected from
    the full logits."""
    if positions is None:
        return run(**kwargs).logits
    if keeps:
        return run(logits_to_keep=positions, **kwargs).logits
    return run(**kwargs).logits.index_select(1, positions)
