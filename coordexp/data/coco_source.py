"""Reading COCO / LVIS instance files into per-image plans (no image I/O): which boxes survive, and why not.
Repeated image, annotation or category ids are refused (pycocotools would keep the last one silently).

The files are read with pycocotools (``COCO`` index: images, annotations per image, categories). For each
image the plan keeps the annotations that become objects and counts the others by reason:

- ``crowd``: ``iscrowd == 1`` (COCO's crowd regions; kept with ``keep_crowd=True``);
- ``invalid_box``: ``bbox`` is not 4 finite JSON numbers, or its width or height is negative;
- ``outside_image``: the box does not overlap the image (touching its edge from outside included);
- ``sub_pixel``: inside, but under one pixel wide or high after clipping (``w < 1`` or ``h < 1``; a
  zero-width box is one);
- ``unknown_category``: the annotation's ``category_id`` is not in ``categories``.

Boxes are COCO ``[x, y, w, h]`` in pixels of the original image (edges), clipped to ``[0, W] x [0, H]``.
LVIS files have no ``file_name`` and no ``iscrowd``: the file is the last two parts of ``coco_url``
(``train2017/000000391895.jpg``), and every annotation is a non-crowd one. LVIS images carry
``not_exhaustive_category_ids`` and ``neg_category_ids``; the plan keeps them for the record's metadata.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordexp.errors import CoordexpError

__all__ = ["DROP_REASONS", "PlannedBox", "PlannedImage", "SourceError", "SourcePlan", "load_desc_map",
           "plan_source"]

DROP_REASONS = ("crowd", "invalid_box", "outside_image", "sub_pixel", "unknown_category")
SOURCES = ("coco", "lvis")


class SourceError(CoordexpError, ValueError):
    """The instances file, the desc map or an option is unusable; the message names the cause and the fix."""


@dataclass(frozen=True)
class PlannedBox:
    annotation_id: int
    category_id: int
    desc: str
    xywh: tuple[float, float, float, float]  # COCO edges in original pixels, clipped to the image
    crowd: bool


@dataclass
class PlannedImage:
    image_id: int
    file_name: str            # relative to the images folder
    width: int                # as the instances file says (original pixels)
    height: int
    boxes: list[PlannedBox]
    dropped: Counter = field(default_factory=Counter)
    annotations: int = 0      # annotations of this image in the file
    extra: dict[str, Any] = field(default_factory=dict)  # LVIS: not_exhaustive / neg category ids


@dataclass
class SourcePlan:
    source: str
    categories: dict[int, dict[str, str]]   # category id -> {"name", "desc"}
    images: list[PlannedImage]              # every image of the file, sorted by image id


def load_desc_map(path: str | os.PathLike | None, names: set[str]) -> dict[str, str]:
    """``{category name: desc}`` from a JSON file; every key must be a category name of the instances file."""
    if path is None:
        return {}
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise SourceError(f"--desc-map {path}: cannot read it ({err.strerror})") from None
    except ValueError as err:
        raise SourceError(f"--desc-map {path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                            for k, v in raw.items()):
        raise SourceError(f"--desc-map {path}: must be one JSON object of category name -> non-empty desc "
                          f'string, e.g. {{"motorcycle": "motorbike"}}')
    unknown = sorted(set(raw) - names)
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:5])
        raise SourceError(f"--desc-map {path}: {len(unknown)} key(s) are no category name of the instances "
                          f"file: {shown}. Fix: use the names of its 'categories' entries")
    return {k: v.strip() for k, v in raw.items()}


def _read_instances(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise SourceError(f"--instances {path}: file not found") from None
    except OSError as err:
        raise SourceError(f"--instances {path}: cannot read it ({err.strerror})") from None
    except ValueError as err:
        raise SourceError(f"--instances {path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise SourceError(f"--instances {path}: a COCO/LVIS instances file is one JSON object")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise SourceError(f"--instances {path}: no {', '.join(repr(k) for k in missing)} list; a COCO/LVIS "
                          f"instances file has 'images', 'annotations' and 'categories' (captions or "
                          f"keypoint files are not instances files)")
    return data


def _file_name(img: dict[str, Any], source: str) -> str:
    if isinstance(img.get("file_name"), str) and img["file_name"]:
        return img["file_name"]
    url = img.get("coco_url")
    if isinstance(url, str) and url:
        parts = url.rstrip("/").split("/")
        return "/".join(parts[-2:]) if len(parts) >= 2 else parts[-1]
    raise SourceError(f"image id {img.get('id')!r} has neither 'file_name' nor 'coco_url' ({source} file)")


def _number(v: Any) -> float | None:
    """``v`` as a finite float if it is a JSON number (not a bool or a string of digits), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def box_drop_reason(xywh: Any, width: int, height: int) -> str | None:
    """Why a COCO ``[x, y, w, h]`` box (pixels) is dropped for a ``width x height`` image, or None to keep it.

    ``invalid_box``: not 4 finite JSON numbers, or a negative width/height. ``outside_image``: it does not
    overlap the image (a box that only touches its edge included). ``sub_pixel``: inside, but under one pixel
    wide or high after clipping (a zero-width box is one)."""
    if not isinstance(xywh, (list, tuple)) or len(xywh) != 4:
        return "invalid_box"
    nums = [_number(v) for v in xywh]
    if any(v is None for v in nums) or nums[2] < 0 or nums[3] < 0:
        return "invalid_box"
    _, _, cw, ch = _clip(nums, width, height)
    if cw < 0 or ch < 0 or (cw == 0 and nums[2] > 0) or (ch == 0 and nums[3] > 0):
        return "outside_image"
    if cw < 1 or ch < 1:
        return "sub_pixel"
    return None


