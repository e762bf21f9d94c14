import dataclasses
import random

import numpy as np
import pytest
from _bpe import (
    KINDS,
    bboxes,
    build_test_tokenizer,
    corrupted_record,
    descs,
    orders,
    parse_ids,
    parse_text,
    tokenizer_fns,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordexp.coordjson import (
    CONTAINER_HEADER,
    CoordObject,
    FieldOrder,
    TargetInvariantError,
    TokenRole,
    build_channel_a_target,
    build_channel_b_target,
    canonical_order,
    role_ce_weights,
    serialize_record,
)
from coordexp.matching import match_boxes

TOK = build_test_tokenizer()
FNS = tokenizer_fns(TOK)
COSTS = {"top_k": 5, "iou_gate": 0.3, "fp_cost": 0.5, "fn_cost": 2.0}

ROLLOUT = (
    '{"objects": ['
    '{"desc": "red square", "bbox_2d": [<|coord_12|>, <|coord_10|>, <|coord_100|>, <|coord_98|>]}, '
    '{"desc": "dog", "bbox_2d": [<|coord_700|>, <|coord_700|>, <|coord_800|>, <|coord_800|>]}, '
    '{"desc": "tree", "bbox_2d": [<|coord_5|>, <|coord_6|>]}]}'
)
GT = [CoordObject("cat", (500, 500, 600, 600)), CoordObject("red square", (10, 10, 100, 100))]

H, M, D, C, F, I, A, AD, CL, E = (
    TokenRole.PREFIX_HEADER,
    TokenRole.MATCHED_STRUCTURE,
    TokenRole.MATCHED_DESC,
    TokenRole.COORD,
    TokenRole.UNMATCHED_PREDICTION,
    TokenRole.INVALID_RECORD,
    TokenRole.APPENDED_STRUCTURE,
    TokenRole.APPENDED_DESC,
    TokenRole.CLOSURE,
    TokenRole.EOS,
)
KEY = ['",', ' "', "bbox", "_", "2", "d", '":', " ["]
COMMA = [",", " "]


def record_pieces(open_piece, desc, coords, close_piece):
    """Pieces of a desc_first record as this tokenizer splits it."""
    middle = (
        [coords[0], *COMMA, coords[1], *COMMA, coords[2], *COMMA, coords[3]]
        if len(coords) == 4
        else [coords[0], *COMMA, coords[1]]
    )
    return [open_piece, "desc", '":', ' "', *desc, *KEY, *middle, close_piece]


def record_roles(structure, desc_role, num_desc, num_coords):
    coords = [C] + [structure, structure, C] * (num_coords - 1)
    return [structure] * 4 + [desc_role] * num_desc + [structure] * len(KEY) + coords + [structure]


def parse_and_match(text, gt, order="desc_first"):
    parsed = parse_text(TOK, text, order)
    match = match_boxes([o.bbox for o in parsed.objects], [g.bbox for g in gt], **COSTS)
    return parsed, match


def test_one_matched_one_fp_one_invalid_one_missing_gt_exact_supervision():
    parsed, match = parse_and_match(ROLLOUT, GT)
    assert match.index_pairs == [(0, 1)] and match.false_positives == (1,) and match.false_negatives == (0,)
    assert parsed.drop_counts["wrong_arity"] == 1
    target = build_channel_b_target(
        parsed, GT, match.index_pairs, field_order="desc_first", desc_ce_weight=0.5, **FNS
    )

    coord = "<|coord_{}|>".format
    expected_pieces = (
        ['{"', "objects", '":']
        + record_pieces(' [{"', ["red", " square"], [coord(12), coord(10), coord(100), coord(98)], "]},")
        + record_pieces(' {"', ["dog"], [coord(700), coord(700), coord(800), coord(800)], "]},")
        + record_pieces(' {"', ["tree"], [coord(5), coord(6)], "]}")  # re-encoded out of the fused ']}]}'
        + [","]
        + record_pieces(' {"', ["cat"], [coord(500), coord(500), coord(600), coord(600)], "]}]}")
        + ["<|im_end|>"]
    )
    expected_roles = (
        [H, H, H]
        + record_roles(M, D, 2, 4)
        + record_roles(F, F, 1, 4)
        + record_roles(I, I, 1, 2)
        + [A]
        + record_roles(A, AD, 1, 4)[:-1]
        + [CL]
        + [E]
    )
    assert list(target.pieces) == expected_pieces
    assert [TokenRole(r) for r in target.roles] == expected_roles
    # The exact CE weight vector, record by record.
    matched = [1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1]
    fp = [0] * 24
    invalid = [0] * 18
    appended = [1, 1, 1, 1, 1, 0.5, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1]
    np.testing.assert_array_equal(target.ce_weights, [0, 0, 0] + matched + fp + invalid + appended + [1])
    assert target.ce_weights.dtype == np.float32 and target.input_ids.dtype == np.int64

    (matched_group, appended_group) = target.geometry_groups
    assert matched_group == dataclasses.replace(
        matched_group, positions=(17, 20, 23, 26), gt_bins=(10, 10, 100, 100), gt_index=1, pred_index=0
    )
    assert appended_group.positions == (84, 87, 90, 93) and appended_group.gt_bins == (500, 500, 600, 600)
    assert appended_group.gt_index == 0 and appended_group.pred_index is None
    assert target.prefix_len == 70 and target.closure_position == 94 and target.eos_position == 95
    assert target.appended_gt_indices == (0,)
    assert list(target.input_ids[:70]) == list(parsed.prefix_ids) and target.input_ids[-1] == TOK.eos_id


def test_invalid_drop_multiplier_scales_only_non_desc_tail_weights():
    parsed, match = parse_and_match(ROLLOUT, GT)
    plain = build_channel_b_target(
        parsed, GT, match.index_pairs, field_order="desc_first", desc_ce_weight=0.5, **FNS
    )
    scaled = build_channel_b_target(
        parsed,
        GT,
        match.index_pairs,
        field_order="desc_first",
        desc_ce_weight=0.5,
        drop_invalid_struct_ce_multiplier=2.5,
        **FNS,
    )
    np.testing.assert_array_equal(plain.roles, scaled.roles)
    tail_structure = np.isin(scaled.roles, [A, CL, E])
    np.testing.assert_array_equal(scaled.ce_weights[tail_structure], 2.5)
    np.testing.assert_array_equal(scaled.ce_weights[~tail_structure], plain.ce_weights[~tail_structure])
    assert scaled.ce_weights[scaled.roles == AD].tolist() == [0.5]

    clean = ROLLOUT.replace(', {"desc": "tree", "bbox_2d": [<|coord_5|>, <|coord_6|>]}', "")
    parsed, match = parse_and_match(clean, GT)
    assert parsed.num_dropped == 0
    kwargs = dict(field_order="desc_first", desc_ce_weight=0.5, **FNS)
    unscaled = build_channel_b_target(
        parsed, GT, match.index_pairs, drop_invalid_struct_ce_multiplier=4.0, **kwargs
    )
    np.testing.assert_array_equal(
        unscaled.ce_weights, build_channel_b_target(parsed, GT, match.index_pairs, **kwargs).ce_weights
    )


def test_nothing_to_append_closes_right_after_the_prefix():
    parsed, match = parse_and_match(ROLLOUT, [GT[1]])
    target = build_channel_b_target(
        parsed, [GT[1]], match.index_pairs, field_order="desc_first", desc_ce_weight=1.0, **FNS
    )
    assert target.pieces[-3:] == ("]}", "]}", "<|im_end|>") and target.appended_gt_indices == ()
    assert [TokenRole(r) for r in target.roles[-3:]] == [I, CL, E]
    assert "".join(target.pieces[:-1]) == ROLLOUT


def test_fallback_prefix_gets_the_whole_gt_appended_without_a_separator():
    parsed, match = parse_and_match("I see nothing.", GT)
    target = build_channel_b_target(
        parsed, GT, match.index_pairs, field_order="desc_first", desc_ce_weight=1.0, **FNS
    )
    text = "".join(target.pieces[:-1])
    assert (
        text
        == CONTAINER_HEADER
        + serialize_record(GT[1], "desc_first")
        + ", "
        + serialize_record(GT[0], "desc_first")
        + "]}"
    )
    assert target.appended_gt_indices == (1, 0) and [g.gt_index for g in target.geometry_groups] == [1, 0]
    # the injected header is not the model's output: it is supervised so the model learns to open the
    # container
    assert {TokenRole(r) for r in target.roles[: target.prefix_len]} == {TokenRole.FALLBACK_HEADER}
    assert (target.ce_weights[: target.prefix_len] == 1.0).all()


def test_channel_a_supervises_the_whole_document():
    gt = [GT[0], GT[1]]
    target = build_channel_a_target(gt, field_order="geometry_first", desc_ce_weight=0.25, **FNS)
    text = "".join(target.pieces[:-1])
    assert (
        text
        == '{"objects": ['
        + serialize_record(GT[1], "geometry_first")
        + ", "
        + serialize_record(GT[0], "geometry_first")
        + "]}"
    )
    assert target.prefix_len == 0 and target.appended_gt_indices == (1, 0)
    assert [g.gt_index for g in target.geometry_groups] == [1, 0]
    for group in target.geometry_groups:
        assert [TOK.coord_vocab.bin_of(target.input_ids[p]) for p in group.positions] == list(
            gt[group.gt_index].bbox
        )
    coord = TOK.coord_vocab.is_coord(target.input_ids)
    desc = target.roles == AD
    assert target.pieces[:3] == ('{"', "objects", '":') and target.ce_weights[:3].tolist() == [1, 1, 1]
    assert [target.pieces[i] for i in np.flatnonzero(desc)] == ["red", " square", "cat"]
    np.testing.assert_array_equal(target.ce_weights[coord], 0)
    np.testing.assert_array_equal(target.ce_weights[desc], 0.25)
    np.testing.assert_array_equal(target.ce_weights[~coord & ~desc], 1)
    assert (
        target.pieces[-2] == '"}]}'
        and target.roles[-2] == CL
        and target.closure_position == len(target.pieces) - 2
    )
    empty = build_channel_a_target([], field_order="desc_first", desc_ce_weight=1.0, **FNS)
    assert "".join(empty.pieces) == '{"objects": []}<|im_end|>' and empty.geometry_groups == ()


def test_invariant_failures_raise_a_specific_error():
    stray_brace = ROLLOUT.replace(']}, {"desc": "dog"', ']}, x}, {"desc": "dog"')
    parsed, match = parse_and_match(stray_brace, GT)
    assert parsed.drop_counts["malformed"] == 1 and len(parsed.objects) == 2
    with pytest.raises(TargetInvariantError) as error:
        build_channel_b_target(
            parsed, GT, match.index_pairs, field_order="desc_first", desc_ce_weight=1.0, **FNS
        )
    assert error.value.reason == "closure_not_found"

    parsed, match = parse_and_match(ROLLOUT, GT)
    # lies inside the fragment only: the desc alone still spells "cat", so this is no normalization
    lying = {**FNS, "encode": lambda text: TOK.encode(text.replace('"cat"', '"cot"'))}
    with pytest.raises(TargetInvariantError) as error:
        build_channel_b_target(
            parsed, GT, match.index_pairs, field_order="desc_first", desc_ce_weight=1.0, **lying
        )
    assert error.value.reason == "fragment_mismatch"

    char_by_char = {**FNS, "encode": lambda text: [t for ch in text for t in TOK.encode(ch)]}
    with pytest.raises(TargetInvariantError) as error:
        build_channel_b_target(
            parsed, GT, match.index_pairs, field_order="desc_first", desc_ce_weight=1.0, **char_by_char
        )
    assert error.value.reason == "geometry_slot_not_coord"

    moved = dataclasses.replace(parsed.objects[0], coord_positions=(16, 19, 22, 25))
    broken = dataclasses.replace(parsed, objects=(moved,) + parsed.objects[1:])
    with pytest.raises(TargetInvariantError) as error:
        build_channel_b_target(
            broken, GT, match.index_pairs, field_order="desc_first", desc_ce_weight=1.0, **FNS
        )
    assert error.value.reason == "geometry_slot_not_coord"


@pytest.mark.parametrize(
    "matches, kwargs",
    [
        ([(0, 1), (0, 0)], {}),
        ([(0, 1), (1, 1)], {}),
        ([(5, 0)], {}),
        ([(0, 2)], {}),
        ([], {"desc_ce_weight": -1.0}),
        ([], {"drop_invalid_struct_ce_multiplier": 4.5}),
        ([], {"drop_invalid_struct_ce_multiplier": 0.5}),
    ],
)
def test_caller_errors_are_value_errors(matches, kwargs):
    parsed, _ = parse_and_match(ROLLOUT, GT)
    with pytest.raises(ValueError):
        build_channel_b_target(
            parsed, GT, matches, **{"field_order": "desc_first", "desc_ce_weight": 1.0, **kwargs}, **FNS
        )


# ---------------------------------------------------------------- random scenarios


def assert_supervision_matches_the_spans(parsed, match, gt, target, desc_weight, multiplier, order):
    ids, weights, pieces = target.input_ids, target.ce_weights, target.pieces
    n = len(ids)
    assert len(weights) == len(target.roles) == len(pieces) == n
    assert list(ids[: target.prefix_len]) == list(parsed.prefix_ids) and ids[-1] == TOK.eos_id
    assert target.closure_position == n - 2
    np.testing.assert_array_equal(weights, role_ce_weights(desc_weight, multiplier)[target.roles])

    # Re-parsing Y as if it were a rollout gives the prefix objects followed by the appended GT, nothing else.
    reparsed = parse_ids(TOK, [int(t) for t in ids], order)
    fn = list(match.false_negatives)
    expected_appended = [fn[i] for i in canonical_order([gt[g] for g in fn])]
    assert target.appended_gt_indices == tuple(expected_appended)
    assert [(o.desc, o.bbox) for o in reparsed.objects] == [(o.desc, o.bbox) for o in parsed.objects] + [
        (gt[g].desc, gt[g].bbox) for g in expected_appended
    ]
    assert not reparsed.truncated and reparsed.num_dropped == len(parsed.dropped_in_prefix)

    ends = np.cumsum([len(p) for p in pieces])
    starts = ends - [len(p) for p in pieces]

    def inside(span):
        return [i for i in range(target.prefix_len) if span[0] <= starts[i] and ends[i] <= span[1]]

    def overlapping(span, lo=0, hi=n):
        return [i for i in range(lo, hi) if starts[i] < span[1] and span[0] < ends[i]]

    coord = TOK.coord_vocab.is_coord(ids)
    assert (weights[coord] == 0).all()
    matched_preds = {p for p, _ in match.index_pairs}
    matched_structure = set()
    for index, obj in enumerate(parsed.objects):
        if index in matched_preds:
            matched_structure |= set(overlapping(obj.char_span, hi=target.prefix_len))
            assert all(weights[i] == 0 for i in overlapping(obj.desc_char_span, hi=target.prefix_len))
        else:
            assert all(weights[i] == 0 for i in inside(obj.char_span))
    for dropped in parsed.dropped_in_prefix:
        assert all(weights[i] == 0 for i in inside(dropped.char_span))
    header = inside((0, parsed.header_chars))
    if parsed.invalid_rollout:  # the injected fallback header (the whole prefix) is supervised
        assert header == list(range(target.prefix_len)) and all(weights[i] == 1.0 for i in header)
    else:
        assert all(weights[i] == 0 for i in header)
        for i in range(target.prefix_len):  # prefix CE only on matched-record structure
            assert (weights[i] > 0) == (i in matched_structure and target.roles[i] == M)
    appended_desc = set()
    for obj in reparsed.objects[len(parsed.objects) :]:
        appended_desc |= set(overlapping(obj.desc_char_span, lo=target.prefix_len))
    for i in range(target.prefix_len, n - 1):
        want = 0.0 if coord[i] else desc_weight if i in appended_desc else multiplier
        assert weights[i] == np.float32(want)
    assert weights[-1] == multiplier

    groups = target.geometry_groups
    assert len(groups) == len(match.pairs) + len(match.false_negatives)
    for group in groups:
        assert group.gt_bins == gt[group.gt_index].bbox
        bins = tuple(TOK.coord_vocab.bin_of(ids[p]) for p in group.positions)
        if group.pred_index is None:
            assert bins == group.gt_bins and min(group.positions) >= target.prefix_len
        else:
            assert bins == parsed.objects[group.pred_index].bbox
            assert group.positions == parsed.objects[group.pred_index].coord_positions


@st.composite
def scenarios(draw):
    order = draw(orders)
    gt = draw(st.lists(st.builds(CoordObject, descs, bboxes()), max_size=5))
    records = []
    for obj in gt:
        choice = draw(st.sampled_from(["copy", "copy", "skip"]))
        if choice == "copy":
            jitter = draw(st.lists(st.integers(-3, 3), min_size=4, max_size=4))
            x1, y1, x2, y2 = (min(max(v + d, 0), 999) for v, d in zip(obj.bbox, jitter, strict=True))
            pred = CoordObject(draw(descs), (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))
            records.append(serialize_record(pred, order))
    for _ in range(draw(st.integers(0, 2))):
        records.append(serialize_record(CoordObject(draw(descs), draw(bboxes())), order))
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(KINDS[1:-1]))
        records.append(corrupted_record(kind, CoordObject(draw(descs), draw(bboxes())), order))
    random.Random(draw(st.integers(0, 2**16))).shuffle(records)
    text = draw(st.sampled_from(["", "Sure: "])) + CONTAINER_HEADER + ", ".join(records) + "]}"
    ids = TOK.encode(text)
    if draw(st.booleans()):
        ids = ids[: draw(st.integers(0, len(ids)))]
    else:
        ids.append(TOK.eos_id)
    return order, gt, ids


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scenario=scenarios(), desc_weight=st.sampled_from([0.0, 0.5, 1.0]), multiplier=st.sampled_from([1.0, 2.5])
)
def test_random_rollouts_supervise_exactly_the_right_spans(scenario, desc_weight, multiplier):
    order, gt, ids = scenario
    parsed = parse_ids(TOK, ids, order)
    match = match_boxes([o.bbox for o in parsed.objects], [g.bbox for g in gt], **COSTS)
    target = build_channel_b_target(
        parsed,
        gt,
        match.index_pairs,
        field_order=order,
        desc_ce_weight=desc_weight,
        drop_invalid_struct_ce_multiplier=multiplier,
        **FNS,
    )
    effective = multiplier if parsed.num_dropped_invalid else 1.0
    assert_supervision_matches_the_spans(parsed, match, gt, target, desc_weight, effective, order)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios(), data=st.data())
