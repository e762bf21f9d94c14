"""PNG pictures of one sample's ground truth against the model's predictions (PIL only, no display).

Colours (Okabe-Ito, readable with the common colour-vision deficiencies) and line styles:

    GT, matched        blue,           dashed
    GT, missed (FN)    reddish purple, dashed, thick
    prediction, TP     bluish green,   solid   (label: desc, IoU with its GT, the GT desc if different)
    prediction, FP     vermilion,      solid   (label: desc)

A legend with the counts sits in the top-right corner. Text-only samples (the synthetic task) are drawn
on a blank canvas of the sample's width x height; a sample with images is drawn on its first image
(paths relative to the JSONL's folder, unless absolute). Bins map to pixels with
``coordexp.coordjson.bins_to_pixel_box`` on the size of what is drawn on. The picture keeps that size
unless its longer side exceeds ``max_side`` (then it is scaled down) or is under ``MIN_SIDE`` (then it is
enlarged by an integer factor).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from coordexp.coordjson import bins_to_pixel_box
from coordexp.data.fonts import label_font, note_missing_glyphs

GT_MATCHED = (0, 114, 178)
GT_MISSED = (204, 121, 167)
PRED_TP = (0, 158, 115)
PRED_FP = (213, 94, 0)
CANVAS = (246, 246, 246)
DEFAULT_MAX_SIDE = 1280

Obj = tuple[str, Sequence[int]]              # (desc, bins [x1, y1, x2, y2])
Pair = tuple[int, int, float]                # (pred_index, gt_index, iou)


MIN_SIDE = 448  # smaller canvases are enlarged by an integer factor so boxes and labels stay legible


def resolve_image(path: str, image_root: Path | None) -> Path | None:
    """An image path from a sample: absolute as is, else relative to ``image_root`` (the JSONL folder),
    else relative to the working directory; ``None`` if no such file."""
    p = Path(path)
    candidates = [p] if p.is_absolute() else ([Path(image_root) / p] if image_root else []) + [p]
    return next((c for c in candidates if c.is_file()), None)


def _dashed_rect(draw: ImageDraw.ImageDraw, box, colour, width: int, dash: int = 8) -> None:
    x1, y1, x2, y2 = box
    for (ax, ay, bx, by) in ((x1, y1, x2, y1), (x2, y1, x2, y2), (x2, y2, x1, y2), (x1, y2, x1, y1)):
        length = max(abs(bx - ax), abs(by - ay))
        steps = max(int(length // dash), 1)
        for i in range(0, steps, 2):
            t0, t1 = i / steps, min((i + 1) / steps, 1.0)
            start = (ax + (bx - ax) * t0, ay + (by - ay) * t0)
            end = (ax + (bx - ax) * t1, ay + (by - ay) * t1)
            draw.line([start, end], fill=colour, width=width)


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _label(draw: ImageDraw.ImageDraw, xy, text: str, colour, font, canvas_size, placed: list[tuple],
           below: bool = False) -> None:
    """A filled text tag at a box corner, moved down (or up, near the bottom) off tags already placed."""
    x, y = xy
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left + 4, bottom - top + 4
    x = min(max(x, 0), max(canvas_size[0] - w, 0))
    y = y if below else y - h
    y = min(max(y, 0), max(canvas_size[1] - h, 0))
    step = h if y + h * 2 <= canvas_size[1] else -h
    for _ in range(len(placed) + 1):
        rect = (x, y, x + w, y + h)
        if not any(_overlaps(rect, other) for other in placed):
            break
        y = min(max(y + step, 0), max(canvas_size[1] - h, 0))
    placed.append((x, y, x + w, y + h))
    draw.rectangle([x, y, x + w, y + h], fill=colour)
    draw.text((x + 2 - left, y + 2 - top), text, fill=(255, 255, 255), font=font)


def draw_detections(gt: Sequence[Obj], pred: Sequence[Obj], pairs: Iterable[Pair], *, width: int, height: int,
                    image_path: Path | None = None, title: str | None = None,
                    max_side: int | None = DEFAULT_MAX_SIDE, iou_label: str = "IoU 0.5") -> Image.Image:
    """The picture of one sample. ``pairs`` are the matches (pred index, GT index, IoU); every other
    prediction is a false positive and every other GT object a false negative."""
    note = None
    if image_path is not None:
        try:
            with Image.open(image_path) as im:
                canvas = im.convert("RGB")
        except OSError as err:
            canvas, note = None, f"image unreadable: {Path(image_path).name} ({type(err).__name__})"
    else:
        canvas = None
    if canvas is None:
        canvas = Image.new("RGB", (max(int(width), 2), max(int(height), 2)), CANVAS)
    scale = 1.0
    if max_side and max(canvas.size) > max_side:
        scale = max_side / max(canvas.size)
        canvas = canvas.resize((max(round(canvas.width * scale), 2), max(round(canvas.height * scale), 2)))
    elif max(canvas.size) < MIN_SIDE:  # small images (e.g. 112 px synthetic scenes):
        # enlarge, pixels kept sharp
        scale = MIN_SIDE // max(canvas.size)
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    w, h = canvas.size
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(min(w, h) / 240))
    font_px = max(10, round(min(w, h) / 40))

    pairs = list(pairs)
    matched_pred = {p: (g, iou) for p, g, iou in pairs}
    matched_gt = {g for _, g, _ in pairs}

    def px(bins) -> tuple[float, float, float, float]:
        x1, y1, x2, y2 = bins_to_pixel_box(tuple(int(v) for v in bins), w, h)
        return x1, y1, x2, y2

    labels = []  # drawn after every box, so no box line crosses a tag
    for gi, (desc, bins) in enumerate(gt):
        missed = gi not in matched_gt
        box = px(bins)
        _dashed_rect(draw, box, GT_MISSED if missed else GT_MATCHED, line * 2 if missed else line)
        if missed:
            labels.append(((box[0], box[3]), f"FN {desc}", GT_MISSED, True))
    for pi, (desc, bins) in enumerate(pred):
        box = px(bins)
        hit = matched_pred.get(pi)
        colour = PRED_TP if hit else PRED_FP
        draw.rectangle(box, outline=colour, width=line)
        if hit:
            gt_desc = gt[hit[0]][0] if 0 <= hit[0] < len(gt) else desc
            text = f"{desc} {hit[1]:.2f}" + ("" if gt_desc.strip() == desc.strip() else f" (GT: {gt_desc})")
        else:
            text = f"FP {desc}"
        labels.append(((box[0], box[1]), text, colour, False))
    placed: list[tuple] = []
    for anchor, text, colour, below in labels:
        _label(draw, anchor, text, colour, label_font(font_px, text), (w, h), placed, below=below)

    n_tp = len(pairs)
    entries = [(GT_MATCHED, True, f"GT matched ({len(matched_gt)})"),
               (GT_MISSED, True, f"GT missed / FN ({len(gt) - len(matched_gt)})"),
               (PRED_TP, False, f"pred matched / TP ({n_tp})"),
               (PRED_FP, False, f"pred unmatched / FP ({len(pred) - n_tp})")]
    head = [t for t in (title, f"matching at {iou_label}", note) if t]
    _legend(draw, entries, head, label_font(font_px, "".join(head)), (w, h), line)
    return canvas


def _legend(draw, entries, head: list[str], font, size, line: int) -> None:
    pad, swatch = 6, 22
    rows = head + [text for _, _, text in entries]
    heights = [draw.textbbox((0, 0), r, font=font) for r in rows]
    row_h = max(b[3] - b[1] for b in heights) + 4
    text_w = max(b[2] - b[0] for b in heights)
    box_w = text_w + swatch + 3 * pad
    box_h = len(rows) * row_h + 2 * pad
    x0 = max(size[0] - box_w - pad, 0)
    y0 = pad
    draw.rectangle([x0, y0, x0 + box_w, y0 + box_h], fill=(255, 255, 255), outline=(80, 80, 80))
    y = y0 + pad
    for text in head:
        draw.text((x0 + pad, y), text, fill=(20, 20, 20), font=font)
        y += row_h
    for colour, dashed, text in entries:
        mid = y + row_h // 2
        seg = (x0 + pad, mid - 4, x0 + pad + swatch, mid + 4)
        if dashed:
            _dashed_rect(draw, seg, colour, max(line, 2), dash=5)
        else:
            draw.rectangle(seg, outline=colour, width=max(line, 2))
        draw.text((x0 + 2 * pad + swatch, y), text, fill=(20, 20, 20), font=font)
        y += row_h


def save_png(image: Image.Image, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=True)
    return path


def render_prediction(record: dict, *, image_root: Path | None = None, iou_key: str = "0.50",
                      max_side: int | None = DEFAULT_MAX_SIDE) -> Image.Image:
    """Picture of one ``predictions.jsonl`` row (see coordexp.evaluation.report.prediction_record)."""
    gt = [(o["desc"], o["bbox_2d"]) for o in record["gt"]]
    pred = [(o["desc"], o["bbox_2d"]) for o in record["pred"]]
    pairs = [(p, g, iou) for p, g, iou in record["matches"].get(iou_key, [])]
    image = None
    if record.get("images"):
        image = resolve_image(str(record["images"][0]), image_root)
    title = str(record.get("sample_id", ""))
    if record.get("images") and image is None:
        title += " (image not found: blank canvas)"
    if record.get("invalid_rollout"):
        title += " [invalid rollout]"
    elif record.get("truncated"):
        title += " [truncated]"
    return draw_detections(gt, pred, pairs, width=int(record["width"]), height=int(record["height"]),
                           image_path=image, title=title, max_side=max_side,
                           iou_label=f"IoU {float(iou_key):.2f}")


def write_sample_pngs(records: Sequence[dict], out_dir: Path, *, limit: int = 4,
                      image_root: Path | None = None,
                      iou_key: str = "0.50") -> list[tuple[Path, Image.Image]]:
    """PNGs of the first ``limit`` records as ``<out_dir>/<index>_<sample>.png``; returns (path, image).
    Labels no installed font draws are named once on stderr (coordexp.data.fonts.note_missing_glyphs)."""
    note_missing_glyphs(o["desc"] for r in records[:limit] for o in (*r["gt"], *r["pred"]))
    out = []
    for i, record in enumerate(records[:limit]):
        image = render_prediction(record, image_root=image_root, iou_key=iou_key)
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(record.get("sample_id", i)))
        out.append((save_png(image, Path(out_dir) / f"{i:02d}_{name}.png"), image))
    return out
