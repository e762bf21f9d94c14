"""COCO results export: a checkpoint's predictions as the JSON list the official COCO / LVIS evaluators read.

``coordexp.eval ... --coco-results <path>`` writes ``[{"image_id", "category_id", "bbox": [x, y, w, h],
"score"}, ...]`` for a split converted by ``coordexp.data.convert``:

- ``image_id`` is the record's ``metadata.image_id``;
- ``category_id`` comes from the prediction's desc through the converter's category map
  (``<split stem>.categories.json`` next to the split, or an explicit file); a desc that names no category
  is left out and counted (``unknown_desc_predictions``, with the most frequent ones listed);
- ``bbox`` is mapped back to the image's original pixels: bins -> the record's inclusive pixel box
  (:func:`coordexp.coordjson.bins_to_coco_box` on the record's width x height) -> scaled by
  ``original / record`` size (the inverse of the converter's pre-resize);
- ``score`` is the mean coordinate-token probability when every prediction has one (text models), else 1.0
  for every box (ties keep the order the model wrote them, as the report's ``score_constant`` table).

:func:`coco_ground_truth` builds the COCO ground truth of the same records (the converted boxes, crowd
regions already dropped, mapped back the same way), so pycocotools scores the export with the AP of the
report's ``by_desc`` table (tested). Scored against the original instances file instead, AP also counts
what the converter dropped (crowd regions are ignored by COCOeval either way).

LVIS: the converter keeps ``not_exhaustive_category_ids`` and ``neg_category_ids`` in each record's
metadata. The report's own metrics do not use them (a prediction of a category that is not in an image's
ground truth is a false positive there); score the export with the official LVIS evaluator against the
LVIS file, which ignores predictions of categories that are neither in an image's ground truth nor in its
negative list, and does not count them as false positives on not-exhaustive categories.
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordexp.coordjson import bins_to_coco_box
from coordexp.errors import CoordexpError

__all__ = ["CocoExport", "CocoExportError", "category_map_path", "coco_ground_truth", "coco_results",
           "load_category_map", "original_coco_box", "pop_export_flags", "write_coco_results"]

FLAGS = ("--coco-results", "--coco-categories")


class CocoExportError(CoordexpError, ValueError):
    """The split or the category map cannot give COCO ids; the message says which and how to fix it."""


def category_map_path(split: str | os.PathLike) -> Path:
    """Where the converter put the category map of ``split``: ``<split dir>/<split stem>.categories.json``."""
    split = Path(split)
    return split.with_name(f"{split.stem}.categories.json")


def _nfc(desc: str) -> str:
    """Descs compare in Unicode NFC: Qwen tokenizers write NFC, so a model trained on ``"cafe\u0301"``
    answers ``"caf\u00e9"``; the map and the GT are keyed the same way."""
    return unicodedata.normalize("NFC", desc)


def load_category_map(path: str | os.PathLike) -> dict[str, int]:
    """``{desc: category id}`` from a converter category map (``{"categories": [{"id", "name", "desc"}]}``).

    Raises :class:`CocoExportError` when the file is missing or is no such map."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        cats = doc["categories"]
        out = {_nfc(str(c["desc"])): int(c["id"]) for c in cats}
    except FileNotFoundError:
        raise CocoExportError(f"category map {path} not found: it is written by python -m "
                              f"coordexp.data.convert next to the JSONL; convert the split with it, or pass "
                              f"the map's path: --coco-categories <file>") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CocoExportError(f"category map {path} is not a coordexp.data.convert category map "
                              f"({type(err).__name__}: {err})") from None
    if len(out) != len(cats):
        raise CocoExportError(f"category map {path}: two categories share a desc")
    return out


def original_coco_box(bins: Sequence[int], width: int, height: int, original_width: int,
                      original_height: int) -> list[float]:
    """Bins of a ``width`` x ``height`` record -> COCO ``[x, y, w, h]`` in pixels of the original image."""
    x, y, w, h = bins_to_coco_box(tuple(int(v) for v in bins), max(int(width), 2), max(int(height), 2))
    sx, sy = original_width / width, original_height / height
    return [x * sx, y * sy, w * sx, h * sy]


def _image_facts(sample) -> tuple[int, int, int]:
    meta = sample.metadata if isinstance(sample.metadata, Mapping) else {}
    image_id = meta.get("image_id")
    if not isinstance(image_id, int):
        raise CocoExportError(f"{sample.source}: no metadata.image_id; the COCO results export needs a split "
                              f"converted by python -m coordexp.data.convert (docs/own_data.md)")
    ow, oh = meta.get("original_width", sample.width), meta.get("original_height", sample.height)
    return image_id, int(ow), int(oh)


