"""Learner pieces on a real tiny model: Channel-B masks and gradients, the trigger flag's neutrality,
and decode_batch_size as the rollout micro-batch (training and eval)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from coordexp.config.contract import rollout_contract
from coordexp.config.load import compose, to_train_config
from coordexp.coordjson import CoordObject, serialize_record
from coordexp.data.jsonl import DetectionObject, DetectionSample
from coordexp.data.prompt import build_messages
from coordexp.models.prompts import TextPromptEncoder
from coordexp.rollout.batch import Rollout, generate_rollouts
from coordexp.rollout.hf_backend import HFRolloutBackend
from coordexp.rollout.scoring import TokenizerAdapter
from coordexp.trainer.batch import APPENDED, PREFIX, collate
from coordexp.trainer.channels import channel_b_sequence
from coordexp.trainer.evaluation import rollout_evaluator
from coordexp.trainer.losses import coord_distribution, geometry_losses, slot_logits, weighted_token_ce

GT = [DetectionObject("red square", (100, 100, 300, 300)), DetectionObject("blue star", (500, 500, 700, 700)),
      DetectionObject("green heart", (800, 100, 900, 200))]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return tok, AutoModelForCausalLM.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def cfg():
    return to_train_config(compose(["+experiment=smoke/ab_mixed", "rollout=hf",
                                    "rollout_matching.decode_batch_size=4"]))


def sample():
    s = DetectionSample(index=0, source="t.jsonl:1", width=100, height=100, objects=tuple(GT))
    return DetectionSample(**{**s.__dict__, "messages": tuple(build_messages(s))})


def rollout_text():
    matched = serialize_record(CoordObject("red square", (100, 100, 300, 310)), "desc_first")
    false_pos = serialize_record(CoordObject("blue star", (0, 900, 50, 950)), "desc_first")
    invalid = '{"desc": "green heart", "bbox_2d": [<|coord_1|>, <|coord_2|>]}'
    return '{"objects": [' + f"{matched}, {false_pos}, {invalid}" + "]}"  # GT 1 and 2 are missing


def test_channel_b_masks_and_gradients(tiny, cfg):
    tok, model = tiny
    adapter = TokenizerAdapter(tok)
    s = sample()
    prompt = TextPromptEncoder(tok).encode(s)
    gen = adapter.encode(rollout_text()) + [adapter.eos_id]
    seq, record = channel_b_sequence(s, prompt, Rollout(prompt.ids, gen, 0, False), adapter,
                                     rollout_contract(cfg), cfg.stage2_ab)
    assert ((record.valid_pred, record.dropped_invalid, record.matched, record.fp, record.fn)
            == (2, 1, 1, 1, 2))
    assert seq.geometry_kinds == [PREFIX, APPENDED, APPENDED]
    pieces = adapter.pieces(seq.target_ids)
    text = "".join(pieces)
    fp_start = text.index('{"desc": "blue star"')
    fp_end = text.index("}", fp_start) + 1
    starts = [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
    fp_tokens = [i for i, st in enumerate(starts) if fp_start <= st and st + len(pieces[i]) <= fp_end]
    assert fp_tokens and all(seq.ce_weights[i] == 0 for i in fp_tokens)
    coord_tokens = [i for i, t in enumerate(seq.target_ids) if adapter.coord_vocab.bin_of(t) is not None]
    assert all(seq.ce_weights[i] == 0 for i in coord_tokens)

    batch = collate([seq], adapter.pad_id)
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"]).logits
    logits.retain_grad()
    ce = weighted_token_ce(logits, batch["input_ids"], batch["ce_weights"])
    coord_ids = torch.tensor(adapter.coord_token_ids)
    probs = coord_distribution(slot_logits(logits, batch["geometry_slots"]), coord_ids)
    sl1, ciou, _ = geometry_losses(probs, batch["geometry_bins"], 0.05)
    (ce + sl1 + ciou).backward()
    grad_rows = logits.grad[0].abs().sum(-1)  # gradient reaching the logits that predict each position
    offset = len(prompt.ids)
    for slot in [p for group in seq.geometry_slots for p in group]:
        assert grad_rows[offset + slot - 1] > 0, "geometry slots receive gradient"
    for i in fp_tokens:
        assert grad_rows[offset + i - 1] == 0, "false-positive spans receive none"


def test_trigger_flag_does_not_change_supervision(tiny, cfg):
    tok, _ = tiny
    adapter = TokenizerAdapter(tok)
    s = sample()
    prompt = TextPromptEncoder(tok).encode(s)
    gen = adapter.encode(rollout_text()) + [adapter.eos_id]
    contract = rollout_contract(cfg)
    a, rec_a = channel_b_sequence(s, prompt, Rollout(prompt.ids, gen, 0, False), adapter, contract,
                                  cfg.stage2_ab)
    b, rec_b = channel_b_sequence(s, prompt, Rollout(prompt.ids, gen, 1, False), adapter, contract,
                                  cfg.stage2_ab)
    assert a == b
    assert (rec_a.triggered, rec_b.triggered) == (0, 1)


def test_decode_batch_size_is_the_generate_batch_in_training_and_eval(tiny, cfg):
    tok, model = tiny
    contract = rollout_contract(cfg)
    seen = []
    original = model.generate

    def recording_generate(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    model.generate = recording_generate
    try:
        backend = HFRolloutBackend(lambda: model, tok, contract)
        adapter = TokenizerAdapter(tok)
        prompts = [TextPromptEncoder(tok).encode(sample()).ids] * 10
        batch = backend.generate(prompts, [list(sample().messages)] * 10, seed=0)
        assert seen == [4, 4, 2] and batch.decode_batch_sizes == [4, 4, 2] and len(batch.rollouts) == 10
        seen.clear()

        class FakeTrainer:  # only what the evaluator reads
            class args:
                process_index, world_size = 0, 1
            run_dir = None
            state = type("S", (), {"global_step": 0})()

            @staticmethod
            def is_world_process_zero():
                return False

            @staticmethod
            def rollouts(samples, prompts, seed):  # Stage2ABTrainer.rollouts without a server: no sync
                return generate_rollouts(backend, samples, prompts, seed)

        metrics = rollout_evaluator([sample()] * 6, adapter, TextPromptEncoder(tok), contract,
                                    seed=0)(FakeTrainer)
        assert seen == [4, 2] and metrics["eval_rollout/raw_rollouts"] == 6
    finally:
        model.generate = original
