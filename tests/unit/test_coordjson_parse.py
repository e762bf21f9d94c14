import re
from collections import Counter
from unittest import mock

import pytest
from _bpe import (
    KINDS,
    bboxes,
    build_test_tokenizer,
    corrupted_record,
    descs,
    objects_lists,
    orders,
    parse_ids,
    parse_text,
    rollout_tokens,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from coordexp.coordjson import (
    CONTAINER_HEADER,
    CoordObject,
    DropReason,
    FallbackReason,
    FieldOrder,
    parse_rollout,
    serialize_objects,
    serialize_record,
    sort_objects,
)
from coordexp.coordjson import scan as scan_module
from coordexp.coordjson.scan import CONTAINER_HEADER_RE, scan_array
from coordexp.coordjson.serialize import render_records

TOK = build_test_tokenizer()
COORDS = "[<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>]"
VALID = '{"desc": "cat", "bbox_2d": ' + COORDS + "}"
HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def described(parsed):
    return [(o.desc, o.bbox) for o in parsed.objects]


def nonzero(counts):
    return {k: v for k, v in counts.items() if v}


def assert_objects_point_at_their_coord_tokens(parsed):
    for obj in parsed.objects:
        bins = [TOK.coord_vocab.bin_of(parsed.prefix_ids[p]) for p in obj.coord_positions]
        assert tuple(bins) == obj.bbox
        first, stop = obj.token_span
        assert first <= min(obj.coord_positions) and max(obj.coord_positions) < stop <= len(parsed.prefix_ids)
        assert parsed.prefix_text[obj.char_span[0]] == "{" and parsed.prefix_text[obj.char_span[1] - 1] == "}"


# ---------------------------------------------------------------- exact cases


def test_the_tokenizer_fuses_closing_runs():
    pieces = set(TOK.piece_table)
    assert {"]}]}", '"}]}', "]},"} <= pieces
    assert any("}]}" in p for p in pieces)


@pytest.mark.parametrize(
    "order, fused, kept", [("desc_first", "]}]}", "]}"), ("geometry_first", '"}]}', '"}')]
)
def test_cut_inside_a_fused_closing_token_re_encodes_only_that_token(order, fused, kept):
    text = serialize_objects([CoordObject("cat", (1, 2, 3, 4)), CoordObject("dog", (5, 6, 7, 8))], order)
    ids, pieces = rollout_tokens(TOK, text)
    assert pieces[-2] == fused and "}]}" in fused
    parsed = parse_ids(TOK, ids, order)
    assert described(parsed) == [("cat", (1, 2, 3, 4)), ("dog", (5, 6, 7, 8))]
    assert parsed.prefix_text == text[: -len("]}")]
    assert parsed.prefix_pieces[-1] == kept
    assert list(parsed.prefix_ids[:-1]) == ids[:-2]  # every earlier token is the rollout's own
    assert parsed.prefix_ends_with_record and not parsed.truncated and not parsed.invalid_rollout
    assert_objects_point_at_their_coord_tokens(parsed)


def test_exact_positions_of_a_single_record():
    parsed = parse_text(TOK, '{"objects": [' + VALID + "]}", "desc_first")
    assert parsed.prefix_pieces[:4] == ('{"', "objects", '":', ' [{"')
    (obj,) = parsed.objects
    assert [parsed.prefix_pieces[p] for p in obj.coord_positions] == [f"<|coord_{k}|>" for k in (1, 2, 3, 4)]
    assert obj.coord_positions == (16, 19, 22, 25)
    assert obj.token_span == (3, 27) and obj.char_span == (13, 93)
    assert parsed.prefix_text[obj.desc_char_span[0] : obj.desc_char_span[1]] == "cat"
    assert parsed.header_chars == len(CONTAINER_HEADER)


def test_text_before_the_container_is_counted_and_left_out_of_the_prefix():
    parsed = parse_text(TOK, "Sure: " + '{"objects": [' + VALID + "]}", "desc_first")
    assert parsed.leading_junk
    assert parsed.prefix_text == '{"objects": [' + VALID
    assert parsed.prefix_pieces[0] == '{"'  # re-encoded out of the fused ' {"'
    assert described(parsed) == [("cat", (1, 2, 3, 4))]
    assert_objects_point_at_their_coord_tokens(parsed)
    assert not parse_text(TOK, '  \n{"objects": []}', "desc_first").leading_junk


def test_no_container_falls_back_to_the_bare_header():
    for text in ["I see nothing.", '{"items": [' + VALID + "]}", "", '[{"desc": "cat"}]']:
        parsed = parse_text(TOK, text, "desc_first")
        assert parsed.invalid_rollout and parsed.fallback_reason is FallbackReason.NO_CONTAINER
        assert parsed.prefix_text == CONTAINER_HEADER
        assert list(parsed.prefix_ids) == TOK.encode(CONTAINER_HEADER)
        assert parsed.objects == () and parsed.num_records == 0 and not parsed.prefix_ends_with_record


def test_parsing_stops_at_the_first_stop_token():
    first = '{"objects": [' + VALID + "]}"
    ids = TOK.encode(first) + [TOK.eos_id] + TOK.encode(', {"desc": "x"}')
    parsed = parse_ids(TOK, ids, "desc_first")
    assert described(parsed) == [("cat", (1, 2, 3, 4))] and parsed.num_records == 1
    other_stop = TOK.tokenizer.token_to_id("<|endoftext|>")
    ids = TOK.encode('{"objects": [' + VALID) + [other_stop] + TOK.encode("]}")
    parsed = parse_rollout(
        ids,
        TOK.pieces(ids),
        coord_vocab=TOK.coord_vocab,
        stop_ids=[TOK.eos_id, other_stop],
        field_order="desc_first",
        encode=TOK.encode,
        decode_token=TOK.decode_token,
    )
    assert parsed.truncated and not parsed.truncated_tail and len(parsed.objects) == 1


def test_empty_container():
    parsed = parse_text(TOK, '{"objects": []}', "desc_first")
    assert parsed.prefix_text == CONTAINER_HEADER and not parsed.truncated and parsed.num_records == 0
    assert not parsed.invalid_rollout and not parsed.prefix_ends_with_record
    assert parsed.prefix_pieces[-1] == " ["  # re-encoded out of ' []}'


def test_truncated_tail_is_discarded_and_not_counted_as_dropped():
    parsed = parse_text(TOK, '{"objects": [' + VALID + ', {"desc": "bl', "desc_first", eos=False)
    assert parsed.truncated and parsed.truncated_tail and parsed.num_dropped == 0
    assert described(parsed) == [("cat", (1, 2, 3, 4))]
    assert parsed.prefix_text == '{"objects": [' + VALID and parsed.prefix_pieces[-1] == "]}"

    parsed = parse_text(TOK, '{"objects": [{"desc', "desc_first", eos=False)
    assert parsed.truncated and parsed.truncated_tail and parsed.objects == ()
    assert parsed.prefix_text == CONTAINER_HEADER and not parsed.invalid_rollout

    parsed = parse_text(TOK, '{"objects": [' + VALID, "desc_first")
    assert parsed.truncated and not parsed.truncated_tail and len(parsed.objects) == 1


def test_unterminated_string_runs_to_the_end():
    parsed = parse_text(TOK, '{"objects": [' + VALID + ', {"desc": "a]}', "desc_first")
    assert parsed.truncated and parsed.truncated_tail and len(parsed.objects) == 1


RECORD_CASES = [
    ('{"desc" "cat", "bbox_2d": ' + COORDS + "}", DropReason.MALFORMED),
    ('{"desc": "cat", "bbox_2d": ' + COORDS + ",}", DropReason.MALFORMED),
    ('{"desc": "cat", "bbox_2d": [<|coord_1|> <|coord_2|>, <|coord_3|>, <|coord_4|>]}', DropReason.MALFORMED),
    ('{"desc": "cat", "bbox_2d": ' + COORDS + "]", DropReason.MALFORMED),
    ("123", DropReason.MALFORMED),
    ('"just a string"', DropReason.MALFORMED),
    ("[<|coord_1|>]", DropReason.MALFORMED),
    ('{"desc": "cat", "bbox_2d": ' + COORDS + ', "score": 1}', DropReason.UNEXPECTED_KEYS),
    (
        (
            '{"desc": "cat", "poly": [<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>, <|coord_5|>, '
            "<|coord_6|>]}"
        ),
        DropReason.UNEXPECTED_KEYS,
    ),
    ('{"desc": "cat", "desc": "dog", "bbox_2d": ' + COORDS + "}", DropReason.UNEXPECTED_KEYS),
    ('{"\\u0064esc": "cat", "bbox_2d": ' + COORDS + "}", DropReason.UNEXPECTED_KEYS),
    ('{"bbox_2d": ' + COORDS + "}", DropReason.MISSING_DESC),
    ("{}", DropReason.MISSING_DESC),
    ('{"desc": "cat"}', DropReason.MISSING_GEOMETRY),
    ('{"bbox_2d": ' + COORDS + ', "desc": "cat"}', DropReason.ORDER_VIOLATION),
    ('{"desc": 7, "bbox_2d": ' + COORDS + "}", DropReason.INVALID_DESC),
    ('{"desc": "a\\qb", "bbox_2d": ' + COORDS + "}", DropReason.INVALID_DESC),
    ('{"desc": "", "bbox_2d": ' + COORDS + "}", DropReason.EMPTY_DESC),
    ('{"desc": "  ", "bbox_2d": ' + COORDS + "}", DropReason.EMPTY_DESC),
    ('{"desc": "cat", "bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>]}', DropReason.WRONG_ARITY),
    ('{"desc": "cat", "bbox_2d": []}', DropReason.WRONG_ARITY),
    ('{"desc": "cat", "bbox_2d": [1, 2, 3]}', DropReason.WRONG_ARITY),
    ('{"desc": "cat", "bbox_2d": [1, 2, 3, 4]}', DropReason.NON_COORD_GEOMETRY),
    ('{"desc": "cat", "bbox_2d": "box"}', DropReason.NON_COORD_GEOMETRY),
    (
        '{"desc": "cat", "bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_1000|>, <|coord_4|>]}',
        DropReason.NON_COORD_GEOMETRY,
    ),
    (
        '{"desc": "cat", "bbox_2d": [<|coord_01|>, <|coord_2|>, <|coord_3|>, <|coord_4|>]}',
        DropReason.NON_COORD_GEOMETRY,
    ),
    (
        '{"desc": "cat", "bbox_2d": [<|coord_5|>, <|coord_2|>, <|coord_3|>, <|coord_4|>]}',
        DropReason.BBOX_INVALID,
    ),
    (
        '{"desc": "cat", "bbox_2d": [<|coord_1|>, <|coord_9|>, <|coord_3|>, <|coord_4|>]}',
        DropReason.BBOX_INVALID,
    ),
]


@pytest.mark.parametrize("record, reason", RECORD_CASES)
def test_each_invalid_record_gets_exactly_its_reason(record, reason):
    text = '{"objects": [' + VALID + ", " + record + ", " + VALID.replace("cat", "dog") + "]}"
    parsed = parse_text(TOK, text, "desc_first")
    assert nonzero(parsed.drop_counts) == {reason.value: 1}
    assert described(parsed) == [("cat", (1, 2, 3, 4)), ("dog", (1, 2, 3, 4))]
    assert parsed.num_records == 3 and not parsed.truncated
    assert parsed.prefix_text == text[:-2]
    if reason is not DropReason.MALFORMED or record.startswith("{"):
        (dropped,) = parsed.dropped_in_prefix
        assert dropped.reason is reason
        assert parsed.prefix_text[dropped.char_span[0] : dropped.char_span[1]] == record


def test_geometry_first_order_is_enforced():
    parsed = parse_text(TOK, '{"objects": [' + VALID + "]}", "geometry_first")
    assert nonzero(parsed.drop_counts) == {"order_violation": 1} and parsed.objects == ()
    assert (
        parsed.prefix_ends_with_record
    )  # an invalid record still ends the prefix; its text stays unsupervised


def test_missing_separator_makes_the_second_record_malformed():
    parsed = parse_text(TOK, '{"objects": [' + VALID + " " + VALID + "]}", "desc_first")
    assert nonzero(parsed.drop_counts) == {"malformed": 1} and len(parsed.objects) == 1
    parsed = parse_text(TOK, '{"objects": [' + VALID + ",, " + VALID + "]}", "desc_first")
    assert nonzero(parsed.drop_counts) == {"malformed": 1} and len(parsed.objects) == 1


def test_junk_after_the_last_record_is_counted_but_cut_away():
    parsed = parse_text(TOK, '{"objects": [' + VALID + ", 12]}", "desc_first")
    assert nonzero(parsed.drop_counts) == {"malformed": 1} and parsed.num_records == 2
    assert parsed.prefix_text == '{"objects": [' + VALID and parsed.dropped_in_prefix == ()


def test_coord_literal_spelled_with_plain_tokens_is_ambiguous():
    ids = TOK.encode('{"objects": [{"desc": "cat", "bbox_2d": [<|co') + TOK.encode("ord_1|>")
    ids += TOK.encode(", <|coord_2|>, <|coord_3|>, <|coord_4|>]}, " + VALID + "]}") + [TOK.eos_id]
    assert TOK.coord_vocab.bin_of(TOK.encode("<|coord_1|>")[0]) == 1
    parsed = parse_ids(TOK, ids, "desc_first")
    assert nonzero(parsed.drop_counts) == {"ambiguous_coord": 1}
    assert described(parsed) == [("cat", (1, 2, 3, 4))] and parsed.num_records == 2
    assert parsed.dropped_in_prefix[0].reason is DropReason.AMBIGUOUS_COORD


def test_prefix_that_cannot_be_re_encoded_falls_back_and_keeps_the_count_invariant():
    text = '{"objects": [' + VALID + "]}"
    ids, pieces = rollout_tokens(TOK, text)
    parsed = parse_rollout(
        ids,
        pieces,
        coord_vocab=TOK.coord_vocab,
        stop_ids=[TOK.eos_id],
        field_order="desc_first",
        encode=lambda t: TOK.encode(t.replace("]}", "] }")),
        decode_token=TOK.decode_token,
    )
    assert parsed.invalid_rollout and parsed.fallback_reason is FallbackReason.PREFIX_REENCODE_FAILED
    assert parsed.objects == () and nonzero(parsed.drop_counts) == {"prefix_unusable": 1}
    assert parsed.num_dropped_invalid == 0 and parsed.prefix_text == CONTAINER_HEADER


def test_non_ascii_desc_split_across_tokens_does_not_crash():
    parsed = parse_text(
        TOK, serialize_objects([CoordObject("café 中文", (1, 2, 3, 4))], "desc_first"), "desc_first"
    )
    (obj,) = parsed.objects
    assert obj.desc.startswith("café ") and obj.bbox == (1, 2, 3, 4)


def test_mismatched_lengths_are_a_caller_error():
    with pytest.raises(ValueError, match="pieces"):
        parse_rollout(
            [1, 2],
            ["a"],
            coord_vocab=TOK.coord_vocab,
            stop_ids=[],
            field_order="desc_first",
            encode=TOK.encode,
            decode_token=TOK.decode_token,
        )


# ---------------------------------------------------------------- properties


@HYPOTHESIS
@given(
    objects=objects_lists,
    order=orders,
    junk=st.sampled_from(["", "Sure: ", "\n", "ok {"]),
    trailer=st.sampled_from(["", " done", "]}"]),
)
def test_serialize_tokenize_parse_is_identity(objects, order, junk, trailer):
    text = serialize_objects(objects, order)
    parsed = parse_text(TOK, junk + text + trailer, order)
    assert described(parsed) == [(o.desc, o.bbox) for o in sort_objects(objects)]
    assert parsed.num_dropped == 0 and parsed.num_records == len(objects)
    assert not parsed.truncated and not parsed.invalid_rollout
    assert parsed.leading_junk == bool(junk.strip())
    assert parsed.prefix_text == text[:-2] and parsed.prefix_ends_with_record == bool(objects)
    assert_objects_point_at_their_coord_tokens(parsed)


@HYPOTHESIS
@given(objects=objects_lists.filter(bool), order=orders, data=st.data())
def test_any_truncation_keeps_exactly_the_complete_records(objects, order, data):
    ordered = sort_objects(objects)
    rendered = render_records(ordered, order, lead=CONTAINER_HEADER, tail="]}")
    ids = TOK.encode(rendered.text)
    cut = data.draw(st.integers(0, len(ids)))
    parsed = parse_ids(TOK, ids[:cut], order)
    seen = "".join(TOK.pieces(ids[:cut]))
    if CONTAINER_HEADER_RE.search(seen) is None:
        assert parsed.invalid_rollout and parsed.objects == ()
        return
    complete = [r for r in rendered.records if r.span[1] <= len(seen)]
    assert described(parsed) == [(o.desc, o.bbox) for o in ordered[: len(complete)]]
    assert parsed.num_dropped == 0 and parsed.num_records == len(complete)
    assert parsed.truncated == (len(seen) < len(rendered.text) - 1)
    prefix_end = complete[-1].span[1] if complete else len(CONTAINER_HEADER)
    assert parsed.prefix_text == rendered.text[:prefix_end]
    assert_objects_point_at_their_coord_tokens(parsed)


@HYPOTHESIS
@given(
    records=st.lists(st.tuples(st.sampled_from(KINDS), st.builds(CoordObject, descs, bboxes())), max_size=6),
    order=orders,
)
def test_each_corrupted_record_lands_in_exactly_its_bucket(records, order):
    records = [(k, o) for k, o in records if k != "bbox_invalid" or o.bbox[0] < 999]
    texts = [
        serialize_record(o, order) if k == "valid" else corrupted_record(k, o, order) for k, o in records
    ]
    parsed = parse_text(TOK, CONTAINER_HEADER + ", ".join(texts) + "]}", order)
    assert described(parsed) == [(o.desc, o.bbox) for k, o in records if k == "valid"]
    assert nonzero(parsed.drop_counts) == dict(Counter(k for k, _ in records if k != "valid"))
    assert parsed.num_records == len(records)


MUTATION_SNIPPETS = [
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    '"',
    "\\",
    " ",
    "x",
    "<|coord_7|>",
    '"desc": ',
    "<|coord_",
    "1",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(objects=objects_lists, order=orders, data=st.data())
def test_random_corruptions_never_raise_and_every_record_is_accounted_for(objects, order, data):
    text = serialize_objects(objects, order)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(text)))
        action = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        snippet = data.draw(st.sampled_from(MUTATION_SNIPPETS)) if action != "delete" else ""
        width = data.draw(st.integers(1, 6)) if action != "insert" else 0
        text = text[:pos] + snippet + text[pos + width :]
    ids = TOK.encode(text)
    for _ in range(data.draw(st.integers(0, 2))):  # token-level damage too: stray ids, stop tokens, coords
        ids.insert(data.draw(st.integers(0, len(ids))), data.draw(st.integers(0, len(TOK.piece_table) - 1)))
    if data.draw(st.booleans()):
        ids.append(TOK.eos_id)

    parsed = parse_ids(TOK, ids, order)
    event(
        f"dropped={min(parsed.num_dropped, 2)} truncated={parsed.truncated} fallback={parsed.invalid_rollout}"
    )
    assert len(parsed.objects) + parsed.num_dropped == parsed.num_records
    assert_prefix_is_a_valid_continuation_point(parsed, order)


