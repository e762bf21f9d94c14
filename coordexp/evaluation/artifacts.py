"""Evaluation files besides the report: ``predictions.jsonl``, bounded markdown dumps of rollout texts with
their parse results (``qualitative/``), and the in-training eval's PNGs (``viz/``, also as TensorBoard
images)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from coordexp.viz import write_sample_pngs

PREDICTIONS_NAME = "predictions.jsonl"
#: How every eval text file is written: UTF-8, and a lone surrogate (which UTF-8 cannot encode, e.g. from a
#: file name or a JSON escape) as its escape ``\udXXX``, which in JSON is that same string: no writer fails.
TEXT_ENCODING = {"encoding": "utf-8", "errors": "backslashreplace"}
#: Rollouts written to each qualitative markdown dump.
QUALITATIVE_LIMIT = 8
#: Samples drawn as PNGs per eval.
VIZ_LIMIT = 4
#: Characters of rollout text kept in one qualitative entry.
QUALITATIVE_TEXT_CHARS = 3000


def write_predictions(records: Sequence[dict[str, Any]], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", **TEXT_ENCODING) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def _visible(text: str) -> str:
    """Rollout text on one line: control characters escaped (CoordJSON itself is one line)."""
    out = text
    for raw, shown in (("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t")):
        out = out.replace(raw, shown)
    return out.replace("```", "` ` `")


def _fmt_box(b) -> str:
    return "[" + ", ".join(str(int(v)) for v in b) + "]"


def qualitative_markdown(records: Sequence[dict[str, Any]], *, title: str, limit: int = QUALITATIVE_LIMIT,
                         iou_key: str = "0.50") -> str:
    lines = [f"# {title}", "",
             f"First {min(limit, len(records))} of {len(records)} rollouts: raw text (special tokens "
             f"kept, newlines shown as \\n) and the strict parse. Matching at IoU {float(iou_key):.2f}; "
             f"boxes in norm1000 bins.", ""]
    for r in records[:limit]:
        pairs = {p: (g, iou) for p, g, iou in r["matches"].get(iou_key, [])}
        flags = [name for name in ("invalid_rollout", "truncated", "forced_eos", "hit_max_new_tokens",
                                   "leading_junk") if r.get(name)]
        n_tp = len(pairs)
        lines += [f"## {r['sample_id']}", "",
                  f"- {len(r['pred'])} valid predictions, {len(r['gt'])} GT: TP {n_tp}, "
                  f"FP {len(r['pred']) - n_tp}, FN {len(r['gt']) - n_tp}; {r['gen_tokens']} generated tokens"
                  + (f"; flags: {', '.join(flags)}" if flags else ""),
                  ]
        if r.get("fallback_reason"):
            lines.append(f"- parse fell back: `{r['fallback_reason']}`")
        if r.get("dropped"):
            lines.append("- dropped: " + ", ".join(f"{k} x{v}" for k, v in sorted(r["dropped"].items())))
        text = r["text"]
        if len(text) > QUALITATIVE_TEXT_CHARS:
            more = len(r["text"]) - QUALITATIVE_TEXT_CHARS
            text = text[:QUALITATIVE_TEXT_CHARS] + f" ... [{more} more chars]"
        lines += ["", "```text", _visible(text), "```", "",
                  "| | desc | bbox_2d | result |", "|---|---|---|---|"]
        matched_gt = {g for g, _ in pairs.values()}
        for i, p in enumerate(r["pred"]):
            hit = pairs.get(i)
            result = f"TP (GT {hit[0]}, IoU {hit[1]:.3f})" if hit else "FP"
            if p.get("duplicate"):
                result += ", duplicate"
            if p.get("score") is not None:
                result += f", score {p['score']:.3f}"
            lines.append(f"| pred {i} | {p['desc']} | {_fmt_box(p['bbox_2d'])} | {result} |")
        for j, g in enumerate(r["gt"]):
            lines.append(f"| GT {j} | {g['desc']} | {_fmt_box(g['bbox_2d'])} | "
                         f"{'matched' if j in matched_gt else 'FN'} |")
        lines.append("")
    return "\n".join(lines)


def write_qualitative(records: Sequence[dict[str, Any]], path: Path, *, title: str,
                      limit: int = QUALITATIVE_LIMIT) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(qualitative_markdown(records, title=title, limit=limit), **TEXT_ENCODING)
    return path


# ---- in-training eval artifacts (rank 0) -------------------------------------------------------------
def find_tensorboard_writer(trainer):
    """The SummaryWriter of the Trainer's TensorBoard callback, if it has one open."""
    from transformers.integrations import TensorBoardCallback  # the in-training eval only: torch is loaded

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback) and getattr(cb, "tb_writer", None) is not None:
            return cb.tb_writer
    return None


def write_eval_artifacts(records: Sequence[dict[str, Any]], run_dir: Path, step: int, *, tb_writer=None,
                         image_root: Path | None = None, viz_limit: int = VIZ_LIMIT,
                         qualitative_limit: int = QUALITATIVE_LIMIT) -> dict[str, Any]:
    """qualitative/step-<N>.md, viz/step-<N>/*.png and (if a writer is given) the PNGs as TensorBoard
    images ``eval_viz/<index>``. Returns the paths written."""
    run_dir = Path(run_dir)
    md = write_qualitative(records, run_dir / "qualitative" / f"step-{step}.md",
                           title=f"in-training eval, step {step}", limit=qualitative_limit)
    pngs = write_sample_pngs(records, run_dir / "viz" / f"step-{step}", limit=viz_limit,
                             image_root=image_root)
    if tb_writer is not None:
        for i, (_, image) in enumerate(pngs):
            tb_writer.add_image(f"eval_viz/{i}", np.asarray(image), step, dataformats="HWC")
        tb_writer.flush()
    return {"qualitative": md, "viz": [p for p, _ in pngs]}
