"""Scoring one rollout: the tokenizer as the pure core sees it, strict parse + Hungarian match against the
ground truth, the per-sample record every rollout metric is computed from, and those metrics.

Shared by Channel B (training), the in-training rollout eval and ``coordexp.eval``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cache, cached_property, lru_cache
from pathlib import Path

from coordexp.checkpoint import read_stop_ids
from coordexp.config.contract import RolloutContract
from coordexp.coordjson import (
    NUM_BINS,
    CoordObject,
    CoordVocab,
    DropReason,
    FieldOrder,
    frame_pieces,
    parse_rollout,
    raw_piece,
    spelled,
)
from coordexp.data.special_tokens import special_token_pattern
from coordexp.matching import match_boxes
from coordexp.rollout.batch import Rollout
from coordexp.telemetry.metrics import MetricBuffer

__all__ = ["SampleRecord", "TokenizerAdapter", "gt_objects", "record_as_dict", "record_rollout_metrics",
           "sample_record", "score_rollout", "stop_ids_of"]


@cache
def _stop_ids(folder: str, eos: int) -> tuple[int, ...]:
    return read_stop_ids(folder, tokenizer_eos=eos) if Path(folder).is_dir() else (eos,)


def stop_ids_of(tokenizer) -> tuple[int, ...]:
    """The one stop-token set of the checkpoint the tokenizer was loaded from (``checkpoint.read_stop_ids``:
    the tokenizer's EOS, then ``generation_config.json``'s ``eos_token_id`` list), read once per folder. It
    drives every backend (HF ``generate``, server rollouts), the forced-EOS guard, rollout trimming, the
    parser and the metrics. A tokenizer without a folder: its EOS alone."""
    return _stop_ids(str(getattr(tokenizer, "name_or_path", "") or ""), int(tokenizer.eos_token_id))


class TokenizerAdapter:
    """The tokenizer as the pure core sees it: encode, lossless per-token pieces, coordinate vocabulary, the
    stop-token set."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = int(tokenizer.eos_token_id)  # end of turn: what every target closes with
        self.stop_ids = stop_ids_of(tokenizer)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id)
        self.coord_vocab = CoordVocab.from_vocab(tokenizer.get_vocab())
        self.coord_token_ids = [self.coord_vocab.id_of(k) for k in range(NUM_BINS)]
        # lossless (coordjson.raw_piece): a byte-level token holding part of a multi-byte character keeps
        # its bytes, so the token frame decodes split characters exactly (docs/channel_b.md)
        self.decode_token = lru_cache(maxsize=None)(lambda i: raw_piece(
            tokenizer.convert_ids_to_tokens(int(i)), tokenizer.decode([int(i)], skip_special_tokens=False)))
        # the Rust tokenizer behind a fast tokenizer gives the same ids without transformers' per-call
        # overhead (~0.1 ms, two calls per Channel-B sample)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._encode = ((lambda text: backend.encode(text, add_special_tokens=False).ids)
                        if backend is not None
                        else (lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])))
        self._spelled = lru_cache(maxsize=1 << 16)(lambda text: spelled(text, self.encode, self.decode_token))

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    @cached_property
    def special_token_pattern(self):
        """A regex of every added token (special tokens and the coordinate vocabulary): text that holds one
        is encoded as that token (coordexp.data.special_tokens)."""
        return special_token_pattern([*self.tokenizer.get_added_vocab(), *self.tokenizer.all_special_tokens])

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """Lossless pieces (what ``parse_rollout`` takes)."""
        return [self.decode_token(int(i)) for i in ids]

    def text_pieces(self, ids: Sequence[int]) -> tuple[str, ...]:
        """Each token's exact text (``coordjson.frame_pieces``); joined, the tokenizer's ``decode``."""
        return frame_pieces(self.pieces(ids))

    def spelled(self, text: str) -> str:
        """``text`` as this tokenizer writes it (encode, then decode; e.g. NFC); cached (GT descs repeat)."""
        return self._spelled(text)


@dataclass
class SampleRecord:
    """Per-sample Channel-B outcome (written to rollout_samples.jsonl; metrics are sums over these)."""

    sample_id: str
    gen_tokens: int
    triggered: int
    hit_max_new_tokens: int
    truncated: int
    invalid_rollout: int
    valid_pred: int
    dropped_invalid: int          # complete records dropped by the strict parser (reason != prefix_unusable)
    dropped: dict[str, int]       # per reason, prefix_unusable included
    gt: int
    matched: int
    fp: int
    fn: int
    matched_iou_sum: float
    gating_rejections: int
    target_dropped: int


