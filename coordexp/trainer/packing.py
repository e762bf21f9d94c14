"""Post-rollout packing: the segments (prompt + target) of one optimizer step laid padding-free into as few
rows of at most ``training.packing_length`` tokens as fit.

In a pack, ``position_ids`` restart at every segment and no attention mask is passed: transformers then
builds the block-diagonal causal mask from the position ids (sdpa/eager on CPU; flash-attention varlen on
GPU), so no token attends across segments. Vision-language segments keep their images: the pack carries the
images of its segments in order, and Qwen-VL's multimodal rotary positions (three mRoPE rows, computed per
segment by the model's ``get_rope_index``) follow a text row that restarts per segment (the ``[4, 1, L]``
layout the Qwen-VL language models read packed masks from).

:func:`plan_packs` is FIFO-greedy: each pack starts with the oldest segment not yet packed and takes every
later one that still fits, in order. Deterministic, and no segment waits behind a later one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from coordexp.errors import LearnerError
from coordexp.models.prompts import concat_vision
from coordexp.trainer.batch import TrainSequence
from coordexp.trainer.positions import mrope_position_ids

__all__ = ["OversizeSegmentError", "PackingSettings", "pack", "plan_packs", "segment_length"]


@dataclass(frozen=True)
class PackingSettings:
    """``training.packing_*``: tokens per pack, most segments buffered per step, the fill below which a
    step counts as underfilled (and pipelined rollouts wait for more segments before a pack)."""

    length: int
    buffer: int
    min_fill_ratio: float

    @classmethod
    def from_training(cls, training: Any) -> PackingSettings | None:
        if not training.packing:
            return None
        return cls(int(training.packing_length), int(training.packing_buffer),
                   float(training.packing_min_fill_ratio))


class OversizeSegmentError(LearnerError):
    """A segment is longer than ``training.packing_length``: it fits no pack."""


def segment_length(seq: TrainSequence) -> int:
    return len(seq.prompt_ids) + len(seq.target_ids)


def plan_packs(lengths: Sequence[int], capacity: int, names: Sequence[str] | None = None) -> list[list[int]]:
    """Indices of the segments in each pack (FIFO-greedy, every pack's total <= ``capacity`` tokens).

    Raises :class:`OversizeSegmentError` naming the segment (``names[i]``) when one alone exceeds capacity."""
    for i, n in enumerate(lengths):
        if n > capacity:
            name = names[i] if names is not None else f"segment {i}"
            raise OversizeSegmentError(
                f"{name}: prompt + target is {n} tokens, more than training.packing_length={capacity}; raise "
                f"training.packing_length (and vllm.max_model_len), or shorten the sample")
    left = list(range(len(lengths)))
    packs: list[list[int]] = []
    while left:
        pack_, used, rest = [], 0, []
        for i in left:
            if used + lengths[i] <= capacity:
                pack_.append(i)
                used += lengths[i]
            else:
                rest.append(i)
        packs.append(pack_)
        left = rest
    return packs


def pack(seqs: Sequence[TrainSequence], image_token_id: int | None = None, model: Any = None) -> dict:
    """One padding-free row of ``seqs``, in the layout of :func:`coordexp.trainer.batch.collate` (batch 1):
    ``input_ids``, ``ce_weights``, ``segment_ids`` ``[1, L]``, ``position_ids`` (``[1, L]`` text positions
    restarting per segment; ``[4, 1, L]`` for a vision-language model given as ``model``), geometry slots
    ``[N, 4, 2]`` at packed positions, ``geometry_segments [N]``, ``model_inputs`` (the segments' images in
    order) and ``attention_mask: None`` (the position ids define the block-diagonal mask)."""
    ids, weights, segments, text_pos, rope_rows = [], [], [], [], []
    slots, bins, kinds, groups = [], [], [], []
    offset = 0
    for s, seq in enumerate(seqs):
        seg = list(seq.prompt_ids) + list(seq.target_ids)
        start = offset + len(seq.prompt_ids)
        ids += seg
        weights += [0.0] * len(seq.prompt_ids) + [float(w) for w in seq.ce_weights]
        segments += [s] * len(seg)
        text_pos += list(range(len(seg)))
        for group, gt, kind in zip(seq.geometry_slots, seq.geometry_bins, seq.geometry_kinds):
            slots.append([[0, start + p] for p in group])
            bins.append(list(gt))
            kinds.append(kind)
            groups.append(s)
        if model is not None and seq.vision is not None:
            seg_ids = torch.tensor([seg])
            rope = mrope_position_ids(model, seg_ids, None,
                                      concat_vision([seq.vision], image_token_id, seg_ids))
            rope_rows.append(rope)
        elif model is not None:
            rope_rows.append(torch.arange(len(seg)).view(1, 1, -1).expand(3, 1, -1))
        offset += len(seg)
    input_ids = torch.tensor([ids], dtype=torch.long)
    text = torch.tensor([text_pos], dtype=torch.long)
    visions = [seq.vision for seq in seqs]
    has_images = any(v is not None for v in visions)
    positions = (torch.cat([text.unsqueeze(0), torch.cat(rope_rows, dim=-1)], dim=0)
                 if has_images and model is not None else text)
    return {
        "input_ids": input_ids,
        "attention_mask": None,
        "position_ids": positions,
        "ce_weights": torch.tensor([weights], dtype=torch.float32),
        "segment_ids": torch.tensor([segments], dtype=torch.long),
        "geometry_slots": torch.tensor(slots, dtype=torch.long).reshape(-1, 4, 2),
        "geometry_bins": torch.tensor(bins, dtype=torch.long).reshape(-1, 4),
        "geometry_kinds": torch.tensor(kinds, dtype=torch.long),
        "geometry_segments": torch.tensor(groups, dtype=torch.long),
        "model_inputs": concat_vision(visions, image_token_id, input_ids),
    }
