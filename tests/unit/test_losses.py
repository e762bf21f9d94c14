"""Loss math: weighted CE positions, expectation decode, CIoU, geometry losses, collation."""

import math

import pytest
import torch

from coordexp.trainer.batch import APPENDED, PREFIX, TrainSequence, collate
from coordexp.trainer.losses import (
    ciou,
    coord_distribution,
    coord_gate,
    expected_coords,
    geometry_losses,
    slot_logits,
    weighted_token_ce,
)


def test_weighted_ce_uses_previous_position_logits_and_weights():
    vocab = 5
    logits = torch.zeros(1, 4, vocab)
    logits[0, 1, 3] = 10.0  # position 1 predicts token at position 2
    input_ids = torch.tensor([[0, 1, 3, 4]])
    weights = torch.tensor([[0.0, 0.0, 2.0, 0.0]])
    ce = weighted_token_ce(logits, input_ids, weights)
    expected = -torch.log_softmax(logits[0, 1], -1)[3]
    assert ce.item() == pytest.approx(expected.item())


def test_weighted_ce_is_zero_without_weights_and_keeps_the_graph():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    ce = weighted_token_ce(logits, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))
    assert ce.item() == 0.0
    ce.backward()
    assert logits.grad is not None


def test_expectation_of_split_mass_is_the_midpoint():
    probs = torch.zeros(1, 1000)
    probs[0, 0] = probs[0, 999] = 0.5
    assert expected_coords(probs).item() == pytest.approx(0.5)
    one_hot = torch.zeros(1, 1000)
    one_hot[0, 333] = 1.0
    assert expected_coords(one_hot).item() == pytest.approx(333 / 999)


def test_ciou_identity_and_disjoint():
    box = torch.tensor([[0.1, 0.2, 0.5, 0.6]])
    assert ciou(box, box).item() == pytest.approx(1.0, abs=1e-5)
    far = torch.tensor([[0.7, 0.7, 0.9, 0.9]])
    value = ciou(far, box).item()
    assert value < 0  # no overlap: IoU 0 minus the centre-distance penalty
    # canonicalization: swapped corners give the same result
    assert ciou(torch.tensor([[0.5, 0.6, 0.1, 0.2]]), box).item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("pred, target, expected", [
    # partial overlap of two squares (aspect term 0): IoU 1/7, centre distance^2 2, enclosing diagonal^2 18
    ((0, 0, 2, 2), (1, 1, 3, 3), 1 / 7 - 2 / 18),
    # aspect ratio 2:1 vs 1:1: IoU 1/2, rho^2/c^2 = 1/20, v = 4/pi^2 (atan 1 - atan 2)^2 = 0.0419565,
    # alpha = v / (1 - IoU + v) = 0.0774167
    ((0, 0, 4, 2), (0, 0, 2, 2), 0.446751870701443),
    # disjoint, aspect 1:3 vs 1:1: rho^2 = 6.5, c^2 = 25, v = 0.0871237, alpha = v / (1 + v) = 0.0801415
    ((3, 0, 4, 3), (0, 0, 2, 2), -0.266982221586772),
])
def test_ciou_matches_hand_computed_reference_values(pred, target, expected):
    """CIoU = IoU - rho^2(b, b_gt) / c^2 - alpha v (Zheng et al., AAAI 2020, "Distance-IoU Loss"), values
    worked out by hand on boxes in units of 1/4 (CIoU is scale invariant)."""
    scaled = [torch.tensor([[v / 4 for v in box]], dtype=torch.float64) for box in (pred, target)]
    assert ciou(*scaled).item() == pytest.approx(expected, abs=1e-6)


def test_geometry_losses_on_exact_prediction():
    bins = torch.tensor([[100, 200, 300, 400]])
    probs = torch.zeros(1, 4, 1000)
    probs[0, torch.arange(4), bins[0]] = 1.0
    sl1, ciou_loss, coord_ce = geometry_losses(probs, bins, smoothl1_beta=0.05)
    assert sl1.item() == pytest.approx(0.0, abs=1e-7)
    assert ciou_loss.item() == pytest.approx(0.0, abs=1e-5)
    assert coord_ce.item() == pytest.approx(0.0, abs=1e-6)


def test_coord_distribution_reads_the_logits_before_each_slot():
    logits = torch.zeros(1, 6, 1010)
    coord_ids = torch.arange(10, 1010)
    logits[0, 2, 10 + 7] = 50.0  # slot at position 3 is predicted by position 2 -> bin 7
    slots = torch.tensor([[[0, 3], [0, 4], [0, 5], [0, 5]]])
    probs = coord_distribution(slot_logits(logits, slots), coord_ids)
    assert probs.shape == (1, 4, 1000)
    assert probs[0, 0].argmax().item() == 7
    assert math.isclose(probs[0, 1].max().item(), 1 / 1000, rel_tol=1e-4)


def test_collate_places_targets_after_prompts():
    a = TrainSequence([1, 2], [5, 6, 7], [1.0, 0.0, 1.0], [(0, 1, 2, 2)], [(1, 2, 3, 4)], [PREFIX])
    b = TrainSequence([1], [8], [1.0], [(0, 0, 0, 0)], [(5, 6, 7, 8)], [APPENDED])
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 5, 6, 7], [1, 8, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["ce_weights"].tolist() == [[0, 0, 1, 0, 1], [0, 1, 0, 0, 0]]
    assert batch["geometry_slots"].tolist() == [[[0, 2], [0, 3], [0, 4], [0, 4]],
                                                [[1, 1], [1, 1], [1, 1], [1, 1]]]
    assert batch["geometry_bins"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert batch["geometry_kinds"].tolist() == [PREFIX, APPENDED]


def test_collate_without_geometry():
    batch = collate([TrainSequence([1], [2], [1.0])], pad_id=0)
    assert batch["geometry_slots"].shape == (0, 4, 2)
    assert batch["geometry_bins"].shape == (0, 4)


def test_coord_gate_is_minus_log_mass_on_coordinate_tokens():
    logits = torch.zeros(1, 1, 4, 8)  # [N, 4 slots, V]: uniform over 8 tokens, 2 of them coordinates
    coord_ids = torch.tensor([6, 7])
    assert coord_gate(logits[0].unsqueeze(0), coord_ids).item() == pytest.approx(math.log(4))
