"""JSONL dataset: strict validation with exact `file:line: reason` messages; prompt messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordexp.data.jsonl import (
    DataValidationError,
    DetectionObject,
    JsonlDetectionDataset,
    load_jsonl,
    parse_record,
)
from coordexp.data.prompt import PromptSpec, build_messages, instruction_text

GOOD = {"width": 640, "height": 480, "objects": [{"desc": "cat", "bbox_2d": [1, 2, 30, 40]}]}


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _error(tmp_path: Path, bad, line_before: int = 1) -> str:
    path = _write(tmp_path / "d.jsonl", [GOOD] * line_before + [bad])
    with pytest.raises(DataValidationError) as e:
        JsonlDetectionDataset(path)
    assert len(e.value.errors) == 1
    return str(e.value)


def _obj(**kw):
    return {**GOOD, **kw}


CASES = [
    ("{not json", "bad JSON: Expecting property name enclosed in double quotes (column 2)"),
    ('{"width": 1, "height": 2, "objects": []} trailing', "bad JSON: Extra data (column 42)"),
    ("[1, 2]", "record must be a JSON object, got list"),
    ({"height": 480, "objects": GOOD["objects"]}, "missing 'width'"),
    ({"width": 640, "objects": GOOD["objects"]}, "missing 'height'"),
    (_obj(width=0), "width must be a positive int, got 0"),
    (_obj(height=4.5), "height must be a positive int, got 4.5"),
    (_obj(width=True), "width must be a positive int, got True"),
    ({"width": 640, "height": 480}, "missing 'objects'"),
    (_obj(objects=[]), "empty objects (Stage-2 needs at least one ground-truth object per sample)"),
    (_obj(objects={"desc": "a"}), "objects must be a list, got dict"),
    (_obj(objects=["cat"]), "objects[0] must be an object, got str"),
    (_obj(objects=[{"desc": "", "bbox_2d": [1, 2, 3, 4]}]), "objects[0]: empty desc"),
    (_obj(objects=[{"desc": "  ", "bbox_2d": [1, 2, 3, 4]}]), "objects[0]: empty desc"),
    (_obj(objects=[{"desc": 3, "bbox_2d": [1, 2, 3, 4]}]), "objects[0]: desc must be a string, got int"),
    (_obj(objects=[{"bbox_2d": [1, 2, 3, 4]}]), "objects[0]: missing 'desc'"),
    (_obj(objects=[{"desc": "a"}]), "objects[0]: missing 'bbox_2d'"),
    (_obj(objects=[{"desc": "a", "poly": [1, 2, 3, 4, 5, 6]}]),
     "objects[0]: bbox-only: geometry 'poly' is not supported "
     "(Stage-2 accepts exactly one 'bbox_2d' per object)"),
    (_obj(objects=[{"desc": "a", "bbox_2d": [1, 2, 3, 4], "poly": [1, 2, 3, 4, 5, 6]}]),
     "objects[0]: bbox-only: geometry 'poly' is not supported "
     "(Stage-2 accepts exactly one 'bbox_2d' per object)"),
    (_obj(objects=[{"desc": "a", "bbox_2d": [1, 2, 3, 4], "line": [1, 2, 3, 4]}]),
     "objects[0]: bbox-only: geometry 'line' is not supported "
     "(Stage-2 accepts exactly one 'bbox_2d' per object)"),
    (_obj(objects=[{"desc": "a", "bbox_2d": [1, 2, 3, 4], "score": 1}]),
     "objects[0]: unknown key(s) 'score' (allowed: 'desc', 'bbox_2d')"),
    (_obj(objects=[{"desc": "a", "bbox_2d": [1, 2, 3]}]),
     "objects[0]: bbox_2d must have 4 values [x1, y1, x2, y2], got 3"),
    (_obj(objects=[{"desc": "a", "bbox_2d": [1, 2, 3, 4, 5]}]),
     "objects[0]: bbox_2d must have 4 values [x1, y1, x2, y2], got 5"),
    (_obj(objects=[{"desc": "a", "bbox_2d": "1,2,3,4"}]),
     "objects[0]: bbox_2d must be a list of 4 values, got str"),
    (_obj(objects=[{"desc": "a", "bbox_2d": [1, 2, 3, 1000]}]),
     "objects[0]: bbox_2d[3]=1000 out of range 0..999"),
    (_obj(objects=[{"desc": "a", "bbox_2d": [-1, 2, 3, 4]}]),
     "objects[0]: bbox_2d[0]=-1 out of range 0..999"),
    (_obj(objects=[{"desc": "a", "bbox_2d": [1.5, 2, 3, 4]}]),
     "objects[0]: bbox_2d[0]=1.5 must be an int 0..999 or a string '<|coord_k|>'"),
    (_obj(objects=[{"desc": "a", "bbox_2d": [1, "<|coord_1000|>", 3, 4]}]),
     "objects[0]: bbox_2d[1]='<|coord_1000|>' is not a coord token '<|coord_k|>' with k in 0..999"),
    (_obj(objects=[{"desc": "a", "bbox_2d": [1, "12", 3, 4]}]),
     "objects[0]: bbox_2d[1]='12' is not a coord token '<|coord_k|>' with k in 0..999"),
    (_obj(objects=[{"desc": "a", "bbox_2d": [30, 2, 10, 40]}]),
     "objects[0]: bbox_2d needs x2 > x1, got x1=30 x2=10"),
    (_obj(objects=[{"desc": "a", "bbox_2d": [10, 2, 10, 40]}]),
     "objects[0]: bbox_2d needs x2 > x1, got x1=10 x2=10"),
    (_obj(objects=[{"desc": "a", "bbox_2d": [1, 50, 30, 40]}]),
     "objects[0]: bbox_2d needs y2 > y1, got y1=50 y2=40"),
    (_obj(objects=[{"desc": "a", "bbox_2d": [1, 50, 30, 60]}, {"desc": "b", "bbox_2d": [1, 20, 30, 60]}]),
     "objects not sorted by (minY, minX): objects[1] (y1=20, x1=1) comes after objects[0] (y1=50, x1=1)"),
    (_obj(objects=[{"desc": "a", "bbox_2d": [9, 5, 30, 60]}, {"desc": "b", "bbox_2d": [1, 5, 30, 60]}]),
     "objects not sorted by (minY, minX): objects[1] (y1=5, x1=1) comes after objects[0] (y1=5, x1=9)"),
    (_obj(id=7), "unknown key(s) 'id' (allowed: height, images, metadata, objects, summary, width)"),
    (_obj(images="a.png"), "images must be a list of non-empty path strings"),
]


@pytest.mark.parametrize("bad,reason", CASES)
def test_exact_error_message_with_file_and_line(tmp_path, bad, reason):
    msg = _error(tmp_path, bad, line_before=2)
    assert msg == f"{tmp_path / 'd.jsonl'}:3: {reason}"


def test_missing_image_and_blank_lines_keep_line_numbers(tmp_path):
    path = _write(tmp_path / "d.jsonl", [GOOD, "", "   ", _obj(images=["img/missing.png"])])
    with pytest.raises(DataValidationError) as e:
        JsonlDetectionDataset(path)
    assert str(e.value) == (f"{path}:4: image not found: img/missing.png "
                            f"(resolved to {tmp_path / 'img/missing.png'})")
    ds = JsonlDetectionDataset(path, check_images=False)
    assert [s.source for s in ds] == [f"{path}:1", f"{path}:4"]


def test_all_bad_lines_reported_and_capped(tmp_path):
    bad = _obj(objects=[])
    path = _write(tmp_path / "d.jsonl", [GOOD] + [bad] * 25)
    with pytest.raises(DataValidationError) as e:
        JsonlDetectionDataset(path)
    lines = str(e.value).splitlines()
    assert len(e.value.errors) == 20 and e.value.total == 25
    assert lines[0].startswith(f"{path}:2: empty objects")
    assert lines[19].startswith(f"{path}:21: ")
    assert lines[-1] == "... and 5 more invalid line(s)"
    assert isinstance(e.value, ValueError)


def test_empty_and_missing_files(tmp_path):
    empty = _write(tmp_path / "e.jsonl", ["", ""])
    with pytest.raises(DataValidationError, match=r"e\.jsonl: no records$"):
        JsonlDetectionDataset(empty)
    with pytest.raises(FileNotFoundError, match="JSONL file not found"):
        JsonlDetectionDataset(tmp_path / "nope.jsonl")


def test_valid_records_ints_tokens_images_and_extras(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"\x89PNG")
    absolute = tmp_path / "b.png"
    absolute.write_bytes(b"\x89PNG")
    rec = {
        "images": ["img/a.png", str(absolute)],
        "width": 800,
        "height": 600,
        "objects": [
            {"desc": "dog", "bbox_2d": ["<|coord_0|>", "<|coord_5|>", "<|coord_999|>", 10]},
            {"bbox_2d": [3, 5, 4, 6], "desc": "cat"},
        ],
        "summary": "two animals",
        "metadata": {"id": 1},
    }
    path = _write(tmp_path / "d.jsonl", [rec, GOOD])
    ds = load_jsonl(path)
    assert len(ds) == 2
    s = ds[0]
    assert s.objects == (DetectionObject("dog", (0, 5, 999, 10)), DetectionObject("cat", (3, 5, 4, 6)))
    assert s.images == (tmp_path / "img" / "a.png", absolute)
    assert (s.width, s.height, s.summary, s.metadata, s.index) == (800, 600, "two animals", {"id": 1}, 0)
    # images present -> image scene: the prompt never contains the objects
    user = s.messages[-1]
    assert user["role"] == "user"
    assert user["content"][:2] == [{"type": "image", "image": str(tmp_path / "img" / "a.png")},
                                   {"type": "image", "image": str(absolute)}]
    assert user["content"][2] == {"type": "text", "text": instruction_text("desc_first")}
    assert ds[1].messages == tuple(build_messages(GOOD))
    assert ds[1].record() == GOOD
    assert len(JsonlDetectionDataset(path, limit=1)) == 1


def test_dataset_messages_are_the_shared_prompt_builder(tmp_path):
    path = _write(tmp_path / "d.jsonl", [GOOD])
    spec = PromptSpec(object_field_order="geometry_first", system_prompt="sys")
    s = JsonlDetectionDataset(path, prompt=spec)[0]
    assert list(s.messages) == build_messages(s, spec) == build_messages(GOOD, spec)
    assert s.messages[0] == {"role": "system", "content": "sys"}
    assert s.messages[1]["content"] == (
        instruction_text("geometry_first")
        + "\nObjects:\n<|coord_1|> <|coord_2|> <|coord_30|> <|coord_40|> cat"
    )


def test_parse_record_reports_bare_reason():
    with pytest.raises(ValueError, match=r"^objects\[0\]: empty desc$"):
        parse_record(_obj(objects=[{"desc": "", "bbox_2d": [1, 2, 3, 4]}]))
    w, h, objs, imgs = parse_record(GOOD)
    assert (w, h, imgs) == (640, 480, ()) and objs[0].bbox_2d == (1, 2, 30, 40)


def test_prompt_spec_and_wording():
    assert '{"desc", "bbox_2d"}' in instruction_text("desc_first")
    assert '{"bbox_2d", "desc"}' in instruction_text("geometry_first")
    with pytest.raises(ValueError, match="object_field_order"):
        PromptSpec(object_field_order="xy_first")
    with pytest.raises(ValueError, match="scene"):
        PromptSpec(scene="video")
    with pytest.raises(ValueError, match="no images"):
        build_messages(GOOD, PromptSpec(scene="images"))

    class Order(str):  # str-valued enums (the config schema's FieldOrder) are accepted
        value = "geometry_first"

    assert PromptSpec(object_field_order=Order("geometry_first")).object_field_order == "geometry_first"
    text_only = build_messages({**GOOD, "images": ["x.png"]}, PromptSpec(scene="text"))
    assert text_only[0]["content"].endswith("cat <|coord_1|> <|coord_2|> <|coord_30|> <|coord_40|>")
