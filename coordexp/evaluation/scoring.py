"""Scoring rollouts for evaluation: per-sample ``predictions.jsonl`` records (GT, parsed predictions,
matches per IoU threshold, duplicate flags, scores, parse flags, rollout text), the detection aggregate, and
the optional coordinate-token probability score (:class:`TeacherForcedScorer`: one teacher-forced forward
pass over prompt + rollout tokens; torch is imported only when it runs)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from coordexp.coordjson import TokenFrame
from coordexp.evaluation.detection import (
    IOU_THRESHOLDS,
    DetectionAggregate,
    MatchSettings,
    SampleOutcome,
    ThresholdMatch,
    threshold_key,
)
from coordexp.rollout.scoring import score_rollout

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
        import torch  # only when scoring runs: the report and its files need no torch

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


def score_rollouts(samples: Sequence, rollouts: Sequence, adapter, contract, *,
                   scorer: Scorer | None = None, thresholds: Sequence[float] = IOU_THRESHOLDS,
                   scored: Sequence | None = None
                   ) -> tuple[list[dict[str, Any]], DetectionAggregate, dict[str, int]]:
    """Parse, match and (optionally) score rollouts: (records, aggregate, training-gate counts).

    ``scored`` may pass ``score_rollout``'s (parsed, gts, match) per rollout when the caller has them."""
    if scored is None:
        scored = [score_rollout(s, r, adapter, contract) for s, r in zip(samples, rollouts)]
    settings = match_settings(contract)
    pieces = [adapter.text_pieces(r.token_ids) for r in rollouts]  # exact text: written to predictions
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
