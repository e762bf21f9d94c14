import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordexp.matching import box_iou, gate_candidates, match_boxes

COSTS = {"top_k": 5, "iou_gate": 0.3, "fp_cost": 0.5, "fn_cost": 2.0}


def test_box_iou_exact_values():
    a = [[0, 0, 10, 10], [0, 0, 0, 10], [20, 20, 30, 30]]
    b = [[5, 5, 15, 15], [0, 0, 10, 10], [0, 0, 0, 10]]
    np.testing.assert_allclose(
        box_iou(a, b),
        [[25 / 175, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
    )
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 3)
    assert box_iou(a, []).shape == (3, 0)
    with pytest.raises(ValueError):
        box_iou([[0, 0, 1]], b)
    with pytest.raises(ValueError):
        box_iou([[0, 0, 1, np.nan]], b)


def test_box_iou_is_symmetric_and_bounded():
    rng = np.random.default_rng(0)
    lo = rng.integers(0, 500, size=(30, 2))
    boxes = np.concatenate([lo, lo + rng.integers(0, 500, size=(30, 2))], axis=1)
    iou = box_iou(boxes, boxes)
    np.testing.assert_allclose(iou, iou.T)
    assert ((iou >= 0) & (iou <= 1)).all()


def test_gate_keeps_top_k_per_prediction_and_counts_rejections():
    iou = np.array([[0.9, 0.5, 0.2, 0.4], [0.1, 0.1, 0.0, 0.35]])
    feasible, rejections, candidates = gate_candidates(iou, top_k=2, iou_gate=0.3)
    # pred 0: top-2 = gt0 (0.9), gt1 (0.5), both pass; gt3 (0.4) is not a candidate: infeasible, not rejected.
    # pred 1: top-2 = gt3 (0.35) then gt0 (0.1, tie with gt1 broken by index) -> one rejection.
    np.testing.assert_array_equal(feasible, [[True, True, False, False], [False, False, False, True]])
    assert (rejections, candidates) == (1, 4)
    _, rejections, candidates = gate_candidates(iou, top_k=10, iou_gate=0.3)
    assert (rejections, candidates) == (4, 8)
    assert gate_candidates(np.zeros((0, 3)), top_k=2, iou_gate=0.3)[1:] == (0, 0)


def test_match_exact_small_case():
    preds = [[0, 0, 10, 10], [100, 100, 110, 110], [50, 50, 60, 60]]
    gts = [[51, 50, 60, 60], [0, 0, 10, 9], [300, 300, 310, 310]]
    result = match_boxes(preds, gts, **COSTS)
    assert [(p.pred_index, p.gt_index) for p in result.pairs] == [(0, 1), (2, 0)]
    assert result.pairs[0].iou == pytest.approx(0.9) and result.pairs[1].iou == pytest.approx(0.9)
    assert result.false_positives == (1,) and result.false_negatives == (2,)
    assert result.index_pairs == [(0, 1), (2, 0)]
    assert result.total_cost == pytest.approx(0.1 + 0.1 + 0.5 + 2.0)
    # Every pred sees all 3 GTs (top_k 5): 3 + 3 + 3 candidates, of which 2 pass the gate.
    assert (result.candidate_pairs, result.gating_rejections) == (9, 7)


def test_below_gate_pairs_never_match_and_empty_sides_work():
    result = match_boxes([[0, 0, 10, 10]], [[5, 0, 15, 10]], **COSTS)  # IoU 1/3 >= 0.3
    assert result.index_pairs == [(0, 0)]
    result = match_boxes([[0, 0, 10, 10]], [[6, 0, 16, 10]], **COSTS)  # IoU 0.25 < 0.3
    assert result.pairs == () and result.false_positives == (0,) and result.false_negatives == (0,)
    assert result.gating_rejections == 1
    result = match_boxes([], [[0, 0, 1, 1]], **COSTS)
    assert result.false_negatives == (0,) and result.total_cost == 2.0
    result = match_boxes([[0, 0, 1, 1]], np.zeros((0, 4)), **COSTS)
    assert result.false_positives == (0,) and result.candidate_pairs == 0


def test_cheap_unmatched_costs_can_beat_a_poor_match():
    # 1 - IoU = 0.6 > fp_cost + fn_cost = 0.4: leaving both unmatched is optimal.
    result = match_boxes([[0, 0, 10, 10]], [[0, 0, 10, 4]], top_k=1, iou_gate=0.1, fp_cost=0.2, fn_cost=0.2)
    assert result.pairs == () and result.total_cost == pytest.approx(0.4)


def test_top_k_limits_candidates():
    preds = [[0, 0, 10, 10]]
    gts = [[0, 0, 10, 10], [0, 0, 10, 9]]
    pred2 = [[0, 0, 10, 10], [0, 0, 10, 10]]
    # The second pred's only candidate (top-1) is gt0, which the first pred takes; gt1 stays unmatched.
    result = match_boxes(pred2, gts, top_k=1, iou_gate=0.3, fp_cost=0.5, fn_cost=2.0)
    assert (
        result.index_pairs == [(0, 0)] and result.false_negatives == (1,) and result.false_positives == (1,)
    )
    result = match_boxes(pred2, gts, top_k=2, iou_gate=0.3, fp_cost=0.5, fn_cost=2.0)
    assert len(result.pairs) == 2
    assert match_boxes(preds, gts, **COSTS).index_pairs == [(0, 0)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": 0},
        {"top_k": 1.5},
        {"iou_gate": 1.5},
        {"iou_gate": -0.1},
        {"fp_cost": -1},
        {"fn_cost": float("inf")},
    ],
)
def test_invalid_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        match_boxes([[0, 0, 1, 1]], [[0, 0, 1, 1]], **{**COSTS, **kwargs})


