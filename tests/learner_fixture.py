"""Shared by the learner-loss tests: a Stage2ABTrainer stand-in with the real loss methods, Channel-A / B
segments of the tiny models, and their sample splits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from coordexp.config.load import compose, to_train_config
from coordexp.telemetry.metrics import MetricBuffer
from coordexp.trainer.stage2_trainer import Stage2ABTrainer


def fake_trainer(ab, adapter, image_token_id, model):
    fake = SimpleNamespace(stage2_ab=ab, adapter=adapter, metric_buffer=MetricBuffer(),
                           prompts=SimpleNamespace(image_token_id=image_token_id),
                           args=SimpleNamespace(device=torch.device("cpu")),
                           _coord_ids=torch.tensor(adapter.coord_token_ids), _keeps_logits=None,
                           _forward_tokens=0,
                           accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    for name in ("_logits", "_forward_losses", "_weighted", "_sample_losses", "_mean_loss", "_pack_loss"):
        setattr(fake, name, getattr(Stage2ABTrainer, name).__get__(fake))
    return fake


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def setup_channel_a(path, samples, n_softctx_iter):
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


def channel_b_seqs(model, adapter, prompts, ab, samples):
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
