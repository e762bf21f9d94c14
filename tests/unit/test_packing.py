"""Post-rollout packing: the FIFO-greedy plan, the packed layout, and the packed step's loss and gradients
against per-segment forwards of the same samples (tiny text and vision-language models, with and without
soft self-context)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from learner_fixture import channel_b_seqs, fake_trainer, grads, setup_channel_a

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


def _compare(path, samples, n_softctx_iter, capacity_of, channel="A"):
    model, adapter, prompts, ab, seqs = setup_channel_a(path, samples, n_softctx_iter)
    if channel == "B":
        seqs = channel_b_seqs(model, adapter, prompts, ab, samples)
        assert len(seqs) == len(samples)  # every rollout gave a target (appended GT at least)
    trainer = fake_trainer(ab, adapter, prompts.image_token_id, model)
    soft = n_softctx_iter > 1
    # reference: every segment forward on its own, mean of the per-sample totals
    per = [trainer._weighted(trainer._sample_losses(model, [q], soft)) for q in seqs]
    reference = torch.cat(per).mean()
    ref_grads = grads(model, reference)
    lengths = [len(q.prompt_ids) + len(q.target_ids) for q in seqs]
    packs = plan_packs(lengths, capacity_of(lengths))
    assert len(packs) >= 2 and any(len(p) >= 2 for p in packs)  # several packs, several segments in one
    total = sum(trainer._pack_loss(model, [seqs[i] for i in members], len(seqs), soft) for members in packs)
    packed_grads = grads(model, total)
    assert total.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)
    assert ref_grads.keys() == packed_grads.keys() and len(ref_grads) > 10
    for name, g in ref_grads.items():  # float32: the packed attention sums in another order
        assert (packed_grads[name] - g).norm() <= 1e-4 * g.norm() + 1e-7, name


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
