"""``python -m coordexp.data.inspect <jsonl> --out <dir>``: look at a dataset before training on it.

Writes into ``--out``:

- ``samples/<index>_<image>.png``: the ground truth of the first ``--limit`` records drawn on their image
  at the record's ``width`` x ``height`` (the size the bins refer to: an image of another size is resized to
  it first, as the processor will), or on a blank canvas of that size for records without images. Bins map
  to pixels with the project's one rule (:func:`coordexp.coordjson.bins_to_pixel_box`);
- ``stats.json``: records, objects, objects per image (min/median/mean/max and counts), box sizes in COCO's
  small / medium / large ranges (area < 32^2, < 96^2, else; in pixels of ``metadata.original_width`` x
  ``original_height`` when the converter recorded them, else of the record's size: ``area_frame`` says
  which), distinct descs and the ``--top-k`` most frequent ones, images per size;
- ``histograms.png``: objects per image, box size (sqrt of the area, COCO limits marked), box aspect ratio
  and the top descs.

An invalid JSONL file ends with the loader's ``file:line: reason`` list and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coordexp.coordjson import bins_to_coco_box, bins_to_pixel_box
from coordexp.data.fonts import label_font, missing_glyphs, missing_glyphs_note, plot_font_families

__all__ = ["COCO_MEDIUM", "COCO_SMALL", "dataset_stats", "draw_ground_truth", "main", "size_class"]

COCO_SMALL = 32 ** 2    # area < 32^2: small
COCO_MEDIUM = 96 ** 2   # area < 96^2: medium, else large
CANVAS = (246, 246, 246)
PALETTE = ((0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233),
           (240, 228, 66))
EXIT_USER_ERROR = 2


def size_class(area: float) -> str:
    """COCO's size class of a box area in pixels: ``small`` (< 32^2), ``medium`` (< 96^2) or ``large``."""
    return "small" if area < COCO_SMALL else "medium" if area < COCO_MEDIUM else "large"


def _area_frame(sample) -> tuple[int, int, str]:
    meta = sample.metadata if isinstance(sample.metadata, dict) else {}
    w, h = meta.get("original_width"), meta.get("original_height")
    if isinstance(w, int) and isinstance(h, int) and w > 1 and h > 1:
        return w, h, "original"
    return sample.width, sample.height, "record"


def _summary(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"min": 0, "median": 0, "mean": 0, "max": 0}
    return {"min": min(values), "median": statistics.median(values),
            "mean": round(statistics.fmean(values), 4), "max": max(values)}


def dataset_stats(samples: Sequence, top_k: int = 20) -> dict[str, Any]:
    """Statistics of ``samples`` (``DetectionSample``); see the module docstring. Areas in pixels."""
    per_image = [len(s.objects) for s in samples]
    descs: Counter = Counter()
    sizes: Counter = Counter()
    frames: Counter = Counter()
    areas, aspects = [], []
    for s in samples:
        w, h, frame = _area_frame(s)
        frames[frame] += 1
        for o in s.objects:
            descs[o.desc] += 1
            _, _, bw, bh = bins_to_coco_box(o.bbox_2d, max(w, 2), max(h, 2))
            areas.append(bw * bh)
            aspects.append(bw / bh)
            sizes[size_class(bw * bh)] += 1
    image_sizes = Counter(f"{s.width}x{s.height}" for s in samples)
    return {
        "records": len(samples),
        "objects": sum(per_image),
        "records_with_images": sum(1 for s in samples if s.images),
        "objects_per_image": {**_summary(per_image),
                              "counts": {str(k): v for k, v in sorted(Counter(per_image).items())}},
        "box_sizes": {"small": sizes["small"], "medium": sizes["medium"], "large": sizes["large"],
                      "area_frame": "original" if frames["original"] and not frames["record"]
                      else "record" if not frames["original"] else "mixed",
                      "area_px": _summary([round(a, 2) for a in areas])},
        "distinct_descs": len(descs),
        "top_descs": [[d, n] for d, n in sorted(descs.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]],
        "image_sizes": dict(sorted(image_sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]),
        "_areas": areas, "_aspects": aspects, "_per_image": per_image,
    }


NOTES_SHOWN = 5


def _image_note(sample) -> tuple[bool, str] | None:
    """(missing, why) when ``sample``'s picture is not its image as the record describes it: no image file
    (missing; drawn on a blank canvas), or an image whose size is not the record's width x height (drawn
    resized to it); None when it is, or when the record has no image."""
    from PIL import Image

    if not sample.images:
        return None
    path = Path(sample.images[0])
    if not path.is_file():
        return True, f"{sample.source}: no image file {path} (drawn on a blank canvas)"
    with Image.open(path) as im:  # the header only
        size = im.size
    if size != (sample.width, sample.height):
        return False, (f"{sample.source}: {path.name} is {size[0]}x{size[1]}, the record says {sample.width}x"
                       f"{sample.height} (drawn resized to the record's size; training accepts it only if "
                       f"the model's image processor resizes it to exactly that, docs/vlm.md)")
    return None


