"""Coordinate codec: pixels <-> norm1000 bins <-> `<|coord_k|>` tokens.

The one pixel <-> bin rule of the project (converter, data loader, evaluation and pictures all call these
functions; docs/data.md "Coordinates" states it):

- pixel positions are pixel indices on an axis of ``size`` pixels: 0 is the first pixel, ``size - 1`` the
  last one; a pixel box ``[x1, y1, x2, y2]`` names its first and its last pixel (inclusive);
- bin k in 0..999 stands for the normalized position k/999 (never k/1000):
  pixel -> bin ``k = floor(x * 999 / (size - 1) + 0.5)`` (nearest bin, halves up, clamped to 0..999);
  bin -> pixel ``x = k * (size - 1) / 999``;
- a box maps each corner with that rule; a box whose corners land in one bin is widened to two bins
  (``x2 = x1 + 1``, or ``x1 = 998`` at the far edge) so that ``x2 > x1``;
- COCO boxes ``[x, y, w, h]`` are edge coordinates: the pixel box is ``[x, y, x + w - 1, y + h - 1]``, and
  back ``[x1, y1, x2 - x1 + 1, y2 - y1 + 1]``.

For sizes up to 1000 px every integer pixel survives pixel -> bin -> pixel (rounded) exactly; for sizes
of 1000 px and more every bin survives bin -> pixel (rounded) -> bin exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

NUM_BINS = 1000
MAX_BIN = NUM_BINS - 1

# Exactly these 1000 spellings are coord tokens: no sign, no leading zeros, no spaces.
_BIN_OF_TOKEN = {f"<|coord_{k}|>": k for k in range(NUM_BINS)}


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or size < 2:
        raise ValueError(f"image size must be an int >= 2, got {size!r}")


def _check_bin(k: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 0 <= k <= MAX_BIN:
        raise ValueError(f"coord bin must be an int in [0, {MAX_BIN}], got {k!r}")


def _clamp_bin(k: int) -> int:
    return min(max(k, 0), MAX_BIN)


def _scaled(x: float, size: int) -> float:
    # Multiply before dividing: integer pixels that land exactly on a bin stay exact (no 12.9999 -> 12).
    return x * MAX_BIN / (size - 1)


def pixel_to_bin(x: float, size: int) -> int:
    """Nearest bin of pixel coordinate `x` on an axis of `size` pixels, clamped to [0, 999]."""
    _check_size(size)
    return _clamp_bin(math.floor(_scaled(x, size) + 0.5))


def pixel_box_to_bins(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel box [x1, y1, x2, y2] (inclusive pixel indices) -> bins (x1, y1, x2, y2).

    Each corner goes through :func:`pixel_to_bin`; a box whose corners share a bin is widened by one bin so
    that x2 > x1 and y2 > y1. Raises ValueError for sizes < 2, a wrong length, non-finite values or
    x2 < x1 / y2 < y1."""
    _check_size(width)
    _check_size(height)
    if len(box) != 4:
        raise ValueError(f"box must have 4 values, got {len(box)}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box has non-finite values: {box!r}")
    if x2 < x1 or y2 < y1:
        raise ValueError(f"box must satisfy x2 >= x1 and y2 >= y1, got {box!r}")
    lo_x, hi_x = _nudged(pixel_to_bin(x1, width), pixel_to_bin(x2, width))
    lo_y, hi_y = _nudged(pixel_to_bin(y1, height), pixel_to_bin(y2, height))
    return lo_x, lo_y, hi_x, hi_y


def coco_box_to_pixel_box(xywh: Sequence[float]) -> tuple[float, float, float, float]:
    """COCO ``[x, y, w, h]`` (edges, pixels) -> inclusive pixel box ``[x, y, x + w - 1, y + h - 1]``.

    No validation: callers drop boxes under one pixel (w < 1 or h < 1) before converting."""
    x, y, w, h = (float(v) for v in xywh)
    return x, y, x + w - 1.0, y + h - 1.0


