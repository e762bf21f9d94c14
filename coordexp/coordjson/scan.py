"""Text-level scanning of a CoordJSON container: split the array into elements and validate each record.

This module knows nothing about tokens; `parse.py` maps its char spans onto the token frame.
Records are validated strictly and never repaired: each invalid one gets exactly one DropReason,
the first that applies in the order the enum lists them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from json.decoder import scanstring

import numpy as np

from coordexp.coordjson.codec import try_token_to_bin
from coordexp.coordjson.record_start import JSON_WHITESPACE
from coordexp.coordjson.serialize import Span, lone_surrogate
from coordexp.protocol import BBOX_KEY, DESC_KEY, FieldOrder

# JSON whitespace only (space, tab, LF, CR): the one definition, shared with the record start
_WS = "[" + re.escape(JSON_WHITESPACE) + "]"
CONTAINER_HEADER_RE = re.compile(rf'\{{{_WS}*"objects"{_WS}*:{_WS}*\[')

_STRING = r'"(?:[^"\\]|\\.)*"'
_OPEN_STRING = r'".*'  # no closing quote anywhere after: the string runs to the end of the text
_COORD_LITERAL = r"<\|coord_[0-9]+\|>"  # value checked strictly afterwards (no leading zeros, <= 999)

_LEXEME_RE = re.compile(
    rf"(?P<ws>{_WS}+)|(?P<string>{_STRING})|(?P<open_string>{_OPEN_STRING})|(?P<coord>{_COORD_LITERAL})"
    rf'|(?P<punct>[{{}}\[\],:])|(?P<other>[^{re.escape(JSON_WHITESPACE)}{{}}\[\],:"<]+|<)',
    re.DOTALL,
)
_COORD_SLOTS = rf"{_WS}*,{_WS}*".join(rf"(?P<{name}>{_COORD_LITERAL})" for name in ("x1", "y1", "x2", "y2"))
_RECORD_PARTS = {
    "desc": rf'"{DESC_KEY}"{_WS}*:{_WS}*(?P<desc>{_STRING})',
    "bbox": rf'"{BBOX_KEY}"{_WS}*:{_WS}*\[{_WS}*{_COORD_SLOTS}{_WS}*\]',
}
# The shape almost every record has; anything else goes through the general parser, which agrees with this
# pattern wherever it matches.
_CANONICAL_RECORD_RE = {
    FieldOrder.desc_first: re.compile(
        rf"\{{{_WS}*{_RECORD_PARTS['desc']}{_WS}*,{_WS}*{_RECORD_PARTS['bbox']}{_WS}*\}}", re.DOTALL
    ),
    FieldOrder.geometry_first: re.compile(
        rf"\{{{_WS}*{_RECORD_PARTS['bbox']}{_WS}*,{_WS}*{_RECORD_PARTS['desc']}{_WS}*\}}", re.DOTALL
    ),
}
_STRING_TO_END_RE = re.compile(f"{_STRING}|{_OPEN_STRING}", re.DOTALL)

_OPENERS = frozenset("{[")
_CLOSERS = frozenset("}]")
_JUNK_TERMINATORS = frozenset(",]")
_DEPTH_STEP = np.zeros(256, dtype=np.int64)  # per UTF-8 byte; multi-byte chars never contain ASCII bytes
_DEPTH_STEP[[ord("{"), ord("[")]] = 1
_DEPTH_STEP[[ord("}"), ord("]")]] = -1

# Nesting deeper than this inside one record is malformed (and keeps the recursive parser bounded).
_MAX_VALUE_DEPTH = 16


class DropReason(str, Enum):
    """Why a complete record was dropped. Checked in this order; the first that applies is the reason."""

    MALFORMED = "malformed"  # not a JSON-like object, bad separator before it, or not an object at all
    UNEXPECTED_KEYS = "unexpected_keys"  # a key other than desc/bbox_2d (e.g. poly), or a repeated key
    MISSING_DESC = "missing_desc"
    MISSING_GEOMETRY = "missing_geometry"
    ORDER_VIOLATION = "order_violation"  # keys not in the configured field order
    INVALID_DESC = "invalid_desc"  # desc is not a valid JSON string, or holds a lone surrogate
    EMPTY_DESC = "empty_desc"  # desc is empty or whitespace only
    WRONG_ARITY = "wrong_arity"  # bbox_2d is an array whose length is not 4
    NON_COORD_GEOMETRY = "non_coord_geometry"  # bbox_2d is not an array of coord literals
    BBOX_INVALID = "bbox_invalid"  # x2 < x1 or y2 < y1
    AMBIGUOUS_COORD = "ambiguous_coord"  # a coord literal is not exactly one coord token (token frame)
    PREFIX_UNUSABLE = "prefix_unusable"  # valid, but the rollout fell back because its prefix can't be cut


@dataclass(frozen=True)
class RecordFields:
    """The content of a valid record, with char spans in the scanned text."""

    desc: str
    bbox: tuple[int, int, int, int]
    desc_span: Span  # desc value content, without quotes
    coord_spans: tuple[Span, Span, Span, Span]


@dataclass(frozen=True)
class ScannedElement:
    """One complete element of the objects array."""

    span: Span
    is_record: bool  # starts with `{` and ends with `}`; the prefix may be cut right after it
    reason: DropReason | None  # None: valid, see `fields`
    fields: RecordFields | None


@dataclass(frozen=True)
class ContainerScan:
    elements: tuple[ScannedElement, ...]
    close_span: Span | None  # the array's `]`; None when the text ended first (truncated)
    truncated_tail: bool  # an unfinished element was discarded at the end of the text
    tail_start: int | None = None  # where that unfinished element starts

    @property
    def truncated(self) -> bool:
        return self.close_span is None


class _Malformed(Exception):
    pass


_Lexeme = tuple[str, int, int]


def scan_array(
    text: str, start: int, field_order: FieldOrder, *, after_element: bool = False
) -> ContainerScan:
    """Scan the objects array from `start` (just after its `[`, or after an element when `after_element`)."""
    field_order = FieldOrder(field_order)
    canonical_record = _CANONICAL_RECORD_RE[field_order]
    elements: list[ScannedElement] = []
    expecting_element = not after_element
    bad_separator = False
    current: list[_Lexeme] | None = None  # lexemes of the element being read
    current_is_object = False
    current_bad = False
    depth = 0
    pos = start

    while (match := _LEXEME_RE.match(text, pos)) is not None:
        pos = match.end()
        kind = match.lastgroup
        if kind == "ws":
            continue
        s, e = match.span()
        ch = text[s] if kind == "punct" else ""

        if current is not None:
            if current_is_object:
                current.append((kind, s, e))
                depth += 1 if ch in _OPENERS else -1 if ch in _CLOSERS else 0
                if depth == 0:
                    elements.append(_finish_object(text, current, current_bad, field_order))
                    current, expecting_element = None, False
                continue
            if depth > 0 or ch not in _JUNK_TERMINATORS:
                current.append((kind, s, e))
                depth += 1 if ch in _OPENERS else -1 if (ch in _CLOSERS and depth > 0) else 0
                continue
            elements.append(_junk(current))
            current, expecting_element = None, False

        if ch == "]":
            return ContainerScan(tuple(elements), (s, e), truncated_tail=False)
        if ch == ",":
            bad_separator = bad_separator or expecting_element  # `[,` or `,,`: an empty element
            expecting_element = True
            continue
        bad = bad_separator or not expecting_element
        bad_separator = False
        if ch == "{" and (record := canonical_record.match(text, s)) is not None:
            elements.append(_canonical_element(text, record, bad))
            pos, expecting_element = record.end(), False
            continue
        current = [(kind, s, e)]
        current_is_object = ch == "{"
        current_bad = bad
        depth = 1 if ch in _OPENERS else 0

    return ContainerScan(tuple(elements), None, truncated_tail=current is not None,
                         tail_start=current[0][1] if current is not None else None)


def _canonical_element(text: str, record: re.Match, bad_separator: bool) -> ScannedElement:
    if bad_separator:
        return ScannedElement(record.span(), True, DropReason.MALFORMED, None)
    coord_spans = (record.span("x1"), record.span("y1"), record.span("x2"), record.span("y2"))
    reason, fields = _check_desc_and_box(text, record.span("desc"), coord_spans)
    return ScannedElement(record.span(), True, reason, fields)


def _junk(lexemes: list[_Lexeme]) -> ScannedElement:
    return ScannedElement((lexemes[0][1], lexemes[-1][2]), False, DropReason.MALFORMED, None)


def _finish_object(
    text: str, lexemes: list[_Lexeme], bad_separator: bool, field_order: FieldOrder
) -> ScannedElement:
    span = (lexemes[0][1], lexemes[-1][2])
    is_record = text[span[1] - 1] == "}"
    if bad_separator:
        return ScannedElement(span, is_record, DropReason.MALFORMED, None)
    try:
        pairs, end = _parse_object(text, lexemes, 0, 0)
        if end != len(lexemes):
            raise _Malformed
    except _Malformed:
        return ScannedElement(span, is_record, DropReason.MALFORMED, None)
    reason, fields = _validate_pairs(text, pairs, field_order)
    return ScannedElement(span, is_record, reason, fields)


# Parsed values: ("string", s, e) | ("coord", s, e) | ("scalar",) | ("array", items) | ("object", pairs)


def _parse_object(text: str, lx: list[_Lexeme], i: int, depth: int) -> tuple[list[tuple[str, tuple]], int]:
    if depth > _MAX_VALUE_DEPTH:
        raise _Malformed
    i = _expect(text, lx, i, "{")
    pairs: list[tuple[str, tuple]] = []
    if _punct_at(text, lx, i) == "}":
        return pairs, i + 1
    while True:
        if i >= len(lx) or lx[i][0] != "string":
            raise _Malformed
        key = text[lx[i][1] : lx[i][2]]
        i = _expect(text, lx, i + 1, ":")
        value, i = _parse_value(text, lx, i, depth)
        pairs.append((key, value))
        closer = _punct_at(text, lx, i)
        if closer == "}":
            return pairs, i + 1
        if closer != ",":
            raise _Malformed
        i += 1


def _parse_value(text: str, lx: list[_Lexeme], i: int, depth: int) -> tuple[tuple, int]:
    if i >= len(lx):
        raise _Malformed
    kind, s, e = lx[i]
    if kind in ("string", "coord"):
        return (kind, s, e), i + 1
    if kind == "other":
        return ("scalar",), i + 1
    ch = _punct_at(text, lx, i)
    if ch == "{":
        pairs, i = _parse_object(text, lx, i, depth + 1)
        return ("object", pairs), i
    if ch != "[" or depth >= _MAX_VALUE_DEPTH:
        raise _Malformed
    items: list[tuple] = []
    i += 1
    if _punct_at(text, lx, i) == "]":
        return ("array", items), i + 1
    while True:
        item, i = _parse_value(text, lx, i, depth + 1)
        items.append(item)
        closer = _punct_at(text, lx, i)
        if closer == "]":
            return ("array", items), i + 1
        if closer != ",":
            raise _Malformed
        i += 1


def _punct_at(text: str, lx: list[_Lexeme], i: int) -> str:
    return text[lx[i][1]] if i < len(lx) and lx[i][0] == "punct" else ""


def _expect(text: str, lx: list[_Lexeme], i: int, ch: str) -> int:
    if _punct_at(text, lx, i) != ch:
        raise _Malformed
    return i + 1


_DESC_KEY_LITERAL = f'"{DESC_KEY}"'
_BBOX_KEY_LITERAL = f'"{BBOX_KEY}"'


def _validate_pairs(
    text: str, pairs: list[tuple[str, tuple]], field_order: FieldOrder
) -> tuple[DropReason | None, RecordFields | None]:
    # Keys are compared as written: an escaped spelling of "desc" is an unexpected key (strict, no repair).
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys) or any(k not in (_DESC_KEY_LITERAL, _BBOX_KEY_LITERAL) for k in keys):
        return DropReason.UNEXPECTED_KEYS, None
    values = dict(pairs)
    if _DESC_KEY_LITERAL not in values:
        return DropReason.MISSING_DESC, None
    if _BBOX_KEY_LITERAL not in values:
        return DropReason.MISSING_GEOMETRY, None
    if tuple(k.strip('"') for k in keys) != field_order.keys:
        return DropReason.ORDER_VIOLATION, None

    desc_value = values[_DESC_KEY_LITERAL]
    if desc_value[0] != "string":
        return DropReason.INVALID_DESC, None
    geometry = values[_BBOX_KEY_LITERAL]
    if geometry[0] != "array":
        return _check_desc_and_box(text, desc_value[1:], DropReason.NON_COORD_GEOMETRY)
    items = geometry[1]
    if len(items) != 4:
        return _check_desc_and_box(text, desc_value[1:], DropReason.WRONG_ARITY)
    if any(item[0] != "coord" for item in items):
        return _check_desc_and_box(text, desc_value[1:], DropReason.NON_COORD_GEOMETRY)
    return _check_desc_and_box(text, desc_value[1:], tuple(item[1:] for item in items))


def _check_desc_and_box(
    text: str, desc_literal: Span, geometry: tuple[Span, ...] | DropReason
) -> tuple[DropReason | None, RecordFields | None]:
    """Desc checks first; then the geometry's own failure, or else the values of its 4 coord literals."""
    try:
        desc, _ = scanstring(text, desc_literal[0] + 1, True)  # json.loads' own strict string decoder
    except ValueError:
        return DropReason.INVALID_DESC, None
    if lone_surrogate(desc) is not None:
        return DropReason.INVALID_DESC, None
    if not desc.strip():
        return DropReason.EMPTY_DESC, None
    if isinstance(geometry, DropReason):
        return geometry, None
    coord_spans = geometry
    bins = [try_token_to_bin(text[s:e]) for s, e in coord_spans]
    if None in bins:
        return DropReason.NON_COORD_GEOMETRY, None
    x1, y1, x2, y2 = bins
    if x2 < x1 or y2 < y1:
        return DropReason.BBOX_INVALID, None
    desc_span = (desc_literal[0] + 1, desc_literal[1] - 1)
    return None, RecordFields(desc, (x1, y1, x2, y2), desc_span, coord_spans)  # type: ignore[arg-type]


def container_closes_at_end(text: str) -> bool:
    """True iff the `{` at index 0 is closed (depth back to 0, strings skipped) by the last char, a `}`."""
    if not text.startswith("{") or not text.endswith("}"):
        return False
    # Emptying strings shifts positions, but not which bracket comes first or last.
    brackets_only = _STRING_TO_END_RE.sub('""', text).encode()
    depth = np.cumsum(_DEPTH_STEP[np.frombuffer(brackets_only, dtype=np.uint8)])
    return bool(depth[-1] == 0 and (depth[:-1] > 0).all())
