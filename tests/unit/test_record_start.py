"""One definition of a record start, shared by the parser and the object cap of repeat-terminate.

Property: over rollouts inside the grammar (any JSON whitespace between tokens, either key order per
record, descs with escapes, braces and non-ASCII text, cut after any token), the cap's token-level count
equals the number of container elements the parser sees opening with a record start, through the tiny
model's real byte-level tokenizer.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordexp.coordjson import (
    JSON_WHITESPACE,
    RECORD_START,
    CoordVocab,
    FieldOrder,
    RecordStartAutomaton,
    RecordStartCounter,
    bin_to_token,
    parse_rollout,
)

DESC_FIRST, GEOMETRY_FIRST = FieldOrder("desc_first"), FieldOrder("geometry_first")

DESCS = ["cat", "red square", '{"desc": "x"}', "a \\ b", "café", "红色", "\U0001F600", "{", '"', "bbox_2d"]


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    tok = tiny_tokenizer
    table = [tok.decode([i], skip_special_tokens=False) for i in range(len(tok))]  # what the cap sees
    return tok, table, RecordStartCounter(table), CoordVocab.from_vocab(tok.get_vocab())


def _parse(tiny, ids, order):
    tok, table, _, coords = tiny
    return parse_rollout(ids, [table[i] for i in ids], coord_vocab=coords, stop_ids=[tok.eos_token_id],
                         field_order=order, encode=lambda t: tok.encode(t, add_special_tokens=False),
                         decode_token=table.__getitem__)


@pytest.mark.parametrize("text, count", [
    ('{"desc"', 1), ('{ "desc"', 1), ('{\n\t "bbox_2d"', 1), ('{\r\n"desc"', 1), ('{{"desc"', 1),
    ('{"desc', 0), ('{"description"', 0), ('{"bbox"', 0), ('{\\"desc\\"', 0), ('{\u00a0"desc"', 0),
    ('{\u3000"desc"', 0), ('{"objects"', 0), ('{"desc"}, {"bbox_2d"}, { "desc"', 3), ('{"desc""desc"', 1),
])
def test_record_start_spellings(text, count):
    assert RECORD_START.count(text) == count
    assert RECORD_START.starts_at(text, 0) == (count > 0 and not text.startswith("{{"))


def test_parser_takes_only_json_whitespace():
    """A no-break space is not JSON whitespace: not a record start, and a malformed element for the parser."""
    box = '"bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>]'
    assert JSON_WHITESPACE == " \t\n\r"
    automaton = RecordStartAutomaton()
    for ws, valid in ((" \t\n\r", True), ("\u00a0", False), ("\u2028", False), ("\x0b", False)):
        text = '{"objects": [{' + ws + '"desc": "cat",' + ws + box + "}]}"
        assert automaton.count(text) == int(valid)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list('{}[]":, \t\n\rdescbox_2\\x') + ["é", "\U0001F600"]),
                    max_size=60))
def test_token_counter_equals_text_count(tiny, text):
    """Token by token (cached per state and token) the counter sees what the automaton sees in the text."""
    tok, _, counter, _ = tiny
    ids = tok.encode(text, add_special_tokens=False)
    assert counter.count(ids) == RECORD_START.count(text)


_WS = st.text(alphabet=JSON_WHITESPACE, max_size=3)


@st.composite
def rollouts(draw):
    """(text, number of records, orders): a container of records with random whitespace and key orders."""
    def w():
        return draw(_WS)

    orders = draw(st.lists(st.sampled_from(list(FieldOrder)), max_size=5))
    records = []
    for order in orders:
        desc = json.dumps(draw(st.sampled_from(DESCS)), ensure_ascii=draw(st.booleans()))
        bins = sorted(draw(st.lists(st.integers(0, 999), min_size=4, max_size=4)))
        box = "[" + w() + ("," + w()).join(bin_to_token(b) + w() for b in bins) + "]"
        pairs = [w() + '"desc"' + w() + ":" + w() + desc + w(),
                 w() + '"bbox_2d"' + w() + ":" + w() + box + w()]
        records.append("{" + ",".join(pairs if order is FieldOrder.desc_first else pairs[::-1]) + "}")
    body = ("," + w()).join(r + w() for r in records)
    text = "{" + w() + '"objects"' + w() + ":" + w() + "[" + w() + body + "]" + w() + "}"
    return text, len(records), orders


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rollout=rollouts(), field_order=st.sampled_from(list(FieldOrder)), cut=st.floats(0, 1))
def test_cap_counts_exactly_the_records_the_parser_sees(tiny, rollout, field_order, cut):
    tok, _, counter, _ = tiny
    text, n, orders = rollout
    ids = tok.encode(text, add_special_tokens=False)
    whole = _parse(tiny, ids, field_order)
    assert counter.count(ids) == whole.record_starts == whole.num_records == n
    assert len(whole.objects) == sum(o is field_order for o in orders)  # the other order: order_violation
    assert whole.drop_counts["order_violation"] == n - len(whole.objects)
    head = ids[: round(cut * len(ids))]
    assert counter.count(head) == _parse(tiny, head, field_order).record_starts
