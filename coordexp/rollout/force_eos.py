"""The forced-EOS edit of next-token scores, shared by the HF guard and the vLLM processors (torch only)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["force_eos_rows"]


def force_eos_rows(scores: torch.Tensor, rows: Sequence[int], stop_ids: Sequence[int]) -> torch.Tensor:
    """In place: rows ``rows`` of ``scores`` (``[batch, vocab]``) become ``-inf`` except the stop ids
    (``0.0``). Returns ``scores``."""
    if not rows:
        return scores
    r = torch.as_tensor(list(rows), dtype=torch.long, device=scores.device)
    s = torch.as_tensor(list(stop_ids), dtype=torch.long, device=scores.device)
    scores.index_fill_(0, r, float("-inf"))
    scores[r.unsqueeze(1), s.unsqueeze(0)] = 0.0
    return scores