def pixel_box_to_coco_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    """Inclusive pixel box ``[x1, y1, x2, y2]`` -> COCO ``[x, y, w, h]`` (pixels):
    ``[x1, y1, x2 - x1 + 1, y2 - y1 + 1]``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return x1, y1, x2 - x1 + 1.0, y2 - y1 + 1.0


def bins_to_coco_box(bins: Sequence[int], width: int, height: int) -> tuple[float, float, float, float]:
    """Bin box -> COCO ``[x, y, w, h]`` in pixels of a ``width`` x ``height`` image (the inverse of
    :func:`coco_box_to_pixel_box` + :func:`pixel_box_to_bins`)."""
    return pixel_box_to_coco_box(bins_to_pixel_box(bins, width, height))


def _nudged(lo: int, hi: int) -> tuple[int, int]:
    lo, hi = _clamp_bin(lo), _clamp_bin(hi)
    if hi > lo:
        return lo, hi
    if lo < MAX_BIN:
        return lo, lo + 1
    return MAX_BIN - 1, MAX_BIN


def bin_to_norm(k: int) -> float:
    """Bin -> normalized coordinate k/999 in [0, 1]."""
    _check_bin(k)
    return k / MAX_BIN


def bin_to_pixel(k: int, size: int) -> float:
    """Bin -> pixel coordinate k/999 * (size - 1)."""
    _check_bin(k)
    _check_size(size)
    return k * (size - 1) / MAX_BIN


def bins_to_pixel_box(bins: Sequence[int], width: int, height: int) -> tuple[float, float, float, float]:
    """Bin box [x1, y1, x2, y2] -> inclusive pixel box (float pixel indices, each in [0, size - 1])."""
    x1, y1, x2, y2 = bins
    return (
        bin_to_pixel(x1, width),
        bin_to_pixel(y1, height),
        bin_to_pixel(x2, width),
        bin_to_pixel(y2, height),
    )


def bin_to_token(k: int) -> str:
    """Bin -> its token string `<|coord_k|>`."""
    _check_bin(k)
    return f"<|coord_{int(k)}|>"


def token_to_bin(token: str) -> int:
    """Token string `<|coord_k|>` -> k; ValueError on anything else (leading zeros, k > 999, spaces)."""
    k = _BIN_OF_TOKEN.get(token)
    if k is None:
        raise ValueError(f"not a coord token: {token!r}")
    return k


def try_token_to_bin(token: str) -> int | None:
    """Like token_to_bin, but None instead of raising."""
    return _BIN_OF_TOKEN.get(token)


@dataclass(frozen=True)
class CoordVocab:
    """The 1000 coord token ids of a tokenizer, indexed by bin (token_ids[k] is the id of `<|coord_k|>`)."""

    token_ids: tuple[int, ...]
    _bin_of_id: dict[int, int] = field(init=False, repr=False, compare=False)
    _sorted_ids: np.ndarray = field(init=False, repr=False, compare=False)
    _bins_of_sorted: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids = tuple(int(i) for i in self.token_ids)
        if len(ids) != NUM_BINS:
            raise ValueError(f"CoordVocab needs {NUM_BINS} token ids, got {len(ids)}")
        if len(set(ids)) != NUM_BINS:
            raise ValueError("CoordVocab token ids must be distinct")
        if min(ids) < 0:
            raise ValueError("CoordVocab token ids must be >= 0")
        object.__setattr__(self, "token_ids", ids)
        object.__setattr__(self, "_bin_of_id", {tid: k for k, tid in enumerate(ids)})
        order = np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")
        object.__setattr__(self, "_sorted_ids", np.asarray(ids, dtype=np.int64)[order])
        object.__setattr__(self, "_bins_of_sorted", order.astype(np.int64))

    @classmethod
    def from_vocab(cls, vocab: Mapping[str, int]) -> CoordVocab:
        """Build from a token-string -> id mapping (e.g. a tokenizer's get_vocab()); all 1000 must exist."""
        missing = [bin_to_token(k) for k in range(NUM_BINS) if bin_to_token(k) not in vocab]
        if missing:
            raise ValueError(f"vocabulary lacks {len(missing)} coord tokens, first: {missing[0]}")
        return cls(tuple(vocab[bin_to_token(k)] for k in range(NUM_BINS)))

    def bin_of(self, token_id: int) -> int | None:
        """Bin of a token id, or None if it is not a coord token."""
        return self._bin_of_id.get(int(token_id))

    def id_of(self, k: int) -> int:
        """Token id of bin k."""
        _check_bin(k)
        return self.token_ids[k]

    def bins_of(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Bin of each token id (int64 array), -1 where the id is not a coord token."""
        ids = np.asarray(token_ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._sorted_ids, ids), NUM_BINS - 1)
        return np.where(self._sorted_ids[pos] == ids, self._bins_of_sorted[pos], -1)

    def is_coord(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Boolean mask: which of `token_ids` are coord tokens."""
        return self.bins_of(token_ids) >= 0
