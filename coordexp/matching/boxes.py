"""Exact axis-aligned box IoU, vectorized."""

from __future__ import annotations

import numpy as np


def as_boxes(boxes: object) -> np.ndarray:
    """(N, 4) float64 array of [x1, y1, x2, y2] boxes; an empty input gives shape (0, 4)."""
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return array.reshape(0, 4)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("boxes must be finite")
    return array


def box_iou(boxes_a: object, boxes_b: object) -> np.ndarray:
    """(N, M) IoU of [x1, y1, x2, y2] boxes (continuous areas; a zero-area box has IoU 0 with anything)."""
    a, b = as_boxes(boxes_a), as_boxes(boxes_b)
    width = np.clip(
        np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None
    )
    height = np.clip(
        np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None
    )
    intersection = width * height
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)
