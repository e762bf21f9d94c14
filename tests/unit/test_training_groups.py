"""The learner with parameter groups, precision and activation checkpointing, driven in-process for a few
steps on the tiny Qwen2-VL model (Channel A with two soft self-context passes, rollout=hf): frozen groups stay
bit-identical, every trainable parameter moves, the optimizer carries the configured rates, bf16 autocast
matches fp32 within a stated tolerance, checkpointing changes nothing but memory, and resume keeps the groups.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from learner_fixture import fake_trainer

from coordexp.config.load import compose, to_train_config
from coordexp.models.param_groups import group_of

#: A few Channel-A steps of 2 samples each (no rollouts: b_ratio 0), soft self-context as in production.
BASE = ["+experiment=smoke/ab_mixed_vl", "model.tiny_stage1_steps=0", "stage2_ab.schedule.b_ratio=0.0",
        "training.effective_batch_size=2", "training.per_device_train_batch_size=2", "training.packing=false",
        "training.eval_strategy=no", "training.save_strategy=no", "training.report_to=[]",
        "training.warmup_steps=0", "training.lr_scheduler_type=constant", "training.weight_decay=0.01",
        "data.synthetic.train_samples=16", "data.synthetic.val_samples=2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    from coordexp.models.tiny import ensure_tiny_model

    root = tmp_path_factory.getbasetemp() / "tiny-model-cache"  # shared with the other tiny-VLM tests
    ensure_tiny_model(root, arch="qwen2_vl")
    return root


def run(cache: Path, run_dir: Path, *overrides: str):
    from coordexp.trainer.learner import train

    cfg = to_train_config(compose([*BASE, f"model.path={cache}", f"training.output_dir={run_dir}",
                                   *overrides]))
    return train(cfg, run_dir, summary=False)


def base_weights(cache: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForImageTextToText

    from coordexp.models.tiny import ensure_tiny_model

    model = AutoModelForImageTextToText.from_pretrained(ensure_tiny_model(cache, arch="qwen2_vl"))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def named_groups(optimizer) -> dict[str, tuple[float, float, int]]:
    """``{name: (initial lr, weight decay, element count)}`` read from the optimizer's param groups."""
    return {g["name"]: (g["initial_lr"], g["weight_decay"], sum(p.numel() for p in g["params"]))
            for g in optimizer.param_groups}


@pytest.mark.slow
def test_frozen_vision_tower_stays_bit_identical_and_groups_carry_their_rates(cache, tmp_path):
    trainer = run(cache, tmp_path / "run", "training.max_steps=3", "model.freeze_vit=true",
                  "training.learning_rate=1e-3", "training.vit_lr=2e-4", "training.aligner_lr=5e-3")
    before = base_weights(cache)
    model = trainer.model
    groups = {n: group_of(n, "qwen2_vl") for n, _ in model.named_parameters()}
    assert set(groups.values()) == {"llm", "vit", "aligner"}
    for name, p in model.named_parameters():
        if groups[name] == "vit":
            assert not p.requires_grad and torch.equal(p, before[name]), name
        else:  # every trainable parameter moved
            assert p.requires_grad and not torch.equal(p, before[name]), name
    got = named_groups(trainer.optimizer)
    assert {k: v[:2] for k, v in got.items()} == {
        "llm/decay": (1e-3, 0.01), "llm/no_decay": (1e-3, 0.0),
        "aligner/decay": (5e-3, 0.01), "aligner/no_decay": (5e-3, 0.0)}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == trainable
    # the scheduler scales each group's own rate (constant here: unchanged after 3 steps)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-3, 1e-3, 5e-3, 5e-3]


@pytest.mark.slow
def test_scheduler_scales_each_group_by_the_same_factor(cache, tmp_path):
    trainer = run(cache, tmp_path / "run", "training.max_steps=2", "training.warmup_steps=4",
                  "training.lr_scheduler_type=linear", "model.freeze_llm=true", "training.vit_lr=1e-3",
                  "training.aligner_lr=4e-3")
    factors = {g["name"]: g["lr"] / g["initial_lr"] for g in trainer.optimizer.param_groups}
    assert set(factors) == {"vit/decay", "vit/no_decay", "aligner/decay", "aligner/no_decay"}
    assert all(f == pytest.approx(0.5) for f in factors.values())  # step 2 of 4 warmup steps
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters()
               if group_of(n, "qwen2_vl") == "llm")


class Recorder:
    """Records the dtype a decoder projection computes in (autocast on or off) and the dtypes of the loss
    terms the trainer gets from coordexp.trainer.losses.sample_losses."""

    def __init__(self, monkeypatch):
        import coordexp.trainer.stage2_trainer as st

        self.proj: list[torch.dtype] = []
        self.losses: list[set[torch.dtype]] = []
        self.logits: list[torch.dtype] = []
        real = st.sample_losses

        def recording(ce_logits, geo_logits, *args, **kwargs):
            self.logits.append(geo_logits.dtype)
            out = real(ce_logits, geo_logits, *args, **kwargs)
            self.losses.append({v.dtype for v in out.values()})
            return out

        monkeypatch.setattr(st, "sample_losses", recording)

    def hook(self, model) -> None:
        layer = model.model.language_model.layers[0].self_attn.q_proj
        layer.register_forward_hook(lambda m, i, o: self.proj.append(o.dtype))


