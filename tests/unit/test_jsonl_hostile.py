"""Issue 14 item 5: data files that are not what they seem. Every JSONL reader (the eager dataset and the lazy
one) refuses non-UTF-8 lines, deeply nested JSON and duplicate keys with `file:line: reason`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordexp.data.jsonl import MAX_JSON_DEPTH, DataValidationError, JsonlDetectionDataset, decode_line
from coordexp.data.lazy_jsonl import LazyJsonlDataset

GOOD = json.dumps({"width": 640, "height": 480, "objects": [{"desc": "cat", "bbox_2d": [1, 2, 30, 40]}]})


@pytest.mark.parametrize("line,reason", [
    ('{"width": 640, "height": 480, "objects": [{"desc": "caf\xe9", "bbox_2d": [1, 2, 30, 40]}]}'.encode(
        "latin-1"), "not UTF-8 text: byte 0xe9 at byte offset 55"),
    (b"[" * 100_000 + b"]" * 100_000,
     f"JSON nested deeper than Python's parser allows (a record may nest at most {MAX_JSON_DEPTH} levels)"),
    (b'{"width": 640, "height": 480, "objects": [{"desc": "a", "bbox_2d": [1, 2, 30, 40]}], "metadata": '
     + b'{"a": ' * 70 + b"1" + b"}" * 70 + b"}",
     f"JSON nested 71 levels deep (a record may nest at most {MAX_JSON_DEPTH})"),
    (b'{"width": 640, "width": 1, "height": 480, "objects": [{"desc": "a", "bbox_2d": [1, 2, 30, 40]}]}',
     "duplicate key 'width' in one JSON object (JSON readers keep only one of them): remove the other"),
    (b'{"width": 640, "height": 480, "objects": [{"desc": "a", "desc": "b", "bbox_2d": [1, 2, 30, 40]}]}',
     "duplicate key 'desc' in one JSON object (JSON readers keep only one of them): remove the other"),
])
@pytest.mark.parametrize("loader", ["eager", "lazy"])
def test_hostile_lines_are_file_line_reason(tmp_path, line, reason, loader):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + line + b"\n" + GOOD.encode() + b"\n")
    with pytest.raises(DataValidationError) as err:
        if loader == "eager":
            JsonlDetectionDataset(path, check_images=False)
        else:
            LazyJsonlDataset(path, check_images=False).validate(progress=False)
    assert err.value.errors == [f"{path}:2: {reason}"]


def test_decode_line_keeps_ordinary_records_and_nesting_up_to_the_limit():
    assert decode_line(GOOD.encode())["objects"][0]["desc"] == "cat"
    deepest = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert decode_line(deepest.encode()) == json.loads(deepest)
    assert decode_line('{"desc": "caf\u00e9"}'.encode())["desc"] == "caf\u00e9"
    with pytest.raises(ValueError, match=r"^JSON nested 65 levels deep"):
        decode_line(b"[" * 65 + b"]" * 65)


def test_a_one_megabyte_desc_loads_fast_and_whole(tmp_path):
    """The length limit is a token rule (the learner's load check); the reader itself takes any size."""
    path = tmp_path / "big.jsonl"
    rec = {"width": 640, "height": 480, "objects": [{"desc": "x" * 1_000_000, "bbox_2d": [1, 2, 30, 40]}]}
    path.write_text(json.dumps(rec) + "\n")
    (sample,) = JsonlDetectionDataset(path, check_images=False)
    assert len(sample.objects[0].desc) == 1_000_000 and sample.source == f"{Path(path)}:1"


@pytest.mark.parametrize("loader", ["eager", "lazy"])
def test_a_file_with_a_utf8_byte_order_mark_loads(tmp_path, loader):
    """Windows editors may write a BOM first: the file loads as without it (both readers)."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\n" + GOOD.encode() + b"\n")
    if loader == "eager":
        samples = list(JsonlDetectionDataset(path, check_images=False))
    else:
        lazy = LazyJsonlDataset(path, check_images=False)
        lazy.validate(progress=False)
        samples = [lazy.get(0), lazy.get(1)]
    assert [s.objects[0].desc for s in samples] == ["cat", "cat"] and samples[0].width == 640