def gt_objects(sample, tok: TokenizerAdapter | None = None) -> list[CoordObject]:
    """The sample's GT objects; with ``tok``, each desc as the tokenizer spells it (what a model trained on
    it can write, so desc matching compares like with like)."""
    desc = tok.spelled if tok is not None else str
    return [CoordObject(desc(o.desc), tuple(o.bbox_2d)) for o in sample.objects]


def score_rollout(sample, rollout: Rollout, tok: TokenizerAdapter, contract: RolloutContract):
    """Strict parse + Hungarian match of one rollout: (parsed, GT objects, match)."""
    gts = gt_objects(sample, tok)
    parsed = parse_rollout(rollout.token_ids, tok.pieces(rollout.token_ids), coord_vocab=tok.coord_vocab,
                           stop_ids=tok.stop_ids, field_order=FieldOrder(contract.object_field_order),
                           encode=tok.encode, decode_token=tok.decode_token)
    match = match_boxes([o.bbox for o in parsed.objects], [g.bbox for g in gts],
                        top_k=contract.candidate_top_k, iou_gate=contract.iou_gate,
                        fp_cost=contract.fp_cost, fn_cost=contract.fn_cost)
    return parsed, gts, match


def sample_record(sample, rollout: Rollout, parsed, gts, match, target_dropped: bool) -> SampleRecord:
    return SampleRecord(
        sample_id=str(sample.source), gen_tokens=len(rollout.token_ids), triggered=int(rollout.triggered),
        hit_max_new_tokens=int(rollout.hit_max_new_tokens), truncated=int(parsed.truncated),
        invalid_rollout=int(parsed.invalid_rollout), valid_pred=len(parsed.objects),
        dropped_invalid=int(parsed.num_dropped_invalid),
        dropped={r.value: int(parsed.drop_counts.get(r.value, 0)) for r in DropReason}, gt=len(gts),
        matched=len(match.pairs), fp=len(match.false_positives), fn=len(match.false_negatives),
        matched_iou_sum=float(sum(p.iou for p in match.pairs)), gating_rejections=match.gating_rejections,
        target_dropped=int(target_dropped))


def record_rollout_metrics(buf: MetricBuffer, records: Sequence[SampleRecord],
                           prefix: str = "rollout") -> None:
    """Counters, ratio-of-sums rates and the p99 sample list from per-sample records."""
    n = len(records)
    s = lambda field: sum(getattr(r, field) for r in records)
    pred, gt, matched = s("valid_pred"), s("gt"), s("matched")
    dropped = {reason.value: sum(r.dropped[reason.value] for r in records) for reason in DropReason}
    buf.add_sum(f"{prefix}/raw_rollouts", n)
    buf.add_sum(f"{prefix}/repeat_terminate_triggered_sequences", s("triggered"))
    buf.add_sum(f"{prefix}/hit_max_new_tokens", s("hit_max_new_tokens"))
    buf.add_sum(f"{prefix}/parse_truncated", s("truncated"))
    buf.add_ratio(f"{prefix}/parse_truncated_rate", s("truncated"), n)
    buf.add_sum(f"{prefix}/invalid_rollout", s("invalid_rollout"))
    buf.add_ratio(f"{prefix}/invalid_rollout_rate", s("invalid_rollout"), n)
    buf.add_sum(f"{prefix}/parse_dropped_invalid", s("dropped_invalid"))
    for reason, count in dropped.items():
        if count:  # absent means 0: keeps the log short
            buf.add_sum(f"{prefix}/parse_dropped/{reason}", count)
    buf.add_sum(f"{prefix}/valid_pred_objects", pred)
    buf.add_sum(f"{prefix}/gt_objects", gt)
    buf.add_sum(f"{prefix}/matched", matched)
    buf.add_sum(f"{prefix}/fp", s("fp"))
    buf.add_sum(f"{prefix}/fn", s("fn"))
    buf.add_ratio(f"{prefix}/precision", matched, pred)
    buf.add_ratio(f"{prefix}/recall", matched, gt)
    buf.add_ratio(f"{prefix}/f1", 2 * matched, pred + gt)
    buf.add_ratio(f"{prefix}/matched_iou_mean", s("matched_iou_sum"), matched)
    buf.add_sum(f"{prefix}/gating_rejections", s("gating_rejections"))
    buf.add_sum(f"{prefix}/target_invariant_dropped", s("target_dropped"))
    buf.add_sum(f"{prefix}/gen_new_tokens_total", s("gen_tokens"))
    buf.add_ratio(f"{prefix}/gen_new_tokens_mean", s("gen_tokens"), n)
    buf.add_samples(f"{prefix}/gen_new_tokens_p99", [r.gen_tokens for r in records])


def record_as_dict(record: SampleRecord) -> dict:
    return asdict(record)
