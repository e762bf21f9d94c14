"""Post-rollout packing: the FIFO-greedy plan, the packed layout, and the packed step's loss and gradients
against per-segment forwards of the same samples (tiny text and vision-language models, with and without
soft self-context)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from coordexp.config.load import compose, to_train_config
from coordexp.telemetry.metrics import MetricBuffer
from coordexp.trainer.batch import TrainSequence
from coordexp.trainer.packing import OversizeSegmentError, pack, plan_packs
from coordexp.trainer.stage2_trainer import Stage2ABTrainer


def test_plan_is_next_fit_in_arrival_order():
    assert plan_packs([5, 4, 3, 2, 6], capacity=10) == [[0, 1], [2, 3], [4]]
    assert plan_packs([7, 4, 3], capacity=10) == [[0], [1, 2]]  # no later segment jumps the queue
    assert plan_packs([10, 10], capacity=10) == [[0], [1]]
    assert plan_packs([], capacity=10) == []


def test_an_oversize_segment_names_the_sample_and_the_fix():
    with pytest.raises(OversizeSegmentError) as info:
        plan_packs([3, 12], capacity=10, names=["a.jsonl:1", "a.jsonl:2"])
    assert str(info.value) == (
        "a.jsonl:2: prompt + target is 12 tokens, more than training.packing_length=10; "
        "raise training.packing_length (and vllm.max_model_len), or shorten the sample")


def test_packed_layout():
    a = TrainSequence([1, 2], [3, 4, 5], [1.0, 0.0, 0.5], [(1, 2, 1, 2)], [(10, 20, 30, 40)], [0])
    b = TrainSequence([6], [7, 8], [1.0, 1.0], [(0, 1, 0, 1)], [(1, 2, 3, 4)], [1])
    p = pack([a, b])
    assert p["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]  # restart per segment
    assert p["segment_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1]]
    assert p["ce_weights"].tolist() == [[0.0, 0.0, 1.0, 0.0, 0.5, 0.0, 1.0, 1.0]]
    assert p["geometry_slots"].tolist() == [[[0, 3], [0, 4], [0, 3], [0, 4]],
                                            [[0, 6], [0, 7], [0, 6], [0, 7]]]
    assert p["geometry_segments"].tolist() == [0, 1] and p["attention_mask"] is None
    assert p["geometry_bins"].tolist() == [[10, 20, 30, 40], [1, 2, 3, 4]]


def _fake_trainer(ab, adapter, image_token_id, model):
    fake = SimpleNamespace(stage2_ab=ab, adapter=adapter, metric_buffer=MetricBuffer(),
                           prompts=SimpleNamespace(image_token_id=image_token_id),
                           args=SimpleNamespace(device=torch.device("cpu")),
                           _coord_ids=torch.tensor(adapter.coord_token_ids),
                           accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    for name in ("_logits", "_forward_losses", "_weighted", "_sample_losses", "_mean_loss", "_pack_loss"):
        setattr(fake, name, getattr(Stage2ABTrainer, name).__get__(fake))
    return fake


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _setup(path, samples, n_softctx_iter):
    from coordexp.models.prompts import load_model_and_prompts
    from coordexp.rollout.scoring import TokenizerAdapter
    from coordexp.trainer.channels import channel_a_sequence

    model, tok, prompts = load_model_and_prompts(path, "float32")
    model.train()
    torch.manual_seed(0)
    adapter = TokenizerAdapter(tok)
    ab = to_train_config(compose(["+experiment=smoke/a_only", "rollout=hf",
                                  f"stage2_ab.n_softctx_iter={n_softctx_iter}"])).stage2_ab
    seqs = [channel_a_sequence(s, prompts.encode(s), adapter, "desc_first", ab) for s in samples]
    return model, adapter, prompts, ab, seqs


def _channel_b_seqs(model, adapter, prompts, ab, samples):
    """Channel-B segments from the model's own greedy rollouts (HF backend)."""
    from coordexp.config.contract import rollout_contract
    from coordexp.rollout.batch import generate_rollouts
    from coordexp.rollout.hf_backend import HFRolloutBackend
    from coordexp.trainer.channels import channel_b_sequence

    contract = rollout_contract(to_train_config(compose(["+experiment=smoke/b_only", "rollout=hf",
                                                         "rollout_matching.max_new_tokens=40"])))
    encoded = [prompts.encode(s) for s in samples]
    backend = HFRolloutBackend(lambda: model, adapter.tokenizer, contract, prompts.image_token_id)
    batch = generate_rollouts(backend, samples, encoded, seed=0)
    model.train()
    seqs = [channel_b_sequence(s, p, r, adapter, contract, ab)[0]
            for s, p, r in zip(samples, encoded, batch.rollouts)]
    return [q for q in seqs if q is not None]


