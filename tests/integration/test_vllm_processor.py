"""vLLM logits processors: bookkeeping under fault injection (fake batch updates / fake MRV2 request
state) and a REAL offline vLLM engine on CPU with the processor registered at engine start."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from coordexp.protocol import ENV_CONFIG_JSON, PROCESSOR_FQCN, XARGS_KEY
from coordexp.repeat_rules import (
    first_trigger_length,
    forced_eos_flag,
    merge_overrides,
    parse_config,
    triggered,
)
from coordexp.rollout.vllm_processor import (
    ProcessorCore,
    RepeatTerminateLogitsProcessor,
    RepeatTerminateMRV2LogitsProcessor,
    RepeatTerminateV1LogitsProcessor,
    server_default_config,
    validate_request_params,
)

V = 64


from tests.conftest import rules_config as cfg


def params(overrides=None):
    return SimpleNamespace(extra_args={XARGS_KEY: overrides} if overrides is not None else None)


def forced_rows(logits: torch.Tensor, eos: int) -> set[int]:
    rows = set()
    for r in range(logits.shape[0]):
        row = logits[r]
        if torch.isinf(row).any():
            others = torch.cat([row[:eos], row[eos + 1 :]])
            assert row[eos] == 0.0 and torch.isneginf(others).all(), f"row {r} partly masked"
            rows.add(r)
    return rows


@pytest.fixture(scope="module")
def core(tiny_tokenizer):
    defaults = cfg(min_new_tokens=2, max_consecutive_token_repeats=3, ngram_size=2, ngram_repeats=3)
    return ProcessorCore(tokenizer=tiny_tokenizer, defaults=defaults)


# -------------------------------------------------------------------------------------------- V1 bookkeeping


REQ_CONFIGS = [
    None,
    {"enabled": False},
    {"max_consecutive_token_repeats": 4},
    {"min_new_tokens": 6},
    {"ngram_size": 1, "ngram_repeats": 2, "max_consecutive_token_repeats": 0},
]


def _valid(out):
    return out[: out.index(-1)] if -1 in out else out


@pytest.mark.parametrize("seed", range(6))
def test_v1_batch_updates_add_remove_move_swap(core, seed):
    """Random persistent-batch churn (added / removed / unidirectional moves / swaps, async placeholders,
    discarded tokens): after every update the processor forces exactly the rows whose rule holds."""
    rng = random.Random(seed)
    eos = core.stop_ids[0]
    proc = RepeatTerminateV1LogitsProcessor(None, torch.device("cpu"), False, core=core)
    assert proc.is_argmax_invariant() is False
    slots: dict[int, dict] = {}
    to_remove: set[int] = set()
    n_forced = 0
    for step in range(250):
        removed = sorted({i for i in slots if rng.random() < 0.05} | to_remove)
        to_remove = set()
        for i in removed:
            del slots[i]
        added = []
        free = sorted(set(range(max(slots, default=-1) + 2)) - set(slots))
        for _ in range(rng.choice([0, 0, 1, 2])):
            idx = free.pop(0) if free else max(slots, default=-1) + 1
            ov = rng.choice(REQ_CONFIGS)
            req = {"out": [], "cfg": merge_overrides(core.defaults, ov)}
            slots[idx] = req
            added.append((idx, params(ov), [1, 2, 3], req["out"]))
        moved = []
        live = sorted(slots)
        if len(live) >= 2 and rng.random() < 0.3:
            a, b = rng.sample(live, 2)
            slots[a], slots[b] = slots[b], slots[a]
            moved.append((a, b, MoveDirectionality.SWAP))
        holes = sorted(set(range(max(slots, default=-1) + 1)) - set(slots))
        if holes and rng.random() < 0.5:  # condense: move the last request into the first hole
            last = max(slots)
            slots[holes[0]] = slots.pop(last)
            moved.append((last, holes[0], MoveDirectionality.UNIDIRECTIONAL))
        if removed or added or moved:
            proc.update_state(BatchUpdate(batch_size=len(slots), removed=removed, added=added, moved=moved))
        else:
            proc.update_state(None)
        for req in slots.values():
            out = req["out"]
            if out and out[-1] == -1:
                out[-1] = rng.randrange(4)  # the placeholder gets its real token
            r = rng.random()
            if r < 0.05 and len(out) >= 2:
                del out[-2:]  # tokens discarded (kv-load failure)
            elif r < 0.12:
                out.append(-1)  # async scheduling: placeholder not filled yet at apply time
            else:
                out.append(rng.randrange(4))
        logits = torch.zeros(max(slots, default=-1) + 1, V)
        proc.apply(logits)
        expected = {
            i for i, req in slots.items() if req["cfg"].enabled and triggered(req["cfg"], _valid(req["out"]))
        }
        assert forced_rows(logits, eos) == expected, (seed, step)
        for i in expected:  # a forced request samples EOS and leaves the batch at the next update
            slots[i]["out"].append(eos)
            to_remove.add(i)
            n_forced += 1
    assert n_forced > 0


# ------------------------------------------------------------------------------------------ MRV2 bookkeeping


class FakeReqStates:
    """The read-only view MRV2 gives processors: all_token_ids (.gpu), prompt_len (.np)."""

    def __init__(self, max_reqs=8, max_len=256):
        self.max_num_reqs = max_reqs
        self.vocab_size = V
        self.device = torch.device("cpu")
        self.all_token_ids = SimpleNamespace(gpu=torch.zeros(max_reqs, max_len, dtype=torch.int32))
        self.prompt_len = SimpleNamespace(np=np.zeros(max_reqs, dtype=np.int32))


def _ctx(batch_slots, seq_lens):
    idx = np.asarray(batch_slots, dtype=np.int32)
    return SimpleNamespace(
        idx_mapping_np=idx,
        idx_mapping=torch.from_numpy(idx),
        expanded_idx_mapping=torch.from_numpy(idx),
        seq_lens_upper_bound_np=np.asarray(seq_lens, dtype=np.int32),
    )


@pytest.mark.parametrize("seed", range(6))
def test_mrv2_slots_reordering_prefill_preemption(core, seed):
    """Fake MRV2 runner: recycled slots, rows reordered every step, chunked prefill (seq_len < prompt_len),
    resumption after preemption (re-added with partial output already committed), declined requests."""
    rng = random.Random(100 + seed)
    eos = core.stop_ids[0]
    rs = FakeReqStates()
    proc = RepeatTerminateMRV2LogitsProcessor(None, rs, core=core)
    live: dict[int, dict] = {}
    free = list(range(rs.max_num_reqs))
    n_forced = 0
    for step in range(250):
        if free and rng.random() < 0.3:  # admit a request
            slot = free.pop(rng.randrange(len(free)))
            ov = rng.choice(REQ_CONFIGS)
            plen = rng.randint(3, 9)
            rs.prompt_len.np[slot] = plen
            rs.all_token_ids.gpu[slot, :plen] = torch.tensor([rng.randrange(4) for _ in range(plen)])
            wants = proc.add_request(slot, params(ov))
            c = merge_overrides(core.defaults, ov)
            assert wants == c.enabled
            live[slot] = {
                "cfg": c,
                "plen": plen,
                "out": [],
                "prefilled": rng.choice([plen, max(1, plen - 2)]),
                "ov": ov,
            }
        if live and rng.random() < 0.05:  # preempt + resume: same slot, add_request again, outputs kept
            slot = rng.choice(sorted(live))
            req = live[slot]
            proc.add_request(slot, params(req["ov"]))
            req["prefilled"] = req["plen"] + len(req["out"])
        if not live:
            continue
        batch = list(live)
        rng.shuffle(batch)
        seq_lens = []
        for s in batch:
            req = live[s]
            full = req["plen"] + len(req["out"])
            seq_lens.append(min(full, req["prefilled"]))
        logits = torch.zeros(len(batch), V)
        proc.apply(logits, _ctx(batch, seq_lens))
        got = {batch[r] for r in forced_rows(logits, eos)}
        expected = set()
        for s, sl in zip(batch, seq_lens):
            req = live[s]
            gen = req["out"][: max(0, sl - req["plen"])]
            if req["cfg"].enabled and triggered(req["cfg"], gen):
                expected.add(s)
        assert got == expected, (seed, step)
        for s, sl in zip(batch, seq_lens):  # commit this step's token (or finish)
            req = live[s]
            if sl < req["plen"] + len(req["out"]):
                req["prefilled"] = req["plen"] + len(req["out"])  # next chunk completes the prefill
                continue
            if s in expected or len(req["out"]) > 40:
                del live[s]
                free.append(s)
                n_forced += s in expected
                continue
            tok = rng.randrange(4)
            pos = req["plen"] + len(req["out"])
            rs.all_token_ids.gpu[s, pos] = tok
            req["out"].append(tok)
            req["prefilled"] = pos + 1
    assert n_forced > 0


# -------------------------------------------------------------------------------------------- facade, params


def fake_vllm_config(model_dir, speculative=None):
    mc = SimpleNamespace(
        skip_tokenizer_init=True,
        tokenizer=str(model_dir),
        tokenizer_revision=None,
        trust_remote_code=False,
        get_vocab_size=lambda: 10**6,
    )
    return SimpleNamespace(model_config=mc, speculative_config=speculative)


def test_facade_dispatches_on_the_runner_signature(tiny_model_dir):
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2

    assert issubclass(RepeatTerminateLogitsProcessor, V1) and issubclass(RepeatTerminateLogitsProcessor, V2)
    vc = fake_vllm_config(tiny_model_dir)
    p1 = RepeatTerminateLogitsProcessor(vc, torch.device("cpu"), False)
    assert isinstance(p1, RepeatTerminateV1LogitsProcessor) and p1.runner == "v1"
    p2 = RepeatTerminateLogitsProcessor(vc, FakeReqStates())
    assert isinstance(p2, RepeatTerminateMRV2LogitsProcessor) and p2.runner == "mrv2"
    with pytest.raises(TypeError, match="constructor signature"):
        RepeatTerminateLogitsProcessor(vc, object())
    with pytest.raises(ValueError, match="speculative decoding"):
        RepeatTerminateLogitsProcessor(
            fake_vllm_config(tiny_model_dir, speculative=object()), FakeReqStates()
        )
    assert PROCESSOR_FQCN == "coordexp.rollout.vllm_processor:RepeatTerminateLogitsProcessor"


def test_validate_params_and_server_defaults(monkeypatch):
    validate_request_params(params({"enabled": False}))
    validate_request_params(SimpleNamespace(extra_args=None))
    with pytest.raises(ValueError, match="unknown key"):
        RepeatTerminateLogitsProcessor.validate_params(params({"max_repeats": 3}))
    with pytest.raises(ValueError, match="must be a mapping"):
        validate_request_params(params(5))
    assert server_default_config({}).enabled is False
    assert (
        server_default_config({ENV_CONFIG_JSON: '{"enabled": true, "min_new_tokens": 3}'}).min_new_tokens == 3
    )
    with pytest.raises(ValueError, match=ENV_CONFIG_JSON):
        server_default_config({ENV_CONFIG_JSON: '{"enabled": true, "bogus": 1}'})


# ------------------------------------------------------------------------------------------------- real vLLM


@pytest.mark.slow
def test_real_vllm_engine_forces_only_offending_sequences(
    tiny_model_dir, tiny_tokenizer, vllm_cpu_env, monkeypatch
):
    """Offline vLLM (V1 runner on CPU) with the processor registered by FQCN at engine start: in one
    batch only the sequences whose rule holds end early with EOS; the others run to max_tokens,
    token-identical to the same prompt with the feature off. Server defaults come from the env JSON."""
    from vllm import LLM

    defaults = {
        "enabled": True,
        "min_new_tokens": 3,
        "max_consecutive_token_repeats": 5,
        "ngram_size": 0,
        "ngram_repeats": 0,
        "max_object_keys": None,
    }
    monkeypatch.setenv(ENV_CONFIG_JSON, json.dumps(defaults))
    llm = LLM(
        model=str(tiny_model_dir),
        dtype="float32",
        max_model_len=512,
        enforce_eager=True,
        seed=0,
        logits_processors=[PROCESSOR_FQCN],
    )
    try:
        _check_engine(llm, tiny_tokenizer, defaults)
    finally:
        _shutdown(llm)


def _shutdown(llm) -> None:
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def _check_engine(llm, tiny_tokenizer, defaults) -> None:
    from vllm import SamplingParams

    eos = tiny_tokenizer.eos_token_id
    prompts = [
        "hello",
        "red square",
        "detect all objects now please",
        "blue star <|coord_5|>",
        "x",
        "Objects:\ngreen heart",
    ]
    token_prompts = [
        {
            "prompt_token_ids": tiny_tokenizer.encode(
                tiny_tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                ),
                add_special_tokens=False,
            )
        }
        for p in prompts
    ]
    variants = [  # (overrides, max_tokens)
        ({"enabled": False}, 24),  # reference: feature off for this request
        (None, 24),  # server defaults from the env JSON
        ({"max_consecutive_token_repeats": 3, "min_new_tokens": 2}, 20),
        ({"max_consecutive_token_repeats": 40}, 16),  # enabled, can never fire within 16 tokens
        ({"ngram_size": 2, "ngram_repeats": 3, "max_consecutive_token_repeats": 0}, 24),
    ]
    batch, meta = [], []
    for pi, tp in enumerate(token_prompts):
        for ov, mt in variants:
            xa = {XARGS_KEY: ov} if ov is not None else None
            batch.append((tp, SamplingParams(max_tokens=mt, temperature=0.0, extra_args=xa)))
            meta.append((pi, ov, mt))
    outs = llm.generate([b[0] for b in batch], [b[1] for b in batch])
    ref = {}
    for (pi, ov, _mt), o in zip(meta, outs):
        if ov == {"enabled": False}:
            ref[pi] = list(o.outputs[0].token_ids)
    n_forced = n_free = 0
    base = parse_config(defaults)
    for (pi, ov, mt), o in zip(meta, outs):
        c = merge_overrides(base, ov)
        ids = list(o.outputs[0].token_ids)
        first = first_trigger_length(c, ref[pi][:mt]) if c.enabled else None
        if first is not None and first < mt:  # must have been forced right there
            assert ids == ref[pi][:first] + [eos], (pi, ov, ids, ref[pi])
            assert o.outputs[0].finish_reason == "stop"
            assert forced_eos_flag(c, ids, [eos]) == 1
            n_forced += 1
        else:  # untouched: identical to the feature-off reference, runs to max_tokens
            assert ids == ref[pi][:mt], (pi, ov, ids, ref[pi])
            assert o.outputs[0].finish_reason == "length" and len(ids) == mt
            assert forced_eos_flag(c, ids, [eos]) == 0
            n_free += 1
    assert n_forced >= 3 and n_free >= 6, (n_forced, n_free)
    # bad per-request overrides are rejected at admission
    with pytest.raises(Exception, match="unknown key"):
        llm.generate(token_prompts[:1], [SamplingParams(max_tokens=4, extra_args={XARGS_KEY: {"bogus": 1}})])
