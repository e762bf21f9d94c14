"""Channel-A soft self-context: the expected-embedding rule on a hand-computable toy model, the gradient
modes, N=1 identical to plain teacher forcing, and real tiny text / VL models (mRoPE via inputs_embeds)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from coordexp.config.load import compose, to_train_config
from coordexp.trainer.softctx import coord_slot_mask, soft_context_embeds, soft_self_context

VOCAB, HIDDEN = 6, 3
COORD_IDS = torch.tensor([3, 4, 5])


class Toy(torch.nn.Module):
    """Embedding + linear head; records every pass's inputs_embeds and whether grad was enabled."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, VOCAB)
        self.calls = []

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None, use_cache=False, attention_mask=None):
        if inputs_embeds is None:  # a transformers model embeds input_ids itself (exactly one of the two)
            inputs_embeds = self.embed(input_ids)
        self.calls.append((inputs_embeds.detach().clone(), torch.is_grad_enabled()))
        return SimpleNamespace(logits=self.head(torch.tanh(inputs_embeds)))


IDS = torch.tensor([[0, 1, 3, 4, 2, 5]])       # text, text, coord, coord, "image placeholder", coord
SLOTS = torch.tensor([[[0, 2], [0, 3], [0, 5], [0, 5]]])  # (row, position) pairs; 5 twice: a mask, not a list


def test_slot_mask_marks_exactly_the_coordinate_slots():
    mask = coord_slot_mask((1, 6), SLOTS, torch.device("cpu"))
    assert mask.tolist() == [[False, False, True, True, False, True]]


def test_expected_embedding_at_each_slot_and_untouched_elsewhere():
    base = torch.arange(18, dtype=torch.float32).reshape(1, 6, 3)
    logits = torch.zeros(1, 6, VOCAB)
    logits[0, 1, 3:] = torch.tensor([0.0, 0.0, 2.0])  # predicts slot 2
    logits[0, 2, 3:] = torch.tensor([1.0, 1.0, 1.0])  # predicts slot 3: uniform
    logits[0, 4, 3:] = torch.tensor([5.0, 0.0, 0.0])  # predicts slot 5
    coord_embeds = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    mask = coord_slot_mask((1, 6), SLOTS, torch.device("cpu"))
    out = soft_context_embeds(base, logits, mask, COORD_IDS, coord_embeds, temperature=1.0)
    e2 = torch.exp(torch.tensor(2.0))
    e5 = torch.exp(torch.tensor(5.0))
    assert torch.allclose(out[0, 2], torch.tensor([1.0, 1.0, e2]) / (2 + e2))
    assert torch.allclose(out[0, 3], torch.full((3,), 1 / 3))
    assert torch.allclose(out[0, 5], torch.tensor([e5, 1.0, 1.0]) / (e5 + 2))
    for p in (0, 1, 4):  # text and the image placeholder keep their input
        assert torch.equal(out[0, p], base[0, p])
    half = soft_context_embeds(base, logits, mask, COORD_IDS, coord_embeds, temperature=2.0)
    assert torch.allclose(half[0, 2], torch.tensor([1.0, 1.0, e2 ** 0.5]) / (2 + e2 ** 0.5))  # tau divides


@pytest.mark.parametrize("grad_mode", ["unroll", "em_detach"])
def test_iteration_one_input_is_the_softmax_mix_of_iteration_zero(grad_mode):
    model = Toy()
    mask = coord_slot_mask((1, 6), SLOTS, torch.device("cpu"))
    first, _ = soft_self_context(model, model, model.embed, IDS, mask, COORD_IDS, n_iter=2,
                                 temperature=0.7, grad_mode=grad_mode)
    (x0, g0), (x1, g1) = model.calls
    assert torch.equal(x0, model.embed(IDS).detach())
    probs = torch.softmax(first.detach()[0, :-1][:, COORD_IDS] / 0.7, dim=-1)
    expected = probs @ model.embed.weight.detach()[COORD_IDS]
    for p in (2, 3, 5):
        assert torch.allclose(x1[0, p], expected[p - 1], atol=1e-6)
    for p in (0, 1, 4):
        assert torch.equal(x1[0, p], x0[0, p])
    assert (g0, g1) == (True, True)  # the CE anchor (pass 0) and the geometry pass both carry grad


