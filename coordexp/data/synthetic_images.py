"""Synthetic image task: PIL-rendered scenes of a few coloured shapes with exact ground-truth boxes.

The image is a ``cells x cells`` grid of ``cell`` pixel squares on a dark background (default 4 x 4 cells of
28 px = 112 x 112, which is one merged Qwen2-VL patch per cell and no resize by the image processor). Each
object fills a rectangle of whole cells, no two objects share a cell, and every shape touches all four
sides of its rectangle, so the box of an object's drawn pixels *is* its ground-truth pixel box
``[x1, y1, x2, y2]`` (inclusive last pixel). Boxes are written in norm1000 bins
(:func:`coordexp.coordjson.pixel_box_to_bins`), objects sorted by ``(y1, x1)``.

:func:`write_synthetic_image_jsonl` writes ``images/<split>_<index>.png`` next to the JSONL and records
``{"images": ["images/..."], "width", "height", "objects"}`` (paths relative to the JSONL file, as the data
contract in ``docs/data.md`` says). The prompt then shows the image instead of the object list
(:mod:`coordexp.data.prompt`, ``scene="images"``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordexp.coordjson import pixel_box_to_bins
from coordexp.coordjson.serialize import sort_key
from coordexp.data.streams import record_rng

__all__ = ["IMAGE_COLOURS", "IMAGE_SHAPES", "ImageTaskSpec", "draw_object", "generate_image_record",
           "render_image", "write_synthetic_image_jsonl"]

IMAGE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
    "white": (245, 245, 245), "purple": (160, 60, 200),
}
IMAGE_SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
BACKGROUND = (20, 20, 20)


@dataclass(frozen=True)
class ImageTaskSpec:
    cells: int = 4              # cells per axis
    cell: int = 28              # pixels per cell (28 = one merged 2x2 patch of 14 px)
    min_objects: int = 1
    max_objects: int = 3
    max_span: int = 2           # an object covers 1..max_span cells per axis

    def __post_init__(self) -> None:
        if self.cells < 1 or self.cell < 2 or not 1 <= self.max_span <= self.cells:
            raise ValueError(f"invalid ImageTaskSpec geometry: cells={self.cells}, cell={self.cell}, "
                             f"max_span={self.max_span}")
        if not 1 <= self.min_objects <= self.max_objects <= len(IMAGE_COLOURS) * len(IMAGE_SHAPES):
            raise ValueError(f"invalid object counts: min_objects={self.min_objects}, "
                             f"max_objects={self.max_objects}")

    @property
    def size(self) -> int:
        return self.cells * self.cell


def _place(rng, spec: ImageTaskSpec, taken: set) -> tuple[int, int, int, int] | None:
    for _ in range(50):
        w, h = rng.randint(1, spec.max_span), rng.randint(1, spec.max_span)
        cx, cy = rng.randrange(spec.cells - w + 1), rng.randrange(spec.cells - h + 1)
        cells = {(cx + i, cy + j) for i in range(w) for j in range(h)}
        if not cells & taken:
            taken |= cells
            return cx, cy, w, h
    return None


def generate_image_record(seed: int, index: int, spec: ImageTaskSpec | None = None) -> dict[str, Any]:
    """Record ``index`` of stream ``seed``; objects also carry ``shape``, ``colour`` and ``pixel_box``
    (removed before writing)."""
    spec = spec or ImageTaskSpec()
    rng = record_rng(seed + 7_000_003, index)
    n = rng.randint(spec.min_objects, spec.max_objects)
    descs = rng.sample([(c, s) for c in IMAGE_COLOURS for s in IMAGE_SHAPES], n)
    taken: set = set()
    objects = []
    for colour, shape in descs:
        placed = _place(rng, spec, taken)
        if placed is None:
            continue
        cx, cy, w, h = placed
        box = [cx * spec.cell, cy * spec.cell, (cx + w) * spec.cell - 1, (cy + h) * spec.cell - 1]
        objects.append({"desc": f"{colour} {shape}", "colour": colour, "shape": shape, "pixel_box": box,
                        "bbox_2d": list(pixel_box_to_bins(box, spec.size, spec.size))})
    objects.sort(key=lambda o: sort_key(o["bbox_2d"]))
    return {"width": spec.size, "height": spec.size, "objects": objects}


def draw_object(draw, obj: dict[str, Any]) -> None:
    x1, y1, x2, y2 = obj["pixel_box"]
    fill = IMAGE_COLOURS[obj["colour"]]
    if obj["shape"] == "square":
        draw.rectangle([x1, y1, x2, y2], fill=fill)
    elif obj["shape"] == "circle":
        draw.ellipse([x1, y1, x2, y2], fill=fill)
    else:  # apex at the top middle, base on the bottom edge: touches all four sides
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)


def render_image(record: dict[str, Any]):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (record["width"], record["height"]), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in record["objects"]:
        draw_object(draw, obj)
    return image


def write_synthetic_image_jsonl(path: str | os.PathLike, n: int, seed: int,
                                spec: ImageTaskSpec | None = None) -> Path:
    """Render ``n`` scenes to ``<jsonl dir>/images/`` and write their records to ``path``; return the path."""
    path = Path(path)
    image_dir = path.parent / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(n):
            rec = generate_image_record(seed, i, spec)
            name = f"images/{path.stem}_{i:06d}.png"
            render_image(rec).save(path.parent / name)
            objects = [{"desc": o["desc"], "bbox_2d": o["bbox_2d"]} for o in rec["objects"]]
            f.write(json.dumps({"images": [name], "width": rec["width"], "height": rec["height"],
                                "objects": objects}) + "\n")
    os.replace(tmp, path)
    return path
