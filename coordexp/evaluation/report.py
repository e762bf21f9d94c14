"""Rollout evaluation of a held-out split: rollouts -> strict parse -> metrics -> report files.

The pipeline is backend-agnostic: anything with ``RolloutBackend.generate(prompt_ids, messages, seed)``
(the in-process HF backend, the rollout-server backend) produces the rollouts. Everything below the
rollouts is shared by ``python -m coordexp.eval`` and the in-training eval's qualitative dumps:

- ``prediction_record``: one ``predictions.jsonl`` row (GT, parsed predictions, matches per IoU threshold,
  duplicate flags, scores, parse flags, the rollout text);
- ``build_report``: ``eval_report.json`` (detection metrics, COCO AP, rates, settings);
- ``write_qualitative``: a bounded markdown dump of rollout texts with their parse results;
- ``TeacherForcedScorer``: the coordinate-token probability score (one teacher-forced forward pass over
  prompt + rollout tokens; torch is imported only when it runs).
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordexp.coordjson import TokenFrame
from coordexp.evaluation.coco import CocoImage, CocoObject, coco_ap
from coordexp.evaluation.detection import (
    DUPLICATE_IOU,
    IOU_THRESHOLDS,
    DetectionAggregate,
    MatchSettings,
    SampleOutcome,
    ThresholdMatch,
    prf,
    threshold_key,
)

REPORT_NAME = "eval_report.json"
PREDICTIONS_NAME = "predictions.jsonl"
#: Rollouts written to each qualitative markdown dump.
QUALITATIVE_LIMIT = 8
#: Samples drawn as PNGs per eval.
VIZ_LIMIT = 4
#: Characters of rollout text kept in one qualitative entry.
QUALITATIVE_TEXT_CHARS = 3000
COORD_PROB_SCORE = ("mean over the 4 coordinate slots of the full-vocabulary softmax probability of the "
                    "emitted coord token (teacher-forced prompt + rollout)")

# (prompt ids per rollout, generated ids per rollout, generated-token indices per rollout) -> probabilities
Scorer = Callable[[Sequence[list[int]], Sequence[list[int]], Sequence[list[int]]], list[list[float]]]


def sample_name(sample) -> str:
    """Short id of a sample: ``<file name>:<line>`` from a DetectionSample's ``source`` (or ``sample_id``)."""
    source = getattr(sample, "source", None)
    return Path(str(source)).name if source else str(getattr(sample, "sample_id", "?"))


def match_settings(contract) -> MatchSettings:
    return MatchSettings(top_k=contract.candidate_top_k, fp_cost=contract.fp_cost, fn_cost=contract.fn_cost)


# ---- coordinate-token probabilities ------------------------------------------------------------------
def rollout_coord_indices(parsed, token_ids: Sequence[int],
                          pieces: Sequence[str]) -> list[tuple[int, ...] | None]:
    """For each parsed object, the indices in the *generated* tokens of its 4 coordinate tokens.

    Parsed positions index the parse prefix (which starts at the container and may re-encode a straddling
    first token), so they are mapped back through the character frame: the prefix text is a substring of
    the rollout text, and a coord token is always a whole token in both. ``None`` for an object whose
    slots cannot be mapped exactly (never expected; counted by the report as unscored).
    """
    if not parsed.objects:
        return []
    frame = TokenFrame.from_pieces(list(token_ids), list(pieces))
    prefix = parsed.prefix_frame
    offset = frame.text.find(prefix.text) if prefix.text else -1
    out: list[tuple[int, ...] | None] = []
    for obj in parsed.objects:
        if offset < 0:
            out.append(None)
            continue
        found = []
        for p in obj.coord_positions:
            char = offset + int(prefix.starts[p])
            j = int(frame.tokens_at([char])[0])
            ok = j < len(frame) and int(frame.starts[j]) == char and int(token_ids[j]) == int(prefix.ids[p])
            found.append(j if ok else None)
        out.append(tuple(found) if all(i is not None for i in found) else None)
    return out