@pytest.mark.slow
def test_bf16_autocast_step_matches_fp32_with_geometry_in_fp32(cache, tmp_path, monkeypatch):
    """One step on the same batch (same seed and data): bf16 autocast's loss within 2 % of fp32's; the
    projections ran in bf16, the losses in fp32, the master weights stayed fp32."""
    from coordexp.trainer import stage2_trainer as st

    losses, seen = {}, {}
    for precision in ("fp32", "bf16"):
        rec = Recorder(monkeypatch)
        real_init = st.Stage2ABTrainer.__init__

        def init(self, *a, _rec=rec, _init=real_init, **kw):
            _init(self, *a, **kw)
            _rec.hook(self.model)

        monkeypatch.setattr(st.Stage2ABTrainer, "__init__", init)
        trainer = run(cache, tmp_path / precision, "training.max_steps=1", f"training.precision={precision}")
        monkeypatch.setattr(st.Stage2ABTrainer, "__init__", real_init)
        losses[precision] = trainer.state.log_history[0]["loss"]
        seen[precision] = (set(rec.proj), rec.losses, set(rec.logits))
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
        assert trainer.accelerator.mixed_precision == ("bf16" if precision == "bf16" else "no")
    assert seen["fp32"][0] == {torch.float32} and seen["bf16"][0] == {torch.bfloat16}
    for precision in ("fp32", "bf16"):
        assert seen[precision][1] and all(d == {torch.float32} for d in seen[precision][1])
        assert seen[precision][2] == {torch.float32}  # accelerate returns the forward's outputs in fp32
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)
    assert losses["bf16"] != losses["fp32"]  # bf16 really computed something different


def _vl_batch(cache: Path, tmp_path: Path):
    from coordexp.data.jsonl import load_jsonl
    from coordexp.data.prompt import PromptSpec
    from coordexp.data.synthetic_images import write_synthetic_image_jsonl
    from coordexp.models.prompts import load_model_and_prompts
    from coordexp.models.tiny import ensure_tiny_model
    from coordexp.rollout.scoring import TokenizerAdapter
    from coordexp.trainer.batch import collate
    from coordexp.trainer.channels import channel_a_sequence

    model, tok, prompts = load_model_and_prompts(ensure_tiny_model(cache, arch="qwen2_vl"), "float32")
    adapter = TokenizerAdapter(tok)
    ab = to_train_config(compose(BASE + [f"model.path={cache}"])).stage2_ab
    split = write_synthetic_image_jsonl(tmp_path / "v.jsonl", 2, seed=4)
    seqs = [channel_a_sequence(s, prompts.encode(s), adapter, "desc_first", ab)
            for s in load_jsonl(split, PromptSpec())]
    return model, adapter, ab, collate(seqs, adapter.pad_id, prompts.image_token_id)


