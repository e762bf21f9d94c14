"""HF backend guard: only offending rows are forced, flags are real, and a real ``model.generate`` agrees."""

from __future__ import annotations

import pytest
import torch

from coordexp.repeat_rules import first_trigger_length, forced_eos_flag
from coordexp.rollout.hf_guard import RepeatTerminateGuard, build_hf_guard

EOS = 7
PAD = 0


from tests.conftest import rules_config as cfg


def step(guard, ids, vocab=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(len(ids), vocab, generator=g)
    before = scores.clone()
    out = guard(torch.tensor(ids), scores)
    return before, out


def test_only_the_offending_row_is_forced_and_flagged():
    guard = RepeatTerminateGuard(cfg(max_consecutive_token_repeats=3), stop_ids=[EOS])
    prompt = [[PAD, 5, 5, 5, 5], [1, 2, 3, 4, 5]]  # left padding; a run in the prompt must not count
    before, out = step(guard, prompt)
    assert torch.equal(before, out) and guard.triggered_flags() == [0, 0]
    ids = [prompt[0] + [4, 4, 4], prompt[1] + [1, 2, 3]]
    for t in range(1, 4):  # one generated token per call, like generate
        before, out = step(guard, [r[: 5 + t] for r in ids], seed=t)
    assert torch.equal(out[1], before[1])  # the other row: untouched
    assert out[0, EOS] == 0.0 and torch.isinf(out[0]).sum() == out.shape[1] - 1
    assert (out[0][torch.arange(out.shape[1]) != EOS] == float("-inf")).all()
    assert guard.triggered_flags() == [1, 0]


def test_prompt_length_explicit_and_min_new_tokens():
    guard = RepeatTerminateGuard(
        cfg(min_new_tokens=4, max_consecutive_token_repeats=2), stop_ids=[EOS], prompt_length=3
    )
    rows = [[9, 9, 9, 2, 2, 2]]  # 3 generated tokens: run of 3 >= 2, but 3 < min_new_tokens
    _, out = step(guard, rows)
    assert guard.triggered_flags() == [0] and not torch.isinf(out).any()
    _, out = step(guard, [rows[0] + [2]])
    assert guard.triggered_flags() == [1] and out[0, EOS] == 0.0


def test_finished_rows_are_not_tracked_after_their_stop_id():
    guard = RepeatTerminateGuard(cfg(max_consecutive_token_repeats=3), stop_ids=[EOS])
    step(guard, [[1, 2], [1, 2]])
    # row 0 ends naturally with EOS; generate then pads it with PAD (a long run) - never "forced"
    seqs = [[1, 2, 3, EOS, PAD, PAD, PAD, PAD], [1, 2, 3, 4, 5, 6, 5, 6]]
    for t in range(3, 9):
        _, out = step(guard, [s[:t] for s in seqs], seed=t)
        assert not torch.isinf(out).any()
    assert guard.triggered_flags() == [0, 0]


def test_disabled_and_misuse():
    guard = RepeatTerminateGuard(cfg(enabled=False, max_consecutive_token_repeats=1), stop_ids=[EOS])
    before, out = step(guard, [[1, 1, 1]])
    before, out = step(guard, [[1, 1, 1, 1]])
    assert torch.equal(before, out) and guard.triggered_flags() == [0]
    with pytest.raises(ValueError, match="batch size changed"):
        step(guard, [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="matcher"):
        RepeatTerminateGuard(cfg(max_object_keys=2), stop_ids=[EOS])
    with pytest.raises(ValueError, match="stop_ids"):
        RepeatTerminateGuard(cfg(), stop_ids=[])


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_dir
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return tok, model


PROMPTS = [
    "hello",
    "red square",
    "detect all objects now please",
    "blue star <|coord_5|>",
    "x",
    "Objects:\ngreen heart",
    "the answer is 5",
    "a b c d e f g",
]
DEGENERATE_ROWS = (0, 2, 5)


class _RowBias:
    """Test harness, not a fake of the guard: makes the random model degenerate on some rows only (a large
    bias on one token id), so one real ``generate`` batch holds rows that must be forced and rows that must
    not. It runs before the guard, like any model preference would."""

    def __init__(self, rows, token_id, bias=50.0):
        self.rows, self.token_id, self.bias = list(rows), token_id, bias

    def __call__(self, input_ids, scores):
        scores[self.rows, self.token_id] += self.bias
        return scores


def test_real_generate_forces_only_offending_rows(tiny):
    from transformers import LogitsProcessorList

    tok, model = tiny
    eos = tok.eos_token_id
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]
    enc = tok(texts, return_tensors="pt", padding=True)  # left padding
    plen = enc.input_ids.shape[1]
    max_new = 12
    c = cfg(min_new_tokens=2, max_consecutive_token_repeats=4)
    bias = _RowBias(DEGENERATE_ROWS, tok.convert_tokens_to_ids("<|coord_7|>"))
    gen = {
        "max_new_tokens": max_new,
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "pad_token_id": tok.pad_token_id,
    }

    def run(processors):
        torch.manual_seed(1234)
        with torch.no_grad():
            out = model.generate(**enc, **gen, logits_processor=LogitsProcessorList(processors))
        return [r[: r.index(eos) + 1] if eos in r else r for r in out[:, plen:].tolist()]

    ref = run([bias])
    firsts = [first_trigger_length(c, r) for r in ref]
    forced = [f is not None and f < len(r) for f, r in zip(firsts, ref)]
    assert any(forced) and not all(forced), ref

    guard = build_hf_guard(c, tok)
    out = run([bias, guard])
    flags = guard.triggered_flags()
    for i, (r_ref, r_out) in enumerate(zip(ref, out)):
        if forced[i]:
            assert r_out == r_ref[: firsts[i]] + [eos], (i, r_ref, r_out)
            assert flags[i] == 1
        else:  # untouched: the same sampled tokens as without the guard
            assert r_out == r_ref, (i, r_ref, r_out)
            assert flags[i] == 0
        # the HF flag is exactly the deterministic flag rule the server uses
        assert flags[i] == forced_eos_flag(c, r_out, [eos])
    assert [i for i, f in enumerate(flags) if f] == [i for i in range(len(PROMPTS)) if forced[i]]