class TeacherForcedScorer:
    """Probability of each emitted token under one teacher-forced forward pass of prompt + rollout.

    The probability is the full-vocabulary softmax (temperature 1) at the position that predicts the
    token, i.e. what the model assigned to the coordinate token it wrote. Sequences are right-padded in
    micro-batches of ``batch_size`` and cut after the last requested token. Text-only forward pass: for
    image samples a VLM would also need its pixel inputs (not supported yet; callers skip scoring).
    """

    def __init__(self, model, pad_id: int, batch_size: int = 8):
        self.model, self.pad_id, self.batch_size = model, int(pad_id), max(int(batch_size), 1)

    def __call__(self, prompts, completions, positions) -> list[list[float]]:
        import torch

        out: list[list[float]] = [[] for _ in prompts]
        todo = [i for i, pos in enumerate(positions) if pos]
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        try:
            with torch.no_grad():
                for start in range(0, len(todo), self.batch_size):
                    rows = todo[start: start + self.batch_size]
                    seqs = [list(prompts[i]) + list(completions[i][: max(positions[i]) + 1]) for i in rows]
                    width = max(len(s) for s in seqs)
                    ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=device)
                    mask = torch.zeros_like(ids)
                    for r, s in enumerate(seqs):
                        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long, device=device)
                        mask[r, : len(s)] = 1
                    logits = model(input_ids=ids, attention_mask=mask).logits
                    for r, i in enumerate(rows):
                        at = torch.tensor([len(prompts[i]) + k - 1 for k in positions[i]], device=device)
                        want = torch.tensor([int(completions[i][k]) for k in positions[i]], device=device)
                        logp = torch.log_softmax(logits[r, at].float(), dim=-1)
                        out[i] = logp.gather(1, want[:, None]).squeeze(1).exp().tolist()
        finally:
            model.train(was_training)
        return out


# ---- per-sample records ------------------------------------------------------------------------------
def prediction_record(sample, rollout, parsed, text: str, matches: Sequence[ThresholdMatch],
                      duplicates: Sequence[bool],
                      coord_probs: Sequence[Sequence[float] | None] | None = None) -> dict[str, Any]:
    """One predictions.jsonl row. ``matches`` hold every evaluated IoU threshold."""
    pred = []
    for i, obj in enumerate(parsed.objects):
        probs = coord_probs[i] if coord_probs is not None else None
        pred.append({"desc": obj.desc, "bbox_2d": [int(v) for v in obj.bbox],
                     "duplicate": bool(duplicates[i]),
                     "coord_probs": [round(float(p), 6) for p in probs] if probs else None,
                     "score": round(sum(probs) / len(probs), 6) if probs else None})
    return {
        "sample_id": sample_name(sample), "width": int(sample.width), "height": int(sample.height),
        "images": [str(p) for p in (sample.images or [])],
        "gt": [{"desc": o.desc, "bbox_2d": [int(v) for v in o.bbox_2d]} for o in sample.objects],
        "pred": pred,
        "matches": {threshold_key(m.threshold): [[p, g, round(iou, 6)] for p, g, iou in m.pairs]
                    for m in matches},
        "invalid_rollout": bool(parsed.invalid_rollout),
        "fallback_reason": getattr(parsed.fallback_reason, "value", parsed.fallback_reason),
        "truncated": bool(parsed.truncated), "leading_junk": bool(parsed.leading_junk),
        "forced_eos": bool(rollout.triggered), "hit_max_new_tokens": bool(rollout.hit_max_new_tokens),
        "gen_tokens": len(rollout.token_ids),
        "dropped": {k: int(v) for k, v in parsed.drop_counts.items() if v},
        "text": text,
    }


@dataclass
class EvalResult:
    report: dict[str, Any]
    records: list[dict[str, Any]]


def score_rollouts(samples: Sequence, rollouts: Sequence, adapter, contract, *,
                   scorer: Scorer | None = None, thresholds: Sequence[float] = IOU_THRESHOLDS,
                   scored: Sequence | None = None
                   ) -> tuple[list[dict[str, Any]], DetectionAggregate, dict[str, int]]:
    """Parse, match and (optionally) score rollouts: (records, aggregate, training-gate counts).

    ``scored`` may pass ``score_rollout``'s (parsed, gts, match) per rollout when the caller has them."""
    if scored is None:
        from coordexp.trainer.channels import score_rollout

        scored = [score_rollout(s, r, adapter, contract) for s, r in zip(samples, rollouts)]
    settings = match_settings(contract)
    pieces = [adapter.pieces(r.token_ids) for r in rollouts]
    coord_probs: list[list[list[float] | None] | None] = [None] * len(rollouts)
    if scorer is not None:
        slots = [rollout_coord_indices(parsed, r.token_ids, pc)
                 for (parsed, _, _), r, pc in zip(scored, rollouts, pieces)]
        flat = [[k for idx in per if idx is not None for k in idx] for per in slots]
        probs = scorer([list(r.prompt_ids) for r in rollouts], [list(r.token_ids) for r in rollouts], flat)
        for n, per in enumerate(slots):
            it = iter(probs[n])
            coord_probs[n] = [[next(it) for _ in idx] if idx is not None else None for idx in per]
    agg = DetectionAggregate(tuple(float(t) for t in thresholds), settings)
    gate = {"tp": 0, "pred": 0, "gt": 0}
    records = []
    for n, (sample, rollout, (parsed, gts, match), pc) in enumerate(zip(samples, rollouts, scored, pieces)):
        outcome = SampleOutcome(pred_boxes=[tuple(o.bbox) for o in parsed.objects],
                                gt_boxes=[tuple(g.bbox) for g in gts], invalid_rollout=parsed.invalid_rollout,
                                truncated=parsed.truncated, forced_eos=bool(rollout.triggered),
                                hit_max_new_tokens=bool(rollout.hit_max_new_tokens),
                                gen_tokens=len(rollout.token_ids), dropped=parsed.drop_counts,
                                pred_descs=[o.desc for o in parsed.objects], gt_descs=[g.desc for g in gts])
        matches, dups = agg.add(outcome)
        gate["tp"] += len(match.pairs)
        gate["pred"] += len(parsed.objects)
        gate["gt"] += len(gts)
        records.append(prediction_record(sample, rollout, parsed, "".join(pc), matches, dups, coord_probs[n]))
    return records, agg, gate