def draw_ground_truth(sample):
    """A PIL image of ``sample``'s ground truth at the record's size (on its first image, else a blank
    canvas)."""
    from PIL import Image, ImageDraw

    size = (max(sample.width, 2), max(sample.height, 2))
    canvas = None
    if sample.images and Path(sample.images[0]).is_file():
        with Image.open(sample.images[0]) as im:
            canvas = im.convert("RGB")
        if canvas.size != size:
            canvas = canvas.resize(size, Image.Resampling.BICUBIC)
    if canvas is None:
        canvas = Image.new("RGB", size, CANVAS)
    draw = ImageDraw.Draw(canvas)
    line = max(1, round(min(size) / 200))
    font_px = max(10, round(min(size) / 40))
    colours = {}
    for o in sample.objects:
        colour = colours.setdefault(o.desc, PALETTE[len(colours) % len(PALETTE)])
        x1, y1, x2, y2 = bins_to_pixel_box(o.bbox_2d, *size)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=line)
        font = label_font(font_px, o.desc)
        left, top, right, bottom = draw.textbbox((0, 0), o.desc, font=font)
        tx, ty = x1, max(y1 - (bottom - top) - 4, 0)
        draw.rectangle([tx, ty, tx + right - left + 4, ty + bottom - top + 4], fill=colour)
        draw.text((tx + 2 - left, ty + 2 - top), o.desc, fill=(255, 255, 255), font=font)
    return canvas


def _histograms(stats: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["font.family"] = plot_font_families()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    per_image = stats["_per_image"]
    axes[0, 0].hist(per_image, bins=range(max(per_image, default=0) + 2), color="#0072B2", align="left",
                    edgecolor="white")
    axes[0, 0].set(title="objects per image", xlabel="objects", ylabel="images")
    sides = [math.sqrt(a) for a in stats["_areas"]]
    axes[0, 1].hist(sides, bins=40, color="#009E73")
    for limit, name in ((32, "small|medium"), (96, "medium|large")):
        axes[0, 1].axvline(limit, color="#D55E00", linestyle="--", label=name)
    axes[0, 1].set(title=f"box size (sqrt area, px, {stats['box_sizes']['area_frame']} frame)",
                   xlabel="sqrt(area) px", ylabel="boxes")
    axes[0, 1].legend()
    aspects = [math.log2(a) for a in stats["_aspects"] if a > 0]
    axes[1, 0].hist(aspects, bins=40, color="#CC79A7")
    axes[1, 0].set(title="box aspect ratio", xlabel="log2(width / height)", ylabel="boxes")
    top = stats["top_descs"][:15][::-1]
    axes[1, 1].barh([d for d, _ in top], [n for _, n in top], color="#E69F00")
    axes[1, 1].set(title="most frequent descs", xlabel="objects")
    with warnings.catch_warnings():  # one glyph warning per missing character: inspect() says it once
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.tight_layout()
        fig.savefig(path, dpi=90)
    plt.close(fig)


def inspect(jsonl: str | Path, out: str | Path, *, limit: int = 16, top_k: int = 20) -> dict[str, Any]:
    """Write the PNGs, ``stats.json`` and ``histograms.png`` of ``jsonl`` into ``out``; return the stats.

    Raises ``FileNotFoundError`` / ``DataValidationError`` (a ``ValueError``) for a missing or invalid
    file."""
    from coordexp.data.jsonl import load_jsonl

    samples = list(load_jsonl(jsonl, check_images=False))
    out = Path(out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    stats = dataset_stats(samples, top_k=top_k)
    found = []  # (missing, why) per drawn record whose picture is not its image as described
    for s in samples[:limit]:
        note = _image_note(s)
        if note:
            found.append(note)
        stem = Path(s.images[0]).stem if s.images else "canvas"
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
        draw_ground_truth(s).save(out / "samples" / f"{s.index:05d}_{name}.png", format="PNG")
    _histograms(stats, out / "histograms.png")
    public = {k: v for k, v in stats.items() if not k.startswith("_")}
    missing = sum(m for m, _ in found)
    public.update(jsonl=str(jsonl), pictures=min(limit, len(samples)), pictures_without_image_file=missing,
                  pictures_of_another_size=len(found) - missing,
                  image_notes=[why for _, why in found[:NOTES_SHOWN]],
                  glyphs_without_font=missing_glyphs(o.desc for s in samples for o in s.objects))
    (out / "stats.json").write_text(json.dumps(public, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return public


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coordexp.data.inspect",
                                     description="Pictures and statistics of a coordexp JSONL file.")
    parser.add_argument("jsonl", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=16, help="records to draw (default 16)")
    parser.add_argument("--top-k", type=int, default=20, help="most frequent descs to list (default 20)")
    args = parser.parse_args(argv)
    if args.limit < 0 or args.top_k < 0:
        parser.error("--limit and --top-k must be >= 0")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; pass a folder (it is created when missing)")
    try:
        stats = inspect(args.jsonl, args.out, limit=args.limit, top_k=args.top_k)
    except (OSError, ValueError) as err:
        hint = ""
        if "unknown key(s) 'annotations'" in str(err):
            hint = (f"\nFix: {args.jsonl} looks like a COCO/LVIS instances file; convert it first: python -m "
                    f"coordexp.data.convert coco --instances {args.jsonl} --images <dir> --out <dir> "
                    f"(docs/own_data.md)")
        print(f"error: {err}{hint}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    b = stats["box_sizes"]
    print(f"{args.jsonl}: {stats['records']} records, {stats['objects']} objects, {stats['distinct_descs']} "
          f"descs; boxes small/medium/large {b['small']}/{b['medium']}/{b['large']} ({b['area_frame']} "
          f"pixels); {stats['pictures']} pictures in {args.out / 'samples'}; {args.out / 'stats.json'}")
    if stats["image_notes"]:
        n = stats["pictures_without_image_file"] + stats["pictures_of_another_size"]
        print(f"note: {n} of {stats['pictures']} pictures do not show their record's image as it is:\n  "
              + "\n  ".join(stats["image_notes"]) + ("\n  ..." if n > len(stats["image_notes"]) else ""),
              file=sys.stderr)
    if stats["glyphs_without_font"]:
        print(missing_glyphs_note(stats["glyphs_without_font"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
