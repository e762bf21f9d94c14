"""Parameter groups in the config and the optimizer, precision settings and the fp32 geometry region (unit
level: compose, meta-device models, hand-made logits). The training runs are in test_training_groups.py."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from coordexp.config.errors import ConfigError
from coordexp.config.leaf import leaf_file_problems
from coordexp.config.load import compose, to_train_config
from coordexp.config.schema import DType, Precision
from coordexp.config.validate import config_warnings, precision_problems, problems
from coordexp.models.param_groups import group_of
from coordexp.trainer import optim

TEXT = ["+experiment=smoke/ab_mixed", "rollout=hf"]
VL = ["+experiment=smoke/ab_mixed_vl"]


def config_problems(*overrides: str) -> list[str]:
    try:
        return problems(to_train_config(compose(list(overrides))))
    except ConfigError as err:
        return err.problems


def text_model_dir(tmp_path: Path, vision: bool = False) -> Path:
    data = {"model_type": "qwen2_vl" if vision else "qwen2"}
    if vision:
        data["vision_config"] = {"depth": 1}
    (tmp_path / "config.json").write_text(json.dumps(data))
    return tmp_path


# ---- config rules: one test per refused combination --------------------------------------------------------

@pytest.mark.parametrize("knob", ["model.freeze_vit=true", "model.freeze_aligner=true",
                                  "training.vit_lr=1e-4", "training.aligner_lr=1e-4"])
def test_vision_knob_on_tiny_text_model_is_a_config_error(knob):
    key = knob.split("=")[0]
    hint = f"set {key}=false" if "freeze" in key else f"set {key}=null (or leave it out)"
    assert f"{key}: the tiny qwen2 model is a text model without a vision tower or aligner (its only " \
           f"parameter group is the language model); {hint}" in config_problems(*TEXT, knob)


def test_vision_knob_on_local_text_checkpoint_names_it(tmp_path):
    path = text_model_dir(tmp_path)
    got = config_problems("+experiment=ab_mixed", f"model.path={path}", "vllm.server_gpus=[0]")
    want = f"training.vit_lr: the checkpoint {path} (its config.json has no vision_config) is a text model"
    assert any(p.startswith(want) for p in got)
    (tmp_path / "vl").mkdir()
    vl = text_model_dir(tmp_path / "vl", vision=True)
    assert not any("vision" in p for p in config_problems("+experiment=ab_mixed", f"model.path={vl}"))


def test_freezing_everything_is_a_config_error():
    assert "model.freeze_llm: freezes all of the tiny qwen2 model, a text model: nothing would train" in \
        config_problems(*TEXT, "model.freeze_llm=true")
    all_frozen = config_problems(*VL, "model.freeze_llm=true", "model.freeze_vit=true",
                                 "model.freeze_aligner=true")
    assert ("model.freeze_llm/freeze_vit/freeze_aligner: every parameter group is frozen: nothing would "
            "train; unfreeze at least one") in all_frozen
    aligner_only = config_problems(*VL, "model.freeze_llm=true", "model.freeze_vit=true")
    assert not any("freeze" in p for p in aligner_only)


@pytest.mark.parametrize(("value", "message"), [
    ("0", "training.vit_lr: 0.0 must be > 0 (null = training.learning_rate; freeze the group with "
          "model.freeze_vit instead of a zero rate)"),
    ("-1e-5", "training.vit_lr: -1e-05 must be > 0"),
    ("inf", "training.vit_lr: inf is not a finite number"),
])
def test_bad_group_rates(value, message):
    assert any(p.startswith(message) for p in config_problems(*VL, f"training.vit_lr={value}"))


def test_fp16_refused_without_a_gpu(monkeypatch):
    from coordexp.config import validate

    monkeypatch.setattr(validate, "visible_gpus", lambda: 0)
    assert ("training.precision: fp16 runs on CUDA GPUs only and this machine shows none (CPU autocast has "
            "no fp16 gradient scaling): use bf16 (CPU autocast) or fp32") in \
        config_problems(*TEXT, "training.precision=fp16")
    assert config_problems(*TEXT, "training.precision=bf16") == []
    fp16 = dataclasses.replace(to_train_config(compose(TEXT)).training, precision=Precision.fp16)
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):  # the learner's own check
        optim.precision_arguments(fp16, cuda=False)
    assert optim.precision_arguments(fp16, cuda=True)["fp16"] is True


def test_precision_against_the_load_dtype(tmp_path):
    base = to_train_config(compose(["+experiment=ab_mixed"]))
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, dtype=DType.bfloat16),
                              training=dataclasses.replace(base.training, precision=Precision.fp16))
    assert precision_problems(cfg, visible=1) == [
        "training.precision: fp16 needs float32 master weights (model.dtype: float32), got model.dtype "
        "bfloat16: the fp16 gradient scaler cannot unscale bfloat16 gradients"]
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, dtype=DType.float16))
    assert precision_problems(cfg, visible=1) == [
        "training.precision: bf16 autocast over float16 weights mixes two half formats: set model.dtype "
        "float32 (master weights) or bfloat16 (pure bf16)"]


def test_pure_bf16_is_allowed_with_one_warning():
    pure = to_train_config(compose(["+experiment=ab_mixed", "model.dtype=bfloat16"]))
    assert precision_problems(pure, visible=0) == []
    note, data = config_warnings(pure)
    assert note.startswith("model.dtype bfloat16 with training.precision bf16 is pure bf16")
    # the production leaf's data default is the synthetic task: a checkpoint of your own would train on it
    assert data == ("the checkpoint /models/coordexp-stage1 trains on the built-in synthetic task "
                    "(data.kind: synthetic, text): for your data add data=jsonl data.train_jsonl=<file> "
                    "data.val_jsonl=<file> (docs/own_data.md)")
    assert config_warnings(to_train_config(compose(["+experiment=smoke/ab_mixed"]))) == []
    # the smoke leaf warms up for 10 steps: a 6-step run never reaches its learning rate
    short = to_train_config(compose(["+experiment=smoke/ab_mixed", "training.max_steps=6"]))
    assert config_warnings(short) == [
        "training.warmup_steps 10 >= training.max_steps 6: the learning rate never reaches "
        "training.learning_rate; lower training.warmup_steps"]


def test_production_leaves_use_fp32_master_weights_bf16_and_checkpointing():
    for leaf in ("a_only", "b_only", "ab_mixed"):
        cfg = to_train_config(compose([f"+experiment={leaf}"]))
        t = cfg.training
        got = (cfg.model.dtype.value, t.precision.value, t.gradient_checkpointing)
        assert got == ("float32", "bf16", True)
        assert (t.learning_rate, t.vit_lr, t.aligner_lr) == (2e-5, 2e-5, 5e-5)


def test_training_arguments_for_precision_and_checkpointing():
    t = to_train_config(compose([*TEXT, "training.precision=bf16",
                                 "training.gradient_checkpointing=true"])).training
    assert optim.precision_arguments(t, cuda=False) == {
        "bf16": True, "fp16": False, "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    assert optim.precision_arguments(to_train_config(compose(TEXT)).training, cuda=False) == {
        "bf16": False, "fp16": False}


# ---- leaf contract -----------------------------------------------------------------------------------------

def _without(text: str, *keys: str) -> str:
    return "\n".join(line for line in text.splitlines() if not any(line.strip().startswith(k) for k in keys))


@pytest.mark.parametrize("leaf", ["ab_mixed.yaml", "smoke/ab_mixed_vl.yaml"])
def test_vision_language_leaves_must_pin_the_group_rates(leaf, tmp_path):
    src = Path("conf/experiment") / leaf
    bad = tmp_path / "experiment" / "bad.yaml"
    bad.parent.mkdir()
    bad.write_text(_without(src.read_text(), "vit_lr:", "aligner_lr:"))
    assert leaf_file_problems(bad, "bad.yaml") == [
        "bad.yaml: missing required knobs: training.vit_lr, training.aligner_lr (a leaf that selects a "
        "vision-language model also pins the vision tower's and the aligner's learning rates)"]


def test_text_leaves_need_no_group_rates(tmp_path):
    assert leaf_file_problems(Path("conf/experiment/smoke/ab_mixed.yaml"), "x") == []
    # a production-style leaf on a local checkpoint whose config.json says text: no vision rates required
    path = text_model_dir(tmp_path)
    leaf = tmp_path / "experiment" / "text.yaml"
    leaf.parent.mkdir()
    leaf.write_text(_without(Path("conf/experiment/ab_mixed.yaml").read_text(), "vit_lr:", "aligner_lr:")
                    .replace("/models/coordexp-stage1", str(path)))
    assert leaf_file_problems(leaf, "text.yaml") == []


# ---- the plan at load, the optimizer groups ---------------------------------------------------------------

def test_plan_refuses_vision_knobs_for_a_text_checkpoint_at_load():
    cfg = to_train_config(compose(["+experiment=ab_mixed"]))  # pins vit_lr / aligner_lr
    with pytest.raises(ConfigError) as err:
        optim.plan_groups(cfg, {"model_type": "qwen2"})
    assert err.value.problems == [
        f"training.{k}: the qwen2 checkpoint is a text model (its config.json has no vision_config): only "
        f"the language model group exists; set training.{k}=null (or leave it out)"
        for k in ("vit_lr", "aligner_lr")]
    with pytest.raises(ConfigError, match="model_type 'llama' has no parameter-group table"):
        optim.plan_groups(cfg, {"model_type": "llama", "vision_config": {}})


def _meta_vl():
    from tests.unit.test_param_groups import meta_model

    model, config = meta_model("qwen3_vl")
    return model, config


def test_optimizer_groups_rates_decay_split_and_freezing():
    model, config = _meta_vl()
    cfg = to_train_config(compose([*VL, "training.learning_rate=1e-3", "training.vit_lr=2e-4",
                                   "training.aligner_lr=5e-3", "model.freeze_vit=true",
                                   "training.weight_decay=0.1"]))
    plan = optim.plan_groups(cfg, config)
    assert plan.lrs == {"llm": 1e-3, "vit": 2e-4, "aligner": 5e-3} and plan.frozen == {"vit"}
    names = optim.apply_freezing(model, plan)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in set(names["vit"]))
    decay = [n for n, _ in model.named_parameters() if "bias" not in n and "norm" not in n]
    groups = optim.optimizer_param_groups(model, plan, 0.1, decay)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("llm/decay", 1e-3, 0.1), ("llm/no_decay", 1e-3, 0.0),
        ("aligner/decay", 5e-3, 0.1), ("aligner/no_decay", 5e-3, 0.0)]
    by_id = {id(p): n for n, p in model.named_parameters()}
    no_decay = [by_id[id(p)] for g in groups if g["name"].endswith("no_decay") for p in g["params"]]
    assert no_decay and all("bias" in n or "norm" in n for n in no_decay)
    in_groups = sorted(by_id[id(p)] for g in groups for p in g["params"])
    assert in_groups == sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_everything_frozen_at_load_is_refused():
    model, config = _meta_vl()
    cfg = to_train_config(compose([*VL, "model.freeze_llm=true", "model.freeze_vit=true"]))
    plan = optim.plan_groups(cfg, config)
    for name, p in model.named_parameters():  # an aligner already frozen (e.g. by an adapter)
        if group_of(name, "qwen3_vl") == "aligner":
            p.requires_grad_(False)
    with pytest.raises(ConfigError, match="every parameter of the qwen3_vl model is frozen"):
        optim.apply_freezing(model, plan)


# ---- geometry in fp32 under autocast -----------------------------------------------------------------------

def _fake_batch(n_boxes=3, vocab=1100, length=40):
    g = torch.Generator().manual_seed(0)
    slots = torch.stack([torch.stack([torch.zeros(4, dtype=torch.long), torch.arange(4) + 5 + 5 * i], -1)
                         for i in range(n_boxes)])
    return {
        "input_ids": torch.randint(0, vocab, (1, length), generator=g),
        "ce_weights": torch.ones(1, length), "segment_ids": torch.zeros(1, length, dtype=torch.long),
        "geometry_slots": slots, "geometry_bins": torch.randint(0, 1000, (n_boxes, 4), generator=g),
        "geometry_segments": torch.zeros(n_boxes, dtype=torch.long),
    }, torch.randn(1, length, vocab, generator=g)


def test_losses_are_float32_under_bf16_autocast():
    from coordexp.trainer.losses import expected_coords, sample_losses

    batch, logits = _fake_batch()
    coord_ids = torch.arange(100, 1100)
    half = logits.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sample_losses(half, half, batch, coord_ids, 1, temperature=1.0, smoothl1_beta=0.05)
        # what the region prevents: autocast lowers the expectation decode's matmul to bf16
        probs = torch.softmax(half.float()[0, :4, coord_ids], -1)
        assert expected_coords(probs).dtype == torch.bfloat16
    want = sample_losses(half.float(), half.float(), batch, coord_ids, 1, temperature=1.0, smoothl1_beta=0.05)
    assert {k: v.dtype for k, v in got.items()} == dict.fromkeys(want, torch.float32)
    for k in want:  # identical to the computation on the same values in plain fp32
        assert torch.equal(got[k], want[k]), k
    assert all(math.isfinite(float(v)) for v in got.values())


def test_soft_context_expectation_is_float32_under_autocast():
    from coordexp.trainer.softctx import soft_context_embeds

    g = torch.Generator().manual_seed(1)
    base, logits = torch.randn(1, 6, 8, generator=g), torch.randn(1, 6, 20, generator=g)
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, 3] = True
    coord_ids, coord_embeds = torch.arange(10, 20), torch.randn(10, 8, generator=g)
    want = soft_context_embeds(base, logits, mask, coord_ids, coord_embeds, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = soft_context_embeds(base, logits, mask, coord_ids, coord_embeds, 1.0)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_tiny_stage1_is_plain_full_fine_tuning_whatever_the_stage2_groups():
    """The cached Stage-1 checkpoint's key holds no group knobs, so Stage 1 must not inherit them."""
    from coordexp.trainer.model_dir import _stage1_config

    cfg = to_train_config(compose([*VL, "model.freeze_vit=true", "model.freeze_llm=true",
                                   "training.vit_lr=1e-4", "training.aligner_lr=1e-4",
                                   "training.precision=bf16", "training.gradient_checkpointing=true"]))
    s1 = _stage1_config(cfg, Path("/tmp/base"))
    assert (s1.model.freeze_llm, s1.model.freeze_vit, s1.model.freeze_aligner) == (False, False, False)
    t = s1.training
    got = (t.vit_lr, t.aligner_lr, t.precision, t.gradient_checkpointing)
    assert got == (None, None, Precision.fp32, False)
    assert t.learning_rate == cfg.training.learning_rate