def _loss_and_grads(model, adapter, ab, batch):
    """The trainer's own Channel-A loss (two soft self-context passes) and every parameter's gradient."""
    fake = fake_trainer(ab, adapter, None, model)
    model.zero_grad(set_to_none=True)
    losses = fake._forward_losses(model, dict(batch), 2, True)
    loss = fake._weighted(losses).sum() / 2
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("frozen", ["none", "llm_embeddings", "lora"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(cache, tmp_path, frozen):
    """Non-reentrant checkpointing as the Trainer enables it, through soft self-context (inputs_embeds) on the
    tiny VLM, with the embeddings trainable or frozen (then the embedding output is made to require grad), and
    on a peft LoRA model (coordexp.trainer.adapters: every base weight frozen, coordinate rows trainable)."""
    from coordexp.config.schema import AdapterConfig, AdapterKind
    from coordexp.trainer.adapters import attach_adapter

    model, adapter, ab, batch = _vl_batch(cache, tmp_path)
    assert ab.n_softctx_iter == 2
    if frozen == "llm_embeddings":
        model.get_input_embeddings().weight.requires_grad_(False)
    if frozen == "lora":
        lora = AdapterConfig(kind=AdapterKind.lora, dropout=0.0)
        model = attach_adapter(model, lora, adapter.coord_token_ids)
    model.train()
    want_loss, want = _loss_and_grads(model, adapter, ab, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if frozen != "none":
        model.enable_input_require_grads()
    assert model.is_gradient_checkpointing
    got_loss, got = _loss_and_grads(model, adapter, ab, batch)
    assert torch.allclose(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert got.keys() == want.keys() and len(got) > 10
    assert frozen != "lora" or all("lora_" in n or "trainable_tokens" in n for n in got)
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.slow
def test_checkpointed_training_run_with_frozen_embeddings(cache, tmp_path):
    """The learner turns checkpointing on (non-reentrant) with frozen language model and trains the rest."""
    trainer = run(cache, tmp_path / "run", "training.max_steps=1", "training.gradient_checkpointing=true",
                  "model.freeze_llm=true")
    model = trainer.model
    assert model.is_gradient_checkpointing and trainer.args.gradient_checkpointing_kwargs == {
        "use_reentrant": False}
    assert model.get_input_embeddings()._forward_hooks  # enable_input_require_grads' hook
    assert trainer.state.global_step == 1 and trainer.state.log_history[0]["loss"] > 0


@pytest.mark.slow
def test_resume_with_frozen_groups_continues_with_identical_groups(cache, tmp_path):
    overrides = ["model.freeze_vit=true", "training.vit_lr=2e-4", "training.aligner_lr=5e-3",
                 "training.save_strategy=steps", "training.save_steps=2", "training.save_total_limit=null"]
    full = run(cache, tmp_path / "full", "training.max_steps=4", *overrides)
    first = run(cache, tmp_path / "part", "training.max_steps=2", *overrides)
    assert first.state.global_step == 2 and (tmp_path / "part" / "checkpoint-2").is_dir()
    resumed = run(cache, tmp_path / "resumed", "training.max_steps=4", *overrides,
                  f"training.resume_from_checkpoint={tmp_path / 'part' / 'checkpoint-2'}")
    assert resumed.state.global_step == 4
    from tests.conftest import read_jsonl

    trained = [r["step"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl") if "loss" in r]
    assert trained == [3, 4]  # this process trained steps 3 and 4 only
    assert named_groups(resumed.optimizer) == named_groups(full.optimizer)
    before = base_weights(cache)
    for name, p in resumed.model.named_parameters():
        if group_of(name, "qwen2_vl") == "vit":
            assert not p.requires_grad and torch.equal(p, before[name]), name
    # the optimizer state came back: every trainable parameter has 4 steps of Adam state, as without resume
    steps = {int(s["step"]) for s in resumed.optimizer.state.values()}
    assert steps == {4}
    full_params = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        assert torch.allclose(p, full_params[name], atol=1e-5), name


@pytest.mark.slow
def test_production_leaf_with_dora_frozen_vision_bf16_and_checkpointing(cache, tmp_path):
    """+experiment=ab_mixed on a local Qwen2-VL checkpoint (the tiny one), as a real run would configure it:
    fp32 master weights with bf16 autocast, checkpointing, the leaf's three rates, DoRA, frozen vision tower;
    CPU stand-ins for the GPU rollout server (rollout=hf, vllm=cpu) and a small step. Channel A and B run."""
    import math

    from coordexp.models.tiny import ensure_tiny_model
    from coordexp.trainer.learner import train

    ckpt = ensure_tiny_model(cache, arch="qwen2_vl")
    run_dir = tmp_path / "run"
    cfg = to_train_config(compose([
        "+experiment=ab_mixed", f"model.path={ckpt}", "rollout=hf", "vllm=cpu", "data=synthetic_images",
        "training.nproc_per_node=1", "training.effective_batch_size=2", "training.packing_length=2048",
        "training.max_steps=2", "training.eval_strategy=no", "training.save_strategy=no",
        "training.report_to=[]", f"training.output_dir={run_dir}", "data.synthetic.train_samples=8",
        "data.synthetic.val_samples=2",
        "model.adapter.kind=dora", "model.freeze_vit=true", "stage2_ab.schedule.b_ratio=0.5",
        "rollout_matching.max_new_tokens=16", "rollout_matching.decode_batch_size=2"]))
    t = cfg.training
    assert (cfg.model.dtype.value, t.precision.value, t.gradient_checkpointing) == ("float32", "bf16", True)
    trainer = train(cfg, run_dir, summary=False)
    assert trainer.state.global_step == 2
    assert trainer.accelerator.mixed_precision == "bf16" and trainer.model.is_gradient_checkpointing
    assert hasattr(trainer.model, "peft_config") and trainer.model.peft_config["default"].use_dora
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    rates = {g["name"]: g["initial_lr"] for g in trainer.optimizer.param_groups}
    assert rates["llm/decay"] == 2e-5 and rates["aligner/decay"] == 5e-5
    assert not any(k.startswith("vit") for k in rates)
    before = base_weights(cache)
    for name, p in trainer.model.named_parameters():
        if group_of(name, "qwen2_vl") == "vit":
            base = name.removeprefix("base_model.model.")
            assert not p.requires_grad and torch.equal(p, before[base]), name
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    from tests.conftest import read_jsonl

    records = read_jsonl(run_dir / "metrics.jsonl")
    channels = [r["stage2/channel_b"] for r in records if "stage2/channel_b" in r]
    assert channels == [0.0, 1.0]  # step 1 Channel A, step 2 Channel B (rollouts from the DoRA model)
