"""Stage-2 losses: weighted token CE (never on coordinate tokens) and geometry losses on
expectation-decoded coordinates (softmax over the 1000 coordinate logits -> sum_k p_k * k/999)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from coordexp.coordjson import NUM_BINS


def weighted_token_ce(logits: torch.Tensor, input_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_p w_p * CE(logits[p-1], input_ids[p]) / sum_p w_p (0 when no position is weighted).

    logits [B, T, V], input_ids [B, T], weights [B, T] aligned with input_ids (weight of predicting it).
    """
    pred = logits[:, :-1, :].float()
    target = input_ids[:, 1:]
    w = weights[:, 1:].to(pred.dtype)
    mask = w > 0
    if not bool(mask.any()):
        return pred.sum() * 0.0
    ce = F.cross_entropy(pred[mask], target[mask], reduction="none")
    return (ce * w[mask]).sum() / w[mask].sum()


def slot_logits(logits: torch.Tensor, slot_positions: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits that predict each coordinate slot: [N, 4, V].

    slot_positions [N, 4, 2] holds (batch row, sequence position) of each coordinate token.
    """
    return logits[slot_positions[..., 0], slot_positions[..., 1] - 1].float()


def coord_distribution(slot_logits_: torch.Tensor, coord_token_ids: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """Softmax over the coordinate sub-vocabulary at each slot: [N, 4, 1000]."""
    return torch.softmax(slot_logits_[..., coord_token_ids] / temperature, dim=-1)


def coord_gate(slot_logits_: torch.Tensor, coord_token_ids: torch.Tensor) -> torch.Tensor:
    """Mean of -log P(any coordinate token) at the slots: logsumexp(all) - logsumexp(coord)."""
    if slot_logits_.shape[0] == 0:
        return slot_logits_.sum() * 0.0
    return (torch.logsumexp(slot_logits_, -1)
            - torch.logsumexp(slot_logits_[..., coord_token_ids], -1)).mean()


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


def geometry_losses(probs: torch.Tensor, target_bins: torch.Tensor, smoothl1_beta: float):
    """(SmoothL1, 1 - CIoU, coordinate CE) means over boxes, from coordinate distributions [N, 4, 1000]
    and target bins [N, 4]."""
    if probs.shape[0] == 0:
        zero = probs.sum() * 0.0
        return zero, zero, zero
    pred = expected_coords(probs)
    target = target_bins.to(pred.dtype) / (NUM_BINS - 1)
    smooth_l1 = F.smooth_l1_loss(pred, target, beta=smoothl1_beta)
    ciou_loss = (1 - ciou(pred, target)).mean()
    coord_ce = -torch.log(probs.gather(-1, target_bins.long().unsqueeze(-1)).squeeze(-1) + 1e-9).mean()
    return smooth_l1, ciou_loss, coord_ce
