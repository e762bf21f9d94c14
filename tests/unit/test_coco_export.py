"""COCO results export: ids from the converter's category map, boxes in original pixels, and pycocotools
scoring of the export gives the report's AP."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest
from coco_fixture import ANNOTATIONS, write_coco
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from coordexp.data.convert import ConvertOptions, convert
from coordexp.data.jsonl import load_jsonl
from coordexp.eval import FLAGS_HELP
from coordexp.evaluation.coco import CocoImage, CocoObject, coco_ap
from coordexp.evaluation.coco_export import (
    CocoExport,
    CocoExportError,
    category_map_path,
    coco_ground_truth,
    coco_results,
    load_category_map,
    pop_export_flags,
    write_coco_results,
)
from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module", params=["none", "qwen2_5_vl"])
def split(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"coco-{request.param}")
    instances, images = write_coco(root)
    convert(ConvertOptions("coco", instances, images, root / "data", resize=request.param, progress=False))
    path = root / "data" / "instances_val.jsonl"
    return path, list(load_jsonl(path))


def _shift(box, dx, dy):
    x1, y1, x2, y2 = box
    return [min(max(x1 + dx, 0), 998), min(max(y1 + dy, 0), 998), min(max(x2 + dx, 1), 999),
            min(max(y2 + dy, 1), 999)]


def _records(samples):
    """predictions.jsonl-like rows: every GT box found with a small shift, one wrong box, one unknown desc."""
    rows = []
    for i, s in enumerate(samples):
        pred = [{"desc": o.desc, "bbox_2d": _shift(o.bbox_2d, 3 * (j + 1) + i, -2 * j), "score": None}
                for j, o in enumerate(s.objects)]
        pred.insert(1, {"desc": "person", "bbox_2d": [700, 700, 760, 790], "score": None})
        pred.append({"desc": "unicorn", "bbox_2d": [10, 10, 20, 20], "score": None})
        rows.append({"sample_id": s.source, "width": s.width, "height": s.height,
                     "gt": [{"desc": o.desc, "bbox_2d": list(o.bbox_2d)} for o in s.objects], "pred": pred})
    return rows


def _pycocotools_ap(gt_dataset, results) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_dataset
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_export_is_scored_by_pycocotools_with_the_reports_ap(split):
    path, samples = split
    desc_to_id = load_category_map(category_map_path(path))
    assert desc_to_id == {"person": 1, "bicycle": 2, "traffic light": 3, "dog": 4}
    records = _records(samples)
    results, summary = coco_results(records, samples, desc_to_id)
    assert summary == {"images": 2, "predictions": 9, "detections": 7, "unknown_desc_predictions": 2,
                       "unknown_descs": {"unicorn": 2}, "score": "constant"}
    assert [(r["image_id"], r["category_id"], r["score"]) for r in results] == [
        (1, 2, 1.0), (1, 1, 1.0), (1, 1, 1.0), (2, 3, 1.0), (2, 1, 1.0), (2, 2, 1.0), (2, 1, 1.0)]
    report = coco_ap([CocoImage(r["width"], r["height"],
                                [CocoObject(g["desc"], tuple(g["bbox_2d"])) for g in r["gt"]],
                                [CocoObject(p["desc"], tuple(p["bbox_2d"]), 1.0) for p in r["pred"]])
                      for r in records], "by_desc")
    stats = _pycocotools_ap(coco_ground_truth(samples, desc_to_id), results)
    assert 0.0 < report["AP"] < 1.0
    for i, name in enumerate(("AP", "AP50", "AP75")):
        assert stats[i] == pytest.approx(report[name], abs=1e-12), name


def test_ground_truth_comes_back_in_original_pixels(split):
    path, samples = split
    gt = coco_ground_truth(samples, load_category_map(category_map_path(path)))
    assert gt["images"] == [{"id": 1, "width": 333, "height": 517}, {"id": 2, "width": 1000, "height": 667}]
    kept = {a["id"]: a for a in ANNOTATIONS if a["id"] in (11, 12, 21, 22)}
    got = {(a["image_id"], a["category_id"]): a["bbox"] for a in gt["annotations"]}
    for ann in kept.values():
        box = got[(ann["image_id"], ann["category_id"])]
        assert box == pytest.approx(ann["bbox"], abs=1.6)  # within the bin quantisation (and the resize)
    if samples[0].width == 333:  # no resize: integer boxes are exact to the pixel
        assert [round(v) for v in got[(1, 1)]] == [10, 20, 30, 40]
        assert got[(2, 3)] == [0.0, 0.0, 1000.0, 667.0]


def test_results_file_and_errors(split, tmp_path):
    path, samples = split
    out = write_coco_results(_records(samples), samples, tmp_path / "r" / "results.json",
                             category_map=category_map_path(path))
    assert out["detections"] == 7 and out["path"] == str(tmp_path / "r" / "results.json")
    written = json.loads((tmp_path / "r" / "results.json").read_text())
    assert len(written) == 7 and set(written[0]) == {"image_id", "category_id", "bbox", "score"}
    with pytest.raises(CocoExportError, match="coordexp.data.convert next .* --coco-categories <file>$"):
        load_category_map(tmp_path / "missing.categories.json")
    bare = [s.__class__(**{**s.__dict__, "metadata": None}) for s in samples]
    with pytest.raises(CocoExportError, match="no metadata.image_id; the COCO results export needs a split "
                                              "converted by python -m coordexp.data.convert"):
        coco_results(_records(bare), bare, {"person": 1})


def test_coord_prob_scores_are_kept():
    from types import SimpleNamespace

    sample = SimpleNamespace(source="x:1", width=100, height=50, objects=(),
                             metadata={"image_id": 7, "original_width": 200, "original_height": 100})
    rec = {"width": 100, "height": 50, "pred": [{"desc": "a", "bbox_2d": [0, 0, 999, 999], "score": 0.25}]}
    results, summary = coco_results([rec], [sample], {"a": 3})
    # bins 0..999 of a 100 x 50 record: [0, 0, 100, 50] -> x2 in the 200 x 100 original
    assert results == [{"image_id": 7, "category_id": 3, "bbox": [0.0, 0.0, 200.0, 100.0], "score": 0.25}]
    assert summary["score"] == "coord_prob"


def test_command_line_flags_and_the_early_check(split, tmp_path):
    path, samples = split
    rest, found = pop_export_flags(["+experiment=x", "--coco-results", "r.json", "a=b",
                                    "--coco-categories=c.json"])
    assert rest == ["+experiment=x", "a=b"]
    assert found == {"--coco-results": "r.json", "--coco-categories": "c.json"}
    for bad, msg in ((["--coco-results"], "--coco-results needs a path"),
                     (["--coco-results", "--cfg"], "--coco-results needs a path"),
                     (["--coco-categories=c.json"], "--coco-categories is only used with --coco-results")):
        with pytest.raises(CocoExportError, match=msg):
            pop_export_flags(bad)
    export = CocoExport(tmp_path / "out" / "r.json")
    export.check(samples, path)  # the converter's map next to the split; every sample has an image id
    assert export.categories == category_map_path(path)
    summary = export.write(_records(samples), samples)
    assert export.describe(summary) == (f"coco results: {tmp_path / 'out' / 'r.json'} (7 detections of 9 "
                                        f"predictions on 2 images, score constant; 2 with a desc that names "
                                        f"no category: 'unicorn' x2)")
    with pytest.raises(CocoExportError, match="not found"):
        CocoExport(tmp_path / "r.json").check(samples, tmp_path / "elsewhere.jsonl")


def test_eval_help_lists_the_export_flags():
    out = subprocess.run([sys.executable, "-m", "coordexp.eval", "--help"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(FLAGS_HELP) and "== Configuration groups ==" in out.stdout
    assert "--coco-results PATH" in FLAGS_HELP and "--coco-categories PATH" in FLAGS_HELP