def assert_prefix_is_a_valid_continuation_point(parsed, order):
    assert CONTAINER_HEADER_RE.match(parsed.prefix_text) is not None
    assert parsed.prefix_text.endswith("}" if parsed.prefix_ends_with_record else "[")
    assert_objects_point_at_their_coord_tokens(parsed)
    for obj in parsed.objects:
        assert obj.desc.strip() and obj.bbox[0] <= obj.bbox[2] and obj.bbox[1] <= obj.bbox[3]
    # Closing the prefix gives a clean document with the same objects and the same in-prefix drops.
    closed = parse_ids(TOK, list(parsed.prefix_ids) + TOK.encode("]}") + [TOK.eos_id], order)
    assert described(closed) == described(parsed) and not closed.truncated
    assert Counter(r.reason.value for r in parsed.dropped_in_prefix) == Counter(nonzero(closed.drop_counts))


@HYPOTHESIS
@given(
    records=st.lists(st.tuples(st.sampled_from(KINDS), st.builds(CoordObject, descs, bboxes())), max_size=5),
    order=orders,
    spacing=st.sampled_from([": ", " :\n ", ":"]),
)
def test_fast_record_pattern_agrees_with_the_general_parser(records, order, spacing):
    texts = [
        serialize_record(o, order) if k == "valid" else corrupted_record(k, o, order) for k, o in records
    ]
    text = (CONTAINER_HEADER + ", ".join(texts) + "]}").replace(": ", spacing)
    fast = scan_array(text, len(CONTAINER_HEADER), order)
    with mock.patch.dict(scan_module._CANONICAL_RECORD_RE, {FieldOrder(order): re.compile(r"(?!)")}):
        general = scan_array(text, len(CONTAINER_HEADER), order)
    assert fast == general
