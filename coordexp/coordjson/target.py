"""Teacher-forcing targets: token ids plus per-token CE weights, roles and geometry groups.

Channel B: Y = rollout prefix + encode(", "? + unmatched GT records + "]}") + EOS.
Channel A: Y = encode(whole GT document) + EOS.
Every token gets one TokenRole; its CE weight follows from the role (`role_ce_weights`). Coordinate tokens
never get CE: they are supervised through geometry groups (4 slot positions in Y + the target bins).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from coordexp.coordjson.codec import CoordVocab
from coordexp.coordjson.frame import DecodeTokenFn, EncodeFn, TokenFrame, encode_frame, spelled
from coordexp.coordjson.parse import ParsedRollout
from coordexp.coordjson.scan import CONTAINER_HEADER_RE, container_closes_at_end, scan_array
from coordexp.coordjson.serialize import (
    CONTAINER_CLOSURE,
    CONTAINER_HEADER,
    RECORD_SEPARATOR,
    CoordObject,
    FieldOrder,
    Span,
    append_fragment_lead,
    canonical_order,
    render_records,
)


class TokenRole(IntEnum):
    PREFIX_HEADER = 0  # `{"objects": [` taken from the rollout
    PREFIX_SEPARATOR = 1  # rollout text between prefix records
    INVALID_RECORD = 2  # a dropped rollout element
    UNMATCHED_PREDICTION = 3  # a valid rollout record without a GT match (false positive)
    MATCHED_STRUCTURE = 4  # keys, quotes, brackets, braces, commas of a matched rollout record
    MATCHED_DESC = 5  # desc value of a matched rollout record
    COORD = 6  # any coordinate token
    APPENDED_STRUCTURE = 7  # GT text written by the target, except desc values and the closure
    APPENDED_DESC = 8  # desc value of a written GT record
    CLOSURE = 9  # the container's closing `]}`
    EOS = 10
    FALLBACK_HEADER = 11  # `{"objects": [` injected because the rollout had no usable container


class TargetInvariantError(ValueError):
    """A per-sample consistency check failed; callers drop the sample and count `reason`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class GeometryGroup:
    positions: tuple[int, int, int, int]  # indices into input_ids of the x1, y1, x2, y2 coord tokens
    gt_bins: tuple[int, int, int, int]
    gt_index: int
    pred_index: int | None  # the matched rollout object, or None for a written (appended) GT record


@dataclass(frozen=True)
class TeacherForcedTarget:
    input_ids: np.ndarray  # int64, ends with EOS
    ce_weights: np.ndarray  # float32, aligned with input_ids; 0 = no CE
    roles: np.ndarray  # int8 TokenRole per token
    geometry_groups: tuple[GeometryGroup, ...]
    prefix_len: int  # tokens taken from the rollout (0 in Channel A)
    closure_position: int  # token holding the container's final `}`
    appended_gt_indices: tuple[int, ...]  # GT objects written by the target, in written order
    pieces: tuple[str, ...]  # each token decoded alone (EOS included)

    @property
    def eos_position(self) -> int:
        return len(self.input_ids) - 1


def role_ce_weights(desc_ce_weight: float, struct_multiplier: float = 1.0) -> np.ndarray:
    """CE weight of each TokenRole (index = role value)."""
    weights = np.zeros(len(TokenRole), dtype=np.float32)
    weights[TokenRole.MATCHED_STRUCTURE] = 1.0
    weights[TokenRole.APPENDED_STRUCTURE] = struct_multiplier
    weights[TokenRole.APPENDED_DESC] = desc_ce_weight
    weights[TokenRole.CLOSURE] = struct_multiplier
    weights[TokenRole.EOS] = struct_multiplier
    weights[TokenRole.FALLBACK_HEADER] = 1.0  # not the model's output: teach it to open the container
    return weights


