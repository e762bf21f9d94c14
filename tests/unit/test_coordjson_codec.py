import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordexp.coordjson import (
    CoordVocab,
    bin_to_norm,
    bin_to_pixel,
    bin_to_token,
    bins_to_pixel_box,
    pixel_box_to_bins,
    pixel_to_bin,
    token_to_bin,
    try_token_to_bin,
)


def test_pixel_to_bin_uses_size_minus_one_and_rounds_to_nearest():
    assert pixel_to_bin(0, 640) == 0
    assert pixel_to_bin(639, 640) == 999
    assert pixel_to_bin(1, 1000) == 1
    assert pixel_to_bin(5, 11) == 500  # 499.5 rounds half up
    assert pixel_to_bin(4.9, 11) == 490  # 489.51
    assert pixel_to_bin(-3, 100) == 0
    assert pixel_to_bin(5000, 100) == 999


def test_pixel_box_floors_the_start_and_ceils_the_end():
    assert pixel_box_to_bins([0, 0, 10, 10], 11, 11) == (0, 0, 999, 999)
    assert pixel_box_to_bins([5, 5, 5, 5], 11, 11) == (499, 499, 500, 500)
    assert pixel_box_to_bins([2.5, 1, 7.25, 9], 11, 21) == (249, 49, 725, 450)


def test_pixel_box_nudges_degenerate_boxes_and_clamps():
    assert pixel_box_to_bins([3, 3, 3, 3], 1000, 1000) == (3, 3, 4, 4)
    assert pixel_box_to_bins([999, 999, 999, 999], 1000, 1000) == (998, 998, 999, 999)
    assert pixel_box_to_bins([-5, -5, 2000, 2000], 1000, 1000) == (0, 0, 999, 999)
    assert pixel_box_to_bins([1500, 10, 1600, 20], 1000, 1000) == (998, 10, 999, 20)


@pytest.mark.parametrize(
    "box, size",
    [([5, 5, 4, 6], 100), ([1, 2, 3], 100), ([0, 0, 1, float("nan")], 100), ([0, 0, 1, 1], 1)],
)
def test_pixel_box_rejects_bad_input(box, size):
    with pytest.raises(ValueError):
        pixel_box_to_bins(box, size, size)


def test_bin_decoding_divides_by_999_never_1000():
    assert bin_to_norm(0) == 0.0
    assert bin_to_norm(999) == 1.0
    assert bin_to_norm(500) == 500 / 999
    assert bin_to_pixel(999, 640) == 639.0
    assert bin_to_pixel(0, 640) == 0.0
    assert bins_to_pixel_box((0, 999, 999, 999), 11, 21) == (0.0, 20.0, 10.0, 20.0)
    for bad in (-1, 1000, 1.5, True):
        with pytest.raises(ValueError):
            bin_to_norm(bad)


def test_token_strings_round_trip_for_every_bin():
    for k in range(1000):
        assert token_to_bin(bin_to_token(k)) == k
    assert bin_to_token(7) == "<|coord_7|>"


@pytest.mark.parametrize(
    "text",
    [
        "<|coord_1000|>",
        "<|coord_01|>",
        "<|coord_-1|>",
        " <|coord_1|>",
        "<|coord_1|> ",
        "<|coord_|>",
        "coord_1",
    ],
)
def test_token_to_bin_is_strict(text):
    with pytest.raises(ValueError):
        token_to_bin(text)
    assert try_token_to_bin(text) is None


@settings(max_examples=200, deadline=None)
@given(k=st.integers(0, 999), size=st.integers(1000, 5000))
def test_bin_pixel_bin_round_trip(k, size):
    assert pixel_to_bin(bin_to_pixel(k, size), size) == k


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(2, 4000),
    height=st.integers(2, 4000),
    fractions=st.lists(st.floats(0, 1), min_size=4, max_size=4),
)
def test_pixel_boxes_give_ordered_bins_that_cover_the_box(width, height, fractions):
    x1, x2 = sorted(f * (width - 1) for f in fractions[:2])
    y1, y2 = sorted(f * (height - 1) for f in fractions[2:])
    bx1, by1, bx2, by2 = pixel_box_to_bins([x1, y1, x2, y2], width, height)
    assert 0 <= bx1 < bx2 <= 999 and 0 <= by1 < by2 <= 999
    tolerance = 1e-9 * max(width, height)
    assert bin_to_pixel(bx1, width) <= x1 + tolerance and bin_to_pixel(bx2, width) >= x2 - tolerance
    assert bin_to_pixel(by1, height) <= y1 + tolerance and bin_to_pixel(by2, height) >= y2 - tolerance
    assert math.isfinite(bin_to_norm(bx2))


def test_coord_vocab_maps_ids_and_bins_both_ways():
    vocab = {f"<|coord_{k}|>": 5000 - k for k in range(1000)}
    vocab["hello"] = 3
    coords = CoordVocab.from_vocab(vocab)
    assert coords.id_of(0) == 5000 and coords.id_of(999) == 4001
    assert coords.bin_of(4001) == 999 and coords.bin_of(3) is None
    np.testing.assert_array_equal(coords.bins_of([5000, 3, 4500, 99999, -7]), [0, -1, 500, -1, -1])
    np.testing.assert_array_equal(coords.is_coord([4001, 4000]), [True, False])


def test_coord_vocab_rejects_incomplete_or_duplicate_ids():
    with pytest.raises(ValueError, match="lacks 1 coord tokens"):
        CoordVocab.from_vocab({f"<|coord_{k}|>": k for k in range(999)})
    with pytest.raises(ValueError, match="distinct"):
        CoordVocab(tuple([0] * 1000))
    with pytest.raises(ValueError, match="needs 1000"):
        CoordVocab((1, 2, 3))