def test_damaged_rollouts_give_a_target_or_a_counted_invariant_error(scenario, data):
    order, gt, ids = scenario
    for _ in range(data.draw(st.integers(1, 3))):
        ids.insert(data.draw(st.integers(0, len(ids))), data.draw(st.integers(0, len(TOK.piece_table) - 1)))
    parsed = parse_ids(TOK, ids, order)
    match = match_boxes([o.bbox for o in parsed.objects], [g.bbox for g in gt], **COSTS)
    try:
        target = build_channel_b_target(
            parsed, gt, match.index_pairs, field_order=order, desc_ce_weight=1.0, **FNS
        )
    except TargetInvariantError as error:
        assert (
            error.reason == "closure_not_found"
        )  # only unbalanced junk kept in the prefix can break a target
        return
    effective = 1.0
    assert_supervision_matches_the_spans(parsed, match, gt, target, 1.0, effective, order)


def test_field_order_enum_and_string_give_the_same_target():
    parsed, match = parse_and_match(ROLLOUT, GT)
    a = build_channel_b_target(
        parsed, GT, match.index_pairs, field_order=FieldOrder.desc_first, desc_ce_weight=1.0, **FNS
    )
    b = build_channel_b_target(
        parsed, GT, match.index_pairs, field_order="desc_first", desc_ce_weight=1.0, **FNS
    )
    np.testing.assert_array_equal(a.input_ids, b.input_ids)