def build_channel_b_target(
    parsed: ParsedRollout,
    gt_objects: Sequence[CoordObject],
    matches: Iterable[tuple[int, int]],
    *,
    field_order: FieldOrder,
    coord_vocab: CoordVocab,
    encode: EncodeFn,
    decode_token: DecodeTokenFn,
    eos_id: int,
    desc_ce_weight: float,
    drop_invalid_struct_ce_multiplier: float = 1.0,
) -> TeacherForcedTarget:
    """Prefix + unmatched GT appended + closure + EOS; `matches` are (parsed object index, GT index) pairs.

    Raises TargetInvariantError when a consistency check fails for this sample.
    """
    _check_weight(desc_ce_weight)
    if not 1.0 <= drop_invalid_struct_ce_multiplier <= 4.0:
        raise ValueError(
            f"drop_invalid_struct_ce_multiplier must be in [1, 4], got {drop_invalid_struct_ce_multiplier}"
        )
    pairs = _checked_pairs(matches, len(parsed.objects), len(gt_objects))
    matched_gt = {gt for _, gt in pairs}
    unmatched = [g for g in range(len(gt_objects)) if g not in matched_gt]
    appended = [unmatched[i] for i in canonical_order([gt_objects[g] for g in unmatched])]

    prefix = parsed.prefix_frame
    prefix_roles = _prefix_roles(prefix, parsed, {pred for pred, _ in pairs})
    lead = append_fragment_lead(parsed.prefix_ends_with_record, len(appended))
    multiplier = drop_invalid_struct_ce_multiplier if parsed.num_dropped_invalid > 0 else 1.0
    matched_groups = [
        GeometryGroup(parsed.objects[pred].coord_positions, gt_objects[gt].bbox, gt, pred)
        for pred, gt in pairs
    ]
    predicted_bins = [parsed.objects[pred].bbox for pred, _ in pairs]
    _check_slots(prefix.ids, [g.positions for g in matched_groups], predicted_bins, coord_vocab)
    written = _WrittenGT([gt_objects[g] for g in appended], appended, lead)
    fragment, fragment_roles, appended_groups = _encode_written(
        written, FieldOrder(field_order), len(prefix), coord_vocab, encode, decode_token
    )
    return _assemble(
        prefix,
        prefix_roles,
        fragment,
        fragment_roles,
        matched_groups + appended_groups,
        written.gt_indices,
        coord_vocab,
        eos_id,
        decode_token,
        role_ce_weights(desc_ce_weight, multiplier),
    )


def build_channel_a_target(
    gt_objects: Sequence[CoordObject],
    *,
    field_order: FieldOrder,
    coord_vocab: CoordVocab,
    encode: EncodeFn,
    decode_token: DecodeTokenFn,
    eos_id: int,
    desc_ce_weight: float,
) -> TeacherForcedTarget:
    """The whole GT document (sorted by (minY, minX)) + EOS; header and closure get CE 1 here."""
    _check_weight(desc_ce_weight)
    order = canonical_order(gt_objects)
    written = _WrittenGT([gt_objects[g] for g in order], order, CONTAINER_HEADER)
    fragment, fragment_roles, groups = _encode_written(
        written, FieldOrder(field_order), 0, coord_vocab, encode, decode_token
    )
    return _assemble(
        TokenFrame.from_pieces([], []),
        np.zeros(0, dtype=np.int8),
        fragment,
        fragment_roles,
        groups,
        written.gt_indices,
        coord_vocab,
        eos_id,
        decode_token,
        role_ce_weights(desc_ce_weight),
    )


def _check_weight(desc_ce_weight: float) -> None:
    if not (math.isfinite(desc_ce_weight) and desc_ce_weight >= 0):
        raise ValueError(f"desc_ce_weight must be finite and >= 0, got {desc_ce_weight}")


def _checked_pairs(matches: Iterable[tuple[int, int]], num_pred: int, num_gt: int) -> list[tuple[int, int]]:
    pairs = [(int(p), int(g)) for p, g in matches]
    preds = [p for p, _ in pairs]
    gts = [g for _, g in pairs]
    if len(set(preds)) != len(preds) or len(set(gts)) != len(gts):
        raise ValueError(f"matches must be one-to-one, got {pairs}")
    if any(not 0 <= p < num_pred for p in preds) or any(not 0 <= g < num_gt for g in gts):
        raise ValueError(f"match indices out of range ({num_pred} predictions, {num_gt} GT): {pairs}")
    return sorted(pairs)