def test_gradient_modes():
    mask = coord_slot_mask((1, 6), SLOTS, torch.device("cpu"))
    model = Toy()
    first, last = soft_self_context(model, model, model.embed, IDS, mask, COORD_IDS, n_iter=2,
                                    temperature=1.0, grad_mode="unroll")
    (through_first,) = torch.autograd.grad(last[0, 5].sum(), first, retain_graph=True)
    assert through_first.abs().sum() > 0  # unroll: geometry reaches pass 0 through the expected embeddings

    model = Toy()
    first, last = soft_self_context(model, model, model.embed, IDS, mask, COORD_IDS, n_iter=3,
                                    temperature=1.0, grad_mode="em_detach")
    assert [g for _, g in model.calls] == [True, False, True]  # pass 1 of 3 runs without grad
    (none,) = torch.autograd.grad(last[0, 5].sum(), first, allow_unused=True)
    assert none is None  # em_detach: geometry does not reach pass 0
    (head_grad,) = torch.autograd.grad(first[0, 1].sum(), model.head.weight)
    assert head_grad.abs().sum() > 0  # ...but the CE anchor still trains (the original's had no gradient)


def test_hostile_settings_are_refused():
    model = Toy()
    mask = coord_slot_mask((1, 6), SLOTS, torch.device("cpu"))
    with pytest.raises(ValueError, match="n_iter >= 2"):
        soft_self_context(model, model, model.embed, IDS, mask, COORD_IDS, n_iter=1, temperature=1.0,
                          grad_mode="unroll")
    with pytest.raises(ValueError, match="unroll or em_detach"):
        soft_self_context(model, model, model.embed, IDS, mask, COORD_IDS, n_iter=2, temperature=1.0,
                          grad_mode="bogus")


def test_config_accepts_n_passes_and_refuses_zero():
    from coordexp.config.validate import problems

    cfg = to_train_config(compose(["+experiment=smoke/a_only", "rollout=hf", "stage2_ab.n_softctx_iter=3",
                                   "stage2_ab.softctx_grad_mode=em_detach"]))
    assert (cfg.stage2_ab.n_softctx_iter, cfg.stage2_ab.softctx_grad_mode.value) == (3, "em_detach")
    from dataclasses import replace

    zero = replace(cfg, stage2_ab=replace(cfg.stage2_ab, n_softctx_iter=0))
    assert ("stage2_ab.n_softctx_iter: 0 must be in [1, 16] (1 = plain teacher forcing; each pass is a full "
            "forward, the production leaves use 2)") in problems(zero)


# ---------------------------------------------------------------------------------------- real tiny models


def _batch(path, arch_samples, field_order="desc_first"):
    from coordexp.models.prompts import load_model_and_prompts
    from coordexp.rollout.scoring import TokenizerAdapter
    from coordexp.trainer.batch import collate
    from coordexp.trainer.channels import channel_a_sequence

    model, tok, prompts = load_model_and_prompts(path, "float32")
    adapter = TokenizerAdapter(tok)
    ab = to_train_config(compose(["+experiment=smoke/a_only", "rollout=hf"])).stage2_ab
    seqs = [channel_a_sequence(s, prompts.encode(s), adapter, field_order, ab) for s in arch_samples]
    batch = collate(seqs, adapter.pad_id, prompts.image_token_id)
    return model.eval(), adapter, batch


@pytest.fixture(scope="module")
def text_batch(tiny_model_dir, tmp_path_factory):
    from coordexp.data.jsonl import load_jsonl
    from coordexp.data.prompt import PromptSpec
    from coordexp.data.synthetic import write_synthetic_jsonl

    split = write_synthetic_jsonl(tmp_path_factory.mktemp("d") / "t.jsonl", 3, seed=5)
    return _batch(tiny_model_dir, list(load_jsonl(split, PromptSpec())))


