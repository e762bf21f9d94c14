"""JSONL detection dataset: strict record validation and typed samples with their prompt messages.

One record per line (blank lines are skipped; line numbers are 1-based and count every line)::

    {"images": ["img/0001.jpg"], "width": 640, "height": 480,
     "objects": [{"desc": "cat", "bbox_2d": [12, 34, 56, 78]}, ...]}

- ``images`` (optional): paths relative to the JSONL file's folder (absolute paths are kept).
- ``width``, ``height``: positive ints (post-resize size; nothing is resized at runtime).
- ``objects``: non-empty list; each object has a non-empty ``desc`` and a ``bbox_2d`` of 4 norm1000
  values, each an int 0..999 or a string ``"<|coord_k|>"``, with ``x2 > x1`` and ``y2 > y1``.
  Stage-2 is bbox-only: ``poly`` or any other geometry key is an error. Objects must be sorted by
  ``(minY, minX)``.
- ``summary``, ``metadata`` (optional) are carried through untouched; any other key is an error.

Every violation is reported as ``<file>:<line>: <reason>``; all bad lines of a file are reported in
one :class:`DataValidationError` (the first 20, then a count). Real files and the synthetic ones
(:func:`coordexp.data.synthetic.write_synthetic_jsonl`) go through this same class.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordexp.coordjson import MAX_BIN, lone_surrogate, try_token_to_bin
from coordexp.coordjson.serialize import sort_key
from coordexp.data.prompt import PromptSpec, build_messages

__all__ = [
    "DataValidationError",
    "DetectionObject",
    "DetectionSample",
    "JsonlDetectionDataset",
    "load_jsonl",
    "parse_record",
]

RECORD_KEYS = frozenset({"images", "width", "height", "objects", "summary", "metadata"})
OBJECT_KEYS = frozenset({"desc", "bbox_2d"})
# Geometry keys that exist in the wider data contract (or common datasets) but not in bbox-only Stage-2.
GEOMETRY_KEYS = frozenset({"poly", "polygon", "line", "point", "points", "segmentation", "mask", "bbox",
                           "quad"})
MAX_REPORTED_ERRORS = 20
#: Deepest JSON nesting a record may have (a valid record needs 4: record, objects, object, bbox_2d).
MAX_JSON_DEPTH = 64


class DataValidationError(ValueError):
    """One or more records violate the data contract; ``errors`` holds the ``file:line: reason`` lines."""

    def __init__(self, errors: Sequence[str], total: int | None = None) -> None:
        self.errors = list(errors)
        self.total = total if total is not None else len(self.errors)
        lines = list(self.errors)
        if self.total > len(lines):
            lines.append(f"... and {self.total - len(lines)} more invalid line(s)")
        super().__init__("\n".join(lines))


class _RecordError(Exception):
    pass


@dataclass(frozen=True)
class DetectionObject:
    desc: str
    bbox_2d: tuple[int, int, int, int]  # norm1000 bins x1, y1, x2, y2

    def to_dict(self) -> dict[str, Any]:
        return {"desc": self.desc, "bbox_2d": list(self.bbox_2d)}


@dataclass(frozen=True)
class DetectionSample:
    index: int  # position in the dataset
    source: str  # "<file>:<line>"
    width: int
    height: int
    objects: tuple[DetectionObject, ...]
    images: tuple[Path, ...] = ()
    messages: tuple[dict[str, Any], ...] = ()  # prompt messages (system?, user), see coordexp.data.prompt
    summary: Any = None
    metadata: Any = None

    def record(self) -> dict[str, Any]:
        """The record as a plain dict (images as given absolute paths, bboxes as ints)."""
        rec: dict[str, Any] = {"width": self.width, "height": self.height,
                               "objects": [o.to_dict() for o in self.objects]}
        if self.images:
            rec["images"] = [str(p) for p in self.images]
        return rec


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _coord_value(v: Any, i: int) -> int:
    if _is_int(v):
        if not 0 <= v <= MAX_BIN:
            raise _RecordError(f"bbox_2d[{i}]={v} out of range 0..{MAX_BIN}")
        return v
    if isinstance(v, str):
        k = try_token_to_bin(v)
        if k is None:
            raise _RecordError(f"bbox_2d[{i}]={v!r} is not a coord token '<|coord_k|>' "
                               f"with k in 0..{MAX_BIN}")
        return k
    raise _RecordError(f"bbox_2d[{i}]={v!r} must be an int 0..{MAX_BIN} or a string '<|coord_k|>'")


def _parse_object(obj: Any, j: int) -> DetectionObject:
    where = f"objects[{j}]"
    if not isinstance(obj, Mapping):
        raise _RecordError(f"{where} must be an object, got {type(obj).__name__}")
    geometry = sorted(k for k in obj if k in GEOMETRY_KEYS)
    if geometry:
        raise _RecordError(f"{where}: bbox-only: geometry {', '.join(repr(g) for g in geometry)} "
                           f"is not supported (Stage-2 accepts exactly one 'bbox_2d' per object)")
    unknown = sorted(k for k in obj if k not in OBJECT_KEYS)
    if unknown:
        raise _RecordError(f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)} "
                           f"(allowed: 'desc', 'bbox_2d')")
    desc = obj.get("desc")
    if "desc" not in obj:
        raise _RecordError(f"{where}: missing 'desc'")
    if not isinstance(desc, str):
        raise _RecordError(f"{where}: desc must be a string, got {type(desc).__name__}")
    if not desc.strip():
        raise _RecordError(f"{where}: empty desc")
    if (problem := lone_surrogate(desc)) is not None:
        raise _RecordError(f"{where}: {problem}")
    if "bbox_2d" not in obj:
        raise _RecordError(f"{where}: missing 'bbox_2d'")
    box = obj["bbox_2d"]
    if not isinstance(box, list):
        raise _RecordError(f"{where}: bbox_2d must be a list of 4 values, got {type(box).__name__}")
    if len(box) != 4:
        raise _RecordError(f"{where}: bbox_2d must have 4 values [x1, y1, x2, y2], got {len(box)}")
    try:
        x1, y1, x2, y2 = (_coord_value(v, i) for i, v in enumerate(box))
    except _RecordError as e:
        raise _RecordError(f"{where}: {e}") from None
    if x2 <= x1:
        raise _RecordError(f"{where}: bbox_2d needs x2 > x1, got x1={x1} x2={x2}")
    if y2 <= y1:
        raise _RecordError(f"{where}: bbox_2d needs y2 > y1, got y1={y1} y2={y2}")
    return DetectionObject(desc, (x1, y1, x2, y2))


def parse_record(
    rec: Any,
    *,
    base_dir: str | os.PathLike | None = None,
    check_images: bool = True,
) -> tuple[int, int, tuple[DetectionObject, ...], tuple[Path, ...]]:
    """Validate one decoded record; return (width, height, objects, images).

    Raises ``ValueError`` with the bare reason (no file:line) on the first violation.
    """
    try:
        return _parse_record(rec, base_dir, check_images)
    except _RecordError as e:
        raise ValueError(str(e)) from None


def _parse_record(rec: Any, base_dir, check_images: bool):
    if not isinstance(rec, Mapping):
        raise _RecordError(f"record must be a JSON object, got {type(rec).__name__}")
    unknown = sorted(k for k in rec if k not in RECORD_KEYS)
    if unknown:
        raise _RecordError(f"unknown key(s) {', '.join(repr(k) for k in unknown)} "
                           f"(allowed: {', '.join(sorted(RECORD_KEYS))})")
    for key in ("width", "height"):
        if key not in rec:
            raise _RecordError(f"missing '{key}'")
        if not _is_int(rec[key]) or rec[key] < 1:
            raise _RecordError(f"{key} must be a positive int, got {rec[key]!r}")
    if "objects" not in rec:
        raise _RecordError("missing 'objects'")
    objects_raw = rec["objects"]
    if not isinstance(objects_raw, list):
        raise _RecordError(f"objects must be a list, got {type(objects_raw).__name__}")
    if not objects_raw:
        raise _RecordError("empty objects (Stage-2 needs at least one ground-truth object per sample)")
    objects = tuple(_parse_object(o, j) for j, o in enumerate(objects_raw))
    for j in range(1, len(objects)):
        prev, cur = objects[j - 1].bbox_2d, objects[j].bbox_2d
        if sort_key(cur) < sort_key(prev):
            raise _RecordError(f"objects not sorted by (minY, minX): objects[{j}] (y1={cur[1]}, x1={cur[0]}) "
                               f"comes after objects[{j - 1}] (y1={prev[1]}, x1={prev[0]})")
    images: tuple[Path, ...] = ()
    if "images" in rec:
        raw_images = rec["images"]
        if not isinstance(raw_images, list) or not all(isinstance(p, str) and p for p in raw_images):
            raise _RecordError("images must be a list of non-empty path strings")
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        images = tuple(p if p.is_absolute() else base / p for p in map(Path, raw_images))
        if check_images:
            for raw, p in zip(raw_images, images):
                if not p.is_file():
                    raise _RecordError(f"image not found: {raw} (resolved to {p})")
    return rec["width"], rec["height"], objects, images


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RecordError(f"duplicate key {key!r} in one JSON object (JSON readers keep only one of "
                               f"them): remove the other")
        out[key] = value
    return out


def _depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def decode_line(raw: bytes) -> Any:
    """One JSONL line (bytes) -> its JSON value, or ValueError with the reason: not UTF-8, bad JSON, nested
    deeper than MAX_JSON_DEPTH, or a key repeated inside one object. Every JSONL reader uses this. A UTF-8
    byte-order mark (what some Windows editors put first in a file) is skipped."""
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset {e.start}") from None
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise ValueError(f"bad JSON: {e.msg} (column {e.colno})") from None
    except _RecordError as e:
        raise ValueError(str(e)) from None
    except RecursionError:
        raise ValueError(f"JSON nested deeper than Python's parser allows (a record may nest at most "
                         f"{MAX_JSON_DEPTH} levels)") from None
    depth = _depth(value)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"JSON nested {depth} levels deep (a record may nest at most {MAX_JSON_DEPTH})")
    return value


def _iter_file(path: Path, check_images: bool) -> Iterator[tuple[int, str, Any]]:
    """Yield (line_no, error_or_empty, parsed) for each non-blank line."""
    base = path.parent
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rec = decode_line(raw)
            except ValueError as e:
                yield line_no, str(e), None
                continue
            try:
                yield line_no, "", (_parse_record(rec, base, check_images), rec)
            except _RecordError as e:
                yield line_no, str(e), None


@dataclass
class JsonlDetectionDataset:
    """Map-style dataset over one JSONL file (usable directly by a torch ``DataLoader``).

    The whole file is validated at construction; any violation raises :class:`DataValidationError`.
    ``limit`` keeps the first N valid samples (after validating the whole file).
    """

    path: str | os.PathLike
    prompt: PromptSpec = field(default_factory=PromptSpec)
    limit: int | None = None
    check_images: bool = True
    samples: list[DetectionSample] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: JSONL file not found")
        if self.limit is not None and (not _is_int(self.limit) or self.limit < 0):
            raise ValueError(f"limit must be an int >= 0 or None, got {self.limit!r}")
        errors: list[str] = []
        n_errors = 0
        samples: list[DetectionSample] = []
        for line_no, err, parsed in _iter_file(self.path, self.check_images):
            where = f"{self.path}:{line_no}"
            if err:
                n_errors += 1
                if len(errors) < MAX_REPORTED_ERRORS:
                    errors.append(f"{where}: {err}")
                continue
            (width, height, objects, images), rec = parsed
            sample = DetectionSample(
                index=len(samples), source=where, width=width, height=height, objects=objects, images=images,
                summary=rec.get("summary"), metadata=rec.get("metadata"),
            )
            messages = tuple(build_messages(sample, self.prompt))
            samples.append(_with_messages(sample, messages))
        if n_errors:
            raise DataValidationError(errors, n_errors)
        if not samples:
            raise DataValidationError([f"{self.path}: no records"])
        self.samples = samples if self.limit is None else samples[: self.limit]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> DetectionSample:
        return self.samples[i]

    def __iter__(self) -> Iterator[DetectionSample]:
        return iter(self.samples)


def _with_messages(sample: DetectionSample, messages: tuple[dict[str, Any], ...]) -> DetectionSample:
    from dataclasses import replace

    return replace(sample, messages=messages)


def load_jsonl(path: str | os.PathLike, prompt: PromptSpec | None = None,
               **kwargs: Any) -> JsonlDetectionDataset:
    """Shorthand for ``JsonlDetectionDataset(path, prompt or PromptSpec(), **kwargs)``."""
    return JsonlDetectionDataset(path, prompt or PromptSpec(), **kwargs)
