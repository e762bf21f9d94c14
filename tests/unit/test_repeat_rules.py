"""Pure repeat-terminate rule engine: rules, config parsing, object-opening patterns on the real tokenizer,
and the incremental engine == stateless ``triggered`` on random sequences (hypothesis)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordexp.protocol import XARGS_KEY
from coordexp.repeat_rules import (
    CONFIG_KEYS,
    ObjectOpenMatcher,
    RepeatTerminateConfig,
    SequenceState,
    config_from_json,
    consistency_problem,
    count_object_openings,
    first_trigger_length,
    forced_eos_flag,
    merge_overrides,
    object_open_matcher,
    parse_config,
    problems,
    triggered,
    validate_overrides,
)
from tests.conftest import rules_config as cfg

# ----------------------------------------------------------------------------------------------------- rules


def test_consecutive_run():
    c = cfg(max_consecutive_token_repeats=4)
    assert triggered(c, [1, 2, 9, 9, 9, 9])
    assert not triggered(c, [1, 2, 9, 9, 9])
    assert not triggered(c, [9, 9, 9, 1])  # the run must be at the tail
    assert triggered(cfg(max_consecutive_token_repeats=1), [5])  # 1 = any generated token
    assert not triggered(cfg(max_consecutive_token_repeats=0), [9] * 50)  # 0 disables


def test_ngram_tail_repeats():
    c = cfg(ngram_size=2, ngram_repeats=3)
    assert triggered(c, [5, 7, 8, 7, 8, 7, 8])
    assert not triggered(c, [7, 8, 7, 8])  # only 2 copies
    assert not triggered(c, [7, 8, 7, 8, 5, 7, 8])  # not back to back at the tail
    assert not triggered(c, [7, 8, 7, 8, 7, 8, 5])  # repeats must end at the tail
    assert triggered(cfg(ngram_size=3, ngram_repeats=2), [1, 2, 3, 1, 2, 3])
    assert not triggered(cfg(ngram_size=0, ngram_repeats=0), [7, 8] * 20)  # 0 disables


def test_min_new_tokens_gates_every_rule():
    c = cfg(
        min_new_tokens=6, max_consecutive_token_repeats=2, ngram_size=1, ngram_repeats=2, max_object_keys=1
    )
    pats = [[11, 12]]
    assert not triggered(c, [11, 12, 9, 9, 9], pats)  # 5 < 6 although all three rules hold
    assert triggered(c, [11, 12, 9, 9, 9, 9], pats)


def test_disabled_config_never_fires():
    c = cfg(enabled=False, max_consecutive_token_repeats=1)
    assert not triggered(c, [1, 1, 1, 1])
    st_ = SequenceState(c)
    st_.extend([1, 1, 1])
    assert not st_.fired


# token id -> its text: a toy vocabulary whose tokens split a record start anywhere
PIECES = ["{", '"desc"', " ", "x", '{"', 'desc"', "\n", '"bbox_2d"', '"', "desc", '{ "', '"}, {"',
          "description"]


def test_object_cap_counts_record_starts_and_needs_a_matcher():
    m, c = ObjectOpenMatcher(PIECES), cfg(max_object_keys=2)
    assert not triggered(c, [0, 1, 3], m)  # {"desc"x: one start
    assert triggered(c, [0, 1, 3, 4, 5], m)  # ... {"desc": two
    assert triggered(c, [0, 2, 6, 1, 3, 0, 2, 7], m)  # { \n"desc" ... { "bbox_2d": whitespace inside counts
    assert not triggered(c, [0, 1, 4, 12], m)  # {"description is no record start
    with pytest.raises(ValueError, match="matcher"):
        triggered(c, [1, 2], None)
    with pytest.raises(ValueError, match="matcher"):
        SequenceState(c, None)


def test_matcher_counts_record_starts_across_token_boundaries():
    m = ObjectOpenMatcher(PIECES)
    toks = [4, 5, 3, 11, 9, 8, 3, 0, 2, 2, 6, 8, 9, 8, 0, 0, 1]  # {"desc" x"}, {"desc"x{  \n"desc"{{"desc"
    assert m.count(toks) == 4 == count_object_openings(toks, m)
    assert m.text(toks) == '{"desc"x"}, {"desc"x{  \n"desc"{{"desc"'


# ---------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("values", [{"ngram_size": 2, "ngram_repeats": 0},
                                    {"ngram_size": 0, "ngram_repeats": 3}])
def test_one_validation_for_config_overrides_and_merged_requests(values):
    """The half-set n-gram rule is refused the same way by the config check, a per-request override on its
    own, and an override merged with server defaults (one ``problems``)."""
    expected = ("ngram_size: ngram_size and ngram_repeats must be both 0 (rule off) or both set, got "
                f"{values['ngram_size']} and {values['ngram_repeats']}")
    assert problems(values, "rollout_matching.repeat_terminate.") == [
        f"rollout_matching.repeat_terminate.{expected}"]
    with pytest.raises(ValueError, match="both 0"):
        validate_overrides(values, where=f"{XARGS_KEY}.")
    half = {"ngram_repeats": 0} if values["ngram_repeats"] == 0 else {"ngram_size": 0}
    with pytest.raises(ValueError) as e:
        merge_overrides(RepeatTerminateConfig(), half)
    assert (f"{XARGS_KEY} (merged with the server defaults) ngram_size: ngram_size and ngram_repeats"
            in str(e.value))
    off = merge_overrides(RepeatTerminateConfig(), {"ngram_size": 0, "ngram_repeats": 0})
    assert (off.ngram_size, off.ngram_repeats) == (0, 0)


def test_parse_config_rejects_unknown_keys_types_and_ranges():
    with pytest.raises(ValueError) as e:
        parse_config(
            {"enabled": True, "bogus": 1, "max_consecutive_repeat": 3},
            where="rollout_matching.repeat_terminate.",
        )
    assert "rollout_matching.repeat_terminate.bogus" in str(e.value)
    assert "max_consecutive_repeat" in str(e.value)
    for bad in (
        {"enabled": "yes"},
        {"min_new_tokens": -1},
        {"ngram_size": 1.5},
        {"ngram_repeats": 1},
        {"max_object_keys": 0},
        {"max_consecutive_token_repeats": True},
    ):
        with pytest.raises(ValueError):
            parse_config(bad)
    assert parse_config({}) == RepeatTerminateConfig()
    assert tuple(CONFIG_KEYS) == (
        "enabled",
        "min_new_tokens",
        "max_consecutive_token_repeats",
        "ngram_size",
        "ngram_repeats",
        "max_object_keys",
    )


def test_config_from_json_messages():
    with pytest.raises(ValueError, match="not valid JSON"):
        config_from_json("{enabled: true", source="X")
    with pytest.raises(ValueError, match="JSON object"):
        config_from_json("[1]", source="X")
    with pytest.raises(ValueError, match="unknown key"):
        config_from_json(json.dumps({"enabled": True, "foo": 1}), source="X")
    assert config_from_json('{"enabled": false}').enabled is False


def test_merge_overrides():
    base = cfg(max_consecutive_token_repeats=16)
    assert merge_overrides(base, None) is base
    m = merge_overrides(base, {"enabled": False})
    assert m.enabled is False and m.max_consecutive_token_repeats == 16
    with pytest.raises(ValueError, match="coordexp_repeat_terminate.nope"):
        merge_overrides(base, {"nope": 1})


# ------------------------------------------------------------------------------------------------- flag rule


def test_forced_eos_flag_and_consistency():
    eos = 99
    c = cfg(min_new_tokens=2, max_consecutive_token_repeats=3)
    forced = [1, 4, 4, 4, eos]  # rule holds after [1,4,4,4] -> EOS forced as the 5th token
    assert forced_eos_flag(c, forced, [eos]) == 1 and consistency_problem(c, forced, [eos]) is None
    natural = [1, 2, 3, eos]
    assert forced_eos_flag(c, natural, [eos]) == 0 and consistency_problem(c, natural, [eos]) is None
    by_length = [1, 4, 4, 4]  # rule became true exactly at the end (max_tokens): nothing to force
    assert forced_eos_flag(c, by_length, [eos]) == 0 and consistency_problem(c, by_length, [eos]) is None
    not_acted = [1, 4, 4, 4, 4, 4, eos]  # the rule held after 4 tokens but generation went on
    assert forced_eos_flag(c, not_acted, [eos]) == 0
    assert "did not act" in consistency_problem(c, not_acted, [eos])
    assert forced_eos_flag(cfg(enabled=False, max_consecutive_token_repeats=1), [3, eos], [eos]) == 0
    assert first_trigger_length(c, [1, 4, 4, 4, 4]) == 4


# ------------------------------------------------------------------------------------------------ hypothesis

_configs = st.builds(
    lambda en, mn, k, n, r, cap: cfg(
        enabled=en,
        min_new_tokens=mn,
        max_consecutive_token_repeats=k,
        ngram_size=n if r else 0,  # the n-gram rule is on (both set) or off (both 0)
        ngram_repeats=r if n else 0,
        max_object_keys=cap,
    ),
    st.booleans() | st.just(True),
    st.integers(0, 6),
    st.integers(0, 6),
    st.integers(0, 4),
    st.sampled_from([0, 2, 3, 4]),
    st.none() | st.integers(1, 4),
)
_seqs = st.lists(st.integers(0, len(PIECES) - 1), max_size=60)


@settings(max_examples=400, deadline=None)
@given(_configs, _seqs)
def test_incremental_engine_equals_stateless_triggered(c, seq):
    matcher = ObjectOpenMatcher(PIECES)
    state = SequenceState(c, matcher)
    assert state.fired == triggered(c, [], matcher)
    for i, t in enumerate(seq):
        state.push(t)
        assert state.fired == triggered(c, seq[: i + 1], matcher), (i, seq[: i + 1])
    if c.max_object_keys is not None:  # openings are counted only when the cap is set
        assert state.objects == count_object_openings(seq, matcher)


@settings(max_examples=200, deadline=None)
@given(_configs, _seqs)
def test_reset_replays_identically(c, seq):
    matcher = ObjectOpenMatcher(PIECES)
    a = SequenceState(c, matcher)
    a.extend([1, 1, 1, 2, 2])
    a.reset()
    b = SequenceState(c, matcher)
    for t in seq:
        a.push(t)
        b.push(t)
        assert a.fired == b.fired


# -------------------------------------------------------------------------------------------- real tokenizer


def _answer(n: int, order: str) -> str:
    from coordexp.coordjson.serialize import CoordObject, FieldOrder, serialize_objects

    objs = [
        CoordObject(f"{c} square", (10 * i, 20 * i, 10 * i + 5, 20 * i + 7))
        for i, c in zip(range(n), ["red", "blue", "green", "black", "white", "orange"])
    ]
    return serialize_objects(objs, FieldOrder(order), sort=False)


@pytest.mark.parametrize("brace", ["{", "{ ", "{\n  ", "{\t", "{\r\n"])
def test_whitespace_after_the_brace_is_counted(tiny_tokenizer, brace):
    """The cap used to count only `{"desc` as the tokenizer encodes it next to its usual neighbours: a model
    looping on `{ "desc"` (which the parser takes as a record) was never stopped."""
    tok = tiny_tokenizer
    box = '"bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>]'
    text = '{"objects": [' + ", ".join([brace + '"desc": "cat", ' + box + "}"] * 5) + "]}"
    ids = tok.encode(text, add_special_tokens=False)
    assert object_open_matcher(tok).count(ids) == 5
    assert first_trigger_length(cfg(max_object_keys=3), ids, object_open_matcher(tok)) < len(ids)


@pytest.mark.parametrize("order", ["desc_first", "geometry_first"])
def test_object_count_on_real_encodings(tiny_tokenizer, order):
    tok = tiny_tokenizer
    matcher = object_open_matcher(tok)
    for n in range(1, 6):
        text = _answer(n, order)
        ids = tok.encode(text, add_special_tokens=False)
        assert matcher.count(ids) == n, (order, n, tok.convert_ids_to_tokens(ids))
        # cap n: fires right after the n-th opening is complete, not before
        c = cfg(max_object_keys=n)
        at = first_trigger_length(c, ids, matcher)
        opening_end = next(i + 1 for i in range(len(ids)) if matcher.count(ids[: i + 1]) == n)
        assert at == opening_end
        assert triggered(c, ids[:at], matcher) and not triggered(c, ids[: at - 1], matcher)
        # the cap counts generated tokens only: an opening in the prompt is not part of generated_ids
        assert not triggered(cfg(max_object_keys=n + 1), ids, matcher)


def test_object_count_streamed_token_by_token_equals_batch_encoding(tiny_tokenizer):
    """What a model generates is a token stream; the count must not depend on how the text was cut."""
    tok = tiny_tokenizer
    matcher = object_open_matcher(tok)
    text = _answer(4, "desc_first")
    ids = tok.encode(text, add_special_tokens=False)
    state = SequenceState(cfg(max_object_keys=100), matcher)
    state.extend(ids)
    assert state.objects == 4
