"""Text-level scanning of a CoordJSON container: split the array into elements and validate each record.

This module knows nothing about tokens; `parse.py` maps its char spans onto the token frame.
Records are validated strictly and never repaired: each invalid one gets exactly one DropReason,
the first that applies in the order the enum lists them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum

from coordexp.coordjson.codec import try_token_to_bin
from coordexp.coordjson.serialize import BBOX_KEY, DESC_KEY, FieldOrder, Span

CONTAINER_HEADER_RE = re.compile(r'\{\s*"objects"\s*:\s*\[')

_LEXEME_RE = re.compile(
    r"(?P<ws>\s+)"
    r'|(?P<string>"(?:[^"\\]|\\.)*")'
    r'|(?P<open_string>".*)'  # no closing quote anywhere after: the string runs to the end of the text
    r"|(?P<coord><\|coord_[0-9]+\|>)"
    r"|(?P<punct>[{}\[\],:])"
    r'|(?P<other>[^\s{}\[\],:"<]+|<)',
    re.DOTALL,
)

_OPENERS = frozenset("{[")
_CLOSERS = frozenset("}]")
_JUNK_TERMINATORS = frozenset(",]")

# Nesting deeper than this inside one record is malformed (and keeps the recursive parser bounded).
_MAX_VALUE_DEPTH = 16


class DropReason(str, Enum):
    """Why a complete record was dropped. Checked in this order; the first that applies is the reason."""

    MALFORMED = "malformed"  # not a JSON-like object, bad separator before it, or not an object at all
    UNEXPECTED_KEYS = "unexpected_keys"  # a key other than desc/bbox_2d (e.g. poly), or a repeated key
    MISSING_DESC = "missing_desc"
    MISSING_GEOMETRY = "missing_geometry"
    ORDER_VIOLATION = "order_violation"  # keys not in the configured field order
    INVALID_DESC = "invalid_desc"  # desc is not a valid JSON string
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

    @property
    def truncated(self) -> bool:
        return self.close_span is None


class _Malformed(Exception):
    pass


_Lexeme = tuple[str, int, int]


def scan_array(text: str, start: int, field_order: FieldOrder, *, after_element: bool = False) -> ContainerScan:
    """Scan the objects array from `start` (just after its `[`, or after an element when `after_element`)."""
    field_order = FieldOrder(field_order)
    elements: list[ScannedElement] = []
    expecting_element = not after_element
    bad_separator = False
    current: list[_Lexeme] | None = None  # lexemes of the element being read
    current_is_object = False
    current_bad = False
    depth = 0

    for match in _LEXEME_RE.finditer(text, start):
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
        current = [(kind, s, e)]
        current_is_object = ch == "{"
        current_bad = bad_separator or not expecting_element
        bad_separator = False
        depth = 1 if ch in _OPENERS else 0

    return ContainerScan(tuple(elements), None, truncated_tail=current is not None)


def _junk(lexemes: list[_Lexeme]) -> ScannedElement:
    return ScannedElement((lexemes[0][1], lexemes[-1][2]), False, DropReason.MALFORMED, None)


def _finish_object(text: str, lexemes: list[_Lexeme], bad_separator: bool, field_order: FieldOrder) -> ScannedElement:
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
    try:
        desc = json.loads(text[desc_value[1] : desc_value[2]])
    except ValueError:
        return DropReason.INVALID_DESC, None
    if not desc.strip():
        return DropReason.EMPTY_DESC, None

    geometry = values[_BBOX_KEY_LITERAL]
    if geometry[0] != "array":
        return DropReason.NON_COORD_GEOMETRY, None
    items = geometry[1]
    if len(items) != 4:
        return DropReason.WRONG_ARITY, None
    bins = []
    for item in items:
        k = try_token_to_bin(text[item[1] : item[2]]) if item[0] == "coord" else None
        if k is None:
            return DropReason.NON_COORD_GEOMETRY, None
        bins.append(k)
    x1, y1, x2, y2 = bins
    if x2 < x1 or y2 < y1:
        return DropReason.BBOX_INVALID, None
    fields = RecordFields(
        desc=desc,
        bbox=(x1, y1, x2, y2),
        desc_span=(desc_value[1] + 1, desc_value[2] - 1),
        coord_spans=tuple((item[1], item[2]) for item in items),  # type: ignore[arg-type]
    )
    return None, fields


def find_container_close(text: str, start: int) -> int | None:
    """Index of the closer that brings the nesting opened by `{` at `start` back to depth 0 (strings skipped)."""
    depth = 0
    for match in _LEXEME_RE.finditer(text, start):
        if match.lastgroup != "punct":
            continue
        ch = text[match.start()]
        if ch in _OPENERS:
            depth += 1
        elif ch in _CLOSERS:
            depth -= 1
            if depth <= 0:
                return match.start()
    return None