def brute_force_cost(iou, feasible, fp_cost, fn_cost):
    num_pred, num_gt = iou.shape
    best = fp_cost * num_pred + fn_cost * num_gt
    for size in range(1, min(num_pred, num_gt) + 1):
        for preds in itertools.combinations(range(num_pred), size):
            for gts in itertools.permutations(range(num_gt), size):
                if all(feasible[p, g] for p, g in zip(preds, gts, strict=True)):
                    cost = sum(1 - iou[p, g] for p, g in zip(preds, gts, strict=True))
                    best = min(best, cost + fp_cost * (num_pred - size) + fn_cost * (num_gt - size))
    return best


box = st.tuples(st.integers(0, 8), st.integers(0, 8), st.integers(1, 6), st.integers(1, 6)).map(
    lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]]
)


@settings(max_examples=150, deadline=None)
@given(
    preds=st.lists(box, max_size=5),
    gts=st.lists(box, max_size=5),
    top_k=st.integers(1, 4),
    iou_gate=st.sampled_from([0.0, 0.1, 0.3, 0.5]),
    fp_cost=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    fn_cost=st.sampled_from([0.0, 0.3, 1.0, 2.0]),
)
def test_hungarian_equals_brute_force_optimum(preds, gts, top_k, iou_gate, fp_cost, fn_cost):
    result = match_boxes(preds, gts, top_k=top_k, iou_gate=iou_gate, fp_cost=fp_cost, fn_cost=fn_cost)
    iou = box_iou(preds, gts)
    feasible, rejections, candidates = gate_candidates(iou, top_k=top_k, iou_gate=iou_gate)
    assert result.total_cost == pytest.approx(brute_force_cost(iou, feasible, fp_cost, fn_cost), abs=1e-9)
    assert (result.gating_rejections, result.candidate_pairs) == (rejections, candidates)
    matched_preds = [p.pred_index for p in result.pairs]
    matched_gts = [p.gt_index for p in result.pairs]
    assert len(set(matched_preds)) == len(matched_preds) and len(set(matched_gts)) == len(matched_gts)
    assert all(
        feasible[p.pred_index, p.gt_index] and p.iou == iou[p.pred_index, p.gt_index] for p in result.pairs
    )
    assert sorted(matched_preds + list(result.false_positives)) == list(range(len(preds)))
    assert sorted(matched_gts + list(result.false_negatives)) == list(range(len(gts)))


def test_hundred_by_hundred_matches_jittered_copies():
    rng = np.random.default_rng(1)
    lo = rng.integers(0, 900, size=(100, 2))
    gts = np.concatenate([lo, lo + rng.integers(20, 99, size=(100, 2))], axis=1)
    preds = gts + rng.integers(-2, 3, size=gts.shape)
    result = match_boxes(preds[::-1], gts, **COSTS)
    assert len(result.pairs) == 100
    assert all(p.pred_index == 99 - p.gt_index for p in result.pairs)
