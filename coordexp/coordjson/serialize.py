"""CoordJSON serializer: `{"objects": [{"desc": "...", "bbox_2d": [<|coord_a|>, ...]}, ...]}` on one line."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from coordexp.coordjson.codec import MAX_BIN, bin_to_token
from coordexp.protocol import DESC_KEY, FieldOrder

CONTAINER_HEADER = '{"objects": ['
CONTAINER_CLOSURE = "]}"
RECORD_SEPARATOR = ", "
Span = tuple[int, int]


def lone_surrogate(text: str) -> str | None:
    """Why ``text`` is not text, or None: the first lone surrogate it holds (a half of a UTF-16 pair, e.g.
    from the JSON escape ``"\\ud835"``), which UTF-8 cannot encode, so no tokenizer or file can take it.
    The one rule for descs: a rollout record with such a desc is dropped as ``invalid_desc``; a GT object
    (data line, CoordObject) with one is an error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"desc holds a lone surrogate U+{ord(text[error.start]):04X} at index {error.start}, " \
               "which is not text (UTF-8 cannot encode it)"
    return None


@dataclass(frozen=True)
class CoordObject:
    """One bbox object: non-empty desc and bins (x1, y1, x2, y2) in 0..999 with x2 >= x1, y2 >= y1."""

    desc: str
    bbox: tuple[int, int, int, int]

    def __post_init__(self) -> None:
        if not isinstance(self.desc, str) or not self.desc.strip():
            raise ValueError(f"desc must be a non-empty string, got {self.desc!r}")
        if (problem := lone_surrogate(self.desc)) is not None:
            raise ValueError(f"{problem}: {self.desc!r}")
        bbox = tuple(self.bbox)
        if len(bbox) != 4 or not all(_is_bin(v) for v in bbox):
            raise ValueError(f"bbox must be 4 int bins in [0, {MAX_BIN}], got {self.bbox!r}")
        x1, y1, x2, y2 = (int(v) for v in bbox)
        if x2 < x1 or y2 < y1:
            raise ValueError(f"bbox must satisfy x2 >= x1 and y2 >= y1, got {self.bbox!r}")
        object.__setattr__(self, "bbox", (x1, y1, x2, y2))


def _is_bin(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_BIN


@dataclass(frozen=True)
class RenderedRecord:
    """Char spans of one serialized record inside a RenderedText."""

    span: Span
    desc_span: Span  # the desc value's content, without its quotes
    coord_spans: tuple[Span, Span, Span, Span]


@dataclass(frozen=True)
class RenderedText:
    text: str
    records: tuple[RenderedRecord, ...]


def sort_key(bbox: Sequence[int]) -> tuple[int, int]:
    """The canonical object order's key of a box ``[x1, y1, x2, y2]``: (minY, minX)."""
    return (bbox[1], bbox[0])


def canonical_order(objects: Sequence[CoordObject]) -> list[int]:
    """Indices of `objects` sorted by (minY, minX); stable, so ties keep their input order."""
    return sorted(range(len(objects)), key=lambda i: sort_key(objects[i].bbox))


def sort_objects(objects: Sequence[CoordObject]) -> list[CoordObject]:
    """`objects` in canonical (minY, minX) order."""
    return [objects[i] for i in canonical_order(objects)]


def render_records(
    objects: Sequence[CoordObject], field_order: FieldOrder, *, lead: str = "", tail: str = ""
) -> RenderedText:
    """`lead` + records joined by ", " + `tail`, with the char spans of every record's parts.

    Objects are written in the order given (callers sort them).
    """
    field_order = FieldOrder(field_order)
    parts = [lead]
    pos = len(lead)
    records = []
    for index, obj in enumerate(objects):
        if index:
            parts.append(RECORD_SEPARATOR)
            pos += len(RECORD_SEPARATOR)
        text, desc_span, coord_spans = _render_record(obj, field_order)
        records.append(
            RenderedRecord(
                span=(pos, pos + len(text)),
                desc_span=_shift(desc_span, pos),
                coord_spans=tuple(_shift(s, pos) for s in coord_spans),  # type: ignore[arg-type]
            )
        )
        parts.append(text)
        pos += len(text)
    parts.append(tail)
    return RenderedText("".join(parts), tuple(records))


def _shift(span: Span, by: int) -> Span:
    return (span[0] + by, span[1] + by)


def _render_record(obj: CoordObject, field_order: FieldOrder) -> tuple[str, Span, list[Span]]:
    desc_literal = json.dumps(obj.desc, ensure_ascii=False)
    coord_literals = [bin_to_token(k) for k in obj.bbox]
    parts: list[str] = ["{"]
    pos = 1
    desc_span: Span = (0, 0)
    coord_spans: list[Span] = []
    for key_index, key in enumerate(field_order.keys):
        head = ('"' if key_index == 0 else ', "') + key + '": '
        parts.append(head)
        pos += len(head)
        if key == DESC_KEY:
            desc_span = (pos + 1, pos + len(desc_literal) - 1)
            parts.append(desc_literal)
            pos += len(desc_literal)
            continue
        parts.append("[")
        pos += 1
        for coord_index, literal in enumerate(coord_literals):
            if coord_index:
                parts.append(", ")
                pos += 2
            coord_spans.append((pos, pos + len(literal)))
            parts.append(literal)
            pos += len(literal)
        parts.append("]")
        pos += 1
    parts.append("}")
    return "".join(parts), desc_span, coord_spans


def serialize_record(obj: CoordObject, field_order: FieldOrder) -> str:
    """One record, e.g. `{"desc": "cat", "bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>]}`."""
    return _render_record(obj, FieldOrder(field_order))[0]


def serialize_objects(objects: Sequence[CoordObject], field_order: FieldOrder, *, sort: bool = True) -> str:
    """The whole CoordJSON document; objects sorted by (minY, minX) unless sort=False."""
    ordered = sort_objects(objects) if sort else list(objects)
    return render_records(ordered, field_order, lead=CONTAINER_HEADER, tail=CONTAINER_CLOSURE).text


def append_fragment_lead(prefix_ends_with_record: bool, num_objects: int) -> str:
    """ ", " when records are appended after a prefix that already ends with a record's `}`, else ""."""
    return RECORD_SEPARATOR if prefix_ends_with_record and num_objects else ""


def serialize_append_fragment(
    objects: Sequence[CoordObject],
    field_order: FieldOrder,
    *,
    prefix_ends_with_record: bool,
    sort: bool = True,
) -> str:
    """Continuation of a cut rollout prefix: optional ", ", the given records, then the closure `]}`."""
    ordered = sort_objects(objects) if sort else list(objects)
    lead = append_fragment_lead(prefix_ends_with_record, len(ordered))
    return render_records(ordered, field_order, lead=lead, tail=CONTAINER_CLOSURE).text