def _prefix_roles(prefix: TokenFrame, parsed: ParsedRollout, matched_preds: set[int]) -> np.ndarray:
    # Later layers win where a token straddles two regions.
    objects = parsed.objects
    layers = [
        (TokenRole.FALLBACK_HEADER if parsed.invalid_rollout else TokenRole.PREFIX_HEADER,
         [(0, parsed.header_chars)]),
        (TokenRole.INVALID_RECORD, [r.char_span for r in parsed.dropped_in_prefix]),
        (
            TokenRole.UNMATCHED_PREDICTION,
            [o.char_span for i, o in enumerate(objects) if i not in matched_preds],
        ),
        (TokenRole.MATCHED_STRUCTURE, [objects[i].char_span for i in sorted(matched_preds)]),
        (TokenRole.MATCHED_DESC, [objects[i].desc_char_span for i in sorted(matched_preds)]),
    ]
    roles = np.full(len(prefix), TokenRole.PREFIX_SEPARATOR, dtype=np.int8)
    for role, spans in layers:
        _paint(roles, prefix, spans, role)
    return roles


def _paint(roles: np.ndarray, frame: TokenFrame, spans: Sequence[Span], role: TokenRole) -> None:
    for first, stop in frame.token_spans([s for s in spans if s[1] > s[0]]):
        roles[first:stop] = role


@dataclass(frozen=True)
class _WrittenGT:
    objects: list[CoordObject]
    gt_indices: list[int]
    lead: str  # ", " or "" after a prefix; the container header for a whole document


@dataclass(frozen=True)
class _FragmentLayout:
    desc_spans: tuple[Span, ...]
    coord_spans: np.ndarray  # (records * 4, 2)
    closure_span: Span


def _encode_written(
    written: _WrittenGT,
    field_order: FieldOrder,
    offset: int,
    coord_vocab: CoordVocab,
    encode: EncodeFn,
    decode_token: DecodeTokenFn,
) -> tuple[TokenFrame, np.ndarray, list[GeometryGroup]]:
    """Encode the written GT text; its roles and geometry groups (positions shifted by `offset`)."""
    text = render_records(written.objects, field_order, lead=written.lead, tail=CONTAINER_CLOSURE).text
    fragment = encode_frame(text, encode, decode_token)
    layout = _locate_fragment(
        fragment.text, written, field_order, lambda desc: spelled(desc, encode, decode_token)
    )

    roles = np.full(len(fragment), TokenRole.APPENDED_STRUCTURE, dtype=np.int8)
    _paint(roles, fragment, [layout.closure_span], TokenRole.CLOSURE)
    _paint(roles, fragment, layout.desc_spans, TokenRole.APPENDED_DESC)
    slots = fragment.exact_tokens(layout.coord_spans).reshape(-1, 4)
    positions = [tuple(int(p) for p in row) for row in slots]
    _check_slots(fragment.ids, positions, [obj.bbox for obj in written.objects], coord_vocab)
    groups = [
        GeometryGroup(tuple(p + offset for p in pos), obj.bbox, gt, None)  # type: ignore[arg-type]
        for pos, obj, gt in zip(positions, written.objects, written.gt_indices, strict=True)
    ]
    return fragment, roles, groups


def _check_slots(
    ids: np.ndarray,
    positions: Sequence[tuple[int, ...]],
    bins: Sequence[tuple[int, int, int, int]],
    coord_vocab: CoordVocab,
) -> None:
    """Every geometry slot must be one coord token holding the expected bin."""
    if not positions:
        return
    flat = np.array(positions, dtype=np.int64).reshape(-1)
    expected = np.array(bins, dtype=np.int64).reshape(-1)
    if flat.min() < 0 or flat.max() >= len(ids) or (coord_vocab.bins_of(ids[flat]) != expected).any():
        raise TargetInvariantError("geometry_slot_not_coord", f"slots {positions} do not hold bins {bins}")