def test_the_worked_example_of_docs_channel_b():
    rollout = "Sure: " + ROLLOUT[: -len("]}")] + ', {"desc": "bl'
    parsed = parse_text(TOK, rollout, "desc_first", eos=False)
    assert (
        parsed.leading_junk and parsed.truncated and parsed.truncated_tail and parsed.prefix_ends_with_record
    )
    assert nonzero_counts(parsed) == {"wrong_arity": 1} and parsed.num_records == 3
    assert [o.coord_positions for o in parsed.objects] == [(17, 20, 23, 26), (41, 44, 47, 50)]
    match = match_boxes([o.bbox for o in parsed.objects], [g.bbox for g in GT], **COSTS)
    assert match.index_pairs == [(0, 1)] and (match.gating_rejections, match.candidate_pairs) == (3, 4)
    assert round(match.pairs[0].iou, 3) == 0.956 and round(match.total_cost, 3) == 2.544
    target = build_channel_b_target(
        parsed,
        GT,
        match.index_pairs,
        field_order="desc_first",
        desc_ce_weight=0.5,
        drop_invalid_struct_ce_multiplier=2.0,
        **FNS,
    )
    assert (target.prefix_len, target.closure_position, len(target.input_ids)) == (70, 94, 96)
    assert target.pieces[94] == "]}]}" and target.pieces[75] == "cat"
    assert target.ce_weights[[0, 3, 7, 17, 27, 28, 52, 70, 75, 84, 94, 95]].tolist() == [
        0,
        1,
        0,
        0,
        1,
        0,
        0,
        2,
        0.5,
        0,
        2,
        2,
    ]
    assert [(g.positions, g.gt_index, g.pred_index) for g in target.geometry_groups] == [
        ((17, 20, 23, 26), 1, 0),
        ((84, 87, 90, 93), 0, None),
    ]


def nonzero_counts(parsed):
    return {k: v for k, v in parsed.drop_counts.items() if v}