def _clip(xywh: list[float], width: int, height: int) -> tuple[float, float, float, float]:
    x, y, w, h = xywh
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, float(width)), min(y + h, float(height))
    return x1, y1, x2 - x1, y2 - y1


def _unique_ids(data: dict[str, Any], instances: str | os.PathLike) -> None:
    """pycocotools indexes by id and keeps the last entry of a repeated one: boxes would land on another
    image. Refuse repeated image, annotation and category ids instead."""
    for key in ("images", "categories", "annotations"):
        seen: set[Any] = set()
        for entry in data[key]:
            eid = entry.get("id") if isinstance(entry, dict) else None
            if eid in seen:
                raise SourceError(f"--instances {instances}: {key} id {eid!r} appears more than once; "
                                  f"ids must be unique (pycocotools would keep only the last entry and "
                                  f"attach its boxes to the wrong one). Fix: renumber the duplicates")
            seen.add(eid)


def plan_source(source: str, instances: str | os.PathLike, *, desc_map_path: str | os.PathLike | None = None,
                keep_crowd: bool = False) -> SourcePlan:
    """Read ``instances`` (COCO or LVIS format) and plan every image; raises :class:`SourceError`."""
    if source not in SOURCES:
        raise SourceError(f"unknown source {source!r} (known: {', '.join(SOURCES)})")
    from pycocotools.coco import COCO

    data = _read_instances(Path(instances))
    _unique_ids(data, instances)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco = COCO()
        coco.dataset = data
        try:
            coco.createIndex()
        except (KeyError, TypeError) as err:
            raise SourceError(f"--instances {instances}: an entry has no {err} key (every image needs 'id', "
                              f"every annotation 'id', 'image_id' and 'category_id', every category "
                              f"'id')") from None
    names = {c.get("name") for c in coco.cats.values()}
    desc_map = load_desc_map(desc_map_path, {n for n in names if isinstance(n, str)})
    categories: dict[int, dict[str, str]] = {}
    by_desc: dict[str, int] = {}
    for cid in sorted(coco.cats):
        name = coco.cats[cid].get("name")
        if not isinstance(name, str) or not name.strip():
            raise SourceError(f"--instances {instances}: category id {cid} has no name")
        # NFC: the form Qwen tokenizers write (their normalizer), so a decomposed "cafe\u0301" in the file
        # becomes the "caf\u00e9" a trained model answers, and eval / the COCO export match it exactly
        desc = unicodedata.normalize("NFC", desc_map.get(name, name))
        if desc in by_desc:
            raise SourceError(f"categories {by_desc[desc]} and {cid} both get desc {desc!r}; one desc must "
                              f"name one category (the COCO results export maps descs back to category ids). "
                              f"Fix: give them distinct descs in --desc-map")
        by_desc[desc] = cid
        categories[int(cid)] = {"name": name, "desc": desc}
    images = []
    for image_id in sorted(coco.imgs):
        img = coco.imgs[image_id]
        width, height = img.get("width"), img.get("height")
        if not isinstance(width, int) or not isinstance(height, int) or width < 1 or height < 1:
            raise SourceError(f"--instances {instances}: image id {image_id} has no positive integer "
                              f"width/height")
        plan = PlannedImage(int(image_id), _file_name(img, source), width, height, [])
        if source == "lvis":
            plan.extra = {"not_exhaustive_category_ids": sorted(int(c) for c in
                                                                img.get("not_exhaustive_category_ids", [])),
                          "neg_category_ids": sorted(int(c) for c in img.get("neg_category_ids", []))}
        for ann in coco.imgToAnns.get(image_id, []):
            plan.annotations += 1
            cid = ann.get("category_id")
            crowd = bool(ann.get("iscrowd", 0))
            if cid not in categories:
                plan.dropped["unknown_category"] += 1
                continue
            if crowd and not keep_crowd:
                plan.dropped["crowd"] += 1
                continue
            reason = box_drop_reason(ann.get("bbox"), width, height)
            if reason is not None:
                plan.dropped[reason] += 1
                continue
            clipped = _clip([float(v) for v in ann["bbox"]], width, height)
            plan.boxes.append(PlannedBox(int(ann.get("id", 0)), int(cid), categories[cid]["desc"], clipped,
                                         crowd))
        images.append(plan)
    return SourcePlan(source, categories, images)