def _assemble(
    prefix: TokenFrame,
    prefix_roles: np.ndarray,
    fragment: TokenFrame,
    fragment_roles: np.ndarray,
    groups: list[GeometryGroup],
    written_gt_indices: Sequence[int],
    coord_vocab: CoordVocab,
    eos_id: int,
    decode_token: DecodeTokenFn,
    weights_by_role: np.ndarray,
) -> TeacherForcedTarget:
    input_ids = np.concatenate([prefix.ids, fragment.ids, np.array([eos_id], dtype=np.int64)])
    roles = np.concatenate([prefix_roles, fragment_roles, np.array([TokenRole.EOS], dtype=np.int8)])
    roles[coord_vocab.is_coord(input_ids)] = TokenRole.COORD
    pieces = prefix.pieces + fragment.pieces + (decode_token(eos_id),)
    closure = _check_closure(prefix, fragment)
    ce_weights = weights_by_role[roles]
    if not len(input_ids) == len(roles) == len(ce_weights) == len(pieces):
        raise TargetInvariantError("length_mismatch", "ids, roles, weights and pieces differ in length")
    return TeacherForcedTarget(
        input_ids=input_ids,
        ce_weights=ce_weights,
        roles=roles,
        geometry_groups=tuple(groups),
        prefix_len=len(prefix),
        closure_position=closure,
        appended_gt_indices=tuple(written_gt_indices),
        pieces=pieces,
    )


def _locate_fragment(
    text: str, written: _WrittenGT, field_order: FieldOrder, spelled: Callable[[str], str]
) -> _FragmentLayout:
    """Re-scan the encoded fragment as its tokens decode, and check it says what was serialized: each desc
    exactly, or as the tokenizer spells it (``spelled``: encode, then decode; e.g. its NFC normalizer turns
    ``e`` + U+0301 into ``é``)."""
    start = 0
    if written.lead == CONTAINER_HEADER:
        header = CONTAINER_HEADER_RE.match(text)
        if header is None:
            raise TargetInvariantError(
                "fragment_mismatch", f"document does not start with a header: {_excerpt(text)}"
            )
        start = header.end()
    scan = scan_array(text, start, field_order, after_element=written.lead == RECORD_SEPARATOR)
    fields = [e.fields for e in scan.elements]
    if scan.close_span is None or any(f is None for f in fields) or len(fields) != len(written.objects):
        raise TargetInvariantError(
            "fragment_mismatch", f"encoded fragment does not re-parse: {_excerpt(text)}"
        )
    for got, want in zip(fields, written.objects, strict=True):
        if got.bbox != want.bbox or (got.desc != want.desc and got.desc != spelled(want.desc)):
            raise TargetInvariantError(
                "fragment_mismatch", f"{got.desc!r} {got.bbox} != {want.desc!r} {want.bbox}"
            )
    closure = (scan.close_span[0], len(text))
    if text[closure[0] :] != CONTAINER_CLOSURE:
        raise TargetInvariantError(
            "fragment_mismatch", f"fragment does not end with the closure: {_excerpt(text)}"
        )
    return _FragmentLayout(
        desc_spans=tuple(f.desc_span for f in fields),
        coord_spans=np.array([f.coord_spans for f in fields], dtype=np.int64).reshape(-1, 2),
        closure_span=closure,
    )


def _check_closure(prefix: TokenFrame, fragment: TokenFrame) -> int:
    """The container opened at char 0 must close at the very last char, in the token right before EOS."""
    text = prefix.text + fragment.text
    if not container_closes_at_end(text):
        raise TargetInvariantError(
            "closure_not_found", f"outermost '}}' is not the last char before EOS: {_excerpt(text)}"
        )
    if fragment.pieces[-1] == "":
        raise TargetInvariantError("closure_not_found", "the token before EOS decodes to nothing")
    return len(prefix) + len(fragment) - 1


def _excerpt(text: str, limit: int = 160) -> str:
    return repr(text) if len(text) <= limit else repr("..." + text[-limit:])
