"""COCO-style box AP of CoordJSON predictions through pycocotools (``COCOeval(..., "bbox")``).

Inputs are per-image records in norm1000 bins; they are converted to COCO ``[x, y, w, h]`` pixels of the
image's width and height with the project's one pixel <-> bin rule (``bins_to_coco_box``: inclusive pixel
box, ``w = x2 - x1 + 1``) so COCO's small/medium/large area ranges mean what they usually mean.
IoU itself does not depend on that conversion (a per-axis scale leaves IoU unchanged).

Two category modes:

- ``agnostic`` (the headline): every box is category 1, matching the class-agnostic Hungarian metrics;
- ``by_desc``: each distinct GT desc string is a category; a prediction whose desc is no GT category is
  counted in ``unknown_desc_predictions`` and cannot affect AP (pycocotools only scores GT categories).

Scores: COCO ranks detections by score, which a language model does not give. Callers pass a score per
prediction (constant 1.0, or the mean coordinate-token probability); ties are broken by pycocotools'
stable sort, i.e. by image order, then by the order the model wrote the boxes.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from coordexp.coordjson import bins_to_coco_box

#: COCOeval's largest maxDets: per image (and category, in by_desc mode) only the MAX_DETS best-scored
#: detections count for AP and AR100; the rest are ignored (``images_over_max_dets`` counts such images).
MAX_DETS = 100
#: COCOeval.stats index -> report key (maxDets = 1, 10, 100).
STAT_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs",
                               "ARm", "ARl")


@dataclass(frozen=True)
class CocoObject:
    desc: str
    bbox: tuple[int, int, int, int]   # norm1000 bins [x1, y1, x2, y2]
    score: float = 1.0


@dataclass(frozen=True)
class CocoImage:
    width: int
    height: int
    gt: Sequence[CocoObject]
    pred: Sequence[CocoObject]


def _xywh(bins, width: int, height: int) -> list[float]:
    return list(bins_to_coco_box(tuple(int(v) for v in bins), max(int(width), 2), max(int(height), 2)))


def coco_ap(images: Sequence[CocoImage], mode: str = "agnostic") -> dict[str, float | None]:
    """AP/AR table of ``images`` (values in [0, 1]; ``None`` where COCO leaves a value undefined,
    e.g. no GT of that size): exactly ``COCOeval.stats`` with -1 as ``None``, empty prediction sets included.
    No GT at all gives all ``None``. Also ``images_over_max_dets``: images with more than ``MAX_DETS``
    detections (of one category in ``by_desc`` mode), whose extra detections COCOeval ignores."""
    if mode not in ("agnostic", "by_desc"):
        raise ValueError(f"mode must be 'agnostic' or 'by_desc', got {mode!r}")
    if mode == "agnostic":
        categories = {"object": 1}
    else:
        names = sorted({o.desc for im in images for o in im.gt})
        categories = {name: i + 1 for i, name in enumerate(names)}

    def cat_of(desc: str) -> int | None:
        return 1 if mode == "agnostic" else categories.get(desc)

    gt_anns, dets, unknown = [], [], 0
    for image_id, im in enumerate(images, start=1):
        for o in im.gt:
            xywh = _xywh(o.bbox, im.width, im.height)
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": image_id, "category_id": cat_of(o.desc),
                            "bbox": xywh, "area": xywh[2] * xywh[3], "iscrowd": 0})
        for o in im.pred:
            cat = cat_of(o.desc)
            if cat is None:
                unknown += 1
                continue
            dets.append({"image_id": image_id, "category_id": cat, "bbox": _xywh(o.bbox, im.width, im.height),
                         "score": float(o.score)})

    result: dict[str, float | None] = {name: None for name in STAT_NAMES}
    per_image_cat = Counter((d["image_id"], d["category_id"]) for d in dets)
    result.update(images=len(images), gt_objects=len(gt_anns), detections=len(dets),
                  max_dets=MAX_DETS,
                  images_over_max_dets=len({img for (img, _), n in per_image_cat.items() if n > MAX_DETS}))
    if mode == "by_desc":
        result.update(categories=len(categories), unknown_desc_predictions=unknown)
    if not gt_anns:
        return result

    silent = io.StringIO()
    with contextlib.redirect_stdout(silent):
        gt = COCO()
        gt.dataset = {"images": [{"id": i, "width": int(im.width), "height": int(im.height)}
                                 for i, im in enumerate(images, start=1)],
                      "annotations": gt_anns,
                      "categories": [{"id": cid, "name": name} for name, cid in categories.items()]}
        gt.createIndex()
        ev = COCOeval(gt, _results(gt, dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    for name, value in zip(STAT_NAMES, ev.stats.tolist()):
        result[name] = None if value < 0 else float(value)
    return result


def _results(gt, dets: list[dict]):
    """The detections as a pycocotools result set. ``loadRes`` cannot take an empty list, so no detections
    is an empty result set over the same images and categories: COCOeval itself then says which stats are
    0.0 and which undefined (-1 -> None), area-range limits included."""
    if dets:
        return gt.loadRes(dets)
    empty = COCO()
    empty.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]),
                     "annotations": []}
    empty.createIndex()
    return empty
