"""coco_ap equals pycocotools' own COCOeval, stat for stat, on randomized fixtures.

The reference below is pycocotools used the documented way (GT file -> COCO, results list -> loadRes, or a
results file with no annotations when nothing was detected), independently of coco_ap's code path. The
fixtures put boxes exactly on COCO's area-range limits (32^2 and 96^2 px, where COCOeval counts a box in
both neighbouring ranges), leave area ranges without GT (-1 / None), and include images, whole splits and
categories without any prediction.
"""

from __future__ import annotations

import json
import random

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from coordexp.coordjson import bins_to_coco_box
from coordexp.evaluation import CocoImage, CocoObject, coco_ap
from coordexp.evaluation.coco import MAX_DETS, STAT_NAMES

DESCS = ("cat", "dog", "red square")
# On a 1000 x 1000 image bin k is pixel k and a bin box (x1, y1, x2, y2) is x2 - x1 + 1 px wide, so these
# sides give areas exactly at (and one pixel around) the small/medium (1024) and medium/large (9216) limits.
BOUNDARY_SIDES = (31, 32, 33, 95, 96, 97)


def _reference(images: list[CocoImage], mode: str, tmp_path) -> list[float]:
    """COCOeval.stats straight from pycocotools."""
    names = ["object"] if mode == "agnostic" else sorted({o.desc for im in images for o in im.gt})
    cat = {n: i + 1 for i, n in enumerate(names)}
    anns, dets = [], []
    for image_id, im in enumerate(images, start=1):
        for o in im.gt:
            box = list(bins_to_coco_box(o.bbox, im.width, im.height))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "bbox": box, "area": box[2] * box[3],
                         "iscrowd": 0, "category_id": 1 if mode == "agnostic" else cat[o.desc]})
        for o in im.pred:
            if mode == "agnostic" or o.desc in cat:
                box = list(bins_to_coco_box(o.bbox, im.width, im.height))
                dets.append({"image_id": image_id, "bbox": box, "score": o.score,
                             "category_id": 1 if mode == "agnostic" else cat[o.desc]})
    dataset = {"images": [{"id": i, "width": im.width, "height": im.height} for i, im in
                          enumerate(images, start=1)],
               "annotations": anns, "categories": [{"id": i, "name": n} for n, i in cat.items()]}
    gt_file, dt_file = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_file.write_text(json.dumps(dataset))
    gt = COCO(str(gt_file))
    if dets:
        dt = gt.loadRes(dets)
    else:  # loadRes refuses an empty list: a results file with no annotations
        dt_file.write_text(json.dumps({**dataset, "annotations": []}))
        dt = COCO(str(dt_file))
    ev = COCOeval(gt, dt, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats.tolist()


def _box(rng: random.Random, side: int | None = None) -> tuple[int, int, int, int]:
    w = side if side is not None else rng.randint(1, 400)
    h = side if side is not None else rng.randint(1, 400)
    x1, y1 = rng.randint(0, 999 - w), rng.randint(0, 999 - h)
    return (x1, y1, x1 + w - 1, y1 + h - 1) if side is not None else (x1, y1, x1 + w, y1 + h)


def _jitter(rng: random.Random, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (min(999, max(0, v + rng.randint(-6, 6))) for v in box)
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def _fixture(seed: int) -> list[CocoImage]:
    rng = random.Random(seed)
    no_predictions = seed % 5 == 0  # every fifth split: nothing detected anywhere
    images = []
    for _ in range(rng.randint(1, 5)):
        boundary = rng.random() < 0.6
        width, height = (1000, 1000) if boundary else (rng.randint(2, 1400), rng.randint(2, 1400))
        gt = []
        for _ in range(rng.randint(0, 6)):
            side = rng.choice(BOUNDARY_SIDES) if boundary and rng.random() < 0.7 else None
            gt.append(CocoObject(rng.choice(DESCS), _box(rng, side)))
        pred = []
        if not no_predictions and rng.random() < 0.85:
            for g in gt:
                if rng.random() < 0.7:  # a hit, a near miss or a loose box, sometimes with the wrong desc
                    desc = g.desc if rng.random() < 0.8 else rng.choice(DESCS + ("tiger",))
                    pred.append(CocoObject(desc, _jitter(rng, g.bbox), rng.choice((1.0, 0.5, rng.random()))))
            for _ in range(rng.randint(0, 3)):  # false positives
                pred.append(CocoObject(rng.choice(DESCS), _box(rng), rng.choice((1.0, rng.random()))))
            rng.shuffle(pred)
        images.append(CocoImage(width, height, gt, pred))
    return images


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("mode", ["agnostic", "by_desc"])
def test_coco_ap_equals_cocoeval(seed, mode, tmp_path):
    images = _fixture(seed)
    ours = coco_ap(images, mode)
    if not any(im.gt for im in images) or (mode == "by_desc" and not ours["categories"]):
        assert all(ours[name] is None for name in STAT_NAMES)
        return
    expected = [None if v < 0 else v for v in _reference(images, mode, tmp_path)]
    assert [ours[name] for name in STAT_NAMES] == expected


def test_fixtures_cover_the_cases():
    """The randomized fixtures do reach what the parity test is about."""
    fixtures = [_fixture(seed) for seed in range(40)]
    sizes = [bins_to_coco_box(o.bbox, im.width, im.height)[2:] for f in fixtures for im in f for o in im.gt]
    areas = {w * h for w, h in sizes}
    assert {32.0 ** 2, 96.0 ** 2} <= areas
    assert sum(1 for f in fixtures if not any(im.pred for im in f)) >= 8
    stats = [coco_ap(f) for f in fixtures]
    assert any(s["APs"] is None and s["AP"] is not None for s in stats)
    assert any(s["APs"] == 0.0 for s in stats if not s["detections"])


def test_empty_predictions_at_the_area_limits():
    """Nothing detected: COCOeval gives 0.0 for every area range holding a GT box, a box of exactly 32^2 px
    in both the small and the medium range, and undefined (None) for a range without GT."""
    image = CocoImage(1000, 1000, [CocoObject("cat", (0, 0, 31, 31))], [])  # 32 x 32 px
    ap = coco_ap([image])
    assert (ap["AP"], ap["APs"], ap["APm"], ap["APl"], ap["AR100"], ap["ARs"], ap["ARm"], ap["ARl"]) == (
        0.0, 0.0, 0.0, None, 0.0, 0.0, 0.0, None)
    large = coco_ap([CocoImage(1000, 1000, [CocoObject("cat", (10, 10, 105, 105))], [])])  # 96 x 96 px
    assert (large["APs"], large["APm"], large["APl"]) == (None, 0.0, 0.0)


def test_max_dets_cap_and_the_count_of_images_over_it():
    """150 GT boxes, 150 exact predictions in one image: every class-agnostic F1 is 1.0, but COCOeval
    keeps only the 100 best-scored detections per image, so recall stops at 100/150."""
    assert MAX_DETS == COCOeval().params.maxDets[-1] == 100
    boxes = [(x * 66, y * 66, x * 66 + 60, y * 66 + 60) for x in range(15) for y in range(10)]
    many = CocoImage(1000, 1000, [CocoObject("cat", b) for b in boxes], [CocoObject("cat", b) for b in boxes])
    few = CocoImage(1000, 1000, [CocoObject("cat", (0, 0, 60, 60))], [CocoObject("cat", (0, 0, 60, 60))])
    ap = coco_ap([many, few])
    assert ap["images_over_max_dets"] == 1 and ap["max_dets"] == 100
    assert ap["AR100"] == pytest.approx(101 / 151)
    assert ap["AP"] == pytest.approx(67 / 101)  # precision 1 at recall points 0.00 .. 0.66
    assert coco_ap([few])["images_over_max_dets"] == 0
    by_desc = coco_ap([many], "by_desc")  # the cap is per image and category
    assert by_desc["images_over_max_dets"] == 1


def test_console_summary_names_the_images_over_the_cap():
    from coordexp.evaluation.report import format_summary

    keys = ("precision@0.5", "recall@0.5", "f1@0.5", "desc_match@0.5", "precision@[.5:.95]",
            "recall@[.5:.95]", "f1@[.5:.95]", "AP_score_constant", "AP50_score_constant",
            "AP_score_coord_prob", "AP50_score_coord_prob", "invalid_rollout_rate", "parse_truncated_rate",
            "duplicate_rate", "forced_eos_rate")
    report = {"summary": dict.fromkeys(keys, 1.0),
              "counts": {"rollouts": 2, "gt_objects": 151, "pred_objects": 151}}
    assert "COCO cap" not in format_summary(report)
    crowded = CocoImage(1000, 1000, [], [CocoObject("cat", (0, 0, 9, 9))] * 101)
    report["coco"] = {"score_constant": coco_ap([crowded])}
    assert format_summary(report).splitlines()[-1] == (
        "COCO cap:     1 image(s) have more than maxDets=100 predictions: COCO scores only the top 100 of "
        "each (AP, AR100 capped; P/R/F1 count all)")
