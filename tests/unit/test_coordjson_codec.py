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
    bins_to_coco_box,
    bins_to_pixel_box,
    coco_box_to_pixel_box,
    pixel_box_to_bins,
    pixel_box_to_coco_box,
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


def test_pixel_box_rounds_each_corner_with_the_pixel_rule():
    assert pixel_box_to_bins([0, 0, 10, 10], 11, 11) == (0, 0, 999, 999)
    assert pixel_box_to_bins([5, 5, 5, 5], 11, 11) == (500, 500, 501, 501)  # 499.5 -> 500, then widened
    # x: 249.75 -> 250, 724.275 -> 724; y: 49.95 -> 50, 449.55 -> 450
    assert pixel_box_to_bins([2.5, 1, 7.25, 9], 11, 21) == (250, 50, 724, 450)
    for size in (3, 333, 517, 667, 1000, 4000):
        box = [1, 0, size - 1, size // 2]
        want = (pixel_to_bin(1, size), 0, 999, pixel_to_bin(size // 2, size))
        assert pixel_box_to_bins(box, size, size) == want


def test_pixel_bin_pixel_round_trip_is_exact_for_sizes_2_to_1000():
    for size in range(2, 1001):
        xs = np.arange(size)
        bins = np.floor(xs * 999 / (size - 1) + 0.5).astype(int)  # the rule, vectorised
        assert [pixel_to_bin(int(x), size) for x in (0, 1, size // 2, size - 2, size - 1)] == \
            [int(bins[0]), int(bins[1]), int(bins[size // 2]), int(bins[size - 2]), int(bins[size - 1])]
        assert bins[0] == 0 and bins[-1] == 999  # the image edges are bins 0 and 999
        back = np.floor(bins * (size - 1) / 999 + 0.5).astype(int)
        assert (back == xs).all(), size
        assert len(set(bins.tolist())) == size  # distinct pixels stay distinct bins
    for size in (2, 3, 7, 333, 517, 667, 999, 1000):  # the scalar functions agree with the vector rule
        for x in range(size):
            assert math.floor(bin_to_pixel(pixel_to_bin(x, size), size) + 0.5) == x


def test_bin_pixel_bin_round_trip_is_exact_for_sizes_from_1000():
    for size in (1000, 1001, 1333, 2000, 4096):
        for k in range(1000):
            assert pixel_to_bin(round(bin_to_pixel(k, size)), size) == k


def test_coco_boxes_are_edges_and_round_trip_through_bins():
    assert coco_box_to_pixel_box([10, 20, 30, 40]) == (10.0, 20.0, 39.0, 59.0)
    assert pixel_box_to_coco_box((10, 20, 39, 59)) == (10.0, 20.0, 30.0, 40.0)
    # a whole-image box is bins 0..999 and comes back whole, for odd sizes
    for w, h in ((333, 517), (1000, 667), (2, 2)):
        bins = pixel_box_to_bins(coco_box_to_pixel_box([0, 0, w, h]), w, h)
        assert bins == (0, 0, 999, 999)
        assert bins_to_coco_box(bins, w, h) == (0.0, 0.0, float(w), float(h))
    # integer COCO boxes on images up to 1000 px come back exactly
    for x, y, bw, bh in ((0, 0, 1, 1), (332, 516, 1, 1), (17, 3, 100, 250), (5, 400, 328, 117)):
        bins = pixel_box_to_bins(coco_box_to_pixel_box([x, y, bw, bh]), 333, 517)
        if bw > 1 and bh > 1:
            assert tuple(round(v) for v in bins_to_coco_box(bins, 333, 517)) == (x, y, bw, bh)


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
def test_pixel_boxes_give_ordered_bins_at_the_nearest_bin(width, height, fractions):
    x1, x2 = sorted(f * (width - 1) for f in fractions[:2])
    y1, y2 = sorted(f * (height - 1) for f in fractions[2:])
    bx1, by1, bx2, by2 = pixel_box_to_bins([x1, y1, x2, y2], width, height)
    assert 0 <= bx1 < bx2 <= 999 and 0 <= by1 < by2 <= 999
    for lo, hi, a, b, size in ((bx1, bx2, x1, x2, width), (by1, by2, y1, y2, height)):
        half_bin = 0.5 * (size - 1) / 999 * (1 + 1e-9)
        if (lo, hi) == (pixel_to_bin(a, size), pixel_to_bin(b, size)):  # not widened: nearest bins
            assert abs(bin_to_pixel(lo, size) - a) <= half_bin and abs(bin_to_pixel(hi, size) - b) <= half_bin
        else:  # both corners fell into one bin; the box was widened by one bin
            assert pixel_to_bin(a, size) == pixel_to_bin(b, size) and hi == lo + 1
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


def test_channel_b_pages_example_imports_what_it_uses():
    """docs/channel_b.md's snippet: every name it uses from coordexp is imported by its own import lines."""
    import re

    from tests.conftest import REPO_ROOT

    text = (REPO_ROOT / "docs" / "channel_b.md").read_text()
    snippet = text[text.index("```python\n") + 10:]
    snippet = snippet[:snippet.index("```")]
    imports = "\n".join(line for line in snippet.splitlines() if line.startswith("from coordexp"))
    scope: dict = {}
    exec(imports, scope)  # noqa: S102 - the page's own import lines
    names = {"parse_rollout", "build_channel_b_target", "match_boxes", "TargetInvariantError"}
    assert {n for n in names if re.search(rf"\b{n}\(|except {n}\b", snippet)} == names  # the page uses them
    assert names <= scope.keys()


def test_a_pixel_box_takes_the_nearest_bin_of_each_corner():
    """As docs/channel_b.md and docs/data.md say: the nearest bin per corner (not floor / ceil), widened."""
    assert pixel_box_to_bins((10.4, 10.4, 20.4, 20.4), 100, 100) == (105, 105, 206, 206)  # floor: 104
    assert pixel_box_to_bins((999, 5, 999, 5), 1000, 1000) == (998, 5, 999, 6)
