"""``python -m coordexp.data.convert coco|lvis --instances <json> --images <dir> --out <dir>``: COCO / LVIS
instance files -> coordexp JSONL (docs/own_data.md).

Writes into ``--out``:

- ``<name>.jsonl``: one record per image with at least one usable box (``<name>`` = ``--name``, default the
  instances file's stem), objects ``{"desc", "bbox_2d"}`` in norm1000 bins of the record's
  ``width``/``height`` (the one pixel <-> bin rule, :mod:`coordexp.coordjson.codec`), sorted by
  ``(y1, x1)``; ``metadata`` = ``{"source", "image_id", "file_name", "original_width", "original_height",
  "annotation_ids", "category_ids"}`` (+ LVIS ``not_exhaustive_category_ids``, ``neg_category_ids``);
- ``<name>.categories.json``: category id, name and desc of every category (the COCO results export maps
  descs back to ids with it);
- ``<name>.summary.json``: images in/out, boxes in/out by drop reason, boxes per desc, resize, time;
- with ``--resize FAMILY``: ``images/<file_name>``, each image resized with the family processor's
  ``smart_resize`` (:mod:`coordexp.data.resize`); the record's ``width``/``height`` is that size, so the
  learner's image size check passes by construction. Images already there at the right size are reused
  (a second run, or a run after an interruption, only writes what is missing).

``--resize none`` (default) keeps the images where they are (absolute paths in the records); the record's
size is the image's own size, or, with ``--family F``, the size F's processor will resize it to.

Bad input (missing files, an instances file that is not one, a bad desc map, missing images) ends with one
``error: ...`` screen naming the cause and the fix, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordexp.coordjson import coco_box_to_pixel_box, pixel_box_to_bins
from coordexp.data.coco_source import DROP_REASONS, PlannedImage, SourceError, SourcePlan, plan_source
from coordexp.data.resize import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, FAMILY_FACTOR, family_resized_size
from coordexp.errors import CoordexpError, run_reporting

__all__ = ["ConvertError", "ConvertOptions", "ImageJob", "ImageResult", "build_record", "convert", "main",
           "process_image"]

IMAGE_DIR = "images"
JPEG_QUALITY = 95


class ConvertError(CoordexpError, ValueError):
    """A problem the user can fix; printed as one ``error:`` screen, exit code 2."""


@dataclass(frozen=True)
class ConvertOptions:
    source: str                      # "coco" | "lvis"
    instances: Path
    images: Path
    out: Path
    name: str | None = None          # output stem; default: the instances file's stem
    desc_map: Path | None = None
    keep_crowd: bool = False
    resize: str = "none"             # "none" or a family of coordexp.data.resize.FAMILY_FACTOR
    family: str | None = None        # with resize "none": write the size this family's processor produces
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int = 1
    skip_missing_images: bool = False
    progress: bool = True

    @property
    def stem(self) -> str:
        return self.name or self.instances.stem

    @property
    def size_family(self) -> str | None:
        return self.resize if self.resize != "none" else self.family


@dataclass(frozen=True)
class ImageJob:
    src: str                         # image file to read
    dst: str | None                  # resized copy to write (None: keep the source)
    family: str | None               # processor whose resized size the record gets
    min_pixels: int
    max_pixels: int


@dataclass(frozen=True)
class ImageResult:
    width: int                       # the file's own size (pixels)
    height: int
    out_width: int                   # the record's size: the processor's resize of the file, or the file's
    out_height: int
    written: bool = False            # a resized copy was written now
    reused: bool = False             # a resized copy of the right size was already there
    error: str = ""


def process_image(job: ImageJob) -> ImageResult:
    """Read one image's header, compute its record size, and (``job.dst``) write the resized copy.

    Runs in a worker process; never raises for a bad image (``error`` says what went wrong)."""
    from PIL import Image

    try:
        with Image.open(job.src) as im:
            width, height = im.size
            out_w, out_h = (family_resized_size(job.family, width, height, min_pixels=job.min_pixels,
                                                max_pixels=job.max_pixels) if job.family else (width, height))
            if job.dst is None:
                return ImageResult(width, height, out_w, out_h)
            if _has_size(job.dst, (out_w, out_h)):
                return ImageResult(width, height, out_w, out_h, reused=True)
            os.makedirs(os.path.dirname(job.dst), exist_ok=True)
            tmp = f"{job.dst}.{os.getpid()}.tmp"
            if (out_w, out_h) == (width, height):
                shutil.copyfile(job.src, tmp)
            else:
                fmt = im.format or "PNG"
                image = im.convert("RGB") if fmt == "JPEG" and im.mode not in ("RGB", "L") else im
                resized = image.resize((out_w, out_h), Image.Resampling.BICUBIC)
                resized.save(tmp, format=fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
            os.replace(tmp, job.dst)
            return ImageResult(width, height, out_w, out_h, written=True)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return ImageResult(0, 0, 0, 0, error=f"{type(err).__name__}: {err}")


def _has_size(path: str, size: tuple[int, int]) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size == size
    except (OSError, ValueError):
        return False


def build_record(plan: PlannedImage, source: str, image_path: str, width: int, height: int) -> dict[str, Any]:
    """The JSONL record of ``plan``: boxes scaled from the original size to ``width`` x ``height`` (the
    record's size) and converted to bins, objects sorted by ``(y1, x1)`` (then x2, y2, desc, annotation
    id)."""
    sx, sy = width / plan.width, height / plan.height
    rows = []
    for box in plan.boxes:
        x, y, w, h = box.xywh
        x1, y1, x2, y2 = coco_box_to_pixel_box((x * sx, y * sy, w * sx, h * sy))
        bins = pixel_box_to_bins((x1, y1, max(x2, x1), max(y2, y1)), width, height)
        rows.append((bins[1], bins[0], bins[2], bins[3], box.desc, box.annotation_id, box))
    rows.sort(key=lambda r: r[:6])
    metadata: dict[str, Any] = {
        "source": source, "image_id": plan.image_id, "file_name": plan.file_name,
        "original_width": plan.width, "original_height": plan.height,
        "annotation_ids": [r[6].annotation_id for r in rows],
        "category_ids": [r[6].category_id for r in rows],
    }
    metadata.update(plan.extra)
    return {"images": [image_path], "width": width, "height": height,
            "objects": [{"desc": r[4], "bbox_2d": [r[1], r[0], r[2], r[3]]} for r in rows],
            "metadata": metadata}


def _progress(items: Iterable, total: int, enabled: bool, desc: str) -> Iterator:
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, total=total, desc=desc, unit="img", dynamic_ncols=True, file=sys.stderr)


def _run_jobs(jobs: Sequence[ImageJob], workers: int, progress: bool) -> list[ImageResult]:
    if workers <= 1 or len(jobs) <= 1:
        return list(_progress(map(process_image, jobs), len(jobs), progress, "images"))
    if any(job.family for job in jobs):  # import transformers' smart_resize once, before the workers fork
        family_resized_size(next(job.family for job in jobs if job.family), 28, 28)
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(_progress(pool.map(process_image, jobs, chunksize=chunk), len(jobs), progress, "images"))


def _check_options(opts: ConvertOptions) -> None:
    if opts.resize != "none" and opts.resize not in FAMILY_FACTOR:
        raise ConvertError(f"--resize {opts.resize}: unknown (use none, {', '.join(FAMILY_FACTOR)})")
    if opts.family is not None and opts.family not in FAMILY_FACTOR:
        raise ConvertError(f"--family {opts.family}: unknown (use {', '.join(FAMILY_FACTOR)})")
    if opts.family is not None and opts.resize != "none" and opts.family != opts.resize:
        raise ConvertError(f"--family {opts.family} contradicts --resize {opts.resize}: pass one of them")
    if not 0 < opts.min_pixels <= opts.max_pixels:
        raise ConvertError(f"need 0 < --min-pixels <= --max-pixels, got {opts.min_pixels} and "
                           f"{opts.max_pixels}")
    if opts.workers < 1:
        raise ConvertError(f"--workers must be >= 1, got {opts.workers}")
    if opts.out.exists() and not opts.out.is_dir():
        raise ConvertError(f"--out {opts.out}: is a file, not a folder. Fix: pass a new or existing folder "
                           f"(the JSONL, its summary and the resized images go into it)")
    if not opts.images.is_dir():
        raise ConvertError(f"--images {opts.images}: not a folder. Fix: pass the folder the instances file's "
                           f"file_name entries are relative to")


def convert(opts: ConvertOptions) -> dict[str, Any]:
    """Convert one instances file; return the summary (also written to ``<out>/<name>.summary.json``).

    Raises :class:`ConvertError` for anything the user has to fix."""
    started = time.perf_counter()
    _check_options(opts)
    try:
        plan = plan_source(opts.source, opts.instances, desc_map_path=opts.desc_map,
                           keep_crowd=opts.keep_crowd)
    except SourceError as err:
        raise ConvertError(str(err)) from None
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    images_root = opts.images.resolve()
    wanted = [p for p in plan.images if p.boxes]
    missing = [p for p in wanted if not (images_root / p.file_name).is_file()]
    if missing and not opts.skip_missing_images:
        shown = "\n  ".join(str(images_root / p.file_name) for p in missing[:5])
        lvis_hint = " (LVIS: the folder holding train2017/ and val2017/)" if plan.source == "lvis" else ""
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ConvertError(f"{len(missing)} of {len(wanted)} image(s) with boxes are not under --images "
                           f"{opts.images}:\n  {shown}{more}\nFix: point --images at the folder the "
                           f"file_name entries are relative to{lvis_hint}, or pass --skip-missing-images to "
                           f"convert the rest")
    missing_ids = {p.image_id for p in missing}
    todo = [p for p in wanted if p.image_id not in missing_ids]
    jobs = [ImageJob(src=str(images_root / p.file_name),
                     dst=str(out / IMAGE_DIR / p.file_name) if opts.resize != "none" else None,
                     family=opts.size_family, min_pixels=opts.min_pixels, max_pixels=opts.max_pixels)
            for p in todo]
    results = _run_jobs(jobs, opts.workers, opts.progress)

    records, problems = [], Counter()
    bad: list[str] = []
    boxes_per_desc: Counter = Counter()
    for p, job, res in zip(todo, jobs, results):
        if res.error:
            problems["unreadable"] += 1
            bad.append(f"{job.src}: {res.error}")
            continue
        if (res.width, res.height) != (p.width, p.height):
            problems["size_mismatch"] += 1
            bad.append(f"{job.src}: the file is {res.width}x{res.height}, the instances file says "
                       f"{p.width}x{p.height}")
            continue
        path = f"{IMAGE_DIR}/{p.file_name}" if job.dst else job.src
        records.append(build_record(p, plan.source, path, res.out_width, res.out_height))
        boxes_per_desc.update(b.desc for b in p.boxes)
    jsonl = out / f"{opts.stem}.jsonl"
    _write_lines(jsonl, (json.dumps(r, ensure_ascii=False) for r in records))
    _write_json(out / f"{opts.stem}.categories.json", categories_document(plan))
    summary = _summary(opts, plan, records, results, problems, bad, boxes_per_desc, len(missing), jsonl,
                       time.perf_counter() - started)
    _write_json(out / f"{opts.stem}.summary.json", summary)
    if not records:
        raise ConvertError(f"no image of {opts.instances} has a usable box ({summary['images']['in']} "
                           f"images, {summary['boxes']['in']} annotations; see "
                           f"{out / f'{opts.stem}.summary.json'} for what was dropped and why)")
    return summary


def categories_document(plan: SourcePlan) -> dict[str, Any]:
    """``{"source", "categories": [{"id", "name", "desc"}, ...]}`` (the ``<name>.categories.json`` file)."""
    return {"source": plan.source,
            "categories": [{"id": cid, **c} for cid, c in sorted(plan.categories.items())]}


def _summary(opts, plan: SourcePlan, records, results, problems, bad, boxes_per_desc, n_missing, jsonl,
             seconds: float) -> dict[str, Any]:
    dropped = Counter()
    for p in plan.images:
        dropped.update(p.dropped)
    no_annotations = sum(1 for p in plan.images if p.annotations == 0)
    all_dropped = sum(1 for p in plan.images if p.annotations > 0 and not p.boxes)
    kept_ids = {r["metadata"]["image_id"] for r in records}
    boxes_out = sum(len(r["objects"]) for r in records)
    boxes_lost = sum(len(p.boxes) for p in plan.images if p.boxes and p.image_id not in kept_ids)
    return {
        "source": plan.source, "instances": str(opts.instances), "images_dir": str(opts.images),
        "jsonl": str(jsonl),
        "images": {"in": len(plan.images), "out": len(records),
                   "skipped_without_annotations": no_annotations, "skipped_all_boxes_dropped": all_dropped,
                   "skipped_missing_file": n_missing, "skipped_unreadable": problems["unreadable"],
                   "skipped_size_mismatch": problems["size_mismatch"],
                   "written": sum(r.written for r in results), "reused": sum(r.reused for r in results),
                   "resized": sum(1 for r in records
                                  if (r["width"], r["height"]) != (r["metadata"]["original_width"],
                                                                   r["metadata"]["original_height"]))},
        "problems": bad[:20],
        "boxes": {"in": sum(p.annotations for p in plan.images), "out": boxes_out,
                  "dropped": {reason: dropped[reason] for reason in DROP_REASONS},
                  "dropped_with_skipped_images": boxes_lost,
                  "crowd_kept": sum(1 for p in plan.images if p.image_id in kept_ids
                                    for b in p.boxes if b.crowd)},
        "categories": {"total": len(plan.categories), "with_boxes": len(boxes_per_desc),
                       "boxes_per_desc": dict(sorted(boxes_per_desc.items(),
                                                     key=lambda kv: (-kv[1], kv[0])))},
        "resize": {"mode": opts.resize, "family": opts.size_family,
                   "factor": FAMILY_FACTOR.get(opts.size_family or "", None),
                   "min_pixels": opts.min_pixels if opts.size_family else None,
                   "max_pixels": opts.max_pixels if opts.size_family else None},
        "workers": opts.workers, "seconds": round(seconds, 3),
        "images_per_second": round(len(results) / seconds, 2) if seconds > 0 else None,
    }


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    os.replace(tmp, path)


def _write_json(path: Path, doc: Any) -> None:
    _write_lines(path, [json.dumps(doc, indent=2, ensure_ascii=False)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m coordexp.data.convert",
        description="COCO / LVIS instances -> coordexp JSONL (docs/own_data.md).")
    sub = parser.add_subparsers(dest="source", required=True, metavar="{coco,lvis}")
    for source in ("coco", "lvis"):
        p = sub.add_parser(source, help=f"convert a {source.upper()} instances file")
        p.add_argument("--instances", required=True, type=Path, help="instances JSON file")
        p.add_argument("--images", required=True, type=Path,
                       help="folder the images' file_name (LVIS: last two parts of coco_url) is relative to")
        p.add_argument("--out", required=True, type=Path, help="output folder")
        p.add_argument("--name", default=None, help="output file stem (default: the instances file's stem)")
        p.add_argument("--desc-map", type=Path, default=None,
                       help='JSON object {"category name": "desc"} renaming categories')
        p.add_argument("--keep-crowd", action="store_true", help="keep iscrowd boxes (skipped by default)")
        p.add_argument("--resize", default="none", choices=["none", *FAMILY_FACTOR],
                       help="pre-resize the images with this family's smart_resize into <out>/images")
        p.add_argument("--family", default=None, choices=list(FAMILY_FACTOR),
                       help="with --resize none: write the size this family's processor resizes to")
        p.add_argument("--min-pixels", type=int, default=DEFAULT_MIN_PIXELS)
        p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
        p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
        p.add_argument("--skip-missing-images", action="store_true",
                       help="convert the images that exist instead of stopping at missing ones")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = ConvertOptions(source=args.source, instances=args.instances, images=args.images, out=args.out,
                          name=args.name, desc_map=args.desc_map, keep_crowd=args.keep_crowd,
                          resize=args.resize,
                          family=args.family, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                          workers=args.workers, skip_missing_images=args.skip_missing_images,
                          progress=not args.no_progress)
    summary = run_reporting(lambda: convert(opts))
    if isinstance(summary, int):
        return summary
    im, bx = summary["images"], summary["boxes"]
    lost = {**bx["dropped"], "with skipped images": bx["dropped_with_skipped_images"]}
    drops = ", ".join(f"{k} {v}" for k, v in lost.items() if v) or "none"
    print(f"{summary['jsonl']}: {im['out']} of {im['in']} images ({im['skipped_without_annotations']} "
          f"without annotations, {im['skipped_all_boxes_dropped']} with every box dropped), {bx['out']} of "
          f"{bx['in']} boxes (dropped: {drops}), {summary['seconds']} s")
    for line in summary["problems"]:
        print(f"skipped: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