def test_tiny_stage1_key_ignores_the_held_out_split_and_keeps_the_training_data():
    """Stage 1 runs no evals: held-out keys reuse the cached checkpoint; training-data keys rebuild it."""
    from coordexp.trainer.model_dir import _stage1_config, _weights_key

    def key(*overrides):
        return _weights_key(_stage1_config(to_train_config(compose([*VL, *overrides])), Path("/tmp/base")))

    assert key() == key("data.val_sample_limit=4", "data.synthetic.val_samples=7")
    assert key() != key("data.synthetic.train_samples=99")
    assert key() != key("training.effective_batch_size=2")
    # Channel A alone with one pass: Channel-B and multi-pass settings reuse it; its loss settings do not
    assert key() == key("stage2_ab.softctx_grad_mode=em_detach", "stage2_ab.n_softctx_iter=3",
                        "stage2_ab.channel_b.drop_invalid_struct_ce_multiplier=2",
                        "stage2_ab.schedule.b_ratio=0.9")
    assert key() != key("stage2_ab.softctx_temperature=0.5")  # the coordinate softmax of the geometry losses
    assert key() != key("stage2_ab.bbox_ciou_weight=2")


def test_tiny_stage1_key_names_the_base_not_its_path():
    """A moved repo or cache dir reuses the cached Stage-1 build (the base folder's name: its spec's hash)."""
    from coordexp.trainer.model_dir import _stage1_config, _weights_key

    cfg = to_train_config(compose(VL))
    here = _weights_key(_stage1_config(cfg, Path("/a/cache/tiny-models/tiny-qwen2_vl-be99")))
    moved = _weights_key(_stage1_config(cfg, Path("/elsewhere/tiny-models/tiny-qwen2_vl-be99")))
    assert here == moved and here["base"] == "tiny-qwen2_vl-be99"


def test_the_smoke_leaves_own_checkpoints_on_their_task_get_no_data_warning(tmp_path):
    """The tiny Stage-1 build and the summary's evaluate line of a smoke run load a local checkpoint on the
    synthetic task on purpose: only the production leaves' synthetic default is worth a warning."""
    smoke = to_train_config(compose(["+experiment=smoke/ab_mixed", "model.kind=local",
                                     f"model.path={tmp_path}", "model.tiny_stage1_steps=0"]))
    assert config_warnings(smoke) == []
