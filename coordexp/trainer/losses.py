"""Stage-2 losses: weighted token CE (never on coordinate tokens) and geometry losses on
expectation-decoded coordinates (softmax over the 1000 coordinate logits -> sum_k p_k * k/999).

The step loss is one definition, packed or not (:func:`sample_losses`): the mean over the step's samples of
each sample's token-weighted CE plus its box-mean geometry terms. Coordinates, probabilities and every
geometry term are computed in float32 whatever the autocast dtype (``training.precision`` bf16/fp16): the
logits slices are cast with ``.float()`` (:func:`slot_logits`, the token CE) and :func:`sample_losses` runs
with autocast disabled (:func:`fp32_region`), so an autocast region around it cannot turn the expectation
decode's matmul or the CIoU arithmetic back into half precision (tests/unit/test_precision.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from coordexp.coordjson import NUM_BINS
from coordexp.trainer.kept_logits import predicting_logits


def fp32_region(device: torch.device) -> torch.autocast:
    """A region where autocast is off for ``device``'s type: tensors cast to float32 stay float32."""
    return torch.autocast(device_type=device.type, enabled=False)


def token_ce_per_segment(logits: torch.Tensor, input_ids: torch.Tensor, weights: torch.Tensor,
                         segment_ids: torch.Tensor, n_segments: int,
                         positions: torch.Tensor | None = None) -> torch.Tensor:
    """Per segment: sum_p w_p * CE(logits[p-1], input_ids[p]) / sum_p w_p over the segment's positions (0
    for a segment without a weighted position): ``[n_segments]``.

    logits [B, T, V], or [B, K, V] at ``positions [K]`` (coordexp.trainer.kept_logits: the positions that
    predict the supervised tokens); input_ids / weights / segment_ids [B, T] (weights and segment ids
    aligned with input_ids: the weight of predicting that token, the segment it belongs to)."""
    if positions is None:
        pred, nxt = logits[:, :-1, :].float(), slice(1, None)
    else:
        pred, nxt = logits.float(), positions + 1
    target = input_ids[:, nxt]
    w = weights[:, nxt].to(pred.dtype)
    seg = segment_ids[:, nxt]
    mask = w > 0
    zeros = pred.new_zeros(n_segments)
    if not bool(mask.any()):
        return zeros + pred.sum() * 0.0
    ce = F.cross_entropy(pred[mask], target[mask], reduction="none")
    num = zeros.index_add(0, seg[mask], ce * w[mask])
    den = zeros.detach().index_add(0, seg[mask], w[mask])
    return torch.where(den > 0, num / den.clamp(min=1e-12), zeros)


