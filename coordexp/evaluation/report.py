"""The evaluation report: ``eval_report.json`` (detection metrics, COCO AP, rates, settings) and its console
summary."""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coordexp.evaluation.artifacts import TEXT_ENCODING
from coordexp.evaluation.coco import CocoImage, CocoObject, coco_ap
from coordexp.evaluation.detection import DUPLICATE_IOU, DetectionAggregate, prf
from coordexp.evaluation.scoring import COORD_PROB_SCORE
from coordexp.repeat_rules import config_to_dict

REPORT_NAME = "eval_report.json"


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
            "repeat_terminate": config_to_dict(rt),
            "matching": {"candidate_top_k": contract.candidate_top_k, "fp_cost": contract.fp_cost,
                         "fn_cost": contract.fn_cost, "iou_thresholds": list(agg.thresholds),
                         "duplicate_iou": DUPLICATE_IOU},
            "object_field_order": contract.object_field_order,
            "coord_prob_score": COORD_PROB_SCORE if with_coord_prob else None,
        },
        "timing": timing or {},
    }


def write_report(report: dict[str, Any], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", **TEXT_ENCODING)
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
        *_max_dets_note(report.get("coco", {}).get("score_constant", {})),
    ])


def _max_dets_note(table: dict[str, Any]) -> list[str]:
    """A console line when COCO's per-image cap left detections out (AP/AR100 capped, F1 not)."""
    over = table.get("images_over_max_dets") or 0
    if not over:
        return []
    return [f"COCO cap:     {over} image(s) have more than maxDets={table.get('max_dets')} predictions: COCO "
            f"scores only the top {table.get('max_dets')} of each (AP, AR100 capped; P/R/F1 count all)"]
