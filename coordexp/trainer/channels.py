"""Builds the Channel-A and Channel-B teacher-forced sequences of a micro-batch's samples (Channel B also
returns each sample's rollout record, :mod:`coordexp.rollout.scoring`)."""

from __future__ import annotations

from coordexp.config.contract import RolloutContract
from coordexp.config.schema import Stage2ABConfig
from coordexp.coordjson import (
    FieldOrder,
    TargetInvariantError,
    build_channel_a_target,
    build_channel_b_target,
)
from coordexp.models.prompts import EncodedPrompt
from coordexp.rollout.batch import Rollout
from coordexp.rollout.scoring import TokenizerAdapter, gt_objects, sample_record, score_rollout
from coordexp.trainer.batch import APPENDED, PREFIX, TrainSequence


def channel_a_sequence(sample, prompt: EncodedPrompt, tok: TokenizerAdapter, field_order: str,
                       ab: Stage2ABConfig) -> TrainSequence:
    target = build_channel_a_target(gt_objects(sample, tok), field_order=FieldOrder(field_order),
                                    coord_vocab=tok.coord_vocab, encode=tok.encode,
                                    decode_token=tok.decode_token, eos_id=tok.eos_id,
                                    desc_ce_weight=ab.desc_ce_weight)
    return _to_sequence(sample, prompt, target)


def _to_sequence(sample, prompt: EncodedPrompt, target) -> TrainSequence:
    groups = target.geometry_groups
    return TrainSequence(
        source=str(getattr(sample, "source", "")),
        prompt_ids=list(prompt.ids),
        vision=prompt.vision,
        target_ids=[int(i) for i in target.input_ids],
        ce_weights=[float(w) for w in target.ce_weights],
        geometry_slots=[tuple(int(p) for p in g.positions) for g in groups],
        geometry_bins=[tuple(int(b) for b in g.gt_bins) for g in groups],
        geometry_kinds=[PREFIX if g.pred_index is not None else APPENDED for g in groups],
    )


def channel_b_sequence(sample, prompt: EncodedPrompt, rollout: Rollout, tok: TokenizerAdapter,
                       contract: RolloutContract, ab: Stage2ABConfig):
    """(TrainSequence, or None if the sample's target failed its invariants; SampleRecord)."""
    parsed, gts, match = score_rollout(sample, rollout, tok, contract)
    sequence: TrainSequence | None = None
    try:
        target = build_channel_b_target(
            parsed, gts, match.index_pairs, field_order=FieldOrder(contract.object_field_order),
            coord_vocab=tok.coord_vocab, encode=tok.encode, decode_token=tok.decode_token, eos_id=tok.eos_id,
            desc_ce_weight=ab.desc_ce_weight,
            drop_invalid_struct_ce_multiplier=ab.channel_b.drop_invalid_struct_ce_multiplier)
        sequence = _to_sequence(sample, prompt, target)
    except TargetInvariantError:
        sequence = None
    return sequence, sample_record(sample, rollout, parsed, gts, match, sequence is None)


