"""One stop-token set and explicit decoding settings, on the tiny model in-process (HF backend) and in what
the server backend sends (the real server: tests/integration/test_swift_rollout_server.py).

Stop set: a checkpoint whose generation_config lists a second EOS id, one the model emits first, must stop
there on every path (HF generate, trimming, parser, metrics, the forced-EOS guard), and the Channel-B target
still closes with the end-of-turn token. Decoding: a checkpoint's sampling/beam defaults (num_beams: 2,
do_sample: true, ...) change nothing; what was ignored is logged once; trigger flags stay exact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from coordexp.checkpoint import read_stop_ids
from coordexp.config.contract import rollout_contract
from coordexp.config.load import compose, to_train_config
from coordexp.coordjson import CoordObject, serialize_objects
from coordexp.data.jsonl import DetectionObject, DetectionSample
from coordexp.data.prompt import build_messages
from coordexp.models.prompts import TextPromptEncoder
from coordexp.repeat_rules import forced_eos_flag
from coordexp.rollout import batch as rollout_batch
from coordexp.rollout.batch import Rollout, decoding_settings, ignored_checkpoint_defaults
from coordexp.rollout.hf_backend import HFRolloutBackend
from coordexp.rollout.hf_guard import build_hf_guard
from coordexp.rollout.scoring import TokenizerAdapter, score_rollout, stop_ids_of
from coordexp.rollout.server_backend import ServerRolloutBackend
from coordexp.rollout.server_client import build_infer_payload
from coordexp.trainer.channels import channel_b_sequence

GT = (DetectionObject("red square", (100, 100, 300, 300)), DetectionObject("blue star", (500, 500, 700, 700)))


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def cfg():
    return to_train_config(compose(["+experiment=smoke/ab_mixed", "rollout=hf",
                                    "rollout_matching.decode_batch_size=2"]))


def _copy(tiny_dir, tmp_path, name, **generation_config):
    """The tiny checkpoint with generation_config.json keys replaced."""
    out = tmp_path / name
    shutil.copytree(tiny_dir, out)
    path = out / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**config, **generation_config}))
    return out


def _load(folder):
    return AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval()


def _samples(n=3):
    out = []
    for i in range(n):
        s = DetectionSample(index=i, source=f"t.jsonl:{i + 1}", width=100 + i, height=100, objects=GT)
        out.append(DetectionSample(**{**s.__dict__, "messages": tuple(build_messages(s))}))
    return out


def _rollouts(folder, contract, samples, seed=0):
    tok, model = _load(folder)
    prompts = [TextPromptEncoder(tok).encode(s).ids for s in samples]
    backend = HFRolloutBackend(lambda: model, tok, contract)
    return tok, backend, backend.generate(prompts, [s.messages for s in samples], seed).rollouts


# ---------------------------------------------------------------------------------------------- stop set


def test_a_second_eos_in_generation_config_stops_every_path(tiny_dir, tmp_path, cfg):
    contract = rollout_contract(cfg)
    samples = _samples()
    plain = _copy(tiny_dir, tmp_path, "plain")
    tok, _, before = _rollouts(plain, contract, samples)
    eos = tok.eos_token_id
    first = before[0].token_ids[0]
    assert first != eos and len(before[0].token_ids) > 1  # the model does not stop by itself at once
    two = _copy(tiny_dir, tmp_path, "two-eos", eos_token_id=[eos, first])
    assert read_stop_ids(two) == (eos, first)

    tok, backend, after = _rollouts(two, contract, samples)
    assert stop_ids_of(tok) == (eos, first) and backend.stop_ids == [eos, first]
    assert (after[0].token_ids, after[0].triggered, after[0].hit_max_new_tokens) == ([first], 0, False)
    for b, a in zip(before, after, strict=True):  # each rollout ends at its first stop id, not later
        stops = [i for i, t in enumerate(b.token_ids) if t in (eos, first)]
        assert a.token_ids == b.token_ids[: stops[0] + 1] if stops else a.token_ids == b.token_ids
        assert a.hit_max_new_tokens == (not stops and len(b.token_ids) == contract.max_new_tokens)
    assert build_hf_guard(contract.repeat_terminate, tok).stop_ids == tuple(sorted((eos, first)))

    # parser, metrics and the Channel-B target: a rollout that stopped on the secondary id
    adapter = TokenizerAdapter(tok)
    assert adapter.stop_ids == (eos, first)
    doc = serialize_objects([CoordObject("red square", (100, 100, 300, 310))], "desc_first")
    gen = adapter.encode(doc[:-2]) + [first] + adapter.encode(', {"desc": "junk"')
    rollout = Rollout(TextPromptEncoder(tok).encode(samples[0]).ids, gen[: gen.index(first) + 1], 0, False)
    parsed, _, match = score_rollout(samples[0], Rollout(rollout.prompt_ids, gen, 0, False), adapter,
                                     contract)
    assert (len(parsed.objects), parsed.truncated, len(match.pairs)) == (1, True, 1)
    seq, record = channel_b_sequence(samples[0], TextPromptEncoder(tok).encode(samples[0]), rollout, adapter,
                                     contract, cfg.stage2_ab)
    assert seq.target_ids[-1] == eos != first  # closes with the end-of-turn token
    assert first not in seq.target_ids[: len(adapter.encode(doc[:-2]))]
    assert (record.valid_pred, record.matched, record.truncated) == (1, 1, 1)


def test_forced_rows_may_emit_any_stop_id_and_flags_are_exact(tiny_dir, tmp_path, cfg):
    contract = rollout_contract(cfg)
    tok0 = AutoTokenizer.from_pretrained(tiny_dir)
    other = tok0.convert_tokens_to_ids("<|im_start|>")  # a second stop id below EOS: greedy picks it first
    assert other < tok0.eos_token_id
    folder = _copy(tiny_dir, tmp_path, "two-eos", eos_token_id=[tok0.eos_token_id, other])
    # fires as soon as one token is out: every row is forced at its 2nd token
    rt = dataclasses.replace(contract.repeat_terminate, enabled=True, min_new_tokens=1,
                             max_consecutive_token_repeats=1, ngram_size=0, ngram_repeats=0)
    forced = dataclasses.replace(contract, repeat_terminate=rt)
    tok, _, rollouts = _rollouts(folder, forced, _samples(2))
    stops = stop_ids_of(tok)
    assert stops == (tok0.eos_token_id, other)
    for r in rollouts:  # the forced row emits the secondary id: it is allowed, and it stops the row
        assert (len(r.token_ids), r.token_ids[-1], r.triggered) == (2, other, 1)
        assert r.triggered == forced_eos_flag(rt, r.token_ids, stops)


# ---------------------------------------------------------------------------------------------- decoding


def test_checkpoint_decoding_defaults_are_ignored_and_logged_once(tiny_dir, tmp_path, cfg, caplog):
    contract = rollout_contract(cfg)
    assert contract.temperature == 0  # greedy leaf
    samples = _samples(3)
    _, _, plain = _rollouts(_copy(tiny_dir, tmp_path, "plain"), contract, samples)
    leaky = _copy(tiny_dir, tmp_path, "leaky", num_beams=2, do_sample=True, temperature=0.7, top_k=3,
                  top_p=0.5, repetition_penalty=1.3, no_repeat_ngram_size=2, max_new_tokens=3)
    rollout_batch._logged.discard("hf")
    with caplog.at_level(logging.WARNING, logger="coordexp.rollout"):
        _, backend, leaked = _rollouts(leaky, contract, samples, seed=1)
        backend.generate([TextPromptEncoder(backend.tokenizer).encode(samples[0]).ids], [[]], 2)
    assert [r.token_ids for r in leaked] == [r.token_ids for r in plain]
    assert [r.triggered for r in leaked] == [r.triggered for r in plain]
    messages = [r.getMessage() for r in caplog.records if "ignoring the checkpoint" in r.getMessage()]
    assert len(messages) == 1
    for name in ("num_beams=2", "do_sample=True", "temperature=0.7", "top_k=3", "top_p=0.5",
                 "repetition_penalty=1.3", "no_repeat_ngram_size=2", "max_new_tokens=3"):
        assert name in messages[0]
    config = backend.generation_config()
    assert (config.num_beams, config.do_sample, config.max_new_tokens) == (1, False, contract.max_new_tokens)


def test_sampling_flags_are_exact_with_checkpoint_beam_defaults(tiny_dir, tmp_path, cfg):
    """num_beams: 2 in the checkpoint used to turn rollouts into beam search with the guard attached
    (flag 1 for a row it never forced); now every flag is the recomputed one."""
    contract = rollout_contract(cfg)
    rt = dataclasses.replace(contract.repeat_terminate, enabled=True, min_new_tokens=4,
                             max_consecutive_token_repeats=0, ngram_size=2, ngram_repeats=2)
    sampled = dataclasses.replace(contract, temperature=1.0, top_p=1.0, top_k=-1, repeat_terminate=rt)
    folder = _copy(tiny_dir, tmp_path, "beams", num_beams=2, num_return_sequences=1)
    tok, _, rollouts = _rollouts(folder, sampled, _samples(4), seed=3)
    stops = stop_ids_of(tok)
    assert [r.triggered for r in rollouts] == [forced_eos_flag(rt, r.token_ids, stops) for r in rollouts]


def test_server_requests_carry_every_sampling_field(tiny_dir, tmp_path, cfg, caplog):
    """ms-swift fills each sampling field a request leaves unset (None) from the checkpoint's
    generation_config: the request sets all of them, from rollout_matching.* alone."""
    from swift.infer_engine.protocol import RequestConfig

    contract = dataclasses.replace(rollout_contract(cfg), backend="vllm", server_base_urls=("http://x:1",),
                                   temperature=0.0, top_k=-1)
    leaky = _copy(tiny_dir, tmp_path, "leaky", do_sample=True, temperature=0.7, top_k=3, min_p=0.2)
    backend = ServerRolloutBackend(contract, stop_ids=(2, 1), checkpoint_dir=str(leaky),
                                   stop_words=("<|im_end|>", "<|im_start|>"))
    rollout_batch._logged.discard("server")
    with caplog.at_level(logging.WARNING, logger="coordexp.rollout"):
        params = backend.decode_params(seed=5)
    assert "min_p=0.2" in caplog.text and "top_k=3" in caplog.text
    sent = build_infer_payload([], params, 5)["request_config"]
    assert sent["stop"] == ["<|im_end|>", "<|im_start|>"]  # the stop-token set, as ms-swift stop words
    unset_by_default = {f.name for f in dataclasses.fields(RequestConfig) if f.default is None}
    not_decoding = {"best_of", "top_logprobs", "prompt_logprobs", "structured_outputs_regex"}
    assert unset_by_default - not_decoding <= {k for k, v in sent.items() if v is not None}
    assert {k: sent[k] for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "num_beams",
                                 "max_tokens")} == {
        "temperature": 0.0, "top_k": -1, "top_p": contract.top_p, "min_p": 0.0,
        "repetition_penalty": contract.repetition_penalty, "num_beams": 1,
        "max_tokens": contract.max_new_tokens}
    assert ignored_checkpoint_defaults({"eos_token_id": [1, 2], "top_k": -1, "do_sample": True},
                                       decoding_settings(contract)) == {"do_sample": True}