def coco_tables(records: Sequence[dict[str, Any]], *, with_coord_prob: bool) -> dict[str, Any]:
    def images(score_of) -> list[CocoImage]:
        return [CocoImage(r["width"], r["height"],
                          [CocoObject(g["desc"], tuple(g["bbox_2d"])) for g in r["gt"]],
                          [CocoObject(p["desc"], tuple(p["bbox_2d"]), score_of(p)) for p in r["pred"]])
                for r in records]

    constant = images(lambda p: 1.0)
    out: dict[str, Any] = {"score_constant": coco_ap(constant)}
    by_desc = {"score_constant": coco_ap(constant, "by_desc")}
    if with_coord_prob:
        scored = images(lambda p: p["score"] if p["score"] is not None else 0.0)
        out["score_coord_prob"] = coco_ap(scored)
        by_desc["score_coord_prob"] = coco_ap(scored, "by_desc")
    out["by_desc"] = by_desc
    return out


def build_report(records: Sequence[dict[str, Any]], agg: DetectionAggregate, gate: dict[str, int],
                 contract, *, with_coord_prob: bool, meta: dict[str, Any] | None = None,
                 timing: dict[str, float] | None = None) -> dict[str, Any]:
    summary = agg.summary()
    coco = coco_tables(records, with_coord_prob=with_coord_prob)
    unscored = sum(1 for r in records for p in r["pred"] if p["score"] is None) if with_coord_prob else None
    iou50, mean = summary.get("iou50", {}), summary["iou50_95"]

    def ap(table: str, key: str) -> float | None:
        return coco.get(table, {}).get(key)

    headline = {
        "precision@0.5": iou50.get("precision"), "recall@0.5": iou50.get("recall"), "f1@0.5": iou50.get("f1"),
        "desc_match@0.5": iou50.get("desc_match"),
        "precision@[.5:.95]": mean["precision"], "recall@[.5:.95]": mean["recall"], "f1@[.5:.95]": mean["f1"],
        "AP_score_constant": ap("score_constant", "AP"), "AP50_score_constant": ap("score_constant", "AP50"),
        "AP_score_coord_prob": ap("score_coord_prob", "AP"),
        "AP50_score_coord_prob": ap("score_coord_prob", "AP50"),
        **{k: summary["rates"][k] for k in ("invalid_rollout_rate", "parse_truncated_rate", "duplicate_rate",
                                             "forced_eos_rate")},
    }
    rt = contract.repeat_terminate
    return {
        "kind": "coordexp.eval_report", "version": 1,
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **(meta or {}),
        "summary": headline,
        "detection": {"iou50": summary.get("iou50"), "iou50_95": mean,
                      "training_gate": {"iou_gate": contract.iou_gate,
                                        **prf(gate["tp"], gate["pred"], gate["gt"]), "tp": gate["tp"]},
                      "per_threshold": summary["per_threshold"]},
        "coco": coco,
        "rates": summary["rates"], "counts": {**summary["counts"], "unscored_predictions": unscored},
        "gen_new_tokens": summary["gen_new_tokens"],
        "settings": {
            "backend": contract.backend, "decode_batch_size": contract.decode_batch_size,
            "max_new_tokens": contract.max_new_tokens, "temperature": contract.temperature,
            "top_p": contract.top_p, "top_k": contract.top_k,
            "repetition_penalty": contract.repetition_penalty,
            "repeat_terminate": {k: getattr(rt, k) for k in ("enabled", "min_new_tokens",
                                                              "max_consecutive_token_repeats", "ngram_size",
                                                              "ngram_repeats", "max_object_keys")},
            "matching": {"candidate_top_k": contract.candidate_top_k, "fp_cost": contract.fp_cost,
                         "fn_cost": contract.fn_cost, "iou_thresholds": list(agg.thresholds),
                         "duplicate_iou": DUPLICATE_IOU},
            "object_field_order": contract.object_field_order,
            "coord_prob_score": COORD_PROB_SCORE if with_coord_prob else None,
        },
        "timing": timing or {},
    }


