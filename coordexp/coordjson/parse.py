"""Strict rollout parser in the token frame (Channel B).

The rollout's generated tokens are decoded one at a time; their concatenation is the text all spans refer
to. The parser stops at the first stop token, finds the first `{"objects": [` container, validates every
record (scan.py), and cuts a teacher-forcing prefix out of the rollout's own tokens: from the container's
`{` to just after the last complete record's `}` (or just after `[` when there is none). Text before the
container is never part of the prefix. Only a token that straddles either end of the prefix is re-encoded,
and its re-encoding must decode to exactly the kept text; otherwise the rollout falls back to the bare
header `{"objects": [` with no predictions.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from coordexp.coordjson.codec import CoordVocab
from coordexp.coordjson.frame import DecodeTokenFn, EncodeFn, TokenFrame, encode_exactly
from coordexp.coordjson.record_start import RECORD_START
from coordexp.coordjson.scan import CONTAINER_HEADER_RE, ContainerScan, DropReason, ScannedElement, scan_array
from coordexp.coordjson.serialize import CONTAINER_HEADER, FieldOrder, Span


class FallbackReason(str, Enum):
    NO_CONTAINER = "no_container"  # no `{"objects": [` before the stop token
    PREFIX_REENCODE_FAILED = "prefix_reencode_failed"  # a straddling token did not re-encode exactly


@dataclass(frozen=True)
class ParsedObject:
    """A valid predicted object. Token positions index `ParsedRollout.prefix_ids`; char spans its text."""

    desc: str
    bbox: tuple[int, int, int, int]
    coord_positions: tuple[int, int, int, int]
    token_span: tuple[int, int]  # [first, stop) of the tokens overlapping the record
    char_span: Span
    desc_char_span: Span  # desc value content, without quotes


@dataclass(frozen=True)
class DroppedRecord:
    """An invalid element that lies inside the prefix (its text stays there, unsupervised)."""

    reason: DropReason
    token_span: tuple[int, int]
    char_span: Span


@dataclass(frozen=True)
class ParsedRollout:
    objects: tuple[ParsedObject, ...]
    drop_counts: dict[str, int]  # every DropReason value -> number of elements dropped for it
    dropped_in_prefix: tuple[DroppedRecord, ...]
    num_records: int  # complete elements in the container: len(objects) + sum(drop_counts.values())
    truncated: bool  # the objects array was never closed
    truncated_tail: bool  # an unfinished element at the end was discarded (not counted as dropped)
    invalid_rollout: bool  # fell back to the bare header prefix; see fallback_reason
    fallback_reason: FallbackReason | None
    leading_junk: bool  # non-whitespace text before the container (never in the prefix)
    prefix_ids: tuple[int, ...]
    prefix_pieces: tuple[str, ...]
    prefix_ends_with_record: bool  # prefix ends with a record's `}` (else with `[`)
    header_chars: int  # length of the container header at the start of the prefix text
    record_starts: int = 0  # container elements (the unfinished one too) opening with a record start
    _frame: TokenFrame | None = field(default=None, compare=False, repr=False)

    @property
    def prefix_frame(self) -> TokenFrame:
        """The prefix tokens with their char spans."""
        return (
            self._frame
            if self._frame is not None
            else TokenFrame.from_pieces(self.prefix_ids, self.prefix_pieces)
        )

    @property
    def num_dropped(self) -> int:
        return sum(self.drop_counts.values())

    @property
    def num_dropped_invalid(self) -> int:
        """Drops for invalid content (everything but prefix_unusable)."""
        return self.num_dropped - self.drop_counts[DropReason.PREFIX_UNUSABLE.value]

    @property
    def prefix_text(self) -> str:
        return "".join(self.prefix_pieces)


def parse_rollout(
    token_ids: Sequence[int],
    pieces: Sequence[str],
    *,
    coord_vocab: CoordVocab,
    stop_ids: Collection[int],
    field_order: FieldOrder,
    encode: EncodeFn,
    decode_token: DecodeTokenFn,
) -> ParsedRollout:
    """Parse generated tokens (`pieces[i]` = token i decoded alone). Never raises on rollout content.

    `encode` (text -> ids, no special tokens added) and `decode_token` (id -> text) are used only for a token
    straddling a prefix end, and for the fallback header.
    """
    if len(token_ids) != len(pieces):
        raise ValueError(f"{len(token_ids)} token ids but {len(pieces)} pieces")
    field_order = FieldOrder(field_order)
    ids = np.asarray(token_ids, dtype=np.int64)
    stop_positions = np.flatnonzero(np.isin(ids, np.asarray(list(stop_ids), dtype=np.int64)))
    end = int(stop_positions[0]) if len(stop_positions) else len(ids)
    rollout = TokenFrame.from_pieces(ids[:end], pieces[:end])

    header = CONTAINER_HEADER_RE.search(rollout.text)
    if header is None:
        return _fallback(FallbackReason.NO_CONTAINER, encode, decode_token)

    leading_junk = bool(rollout.text[: header.start()].strip())
    scan = scan_array(rollout.text, header.end(), field_order)
    starts = [e.span[0] for e in scan.elements] + ([scan.tail_start] if scan.tail_start is not None else [])
    record_starts = sum(RECORD_START.starts_at(rollout.text, pos) for pos in starts)
    counts = _zero_counts()
    for element in scan.elements:
        if element.reason is not None:
            counts[element.reason.value] += 1
    records = [e for e in scan.elements if e.is_record]
    cut = records[-1].span[1] if records else header.end()

    prefix = _cut_prefix(rollout, header.start(), cut, encode, decode_token)
    if prefix is None:
        counts[DropReason.PREFIX_UNUSABLE.value] += sum(e.reason is None for e in scan.elements)
        return _fallback(
            FallbackReason.PREFIX_REENCODE_FAILED,
            encode,
            decode_token,
            counts=counts,
            scan=scan,
            leading_junk=leading_junk,
            record_starts=record_starts,
        )

    objects, dropped = _locate_elements(prefix, scan.elements, header.start(), cut, coord_vocab, counts)
    return ParsedRollout(
        objects=objects,
        drop_counts=counts,
        dropped_in_prefix=dropped,
        num_records=len(scan.elements),
        truncated=scan.truncated,
        truncated_tail=scan.truncated_tail,
        invalid_rollout=False,
        fallback_reason=None,
        leading_junk=leading_junk,
        prefix_ids=tuple(prefix.ids.tolist()),
        prefix_pieces=prefix.pieces,
        prefix_ends_with_record=bool(records),
        header_chars=header.end() - header.start(),
        record_starts=record_starts,
        _frame=prefix,
    )


def _zero_counts() -> dict[str, int]:
    return {reason.value: 0 for reason in DropReason}


def _cut_prefix(
    rollout: TokenFrame, head: int, cut: int, encode: EncodeFn, decode_token: DecodeTokenFn
) -> TokenFrame | None:
    """Tokens spelling rollout.text[head:cut]; only straddling end tokens are re-encoded. A re-encoded end
    never splits a character's bytes from a kept token: it takes in the tokens that carry the leading bytes
    of its first character (tail), or that complete the character its last token starts (head), and a last
    token that carries bytes past the cut is re-encoded too."""
    first, last = (int(t) for t in rollout.tokens_at([head, cut - 1]))
    carries = rollout.carries if rollout.carries is not None else np.zeros(len(rollout), dtype=bool)
    head_straddles = rollout.starts[first] < head
    tail_straddles = rollout.ends[last] > cut or bool(carries[last])
    if head_straddles:
        while first < last and carries[first]:
            first += 1
    if tail_straddles:
        while last > first and carries[last - 1]:
            last -= 1
    if first == last:
        if head_straddles or tail_straddles:
            return encode_exactly(rollout.text[head:cut], encode, decode_token)
        return rollout.slice(first, last + 1)
    head_token = (
        encode_exactly(rollout.text[head : rollout.ends[first]], encode, decode_token)
        if head_straddles
        else rollout.slice(first, first + 1)
    )
    tail_token = (
        encode_exactly(rollout.text[rollout.starts[last] : cut], encode, decode_token)
        if tail_straddles
        else rollout.slice(last, last + 1)
    )
    if head_token is None or tail_token is None:
        return None
    return TokenFrame.concat([head_token, rollout.slice(first + 1, last), tail_token])


def _locate_elements(
    frame: TokenFrame,
    elements: Sequence[ScannedElement],
    head: int,
    cut: int,
    coord_vocab: CoordVocab,
    counts: dict[str, int],
) -> tuple[tuple[ParsedObject, ...], tuple[DroppedRecord, ...]]:
    """Map text-valid records onto prefix tokens; a coord literal that is not one coord token drops it."""
    valid = [e for e in elements if e.reason is None]
    if valid:
        coord_spans = np.array([e.fields.coord_spans for e in valid], dtype=np.int64).reshape(-1, 2) - head
        positions = frame.exact_tokens(coord_spans)
        bins = np.where(positions >= 0, coord_vocab.bins_of(frame.ids[np.maximum(positions, 0)]), -1)
        expected = np.array([e.fields.bbox for e in valid], dtype=np.int64).reshape(-1)
        aligned = (bins == expected).reshape(-1, 4).all(axis=1)
        positions = positions.reshape(-1, 4)

    in_prefix = [e for e in elements if e.span[1] <= cut]  # only junk lies past the cut
    spans = [(e.span[0] - head, e.span[1] - head) for e in in_prefix]
    objects: list[ParsedObject] = []
    dropped: list[DroppedRecord] = []
    valid_index = 0
    for element, span, token_span in zip(in_prefix, spans, frame.token_spans(spans), strict=True):
        reason = element.reason
        if reason is None:
            fields = element.fields
            ok, slots = aligned[valid_index], positions[valid_index]
            valid_index += 1
            if ok:
                objects.append(
                    ParsedObject(
                        desc=fields.desc,
                        bbox=fields.bbox,
                        coord_positions=tuple(slots.tolist()),
                        token_span=token_span,
                        char_span=span,
                        desc_char_span=(fields.desc_span[0] - head, fields.desc_span[1] - head),
                    )
                )
                continue
            reason = DropReason.AMBIGUOUS_COORD
            counts[reason.value] += 1
        dropped.append(DroppedRecord(reason, token_span, span))
    return tuple(objects), tuple(dropped)


def _fallback(
    reason: FallbackReason,
    encode: EncodeFn,
    decode_token: DecodeTokenFn,
    *,
    counts: dict[str, int] | None = None,
    scan: ContainerScan | None = None,
    leading_junk: bool = False,
    record_starts: int = 0,
) -> ParsedRollout:
    header = encode_exactly(CONTAINER_HEADER, encode, decode_token)
    if header is None:
        raise ValueError(
            f"tokenizer cannot encode {CONTAINER_HEADER!r} so that its tokens decode back exactly"
        )
    return ParsedRollout(
        objects=(),
        drop_counts=counts if counts is not None else _zero_counts(),
        dropped_in_prefix=(),
        num_records=len(scan.elements) if scan else 0,
        truncated=scan.truncated if scan else False,
        truncated_tail=scan.truncated_tail if scan else False,
        invalid_rollout=True,
        fallback_reason=reason,
        leading_junk=leading_junk,
        prefix_ids=tuple(header.ids.tolist()),
        prefix_pieces=header.pieces,
        prefix_ends_with_record=False,
        header_chars=len(CONTAINER_HEADER),
        record_starts=record_starts,
        _frame=header,
    )