def weighted_token_ce(logits: torch.Tensor, input_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_p w_p * CE(logits[p-1], input_ids[p]) / sum_p w_p over the whole batch (0 when no position is
    weighted): :func:`token_ce_per_segment` with one segment."""
    return token_ce_per_segment(logits, input_ids, weights, torch.zeros_like(input_ids), 1)[0]


def slot_logits(logits: torch.Tensor, slot_positions: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
    """Full-vocabulary logits that predict each coordinate slot: [N, 4, V].

    slot_positions [N, 4, 2] holds (batch row, sequence position) of each coordinate token; logits
    [B, T, V], or [B, K, V] at ``positions [K]`` (coordexp.trainer.kept_logits).
    """
    rows, targets = slot_positions[..., 0].reshape(-1), slot_positions[..., 1].reshape(-1)
    picked = predicting_logits(logits, rows, targets, positions)
    return picked.reshape(*slot_positions.shape[:2], logits.shape[-1]).float()


def coord_distribution(slot_logits_: torch.Tensor, coord_token_ids: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """Softmax over the coordinate sub-vocabulary at each slot: [N, 4, 1000]."""
    return torch.softmax(slot_logits_[..., coord_token_ids] / temperature, dim=-1)


def coord_gate_terms(slot_logits_: torch.Tensor, coord_token_ids: torch.Tensor) -> torch.Tensor:
    """Per box, the mean over its 4 slots of -log P(any coordinate token) = logsumexp(all) -
    logsumexp(coord): ``[N]``."""
    coord = torch.logsumexp(slot_logits_[..., coord_token_ids], -1)
    return (torch.logsumexp(slot_logits_, -1) - coord).mean(-1)


def coord_gate(slot_logits_: torch.Tensor, coord_token_ids: torch.Tensor) -> torch.Tensor:
    """Mean of -log P(any coordinate token) at the slots (0 without slots)."""
    if slot_logits_.shape[0] == 0:
        return slot_logits_.sum() * 0.0
    return coord_gate_terms(slot_logits_, coord_token_ids).mean()


def expected_coords(probs: torch.Tensor) -> torch.Tensor:
    """Expectation decode in [0, 1]: sum_k p_k * k/999 (never /1000)."""
    bins = torch.arange(NUM_BINS, device=probs.device, dtype=probs.dtype) / (NUM_BINS - 1)
    return probs @ bins


def ciou(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU of boxes [N, 4] (x1, y1, x2, y2) in [0, 1]; prediction canonicalized (min/max)."""
    px1, px2 = torch.minimum(pred[:, 0], pred[:, 2]), torch.maximum(pred[:, 0], pred[:, 2])
    py1, py2 = torch.minimum(pred[:, 1], pred[:, 3]), torch.maximum(pred[:, 1], pred[:, 3])
    tx1, ty1, tx2, ty2 = target.unbind(-1)
    inter = (torch.minimum(px2, tx2) - torch.maximum(px1, tx1)).clamp(min=0) * \
            (torch.minimum(py2, ty2) - torch.maximum(py1, ty1)).clamp(min=0)
    pw, ph, tw, th = px2 - px1, py2 - py1, tx2 - tx1, ty2 - ty1
    union = pw * ph + tw * th - inter
    iou = inter / (union + eps)
    center_dist = ((px1 + px2 - tx1 - tx2) ** 2 + (py1 + py2 - ty1 - ty2) ** 2) / 4
    diag = (torch.maximum(px2, tx2) - torch.minimum(px1, tx1)) ** 2 + \
           (torch.maximum(py2, ty2) - torch.minimum(py1, ty1)) ** 2
    v = (4 / torch.pi ** 2) * (torch.atan(tw / (th + eps)) - torch.atan(pw / (ph + eps))) ** 2
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return iou - center_dist / (diag + eps) - alpha * v


def geometry_terms(probs: torch.Tensor, target_bins: torch.Tensor, smoothl1_beta: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per box: (SmoothL1 mean over its 4 coordinates, 1 - CIoU, coordinate CE mean over its 4 slots), each
    ``[N]``, from coordinate distributions [N, 4, 1000] and target bins [N, 4]."""
    pred = expected_coords(probs)
    target = target_bins.to(pred.dtype) / (NUM_BINS - 1)
    smooth_l1 = F.smooth_l1_loss(pred, target, beta=smoothl1_beta, reduction="none").mean(-1)
    ciou_loss = 1 - ciou(pred, target)
    coord_ce = -torch.log(probs.gather(-1, target_bins.long().unsqueeze(-1)).squeeze(-1) + 1e-9).mean(-1)
    return smooth_l1, ciou_loss, coord_ce


def geometry_losses(probs: torch.Tensor, target_bins: torch.Tensor, smoothl1_beta: float):
    """(SmoothL1, 1 - CIoU, coordinate CE) means over boxes, from coordinate distributions [N, 4, 1000]
    and target bins [N, 4]."""
    if probs.shape[0] == 0:
        zero = probs.sum() * 0.0
        return zero, zero, zero
    return tuple(t.mean() for t in geometry_terms(probs, target_bins, smoothl1_beta))


def _segment_mean(values: torch.Tensor, segments: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Mean of per-box ``values [N]`` within each segment (0 for a segment without boxes)."""
    zeros = values.new_zeros(n_segments)
    total = zeros.index_add(0, segments, values)
    count = zeros.detach().index_add(0, segments, torch.ones_like(values.detach()))
    return torch.where(count > 0, total / count.clamp(min=1), zeros)


def sample_losses(ce_logits: torch.Tensor, geo_logits: torch.Tensor, batch: dict, coord_ids: torch.Tensor,
                  n_segments: int, *, temperature: float, smoothl1_beta: float,
                  ce_positions: torch.Tensor | None = None, geo_positions: torch.Tensor | None = None
                  ) -> dict[str, torch.Tensor]:
    """Every loss term per sample (segment), each ``[n_segments]``: ``ce`` (token-weighted CE from
    ``ce_logits``), and from ``geo_logits`` the box means ``bbox_smoothl1``, ``bbox_ciou`` (1 - CIoU),
    ``coord_ce`` and ``coord_gate``. ``batch`` carries ``input_ids``, ``ce_weights``, ``segment_ids``,
    ``geometry_slots``, ``geometry_bins`` and ``geometry_segments`` (collate or pack). Logits are
    ``[B, T, V]``, or ``[B, K, V]`` at ``ce_positions`` / ``geo_positions`` (coordexp.trainer.kept_logits).
    Every term is float32 (computed in :func:`fp32_region` from float32 slices of the logits)."""
    with fp32_region(geo_logits.device):
        ce = token_ce_per_segment(ce_logits, batch["input_ids"], batch["ce_weights"], batch["segment_ids"],
                                  n_segments, ce_positions)
        slots = slot_logits(geo_logits, batch["geometry_slots"], geo_positions)
        probs = coord_distribution(slots, coord_ids, temperature)
        sl1, ciou_loss, coord_ce = geometry_terms(probs, batch["geometry_bins"], smoothl1_beta)
        gate = coord_gate_terms(slots, coord_ids)
        seg = batch["geometry_segments"]
        out = {"ce": ce}
        for name, per_box in (("bbox_smoothl1", sl1), ("bbox_ciou", ciou_loss), ("coord_ce", coord_ce),
                              ("coord_gate", gate)):
            out[name] = _segment_mean(per_box, seg, n_segments)
        return out