def evaluate_rollouts(samples: Sequence, backend, adapter, prompts, contract, *, seed: int,
                      scorer: Scorer | None = None, thresholds: Sequence[float] = IOU_THRESHOLDS,
                      meta: dict[str, Any] | None = None) -> EvalResult:
    """Roll out ``samples`` through ``backend`` and evaluate them (see the module docstring)."""
    start = time.perf_counter()
    from coordexp.trainer.rollouts import generate_rollouts

    batch = generate_rollouts(backend, samples, [prompts.encode(s) for s in samples], seed)
    if len(batch.rollouts) != len(samples):
        raise RuntimeError(f"rollout backend returned {len(batch.rollouts)} rollouts for "
                           f"{len(samples)} prompts")
    rollout_s = time.perf_counter() - start
    start = time.perf_counter()
    records, agg, gate = score_rollouts(samples, batch.rollouts, adapter, contract, scorer=scorer,
                                        thresholds=thresholds)
    score_s = time.perf_counter() - start
    report = build_report(records, agg, gate, contract, with_coord_prob=scorer is not None,
                          meta={**(meta or {}), "repeat_terminate_active": batch.repeat_terminate_active},
                          timing={"rollout_s": round(rollout_s, 3), "parse_match_score_s": round(score_s, 3)})
    return EvalResult(report, records)


# ---- files --------------------------------------------------------------------------------------------
def write_report(report: dict[str, Any], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return path


def write_predictions(records: Sequence[dict[str, Any]], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
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
    path.write_text(qualitative_markdown(records, title=title, limit=limit))
    return path


def format_summary(report: dict[str, Any]) -> str:
    """A few console lines of the headline numbers."""
    def f(v) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    s, c = report["summary"], report["counts"]
    return "\n".join([
        f"rollouts {c['rollouts']} | GT {c['gt_objects']} | valid predictions {c['pred_objects']}",
        f"IoU 0.5:      P {f(s['precision@0.5'])}  R {f(s['recall@0.5'])}  F1 {f(s['f1@0.5'])}  "
        f"(desc match of TPs {f(s['desc_match@0.5'])})",
        f"IoU .5:.95:   P {f(s['precision@[.5:.95]'])}  R {f(s['recall@[.5:.95]'])}  "
        f"F1 {f(s['f1@[.5:.95]'])}",
        f"COCO AP:      score=1 {f(s['AP_score_constant'])} (AP50 {f(s['AP50_score_constant'])}) | "
        f"score=coord prob {f(s['AP_score_coord_prob'])} (AP50 {f(s['AP50_score_coord_prob'])})",
        f"rates:        invalid {f(s['invalid_rollout_rate'])}  truncated {f(s['parse_truncated_rate'])}  "
        f"duplicate {f(s['duplicate_rate'])}  forced EOS {f(s['forced_eos_rate'])}",
    ])


# ---- in-training eval artifacts (rank 0) -------------------------------------------------------------
def find_tensorboard_writer(trainer):
    """The SummaryWriter of the Trainer's TensorBoard callback, if it has one open."""
    try:
        from transformers.integrations import TensorBoardCallback
    except ImportError:  # pragma: no cover
        return None
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback) and getattr(cb, "tb_writer", None) is not None:
            return cb.tb_writer
    return None


def write_eval_artifacts(records: Sequence[dict[str, Any]], run_dir: Path, step: int, *, tb_writer=None,
                         image_root: Path | None = None, viz_limit: int = VIZ_LIMIT,
                         qualitative_limit: int = QUALITATIVE_LIMIT) -> dict[str, Any]:
    """qualitative/step-<N>.md, viz/step-<N>/*.png and (if a writer is given) the PNGs as TensorBoard
    images ``eval_viz/<index>``. Returns the paths written."""
    from coordexp.viz import write_sample_pngs

    run_dir = Path(run_dir)
    md = write_qualitative(records, run_dir / "qualitative" / f"step-{step}.md",
                           title=f"in-training eval, step {step}", limit=qualitative_limit)
    pngs = write_sample_pngs(records, run_dir / "viz" / f"step-{step}", limit=viz_limit,
                             image_root=image_root)
    if tb_writer is not None:
        import numpy as np

        for i, (_, image) in enumerate(pngs):
            tb_writer.add_image(f"eval_viz/{i}", np.asarray(image), step, dataformats="HWC")
        tb_writer.flush()
    return {"qualitative": md, "viz": [p for p, _ in pngs]}
