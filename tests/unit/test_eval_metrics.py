"""Evaluation metrics against hand-computed cases: P/R/F1 per IoU threshold, duplicates, rates, COCO AP."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from _bpe import build_test_tokenizer, parse_ids, rollout_tokens

from coordexp.evaluation import (
    IOU_THRESHOLDS,
    CocoImage,
    CocoObject,
    DetectionAggregate,
    MatchSettings,
    SampleOutcome,
    coco_ap,
    duplicate_flags,
    match_at_threshold,
    prf,
    summarize,
)
from coordexp.evaluation.artifacts import qualitative_markdown
from coordexp.evaluation.detection import add_detection_metrics, finish_detection_metrics
from coordexp.evaluation.scoring import TeacherForcedScorer, rollout_coord_indices
from coordexp.telemetry.metrics import MetricBuffer, reduce_buffers

GT_A = (0, 0, 100, 100)
GT_B = (200, 200, 300, 300)
FAR = (600, 600, 700, 700)


def test_thresholds_are_cocos_ten():
    assert IOU_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def test_prf_zero_denominators():
    assert prf(0, 0, 0) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert prf(1, 2, 4) == {"precision": 0.5, "recall": 0.25, "f1": pytest.approx(2 / 6)}


def test_empty_predictions():
    s = summarize([SampleOutcome(pred_boxes=[], gt_boxes=[GT_A, GT_B])])
    assert s["iou50"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0, "fn": 2,
                          "desc_match": 0.0}
    assert s["iou50_95"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert s["rates"]["duplicate_rate"] == 0.0
    assert s["counts"]["pred_objects"] == 0 and s["counts"]["gt_objects"] == 2


def test_all_false_positives():
    s = summarize([SampleOutcome(pred_boxes=[FAR, (800, 0, 900, 50)], gt_boxes=[GT_A])])
    for t in IOU_THRESHOLDS:
        assert s["per_threshold"][f"{t:.2f}"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                                  "tp": 0, "fp": 2, "fn": 1}


def test_mixed_ious_across_thresholds():
    # IoU 0.62 with GT_A (box 100 x 62 inside 100 x 100) and 0.87 with GT_B.
    pred = [(0, 0, 100, 62), (200, 200, 300, 287)]
    s = summarize([SampleOutcome(pred_boxes=pred, gt_boxes=[GT_A, GT_B])])
    tp = {f"{t:.2f}": s["per_threshold"][f"{t:.2f}"]["tp"] for t in IOU_THRESHOLDS}
    assert tp == {"0.50": 2, "0.55": 2, "0.60": 2, "0.65": 1, "0.70": 1, "0.75": 1, "0.80": 1, "0.85": 1,
                  "0.90": 0, "0.95": 0}
    assert s["iou50"]["f1"] == 1.0
    # mean over thresholds of tp / 2: (3 * 1 + 5 * 0.5 + 2 * 0) / 10
    assert s["iou50_95"]["f1"] == pytest.approx(0.55)
    assert s["iou50_95"]["precision"] == pytest.approx(0.55)
    assert s["iou50_95"]["recall"] == pytest.approx(0.55)


def test_sums_over_samples_not_mean_of_samples():
    perfect = SampleOutcome(pred_boxes=[GT_A], gt_boxes=[GT_A])
    missed = SampleOutcome(pred_boxes=[], gt_boxes=[GT_A, GT_B, FAR])
    s = summarize([perfect, missed])
    assert s["iou50"]["precision"] == 1.0
    assert s["iou50"]["recall"] == pytest.approx(1 / 4)
    assert s["iou50"]["f1"] == pytest.approx(2 * 1 / (1 + 4))


def test_duplicates():
    near = (0, 0, 100, 98)  # IoU 0.98 with GT_A
    preds = [GT_A, GT_A, near, GT_B]
    assert duplicate_flags(preds) == [False, True, True, False]
    assert duplicate_flags([GT_A, (0, 0, 100, 90)]) == [False, False]  # IoU 0.90 < 0.95
    assert duplicate_flags([]) == [] and duplicate_flags([GT_A]) == [False]
    s = summarize([SampleOutcome(pred_boxes=preds, gt_boxes=[GT_A, GT_B])])
    assert s["counts"]["duplicates"] == 2
    assert s["rates"]["duplicate_rate"] == 0.5
    # one-to-one matching: the copies are false positives
    assert s["iou50"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 * 2 / 6),
                          "tp": 2, "fp": 2, "fn": 0, "desc_match": 0.0}


def test_desc_match_counts_true_positives_with_the_gt_desc():
    outcomes = [SampleOutcome([GT_A, GT_B, FAR], [GT_A, GT_B], pred_descs=["cat", " dog ", "cat"],
                              gt_descs=["cat", "cow"]),
                SampleOutcome([GT_A], [GT_A], pred_descs=["dog"], gt_descs=["dog"]),
                SampleOutcome([GT_A], [GT_A])]  # descs not given: not counted
    s = summarize(outcomes)
    assert s["iou50"]["tp"] == 4
    assert s["iou50"]["desc_match"] == pytest.approx(2 / 3)  # cat/cat and dog/dog of 3 checked pairs


def test_rollout_rates():
    outcomes = [SampleOutcome([], [GT_A], invalid_rollout=True, gen_tokens=10),
                SampleOutcome([GT_A], [GT_A], truncated=True, forced_eos=True, gen_tokens=30,
                              dropped={"wrong_arity": 2, "malformed": 0}),
                SampleOutcome([GT_A], [GT_A], hit_max_new_tokens=True, truncated=True, gen_tokens=20),
                SampleOutcome([GT_A], [GT_A], gen_tokens=20)]
    s = summarize(outcomes)
    assert s["rates"]["invalid_rollout_rate"] == 0.25
    assert s["rates"]["parse_truncated_rate"] == 0.5
    assert s["rates"]["forced_eos_rate"] == 0.25
    assert s["rates"]["hit_max_new_tokens_rate"] == 0.25
    assert s["rates"]["parse_dropped_per_rollout"] == 0.5
    assert s["counts"]["parse_dropped"] == {"wrong_arity": 2}
    assert s["gen_new_tokens"]["mean"] == 20.0 and s["gen_new_tokens"]["max"] == 30


def test_threshold_is_the_gate_and_costs_apply():
    pred = [(0, 0, 100, 62)]
    assert match_at_threshold(pred, [GT_A], 0.6).tp == 1
    assert match_at_threshold(pred, [GT_A], 0.65).tp == 0
    # top_k = 1: the prediction's only candidate is its best GT
    m = match_at_threshold([GT_A, (0, 0, 100, 99)], [GT_A], 0.5, MatchSettings(top_k=1))
    assert m.pairs == ((0, 0, 1.0),) and m.false_positives == (1,)


def test_in_training_metrics_reduce_like_the_aggregate():
    outcomes = [SampleOutcome([(0, 0, 100, 62)], [GT_A]),
                SampleOutcome([GT_B, GT_B], [GT_B, FAR], forced_eos=True),
                SampleOutcome([], [GT_A])]
    whole = summarize(outcomes)
    payloads = []
    for shard in (outcomes[:2], outcomes[2:]):  # two "ranks"
        agg = DetectionAggregate()
        for o in shard:
            agg.add(o)
        buf = MetricBuffer()
        add_detection_metrics(buf, agg, prefix="eval_rollout")
        payloads.append(buf.to_payload())
    metrics = finish_detection_metrics(reduce_buffers(payloads), prefix="eval_rollout")
    assert not any("/_f1@" in k for k in metrics)
    assert metrics["eval_rollout/f1_iou50"] == pytest.approx(whole["iou50"]["f1"])
    assert metrics["eval_rollout/precision_iou50"] == pytest.approx(whole["iou50"]["precision"])
    assert metrics["eval_rollout/recall_iou50"] == pytest.approx(whole["iou50"]["recall"])
    assert metrics["eval_rollout/f1_iou50_95"] == pytest.approx(whole["iou50_95"]["f1"])
    assert metrics["eval_rollout/duplicate_rate"] == pytest.approx(whole["rates"]["duplicate_rate"]) == 1 / 3
    assert metrics["eval_rollout/forced_eos_rate"] == pytest.approx(1 / 3)
    assert metrics["eval_rollout/desc_match_iou50"] == 0.0  # no descs given


# ---------------------------------------------------------------- COCO AP (pycocotools)
def _image(gt, pred, w=640, h=480):
    return CocoImage(w, h, [CocoObject(d, b) for d, b in gt], [CocoObject(d, b, s) for d, b, s in pred])


def test_coco_perfect_predictions_give_ap_one():
    images = [_image([("cat", GT_A), ("dog", GT_B)], [("cat", GT_A, 1.0), ("dog", GT_B, 1.0)]),
              _image([("cat", (100, 100, 900, 900))], [("cat", (100, 100, 900, 900), 1.0)], 1024, 768)]
    for mode in ("agnostic", "by_desc"):
        ap = coco_ap(images, mode)
        assert ap["AP"] == pytest.approx(1.0) and ap["AP50"] == pytest.approx(1.0)
        assert ap["AP75"] == pytest.approx(1.0) and ap["AR100"] == pytest.approx(1.0)


def test_coco_known_ranking_single_image():
    # one GT; the false positive outranks the true positive: precision at recall 1 is 1/2
    gt = [("cat", GT_A)]
    assert coco_ap([_image(gt, [("cat", GT_A, 0.8), ("cat", FAR, 0.9)])])["AP"] == pytest.approx(0.5)
    # ranked the other way the FP costs nothing
    assert coco_ap([_image(gt, [("cat", GT_A, 0.9), ("cat", FAR, 0.8)])])["AP"] == pytest.approx(1.0)
    # constant score: ties keep the order the boxes were written in (FP first here)
    assert coco_ap([_image(gt, [("cat", FAR, 1.0), ("cat", GT_A, 1.0)])])["AP"] == pytest.approx(0.5)


def test_coco_known_ranking_two_images():
    # ranking TP (0.9), FP (0.8), TP (0.7) over 2 GTs: precision 1 up to recall 0.5 (51 of COCO's 101
    # recall points), then the interpolated precision 2/3 (50 points)
    images = [_image([("cat", GT_A)], [("cat", GT_A, 0.9), ("cat", FAR, 0.8)]),
              _image([("cat", GT_B)], [("cat", GT_B, 0.7)])]
    ap = coco_ap(images)
    assert ap["AP"] == pytest.approx((51 * 1.0 + 50 * 2 / 3) / 101)
    assert ap["AP50"] == pytest.approx(ap["AP"])


def test_coco_empty_and_undefined():
    no_pred = coco_ap([_image([("cat", GT_A)], [])])
    assert no_pred["AP"] == 0.0 and no_pred["detections"] == 0
    # GT_A on 640x480 is 64 x 48 px: medium; no small or large GT -> those stay undefined
    assert no_pred["APm"] == 0.0 and no_pred["APs"] is None and no_pred["APl"] is None
    no_gt = coco_ap([_image([], [("cat", GT_A, 1.0)])])
    assert no_gt["AP"] is None and no_gt["gt_objects"] == 0


def test_coco_by_desc_counts_unknown_descs():
    images = [_image([("cat", GT_A)], [("tiger", GT_A, 1.0)])]
    assert coco_ap(images)["AP"] == pytest.approx(1.0)  # class-agnostic: the box is right
    by_desc = coco_ap(images, "by_desc")
    assert by_desc["unknown_desc_predictions"] == 1 and by_desc["AP"] == 0.0
    wrong = coco_ap([_image([("cat", GT_A), ("dog", GT_B)], [("dog", GT_A, 1.0)])], "by_desc")
    assert wrong["AP"] == 0.0 and wrong["unknown_desc_predictions"] == 0


# ---------------------------------------------------------------- coordinate-token probability score
TOK = build_test_tokenizer()


def test_rollout_coord_indices_map_prefix_positions_to_generated_tokens():
    text = ('Sure: {"objects": [{"desc": "red square", "bbox_2d": [<|coord_12|>, <|coord_10|>, '
            '<|coord_100|>, '
            '<|coord_98|>]}, {"desc": "dog", "bbox_2d": [<|coord_700|>, <|coord_701|>, <|coord_800|>, '
            '<|coord_802|>]}]}')
    ids, pieces = rollout_tokens(TOK, text)
    parsed = parse_ids(TOK, ids, "desc_first")
    assert parsed.leading_junk and len(parsed.objects) == 2
    slots = rollout_coord_indices(parsed, ids, pieces)
    for obj, idx in zip(parsed.objects, slots):
        assert idx is not None
        assert tuple(TOK.coord_vocab.bin_of(ids[i]) for i in idx) == obj.bbox
    assert rollout_coord_indices(parse_ids(TOK, TOK.encode("no json here"), "desc_first"),
                                 TOK.encode("no json here"), TOK.pieces(TOK.encode("no json here"))) == []


class _FixedLogits(torch.nn.Module):
    """Logits that depend only on the position: position p puts logit log(4) on token (p + 1) % V."""

    def __init__(self, vocab: int = 5):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        b, n = input_ids.shape
        logits = torch.zeros(b, n, self.vocab)
        for p in range(n):
            logits[:, p, (p + 1) % self.vocab] = math.log(4.0)
        return SimpleNamespace(logits=logits + self.dummy)


def test_teacher_forced_scorer_reads_the_probability_of_the_emitted_token():
    # vocab 5: favoured token has probability 4 / (4 + 4 * 1) = 0.5, every other 1/8
    scorer = TeacherForcedScorer(_FixedLogits(), pad_id=0, batch_size=2)
    prompts = [[1, 2], [3], [4, 4, 4]]
    completions = [[2, 0, 4], [2, 2], [0]]
    # generated token k sits at position len(prompt) + k and is scored by the logits one position before
    out = scorer(prompts, completions, [[0, 1, 2], [0, 1], []])
    assert out[0] == pytest.approx([0.5, 0.125, 0.5])
    assert out[1] == pytest.approx([0.125, 0.5])
    assert out[2] == []


def _record(i, pred, gt, **flags):
    return {"sample_id": f"val.jsonl:{i}", "width": 640, "height": 480, "images": [],
            "gt": [{"desc": d, "bbox_2d": list(b)} for d, b in gt],
            "pred": [{"desc": d, "bbox_2d": list(b), "duplicate": False, "coord_probs": None, "score": None}
                     for d, b in pred],
            "matches": {"0.50": [[0, 0, 1.0]] if pred and gt else []}, "invalid_rollout": False,
            "fallback_reason": None, "truncated": False, "leading_junk": False, "forced_eos": False,
            "hit_max_new_tokens": False, "gen_tokens": 12, "dropped": {}, "text": "{...}", **flags}


def test_qualitative_markdown_is_bounded_and_lists_the_parse():
    records = [_record(i, [("cat", GT_A)], [("cat", GT_A), ("dog", GT_B)]) for i in range(12)]
    records[0]["dropped"] = {"wrong_arity": 1}
    records[0]["forced_eos"] = True
    md = qualitative_markdown(records, title="t", limit=8)
    assert md.count("\n## val.jsonl:") == 8
    assert "First 8 of 12 rollouts" in md
    assert "| pred 0 | cat | [0, 0, 100, 100] | TP (GT 0, IoU 1.000) |" in md
    assert "| GT 1 | dog | [200, 200, 300, 300] | FN |" in md
    assert "dropped: wrong_arity x1" in md and "flags: forced_eos" in md
