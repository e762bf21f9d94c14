"""Logits only at the positions that predict a supervised token (coordexp.trainer.kept_logits): which
positions, the column lookup, the fallback for a model without ``logits_to_keep``, and the trainer's loss and
every gradient against the full-logits path on the tiny text and vision-language models (padded, packed, soft
self-context in both gradient modes, Channel B)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from learner_fixture import channel_b_seqs, fake_trainer, grads, setup_channel_a

from coordexp.trainer import stage2_trainer
from coordexp.trainer.batch import collate
from coordexp.trainer.kept_logits import (
    accepts_logits_to_keep,
    forward_logits,
    predicting_logits,
    supervised_positions,
)
from coordexp.trainer.packing import pack


def test_supervised_positions_are_those_before_a_weighted_token_or_a_slot():
    weights = torch.tensor([[0, 0, 1, 1, 0, 0, 0, 0],
                            [0, 0, 0, 0, 0, 0.5, 0, 0]])
    slots = torch.tensor([[[0, 6], [0, 7], [0, 6], [0, 7]],
                          [[1, 4], [1, 4], [1, 4], [1, 4]]])
    every, at_slots = supervised_positions(weights, slots)
    assert at_slots.tolist() == [3, 5, 6]           # slot p is predicted at p - 1
    assert every.tolist() == [1, 2, 3, 4, 5, 6]     # CE: row 0 tokens 2, 3 and row 1 token 5 (union of rows)
    none, no_slots = supervised_positions(torch.zeros(1, 5), torch.zeros(0, 4, 2, dtype=torch.long))
    assert none.tolist() == [] and no_slots.tolist() == []


def test_predicting_logits_reads_the_kept_column_of_each_target():
    full = torch.randn(2, 8, 5)
    positions = torch.tensor([1, 3, 6])
    kept = full.index_select(1, positions)
    rows, targets = torch.tensor([0, 1, 1]), torch.tensor([4, 7, 2])
    assert torch.equal(predicting_logits(kept, rows, targets, positions), full[rows, targets - 1])
    assert torch.equal(predicting_logits(full, rows, targets), full[rows, targets - 1])
    with pytest.raises(ValueError, match="not among the kept logits positions"):
        predicting_logits(kept, torch.tensor([0]), torch.tensor([6]), positions)  # position 5 not kept
    nothing = torch.tensor([], dtype=torch.long)
    assert predicting_logits(kept[:, :0], nothing, nothing, positions[:0]).shape == (0, 5)


class Headless(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep`` (e.g. custom remote code)."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Embedding(10, 4)

    def forward(self, input_ids=None):
        return SimpleNamespace(logits=self.head(input_ids))


def test_a_model_without_logits_to_keep_gets_the_kept_columns_of_its_full_logits(tiny_model_dir):
    from coordexp.models.prompts import load_model_and_prompts

    toy = Headless()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    positions = torch.tensor([0, 2, 3])
    assert not accepts_logits_to_keep(toy)
    got = forward_logits(toy, positions, accepts_logits_to_keep(toy), input_ids=ids)
    assert torch.equal(got, toy(ids).logits[:, positions])
    model, _, _ = load_model_and_prompts(tiny_model_dir, "float32")
    assert accepts_logits_to_keep(model)
    with torch.no_grad():
        kept = forward_logits(model, positions, True, input_ids=ids)
        assert kept.shape == (1, 3, model.config.vocab_size)
        assert torch.allclose(kept, model(input_ids=ids).logits[:, positions], atol=1e-5, rtol=0)


def _loss_grads_and_widths(trainer, model, batch, n_segments, soft):
    widths = []
    real = trainer._logits

    def recording(*args):
        out = real(*args)
        widths.append((out[0].shape[1], out[1].shape[1]))
        return out

    trainer._logits = recording
    loss = trainer._weighted(trainer._forward_losses(model, dict(batch), n_segments, soft)).sum() / n_segments
    trainer._logits = real
    return loss.detach(), grads(model, loss), widths


def _compare_with_full_logits(monkeypatch, model, trainer, batch, n_segments, soft):
    kept_loss, kept_grads, widths = _loss_grads_and_widths(trainer, model, batch, n_segments, soft)
    with monkeypatch.context() as m:  # the full-logits path: every position, as before kept logits
        m.setattr(stage2_trainer, "supervised_positions", lambda *a: (None, None))
        full_loss, full_grads, full_widths = _loss_grads_and_widths(trainer, model, batch, n_segments, soft)
    assert kept_loss.item() == pytest.approx(full_loss.item(), rel=1e-5, abs=1e-6)
    assert kept_grads.keys() == full_grads.keys() and len(full_grads) > 10
    for name, g in full_grads.items():
        assert (kept_grads[name] - g).norm() <= 1e-5 * g.norm() + 1e-7, name
    return widths, full_widths


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("n_softctx_iter,grad_mode", [(1, "unroll"), (2, "unroll"), (2, "em_detach")])
def test_kept_logits_give_the_full_logits_loss_and_gradients_text(monkeypatch, tiny_model_dir, text_samples,
                                                                  layout, n_softctx_iter, grad_mode):
    model, adapter, prompts, ab, seqs = setup_channel_a(tiny_model_dir, text_samples[:3], n_softctx_iter)
    ab.softctx_grad_mode = type(ab.softctx_grad_mode)(grad_mode)
    trainer = fake_trainer(ab, adapter, prompts.image_token_id, model)
    batch = collate(seqs, adapter.pad_id) if layout == "padded" else pack(seqs)
    widths, full_widths = _compare_with_full_logits(monkeypatch, model, trainer, batch, len(seqs),
                                                    n_softctx_iter > 1)
    every, at_slots = supervised_positions(batch["ce_weights"], batch["geometry_slots"])
    width = batch["input_ids"].shape[1]
    assert full_widths == [(width, width)]
    # CE logits: only the supervised positions (no prompt); geometry logits of a later pass: the slots only
    assert widths == [(len(every), len(every) if n_softctx_iter == 1 else len(at_slots))]
    prompt = min(len(q.prompt_ids) for q in seqs)
    assert len(every) <= width - prompt and len(at_slots) < len(every)


@pytest.mark.parametrize("n_softctx_iter", [1, 2])
def test_kept_logits_give_the_full_logits_loss_and_gradients_vl(monkeypatch, vl, n_softctx_iter):
    path, samples = vl
    model, adapter, prompts, ab, seqs = setup_channel_a(path, samples[:2], n_softctx_iter)
    trainer = fake_trainer(ab, adapter, prompts.image_token_id, model)
    batch = pack(seqs, prompts.image_token_id, model)
    widths, _ = _compare_with_full_logits(monkeypatch, model, trainer, batch, len(seqs), n_softctx_iter > 1)
    images = int((batch["input_ids"] == prompts.image_token_id).sum())
    assert images > 0 and widths[0][0] <= batch["input_ids"].shape[1] - images  # no image placeholder kept


def test_kept_logits_give_the_full_logits_loss_and_gradients_channel_b(monkeypatch, tiny_model_dir,
                                                                       text_samples):
    model, adapter, prompts, ab, _ = setup_channel_a(tiny_model_dir, text_samples[:3], 1)
    seqs = channel_b_seqs(model, adapter, prompts, ab, text_samples[:3])
    trainer = fake_trainer(ab, adapter, prompts.image_token_id, model)
    _compare_with_full_logits(monkeypatch, model, trainer, pack(seqs), len(seqs), False)


@pytest.mark.parametrize("n_softctx_iter", [1, 2])
def test_total_flos_counts_six_flops_per_parameter_and_token_of_every_pass(tiny_model_dir, text_samples,
                                                                         n_softctx_iter):
    """transformers' rule (PreTrainedModel.floating_point_ops: 6 x non-embedding parameters x tokens) over the
    tokens the model read: a pack once per soft self-context pass. The Trainer's own rule gave 0."""
    model, adapter, prompts, ab, seqs = setup_channel_a(tiny_model_dir, text_samples[:3], n_softctx_iter)
    trainer = fake_trainer(ab, adapter, prompts.image_token_id, model)
    trainer.model, trainer._flop_parameters = model, None
    trainer.floating_point_ops = stage2_trainer.Stage2ABTrainer.floating_point_ops.__get__(trainer)
    batch = pack(seqs)
    tokens = batch["input_ids"].numel()
    trainer._forward_losses(model, batch, len(seqs), soft_context=True)
    flops = trainer.floating_point_ops({})
    assert flops == 6 * model.num_parameters(exclude_embeddings=True) * tokens * n_softctx_iter > 0
    assert trainer.floating_point_ops({}) == 0  # counted once
