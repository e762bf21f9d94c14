"""coordexp.data.convert on a COCO / LVIS fixture drawn in the test (tests/coco_fixture.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from coco_fixture import write_coco, write_lvis
from PIL import Image

from coordexp.data.coco_source import box_drop_reason
from coordexp.data.convert import ConvertError, ConvertOptions, convert, main
from coordexp.data.jsonl import load_jsonl
from coordexp.data.resize import family_resized_size

TINY_VL_PIXELS = ("--min-pixels", "3136", "--max-pixels", "50176")   # the tiny VLM's processor limits

A_OBJECTS = [{"desc": "bicycle", "bbox_2d": [301, 10, 448, 124]},   # [100, 5, 50, 60] -> px [100, 5, 149, 64]
             {"desc": "person", "bbox_2d": [30, 39, 117, 114]}]     # [10, 20, 30, 40] -> px [10, 20, 39, 59]
B_OBJECTS = [{"desc": "traffic light", "bbox_2d": [0, 0, 999, 999]},  # the whole 1000 x 667 image
             {"desc": "bicycle", "bbox_2d": [501, 150, 700, 599]},    # px [500.5, 100.25, 699.5, 399.25]
             {"desc": "person", "bbox_2d": [900, 900, 999, 999]}]     # clipped to [900, 600, 100, 67]


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_coco(tmp_path_factory.mktemp("coco"))


def _opts(coco, out, **kw) -> ConvertOptions:
    instances, images = coco
    return ConvertOptions("coco", instances, images, out, progress=False, **kw)


def test_coco_records_drops_and_order(coco, tmp_path):
    summary = convert(_opts(coco, tmp_path))
    records = _read(tmp_path / "instances_val.jsonl")
    images = coco[1]
    assert records == [
        {"images": [str(images.resolve() / "a.jpg")], "width": 333, "height": 517, "objects": A_OBJECTS,
         "metadata": {"source": "coco", "image_id": 1, "file_name": "a.jpg", "original_width": 333,
                      "original_height": 517, "annotation_ids": [12, 11], "category_ids": [2, 1]}},
        {"images": [str(images.resolve() / "sub/b.png")], "width": 1000, "height": 667, "objects": B_OBJECTS,
         "metadata": {"source": "coco", "image_id": 2, "file_name": "sub/b.png", "original_width": 1000,
                      "original_height": 667, "annotation_ids": [21, 22, 23], "category_ids": [3, 2, 1]}},
    ]
    assert summary["images"] == {"in": 4, "out": 2, "skipped_without_annotations": 1,
                                 "skipped_all_boxes_dropped": 1, "skipped_missing_file": 0,
                                 "skipped_unreadable": 0, "skipped_size_mismatch": 0, "written": 0,
                                 "reused": 0, "resized": 0}
    assert summary["boxes"] == {"in": 8, "out": 5,
                                "dropped": {"crowd": 2, "invalid_box": 0, "outside_image": 0, "sub_pixel": 1,
                                            "unknown_category": 0},
                                "dropped_with_skipped_images": 0, "crowd_kept": 0}
    assert summary["categories"] == {"total": 4, "with_boxes": 3,
                                     "boxes_per_desc": {"bicycle": 2, "person": 2, "traffic light": 1}}
    assert json.loads((tmp_path / "instances_val.summary.json").read_text()) == summary
    assert json.loads((tmp_path / "instances_val.categories.json").read_text()) == {
        "source": "coco", "categories": [{"id": 1, "name": "person", "desc": "person"},
                                         {"id": 2, "name": "bicycle", "desc": "bicycle"},
                                         {"id": 3, "name": "traffic light", "desc": "traffic light"},
                                         {"id": 4, "name": "dog", "desc": "dog"}]}
    ds = load_jsonl(tmp_path / "instances_val.jsonl")  # the loader's strict contract (order, range, files)
    assert [o.bbox_2d for o in ds[1].objects] == [(0, 0, 999, 999), (501, 150, 700, 599),
                                                  (900, 900, 999, 999)]


def test_keep_crowd_and_desc_map(coco, tmp_path):
    desc_map = tmp_path / "map.json"
    desc_map.write_text(json.dumps({"bicycle": "bike", "traffic light": "signal"}))
    summary = convert(_opts(coco, tmp_path / "out", keep_crowd=True, desc_map=desc_map, name="val"))
    records = _read(tmp_path / "out" / "val.jsonl")
    assert [r["metadata"]["image_id"] for r in records] == [1, 2, 4]
    # the crowd region [0, 300, 333, 217] of image 1: px [0, 300, 332, 516] -> bins [0, 581, 999, 999]
    assert records[0]["objects"] == [{"desc": "bike", "bbox_2d": [301, 10, 448, 124]},
                                     {"desc": "person", "bbox_2d": [30, 39, 117, 114]},
                                     {"desc": "person", "bbox_2d": [0, 581, 999, 999]}]
    assert records[2]["objects"] == [{"desc": "dog", "bbox_2d": [102, 128, 489, 615]}]
    assert summary["boxes"]["dropped"]["crowd"] == 0 and summary["boxes"]["crowd_kept"] == 2
    assert summary["categories"]["boxes_per_desc"] == {"person": 3, "bike": 2, "dog": 1, "signal": 1}


def test_desc_map_collision_and_unknown_names_are_user_errors(coco, tmp_path, capsys):
    instances, images = coco
    bad = tmp_path / "map.json"
    bad.write_text(json.dumps({"bicycle": "person"}))
    with pytest.raises(ConvertError, match="categories 1 and 2 both get desc 'person'"):
        convert(_opts(coco, tmp_path / "o", desc_map=bad))
    bad.write_text(json.dumps({"bicycel": "bike"}))
    code = main(["coco", "--instances", str(instances), "--images", str(images), "--out", str(tmp_path / "o"),
                 "--desc-map", str(bad), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err == (f"error: --desc-map {bad}: 1 key(s) are no category name of the instances file: "
                   f"'bicycel'. Fix: use the names of its 'categories' entries\n")


def test_bad_input_exits_2_with_one_screen(coco, tmp_path):
    instances, images = coco
    not_instances = tmp_path / "captions.json"
    not_instances.write_text(json.dumps({"images": [], "annotations": []}))
    no_image_id = tmp_path / "no_image_id.json"
    no_image_id.write_text(json.dumps({"images": [], "categories": [],
                                       "annotations": [{"id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}]}))
    cases = [
        (["--instances", str(tmp_path / "none.json"), "--images", str(images)],
         f"error: --instances {tmp_path / 'none.json'}: file not found"),
        (["--instances", str(not_instances), "--images", str(images)],
         "no 'categories' list; a COCO/LVIS instances file has 'images', 'annotations' and 'categories'"),
        (["--instances", str(no_image_id), "--images", str(images)],
         "an entry has no 'image_id' key (every image needs 'id', every annotation 'id', 'image_id' and "
         "'category_id', every category 'id')"),
        (["--instances", str(instances), "--images", str(tmp_path)],
         "2 of 2 image(s) with boxes are not under --images"),
        (["--instances", str(instances), "--images", str(images), "--min-pixels", "10", "--max-pixels", "5"],
         "need 0 < --min-pixels <= --max-pixels, got 10 and 5"),
    ]
    for args, expected in cases:
        proc = subprocess.run([sys.executable, "-m", "coordexp.data.convert", "coco", *args, "--out",
                               str(tmp_path / "o")], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert expected in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.splitlines()) <= 10


def test_missing_images_can_be_skipped(coco, tmp_path):
    instances, images = coco
    partial = tmp_path / "partial"
    (partial / "sub").mkdir(parents=True)
    (partial / "sub" / "b.png").write_bytes((images / "sub" / "b.png").read_bytes())
    summary = convert(ConvertOptions("coco", instances, partial, tmp_path / "o", skip_missing_images=True,
                                     progress=False))
    assert summary["images"]["out"] == 1 and summary["images"]["skipped_missing_file"] == 1
    assert summary["boxes"]["out"] == 3 and summary["boxes"]["dropped_with_skipped_images"] == 2


def test_resize_qwen2_5_vl_writes_processor_sized_images_and_resumes(coco, tmp_path):
    out = tmp_path / "r"
    summary = convert(_opts(coco, out, resize="qwen2_5_vl", workers=2))
    records = _read(out / "instances_val.jsonl")
    assert [(r["width"], r["height"]) for r in records] == [(336, 504), (1008, 672)]  # default pixel limits
    for r in records:
        with Image.open(out / r["images"][0]) as im:
            assert im.size == (r["width"], r["height"])
            assert family_resized_size("qwen2_5_vl", *im.size) == im.size  # the processor leaves it as is
    # boxes are converted on the resized size: [10, 20, 30, 40] * (336/333, 504/517)
    assert records[0]["objects"] == [{"desc": "bicycle", "bbox_2d": [301, 10, 448, 124]},
                                     {"desc": "person", "bbox_2d": [30, 39, 117, 114]}]
    assert records[1]["objects"][1] == {"desc": "bicycle", "bbox_2d": [500, 150, 700, 599]}
    assert summary["images"]["written"] == 2 and summary["images"]["resized"] == 2
    assert summary["resize"] == {"mode": "qwen2_5_vl", "family": "qwen2_5_vl", "factor": 28,
                                 "min_pixels": 3136, "max_pixels": 1003520}
    stamp = (out / "images" / "a.jpg").stat().st_mtime_ns
    again = convert(_opts(coco, out, resize="qwen2_5_vl", workers=1))
    assert again["images"]["reused"] == 2 and again["images"]["written"] == 0
    assert (out / "images" / "a.jpg").stat().st_mtime_ns == stamp
    assert _read(out / "instances_val.jsonl") == records


def test_family_sizes_without_resizing(coco, tmp_path):
    convert(_opts(coco, tmp_path, family="qwen3_vl"))
    records = _read(tmp_path / "instances_val.jsonl")
    assert [(r["width"], r["height"]) for r in records] == [(320, 512), (992, 672)]  # multiples of 32
    assert records[0]["images"] == [str(coco[1].resolve() / "a.jpg")]  # the original file


def test_resized_set_passes_the_tiny_vlm_size_check(coco, tmp_path):
    from coordexp.models.prompts import load_model_and_prompts
    from coordexp.models.tiny import ensure_tiny_model

    instances, images = coco
    assert main(["coco", "--instances", str(instances), "--images", str(images), "--out", str(tmp_path / "o"),
                 "--resize", "qwen2_5_vl", *TINY_VL_PIXELS, "--no-progress"]) == 0
    samples = list(load_jsonl(tmp_path / "o" / "instances_val.jsonl"))
    assert [(s.width, s.height) for s in samples] == [(168, 252), (252, 168)]
    _, _, prompts = load_model_and_prompts(ensure_tiny_model(tmp_path / "m", arch="qwen2_vl"), "float32")
    prompts.check(samples)  # raises PromptError on any mismatch
    encoded = prompts.encode(samples[0])  # 168x252 -> 12x18 patches -> 54 merged image tokens
    assert encoded.ids.count(prompts.image_token_id) == 54


def test_lvis_carries_not_exhaustive_and_negative_categories(tmp_path):
    instances, images = write_lvis(tmp_path)
    summary = convert(ConvertOptions("lvis", instances, images, tmp_path / "o", progress=False))
    records = _read(tmp_path / "o" / "lvis_v1_val.jsonl")
    assert [r["metadata"]["file_name"] for r in records] == ["val2017/a.jpg", "val2017/sub_b.png"]
    assert records[0]["objects"] == A_OBJECTS and records[1]["objects"] == B_OBJECTS
    assert records[0]["metadata"]["not_exhaustive_category_ids"] == [2]
    assert records[0]["metadata"]["neg_category_ids"] == [4]
    assert records[1]["metadata"]["not_exhaustive_category_ids"] == []
    assert records[1]["metadata"]["source"] == "lvis"
    assert summary["boxes"]["dropped"] == {"crowd": 0, "invalid_box": 0, "outside_image": 0, "sub_pixel": 1,
                                           "unknown_category": 0}


def test_no_usable_box_is_a_user_error(tmp_path):
    instances = tmp_path / "i.json"
    instances.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 10}],
                                     "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                                                      "bbox": [1, 1, 0.5, 0.5], "iscrowd": 0}],
                                     "categories": [{"id": 1, "name": "a"}]}))
    with pytest.raises(ConvertError, match=r"no image of .*i.json has a usable box \(1 images, 1 "
                                           r"annotations; see .*i.summary.json"):
        convert(ConvertOptions("coco", instances, tmp_path, tmp_path / "o", progress=False))
    summary = json.loads((tmp_path / "o" / "i.summary.json").read_text())
    assert summary["boxes"]["dropped"]["sub_pixel"] == 1


@pytest.mark.parametrize(("bbox", "reason"), [
    ([10, 10, 5, 5], None),
    ([0, 0, 100, 50], None),                  # the whole image
    ([90, 40, 30, 30], None),                 # runs over the edge: clipped, kept
    ([10, 10, 0, 30], "sub_pixel"),           # zero width, inside
    ([0, 10, 0, 30], "sub_pixel"),            # zero width on the left edge
    ([10, 10, 0.5, 30], "sub_pixel"),
    ([100, 10, 5, 5], "outside_image"),       # touches the right edge from outside
    ([-5, 10, 5, 5], "outside_image"),        # touches the left edge from outside
    ([300, 10, 0, 5], "outside_image"),       # zero width, beyond the image
    ([10, 10, -5, 20], "invalid_box"),        # negative width
    (["10", "10", "5", "5"], "invalid_box"),  # strings of digits are no JSON numbers
    ([True, 10, 20, 20], "invalid_box"),      # nor is a bool
    ([10, 10, 5], "invalid_box"),
    ([10, 10, 5, float("nan")], "invalid_box"),
    ([10, 10, float("inf"), 5], "invalid_box"),
    (None, "invalid_box"),
    ("10 10 5 5", "invalid_box"),
])
def test_box_drop_reasons(bbox, reason):
    assert box_drop_reason(bbox, 100, 50) == reason


def _instances(tmp_path, images, annotations, categories) -> Path:
    path = tmp_path / "i.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories},
                               ensure_ascii=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_repeated_ids_are_refused(tmp_path, key):
    images = [{"id": 1, "file_name": "a.png", "width": 20, "height": 20},
              {"id": 2, "file_name": "b.png", "width": 10, "height": 10}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [1, 1, 5, 5]}]
    cats = [{"id": 1, "name": "café"}, {"id": 2, "name": "红绿灯"}]
    {"images": images, "annotations": anns, "categories": cats}[key][1]["id"] = 1
    with pytest.raises(ConvertError, match=rf"{key} id 1 appears more than once; ids must be unique .* Fix: "
                                           r"renumber the duplicates"):
        convert(ConvertOptions("coco", _instances(tmp_path, images, anns, cats), tmp_path, tmp_path / "o",
                               progress=False))


def test_descs_are_written_in_nfc_and_the_export_finds_them(tmp_path):
    from coordexp.evaluation.coco_export import coco_results, load_category_map

    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    decomposed = "cafe\u0301"
    instances = _instances(tmp_path, [{"id": 1, "file_name": "a.png", "width": 20, "height": 20}],
                           [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5]}],
                           [{"id": 7, "name": decomposed}])
    convert(ConvertOptions("coco", instances, tmp_path, tmp_path / "o", progress=False))
    record = _read(tmp_path / "o" / "i.jsonl")[0]
    assert record["objects"][0]["desc"] == "caf\u00e9"
    categories = json.loads((tmp_path / "o" / "i.categories.json").read_text())["categories"]
    assert categories == [{"id": 7, "name": decomposed, "desc": "caf\u00e9"}]
    desc_to_id = load_category_map(tmp_path / "o" / "i.categories.json")
    sample = load_jsonl(tmp_path / "o" / "i.jsonl")[0]
    # a prediction in either form lands on category 7
    records = [{"width": 20, "height": 20, "pred": [{"desc": d, "bbox_2d": [50, 50, 250, 250]}
                                                    for d in ("caf\u00e9", decomposed)]}]
    results, summary = coco_results(records, [sample], desc_to_id)
    assert [r["category_id"] for r in results] == [7, 7] and summary["unknown_desc_predictions"] == 0


def test_out_that_is_a_file_and_lost_boxes_on_the_console(coco, tmp_path, capsys):
    instances, images = coco
    (tmp_path / "file").write_text("")
    assert main(["coco", "--instances", str(instances), "--images", str(images), "--out",
                 str(tmp_path / "file"), "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"error: --out {tmp_path / 'file'}: is a file, not a folder. Fix: "
                                       f"pass a new or existing folder (the JSONL, its summary and the "
                                       f"resized images go into it)\n")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "a.jpg").write_bytes((images / "a.jpg").read_bytes())
    assert main(["coco", "--instances", str(instances), "--images", str(partial), "--out",
                 str(tmp_path / "o"), "--skip-missing-images", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "(dropped: crowd 2, sub_pixel 1, with skipped images 3)" in out, out
