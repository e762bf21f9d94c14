"""Teacher-forced sequences (prompt + supervised target) and their collation into tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from coordexp.models.prompts import concat_vision

PREFIX, APPENDED = 0, 1  # geometry group kinds: matched rollout-prefix object, appended GT object


@dataclass
class TrainSequence:
    """One sample's teacher-forced sequence; positions index ``target_ids``."""

    prompt_ids: list[int]
    target_ids: list[int]
    ce_weights: list[float]                       # weight of predicting target_ids[i]; 0 = no CE
    geometry_slots: list[tuple[int, int, int, int]] = field(default_factory=list)
    geometry_bins: list[tuple[int, int, int, int]] = field(default_factory=list)
    geometry_kinds: list[int] = field(default_factory=list)  # PREFIX or APPENDED
    vision: dict[str, torch.Tensor] | None = None         # image inputs of a vision-language prompt
    source: str = ""                                      # the sample it came from (file:line), for messages

    def __post_init__(self) -> None:
        if len(self.ce_weights) != len(self.target_ids):
            raise ValueError(f"ce_weights ({len(self.ce_weights)}) and target_ids ({len(self.target_ids)}) "
                             "differ")
        if not (len(self.geometry_slots) == len(self.geometry_bins) == len(self.geometry_kinds)):
            raise ValueError("geometry slots, bins and kinds must have one entry per box")


def collate(seqs: Sequence[TrainSequence], pad_id: int, image_token_id: int | None = None) -> dict:
    """Right-padded batch: input_ids, attention_mask, ce_weights, segment_ids (the row: one sample per row)
    [B, T]; geometry as absolute (row, position) slots [N, 4, 2], bins [N, 4], kinds [N], segments [N];
    ``model_inputs``: the vision inputs of the rows in order (pixel_values, image_grid_thw,
    mm_token_type_ids), empty for text."""
    lengths = [len(s.prompt_ids) + len(s.target_ids) for s in seqs]
    width = max(lengths)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    weights = torch.zeros((len(seqs), width), dtype=torch.float32)
    slots, bins, kinds, groups = [], [], [], []
    for row, seq in enumerate(seqs):
        start = len(seq.prompt_ids)
        ids = list(seq.prompt_ids) + list(seq.target_ids)
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[row, : len(ids)] = 1
        weights[row, start: len(ids)] = torch.tensor(seq.ce_weights, dtype=torch.float32)
        for group, gt, kind in zip(seq.geometry_slots, seq.geometry_bins, seq.geometry_kinds):
            slots.append([[row, start + p] for p in group])
            bins.append(list(gt))
            kinds.append(kind)
            groups.append(row)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "ce_weights": weights,
        "geometry_slots": torch.tensor(slots, dtype=torch.long).reshape(-1, 4, 2),
        "geometry_bins": torch.tensor(bins, dtype=torch.long).reshape(-1, 4),
        "geometry_kinds": torch.tensor(kinds, dtype=torch.long),
        "segment_ids": torch.arange(len(seqs)).unsqueeze(1).expand(-1, width).clone(),
        "geometry_segments": torch.tensor(groups, dtype=torch.long),
        "model_inputs": concat_vision([s.vision for s in seqs], image_token_id, input_ids),
    }
