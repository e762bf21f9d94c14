"""Post-rollout packing: the segments (prompt + target) of one optimizer step laid padding-free into as few
rows of at most ``training.packing_length`` tokens as fit.

In a pack, ``position_ids`` restart at every segment and no attention mask is passed: transformers then
builds the block-diagonal causal mask from the position ids (sdpa/eager on CPU; flash-attention varlen on
GPU), so no token attends across segments. Vision-language segments keep their images: the pack carries the
images of its segments in order, and Qwen-VL's multimodal rotary positions (three mRoPE rows, computed per
segment by the model's ``get_rope_index``) follow a text row that restarts per segment (the ``[4, 1, L]``
layout the Qwen-VL language models read packed masks from).

:func:`plan_packs` is next-fit in arrival order (:class:`NextFitPacker`): a pack takes segments until the
next does not fit. The oldest segment always opens the next pack and no segment waits behind a later one;
unlike a first-fit search, the grouping can be decided as segments arrive, so a pipelined step (rollouts
fetched while packs train) trains exactly the packs of the serial step.
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

__all__ = ["NextFitPacker", "OversizeSegmentError", "PackingSettings", "check_fits", "pack", "plan_packs",
           "segment_length"]


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


def check_fits(length: int, capacity: int, name: str) -> None:
    """Raise :class:`OversizeSegmentError` naming the segment when it alone exceeds a pack."""
    if length > capacity:
        raise OversizeSegmentError(
            f"{name}: prompt + target is {length} tokens, more than training.packing_length={capacity}; "
            f"raise training.packing_length (and vllm.max_model_len), or shorten the sample")


class NextFitPacker:
    """Segments in arrival order fill the open pack until the next one does not fit; that closes the pack.
    The grouping depends only on the order of the segments, not on when they arrive, so serial and pipelined
    steps train the very same packs. The open pack is always the step's last pack."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.open: list[Any] = []
        self.used = 0

    def add(self, item: Any, length: int) -> list[Any] | None:
        """Add a segment; returns the pack it closed (to train now), if any."""
        closed = None
        if self.open and self.used + length > self.capacity:
            closed, self.open, self.used = self.open, [], 0
        self.open.append(item)
        self.used += length
        return closed


def plan_packs(lengths: Sequence[int], capacity: int, names: Sequence[str] | None = None) -> list[list[int]]:
    """Indices of the segments in each pack (next-fit in order, every pack's total <= ``capacity``).

    Raises :class:`OversizeSegmentError` naming the segment (``names[i]``) when one alone exceeds capacity."""
    packer, packs = NextFitPacker(capacity), []
    for i, n in enumerate(lengths):
        check_fits(n, capacity, names[i] if names is not None else f"segment {i}")
        closed = packer.add(i, n)
        if closed:
            packs.append(closed)
    return packs + ([packer.open] if packer.open else [])


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