def coco_results(records: Sequence[Mapping[str, Any]], samples: Sequence,
                 desc_to_id: Mapping[str, int]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(results, summary) for ``records`` (``predictions.jsonl`` rows) of ``samples`` (same order).

    ``summary``: ``images``, ``predictions``, ``detections`` written, ``unknown_desc_predictions`` and
    ``unknown_descs`` (desc -> count, most frequent first, at most 20), ``score`` (``coord_prob`` or
    ``constant``). Raises :class:`CocoExportError` when a sample has no ``metadata.image_id``."""
    if len(records) != len(samples):
        raise CocoExportError(f"{len(records)} prediction records for {len(samples)} samples")
    preds = [p for r in records for p in r["pred"]]
    scored = bool(preds) and all(p.get("score") is not None for p in preds)
    results, unknown = [], Counter()
    for record, sample in zip(records, samples):
        image_id, ow, oh = _image_facts(sample)
        for p in record["pred"]:
            cid = desc_to_id.get(_nfc(p["desc"]))
            if cid is None:
                unknown[p["desc"]] += 1
                continue
            box = original_coco_box(p["bbox_2d"], record["width"], record["height"], ow, oh)
            results.append({"image_id": image_id, "category_id": cid, "bbox": box,
                            "score": float(p["score"]) if scored else 1.0})
    summary = {"images": len(records), "predictions": len(preds), "detections": len(results),
               "unknown_desc_predictions": sum(unknown.values()),
               "unknown_descs": dict(sorted(unknown.items(), key=lambda kv: (-kv[1], kv[0]))[:20]),
               "score": "coord_prob" if scored else "constant"}
    return results, summary


def coco_ground_truth(samples: Sequence, desc_to_id: Mapping[str, int]) -> dict[str, Any]:
    """The COCO ground-truth dataset of ``samples`` (converted records), boxes in original pixels."""
    images, anns = [], []
    for sample in samples:
        image_id, ow, oh = _image_facts(sample)
        images.append({"id": image_id, "width": ow, "height": oh})
        for o in sample.objects:
            cid = desc_to_id.get(_nfc(o.desc))
            if cid is None:
                raise CocoExportError(f"{sample.source}: desc {o.desc!r} is not in the category map")
            box = original_coco_box(o.bbox_2d, sample.width, sample.height, ow, oh)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cid,
                         "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    return {"images": images, "annotations": anns,
            "categories": [{"id": cid, "name": desc} for desc, cid in sorted(desc_to_id.items(),
                                                                              key=lambda kv: kv[1])]}


def write_coco_results(records: Sequence[Mapping[str, Any]], samples: Sequence, path: str | os.PathLike, *,
                       category_map: str | os.PathLike) -> dict[str, Any]:
    """Write the results JSON to ``path``; return the summary (see :func:`coco_results`) with ``path``."""
    export = CocoExport(Path(path), Path(category_map))
    export.desc_to_id = load_category_map(category_map)
    return export.write(records, samples)


def pop_export_flags(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Split ``--coco-results PATH`` / ``--coco-categories PATH`` (or ``--flag=PATH``) out of a command line:
    (the other arguments, {flag: path}). Raises :class:`CocoExportError` for a flag without a path."""
    rest, found = [], {}
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name not in FLAGS:
            rest.append(arg)
            continue
        if not eq:
            value = next(it, "")
        if not value or value.startswith("-"):
            raise CocoExportError(f"{name} needs a path, e.g. {name}=runs/coco_results.json")
        found[name] = value
    if "--coco-categories" in found and "--coco-results" not in found:
        raise CocoExportError("--coco-categories is only used with --coco-results <path>")
    return rest, found


@dataclass
class CocoExport:
    """The COCO results export of one eval: checked against the split before any rollout, written after."""

    results: Path
    categories: Path | None = None   # default: the converter's map next to the split
    desc_to_id: dict[str, int] = field(default_factory=dict, init=False)

    def check(self, samples: Sequence, split: str | os.PathLike) -> None:
        """Load the category map and check every sample has ``metadata.image_id`` (raises
        :class:`CocoExportError`)."""
        self.categories = Path(self.categories) if self.categories else category_map_path(split)
        self.desc_to_id = load_category_map(self.categories)
        for sample in samples:
            _image_facts(sample)

    def write(self, records: Sequence[Mapping[str, Any]], samples: Sequence) -> dict[str, Any]:
        """Write the results file; return its summary (see :func:`coco_results`) with ``path``."""
        results, summary = coco_results(records, samples, self.desc_to_id)
        self.results.parent.mkdir(parents=True, exist_ok=True)
        self.results.write_text(json.dumps(results), encoding="utf-8")
        return {**summary, "path": str(self.results), "category_map": str(self.categories)}

    def describe(self, summary: Mapping[str, Any]) -> str:
        """One line for the console."""
        unknown = ", ".join(f"{d!r} x{n}" for d, n in summary["unknown_descs"].items())
        return (f"coco results: {summary['path']} ({summary['detections']} detections of "
                f"{summary['predictions']} predictions on {summary['images']} images, score "
                f"{summary['score']}; {summary['unknown_desc_predictions']} with a desc that names no "
                f"category{': ' + unknown if unknown else ''})")