def _compare(path, samples, n_softctx_iter, capacity_of, channel="A"):
    model, adapter, prompts, ab, seqs = _setup(path, samples, n_softctx_iter)
    if channel == "B":
        seqs = _channel_b_seqs(model, adapter, prompts, ab, samples)
        assert len(seqs) == len(samples)  # every rollout gave a target (appended GT at least)
    trainer = _fake_trainer(ab, adapter, prompts.image_token_id, model)
    soft = n_softctx_iter > 1
    # reference: every segment forward on its own, mean of the per-sample totals
    per = [trainer._weighted(trainer._sample_losses(model, [q], soft)) for q in seqs]
    reference = torch.cat(per).mean()
    ref_grads = _grads(model, reference)
    lengths = [len(q.prompt_ids) + len(q.target_ids) for q in seqs]
    packs = plan_packs(lengths, capacity_of(lengths))
    assert len(packs) >= 2 and any(len(p) >= 2 for p in packs)  # several packs, several segments in one
    total = sum(trainer._pack_loss(model, [seqs[i] for i in members], len(seqs), soft) for members in packs)
    packed_grads = _grads(model, total)
    assert total.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)
    assert ref_grads.keys() == packed_grads.keys() and len(ref_grads) > 10
    for name, g in ref_grads.items():  # float32: the packed attention sums in another order
        assert (packed_grads[name] - g).norm() <= 1e-4 * g.norm() + 1e-7, name


@pytest.fixture(scope="module")
def text_samples(tmp_path_factory):
    from coordexp.data.jsonl import load_jsonl
    from coordexp.data.prompt import PromptSpec
    from coordexp.data.synthetic import write_synthetic_jsonl

    return list(load_jsonl(write_synthetic_jsonl(tmp_path_factory.mktemp("t") / "t.jsonl", 5, seed=9),
                           PromptSpec()))


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    from coordexp.data.jsonl import load_jsonl
    from coordexp.data.prompt import PromptSpec
    from coordexp.data.synthetic_images import write_synthetic_image_jsonl
    from coordexp.models.tiny import ensure_tiny_model

    path = ensure_tiny_model(tmp_path_factory.getbasetemp() / "tiny-model-cache", arch="qwen2_vl")
    split = write_synthetic_image_jsonl(tmp_path_factory.mktemp("img") / "v.jsonl", 3, seed=2)
    return path, list(load_jsonl(split, PromptSpec()))


@pytest.mark.parametrize("n_softctx_iter", [1, 2])
def test_packed_step_equals_per_segment_forwards_text(tiny_model_dir, text_samples, n_softctx_iter):
    _compare(tiny_model_dir, text_samples, n_softctx_iter, lambda lengths: max(lengths) * 2)


def test_packed_channel_b_step_equals_per_segment_forwards(tiny_model_dir, text_samples):
    _compare(tiny_model_dir, text_samples, 1, lambda lengths: max(lengths) * 2, channel="B")


@pytest.mark.parametrize("n_softctx_iter", [1, 2])
def test_packed_step_equals_per_segment_forwards_vl(vl, n_softctx_iter):
    path, samples = vl
    _compare(path, samples, n_softctx_iter, lambda lengths: sum(sorted(lengths)[:2]))


def test_pack_metrics_are_global_sums_and_ratios():
    from coordexp.telemetry.metrics import reduce_buffers

    def rank(segments, packs, tokens, length=100):
        trainer = SimpleNamespace(metric_buffer=MetricBuffer(),
                                  packing=SimpleNamespace(length=length, min_fill_ratio=0.7))
        Stage2ABTrainer._record_packs(trainer, segments, packs, tokens)
        return trainer.metric_buffer.to_payload()

    merged = reduce_buffers([rank(2, 1, 90), rank(3, 2, 180), rank(1, 1, 10)])
    assert merged["packing/segments"] == 6 and merged["packing/packs"] == 4
    assert merged["packing/fill"] == pytest.approx((90 + 180 + 10) / 400)  # ratio of global sums
    assert merged["packing/underfilled_steps"] == 1  # the third rank's 10 % fill


def test_chunk_producer_yields_in_order_and_hands_errors_over():
    from coordexp.errors import LearnerError
    from coordexp.rollout.server_backend import ServerBackendError
    from coordexp.trainer.pipeline import ChunkProducer

    calls = []
    producer = ChunkProducer(lambda a, b: calls.append((a, b)) or list(range(a, b)), n=7, chunk=3)
    assert list(producer) == [[0, 1, 2], [3, 4, 5], [6]] and calls == [(0, 3), (3, 6), (6, 7)]

    def fail(a, b):
        if a == 3:
            raise ServerBackendError("rollout server failure: connection refused (optimizer step 4)")
        return [a]

    got = []
    with pytest.raises(ServerBackendError, match="connection refused"):
        for item in ChunkProducer(fail, n=9, chunk=3):
            got.append(item)  # noqa: PERF402 - the items seen before the error
    assert got == [[0]]  # the error reaches the consumer as itself, after the good chunk

    stuck = ChunkProducer(lambda a, b: [a], n=4, chunk=1, poll_s=0.05)
    for first in stuck:  # the consumer stops early: the producer must not stay blocked on the queue
        break
    assert first == [0]
    stuck._thread.join(timeout=2.0)
    assert not stuck._thread.is_alive()
    assert issubclass(ServerBackendError, LearnerError)