@pytest.fixture(scope="module")
def vl_batch(tmp_path_factory):
    from coordexp.data.jsonl import load_jsonl
    from coordexp.data.prompt import PromptSpec
    from coordexp.data.synthetic_images import write_synthetic_image_jsonl
    from coordexp.models.tiny import ensure_tiny_model

    path = ensure_tiny_model(tmp_path_factory.getbasetemp() / "tiny-model-cache", arch="qwen2_vl")
    split = write_synthetic_image_jsonl(tmp_path_factory.mktemp("img") / "v.jsonl", 2, seed=4)
    return _batch(path, list(load_jsonl(split, PromptSpec())))


def _passes(model, adapter, batch, slots, n_iter=2, grad_mode="unroll"):
    from coordexp.trainer.positions import mrope_position_ids

    inputs = batch["model_inputs"]
    kwargs = {"attention_mask": batch["attention_mask"], **inputs}
    positions = mrope_position_ids(model, batch["input_ids"], batch["attention_mask"], inputs)
    if positions is not None:
        kwargs["position_ids"] = positions
    mask = coord_slot_mask(tuple(batch["input_ids"].shape), slots, torch.device("cpu"))
    return soft_self_context(model, model, model.get_input_embeddings(), batch["input_ids"], mask,
                             torch.tensor(adapter.coord_token_ids), n_iter=n_iter, temperature=1.0,
                             grad_mode=grad_mode, **kwargs)


@pytest.mark.parametrize("which", ["text_batch", "vl_batch"])
def test_inputs_embeds_passes_equal_the_plain_forward_without_slots(which, request):
    """No slot to replace: every pass must reproduce the plain input_ids forward (for the VLM this proves the
    image features and the mRoPE positions reach the model unchanged through inputs_embeds)."""
    model, adapter, batch = request.getfixturevalue(which)
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      **batch["model_inputs"]).logits
        first, last = _passes(model, adapter, batch, torch.zeros(0, 4, 2, dtype=torch.long))
    assert torch.allclose(first, plain, atol=1e-5) and torch.allclose(last, plain, atol=1e-5)
    if which == "vl_batch":
        assert int((batch["input_ids"] == model.config.image_token_id).sum()) > 0


@pytest.mark.parametrize("which", ["text_batch", "vl_batch"])
def test_soft_context_changes_only_what_follows_a_slot(which, request):
    model, adapter, batch = request.getfixturevalue(which)
    with torch.no_grad():
        first, last = _passes(model, adapter, batch, batch["geometry_slots"])
    first_slot = int(batch["geometry_slots"][0, 0, 1])  # row 0: causal, so nothing before it can change
    assert torch.allclose(last[0, :first_slot], first[0, :first_slot], atol=1e-5)
    assert not torch.allclose(last[0, first_slot:], first[0, first_slot:], atol=1e-5)


def test_one_pass_is_plain_teacher_forcing(text_batch):
    """n_softctx_iter 1: the trainer's Channel-A logits are one plain teacher-forced forward, at the positions
    that predict a supervised token (coordexp.trainer.kept_logits), equal to the full forward's there."""
    from coordexp.trainer.kept_logits import supervised_positions
    from coordexp.trainer.stage2_trainer import Stage2ABTrainer

    model, adapter, batch = text_batch
    ab = to_train_config(compose(["+experiment=smoke/a_only", "rollout=hf",
                                  "stage2_ab.n_softctx_iter=1"])).stage2_ab
    fake = SimpleNamespace(stage2_ab=ab, _coord_ids=torch.tensor(adapter.coord_token_ids), _keeps_logits=None,
                           _forward_tokens=0,
                           accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    positions, _ = supervised_positions(batch["ce_weights"], batch["geometry_slots"])
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      logits_to_keep=positions).logits
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got_ce, got_geo, ce_at, geo_at = Stage2ABTrainer._logits(fake, model, batch, {}, True)
    assert got_ce is got_geo and ce_at is geo_at and torch.equal(ce_at, positions)  # one plain forward
    assert torch.equal(got_ce, plain) and fake._keeps_logits is True
    assert torch.allclose(got_ce, full.index_select(1, positions), atol=1e-5, rtol=0)
