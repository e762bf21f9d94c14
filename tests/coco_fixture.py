"""A small COCO-format dataset built in the test (PIL-drawn images, odd sizes), and its LVIS variant.

Images (``images/``):
  1 ``a.jpg``      333 x 517: bicycle, person, a crowd box, a sub-pixel box
  2 ``sub/b.png`` 1000 x 667: a whole-image box, a fractional box, a box running over the image's edge
  3 ``c.png``       64 x 48:  no annotations
  4 ``d.jpg``       50 x 40:  only a crowd box
Categories: 1 person, 2 bicycle, 3 traffic light, 4 dog (no boxes).
"""

from __future__ import annotations

import json
from pathlib import Path

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}, {"id": 3, "name": "traffic light"},
              {"id": 4, "name": "dog"}]
IMAGES = [
    {"id": 1, "file_name": "a.jpg", "width": 333, "height": 517},
    {"id": 2, "file_name": "sub/b.png", "width": 1000, "height": 667},
    {"id": 3, "file_name": "c.png", "width": 64, "height": 48},
    {"id": 4, "file_name": "d.jpg", "width": 50, "height": 40},
]
ANNOTATIONS = [
    {"id": 11, "image_id": 1, "category_id": 1, "bbox": [10, 20, 30, 40], "iscrowd": 0, "area": 1200},
    {"id": 12, "image_id": 1, "category_id": 2, "bbox": [100, 5, 50, 60], "iscrowd": 0, "area": 3000},
    {"id": 13, "image_id": 1, "category_id": 1, "bbox": [0, 300, 333, 217], "iscrowd": 1, "area": 72261},
    {"id": 14, "image_id": 1, "category_id": 3, "bbox": [200, 200, 0.5, 10], "iscrowd": 0, "area": 5},
    {"id": 21, "image_id": 2, "category_id": 3, "bbox": [0, 0, 1000, 667], "iscrowd": 0, "area": 667000},
    {"id": 22, "image_id": 2, "category_id": 2, "bbox": [500.5, 100.25, 200, 300], "iscrowd": 0,
     "area": 60000},
    {"id": 23, "image_id": 2, "category_id": 1, "bbox": [900, 600, 150, 100], "iscrowd": 0, "area": 15000},
    {"id": 41, "image_id": 4, "category_id": 4, "bbox": [5, 5, 20, 20], "iscrowd": 1, "area": 400},
]
COLOURS = {1: (230, 40, 40), 2: (40, 200, 60), 3: (50, 90, 240), 4: (240, 220, 40)}


def draw_images(root: Path) -> None:
    from PIL import Image, ImageDraw

    for img in IMAGES:
        im = Image.new("RGB", (img["width"], img["height"]), (30, 30, 30))
        draw = ImageDraw.Draw(im)
        for ann in ANNOTATIONS:
            if ann["image_id"] == img["id"]:
                x, y, w, h = ann["bbox"]
                draw.rectangle([x, y, max(x, x + w - 1), y + h - 1], outline=COLOURS[ann["category_id"]],
                               width=2)
        path = root / img["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path, quality=95) if path.suffix == ".jpg" else im.save(path)


def write_coco(root: Path) -> tuple[Path, Path]:
    """(instances.json, images folder) under ``root``."""
    images = root / "images"
    draw_images(images)
    instances = root / "instances_val.json"
    instances.write_text(json.dumps({"images": IMAGES, "annotations": ANNOTATIONS, "categories": CATEGORIES}))
    return instances, images


def write_lvis(root: Path) -> tuple[Path, Path]:
    """LVIS flavour of the same data: ``coco_url`` instead of ``file_name``, no ``iscrowd``, and per-image
    ``not_exhaustive_category_ids`` / ``neg_category_ids``; images under ``<root>/coco/val2017/``."""
    images = root / "coco"
    lvis_images = []
    for img in IMAGES[:2]:
        flat = img["file_name"].replace("/", "_")
        lvis_images.append({"id": img["id"], "width": img["width"], "height": img["height"],
                            "coco_url": f"http://images.cocodataset.org/val2017/{flat}",
                            "not_exhaustive_category_ids": [2] if img["id"] == 1 else [],
                            "neg_category_ids": [4]})
    draw_images(root / "tmp")
    for img in IMAGES[:2]:
        target = images / "val2017" / img["file_name"].replace("/", "_")
        target.parent.mkdir(parents=True, exist_ok=True)
        (root / "tmp" / img["file_name"]).rename(target)
    anns = [{k: v for k, v in a.items() if k != "iscrowd"} for a in ANNOTATIONS
            if a["image_id"] in (1, 2) and not a["iscrowd"]]
    instances = root / "lvis_v1_val.json"
    instances.write_text(json.dumps({"images": lvis_images, "annotations": anns,
                                     "categories": [dict(c, frequency="f") for c in CATEGORIES]}))
    return instances, images
