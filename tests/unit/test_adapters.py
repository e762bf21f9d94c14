"""model.adapter on the real tiny checkpoints (text and vision-language): which modules get adapters, the
coordinate-token rows train (and only they, of the embedding), and bad settings fail with clear messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from coordexp.config.schema import AdapterConfig, AdapterKind
from coordexp.errors import ConfigError
from coordexp.models import param_groups as pg
from coordexp.rollout.scoring import TokenizerAdapter
from coordexp.trainer.adapters import attach_adapter
from coordexp.trainer.merged_weights import merged_named_weights


@pytest.fixture(scope="module")
def tiny_vl_dir(tmp_path_factory):
    from coordexp.models.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.getbasetemp() / "tiny-model-cache", arch="qwen2_vl")


def load(model_dir, vl=False):
    cls = AutoModelForImageTextToText if vl else AutoModelForCausalLM
    return cls.from_pretrained(model_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("kind", [AdapterKind.lora, AdapterKind.dora])
def test_adapters_on_the_language_model_only_and_the_coordinate_rows(kind, tiny_model_dir, tiny_vl_dir):
    for model_dir, vl in ((tiny_model_dir, False), (tiny_vl_dir, True)):
        model, tok = load(model_dir, vl)
        ids = TokenizerAdapter(tok).coord_token_ids
        peft_model = attach_adapter(model, AdapterConfig(kind=kind, r=4, alpha=8), ids)
        model_type = pg.model_type_of(peft_model.config)
        trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
        lora = [n for n in trainable if ".lora_" in n]
        assert lora and all(pg.group_of(n, model_type) == pg.LLM for n in lora)  # never the vision tower
        assert all("lora_magnitude_vector" not in n for n in lora) == (kind == AdapterKind.lora)
        # every targeted projection of every decoder layer, nothing else
        wrapped = {n.split(".lora_")[0] for n in lora}
        layers = peft_model.config.get_text_config().num_hidden_layers
        assert len(wrapped) == 7 * layers
        rows = [n for n in trainable if ".lora_" not in n]
        assert len(rows) == 1
        assert rows[0].endswith("embed_tokens.token_adapter.trainable_tokens_delta.default")
        delta = dict(peft_model.named_parameters())[rows[0]]
        assert delta.shape == (1000, peft_model.config.get_text_config().hidden_size)
        if vl:  # Qwen2-VL's vision blocks have linear layers too: untouched
            assert not any("visual" in n for n in trainable)
        assert peft_model.peft_config["default"].use_dora == (kind == AdapterKind.dora)


def test_kind_none_leaves_the_model_as_is(tiny_model_dir):
    model, tok = load(tiny_model_dir)
    assert attach_adapter(model, AdapterConfig(), TokenizerAdapter(tok).coord_token_ids) is model


def test_coordinate_rows_used_in_a_batch_change_after_one_step_and_no_other_row(tiny_model_dir):
    """One optimizer step on a batch that uses a few coordinate tokens: those rows of the embedding the
    server receives (tied head: the same matrix) move; every non-coordinate row and every base weight is
    bit-identical. (Coordinate rows outside the batch move too: the tied head puts every coordinate logit in
    the softmax, so they get gradient; they are the trainable set, nothing outside it changes.)"""
    model, tok = load(tiny_model_dir)
    adapter = TokenizerAdapter(tok)
    peft_model = attach_adapter(model, AdapterConfig(kind=AdapterKind.dora, r=4, alpha=8, dropout=0.0),
                                adapter.coord_token_ids)
    before = {k: v.clone() for k, v in merged_named_weights(peft_model)}
    base_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    used = [adapter.coord_token_ids[k] for k in (12, 34, 56, 78)]
    text = tok("red square", return_tensors="pt")["input_ids"][0].tolist()
    ids = torch.tensor([text + used + [tok.eos_token_id]])
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.0)
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    after = dict(merged_named_weights(peft_model))
    embed = "model.embed_tokens.weight"
    coord = torch.tensor(adapter.coord_token_ids)
    other = torch.ones(after[embed].shape[0], dtype=torch.bool)
    other[coord] = False
    for i in used:
        assert not torch.equal(after[embed][i], before[embed][i]), i
    assert torch.equal(after[embed][other], before[embed][other])  # no row outside the coordinate rows
    assert "lm_head.weight" not in after  # tied: the head is the embedding matrix
    for n, p in peft_model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[n]), n


def test_bad_targets_and_modules_to_save_name_the_cause(tiny_model_dir, tiny_vl_dir):
    model, tok = load(tiny_model_dir)
    ids = TokenizerAdapter(tok).coord_token_ids
    with pytest.raises(ConfigError) as err:
        attach_adapter(model, AdapterConfig(kind=AdapterKind.lora, target_modules=["q_proj", "qkv"]), ids)
    msg = str(err.value)
    names = msg.split("named", 1)[1]
    assert "'qkv' matches no module" in msg and "q_proj" in names and "lm_head" not in names
    for targets, text in ((["embed_tokens"], "selects Embedding"),
                          (["lm_head"], r"'lm_head' names the output head \(lm_head\), which adapters never "
                                        r"target")):
        with pytest.raises(ConfigError, match=text):
            attach_adapter(load(tiny_model_dir)[0],
                           AdapterConfig(kind=AdapterKind.lora, target_modules=targets), ids)
    with pytest.raises(ConfigError) as err:
        attach_adapter(load(tiny_model_dir)[0],
                       AdapterConfig(kind=AdapterKind.lora, modules_to_save=["embed_tokens", "no_such"]), ids)
    assert "'embed_tokens' selects the embedding" in str(err.value) and "'no_such' matches no module" in \
        str(err.value)
    # a vision-language model: a target that only exists in the vision tower matches nothing
    vl_model, vl_tok = load(tiny_vl_dir, vl=True)
    with pytest.raises(ConfigError, match="'qkv' matches no module of the language model"):
        attach_adapter(vl_model, AdapterConfig(kind=AdapterKind.lora, target_modules=["qkv"]),
                       TokenizerAdapter(vl_tok).coord_token_ids)


def test_bad_adapter_values_are_refused_at_config_validation_all_at_once():
    from coordexp.config.load import compose, to_train_config

    with pytest.raises(ConfigError) as err:
        to_train_config(compose(["+experiment=smoke/ab_mixed", "model.adapter.kind=dora", "model.adapter.r=0",
                                 "model.adapter.alpha=0", "model.adapter.dropout=1.5",
                                 "model.adapter.target_modules=[]"]))
    problems = err.value.problems
    assert any(p.startswith("model.adapter.r: 0 must be an integer >= 1") for p in problems)
    assert any(p.startswith("model.adapter.alpha: 0 must be > 0") for p in problems)
    assert any(p.startswith("model.adapter.dropout: 1.5 must be in [0, 1)") for p in problems)
    assert any(p.startswith("model.adapter.target_modules: is empty") for p in problems)
    with pytest.raises(ConfigError, match=r"\['q_proj'\] listed more than once"):
        to_train_config(compose(["+experiment=smoke/ab_mixed", "model.adapter.kind=lora",
                                 "model.adapter.target_modules=[q_proj,q_proj]"]))
    # kind none: the adapter settings are not used, so they are not checked
    to_train_config(compose(["+experiment=smoke/ab_mixed", "model.adapter.r=0"]))


def test_an_adapter_checkpoint_as_training_model_path_is_refused_with_the_fix(tmp_path):
    from coordexp.config.load import compose, to_train_config
    from coordexp.trainer.model_dir import ModelDirError, prepare_model_dir

    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    (ckpt / "adapter_config.json").write_text("{}")
    cfg = to_train_config(compose(["+experiment=smoke/ab_mixed", "model.kind=local", f"model.path={ckpt}"]))
    with pytest.raises(ModelDirError, match="is an adapter checkpoint") as err:
        prepare_model_dir(cfg)
    assert f"training.resume_from_checkpoint={ckpt}" in str(err.value)
    assert "python -m coordexp.models.export" in str(err.value)
    assert prepare_model_dir(cfg, allow_adapter=True) == ckpt.resolve()  # coordexp.eval merges it
    # the preflight says the same (exit 2), not "no config.json"
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "coordexp.preflight", "+experiment=smoke/ab_mixed",
                          "model.kind=local", f"model.path={ckpt}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stdout == "", out.stderr
    assert out.stderr.startswith(f"error: model.path '{ckpt}' is an adapter checkpoint"), out.stderr
    assert "Traceback" not in out.stderr


def test_unfrozen_vision_groups_train_in_full_next_to_the_adapter(tiny_vl_dir):
    import copy

    from coordexp.trainer.adapters import full_group_modules

    model, tok = load(tiny_vl_dir, vl=True)
    names = full_group_modules(model, "qwen2_vl", ["vit", "aligner"])
    assert names == ["model.visual.patch_embed", "model.visual.blocks.0", "model.visual.merger"]
    assert full_group_modules(model, "qwen2_vl", ["aligner"]) == ["model.visual.merger"]
    peft_model = attach_adapter(model, AdapterConfig(kind=AdapterKind.dora, r=4, alpha=8),
                                TokenizerAdapter(tok).coord_token_ids, full_groups=["aligner"])
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    merger = [n for n in trainable if ".visual." in n]
    assert merger and all(".visual.merger.modules_to_save.default." in n for n in merger)
    assert {pg.group_of(n, "qwen2_vl") for n in merger} == {pg.ALIGNER}
    # the server's weights of this model (merger copy, DoRA, token rows) are peft's own merge
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    merged = dict(merged_named_weights(peft_model))
    reference = dict(copy.deepcopy(peft_model).merge_and_unload().named_parameters())
    assert list(merged) == list(reference)
    assert all(torch.equal(merged[k], reference[k]) for k in merged)


@pytest.mark.slow
def test_resume_with_dora_and_a_frozen_vision_tower_continues_with_identical_groups(tmp_path, tiny_vl_dir):
    """Tiny Qwen2-VL, DoRA on the language model, vision tower frozen, aligner trained in full next to the
    adapter (modules_to_save): 2 steps + resume to 4 ends where 4 uninterrupted steps end."""
    from tests.conftest import read_jsonl
    from tests.unit.test_training_groups import base_weights, named_groups, run

    cache = Path(tiny_vl_dir).parent  # the session's shared tiny-model cache root
    overrides = ["model.adapter.kind=dora", "model.adapter.r=4", "model.adapter.alpha=8",
                 "model.freeze_vit=true", "training.vit_lr=2e-4", "training.aligner_lr=5e-3",
                 "training.save_strategy=steps", "training.save_steps=2", "training.save_total_limit=null"]
    full = run(cache, tmp_path / "full", "training.max_steps=4", *overrides)
    run(cache, tmp_path / "part", "training.max_steps=2", *overrides)
    resumed = run(cache, tmp_path / "resumed", "training.max_steps=4", *overrides,
                  f"training.resume_from_checkpoint={tmp_path / 'part' / 'checkpoint-2'}")
    assert resumed.state.global_step == 4
    assert [r["step"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl") if "loss" in r] == [3, 4]
    groups = named_groups(resumed.optimizer)
    assert groups == named_groups(full.optimizer)
    assert set(groups) == {"llm/decay", "aligner/decay", "aligner/no_decay"}  # no vit: frozen
    assert {int(s["step"]) for s in resumed.optimizer.state.values()} == {4}
    before = base_weights(cache)
    want = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, want[name], rtol=0, atol=1e-5, msg=name)
        plain = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
        if pg.group_of(name, "qwen2_vl") == pg.VIT:
            assert not p.requires_grad and torch.equal(p, before[plain]), name


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_vision_blocks_with_llm_like_names_get_no_adapter(arch):
    """Qwen2.5-VL's vision MLP is gate_proj/up_proj/down_proj and Qwen3-VL's has linear_fc1/fc2 plus
    deepstack mergers: the adapter still lands on the language model only; the unfrozen aligner (merger and,
    for Qwen3-VL, every deepstack merger) trains in full next to it."""
    from tests.unit.test_param_groups import meta_model

    model, _ = meta_model(arch)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    peft_model = attach_adapter(model, AdapterConfig(kind=AdapterKind.dora, r=2, alpha=4),
                                list(range(10, 20)), full_groups=["aligner"])
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    groups = {n: pg.group_of(n, arch) for n in trainable}
    assert all(g == pg.LLM for n, g in groups.items() if ".lora_" in n)
    layers = peft_model.config.get_text_config().num_hidden_layers
    assert len({n.split(".lora_")[0] for n in trainable if ".lora_" in n}) == 7 * layers
    saved = {n.split(".modules_to_save.")[0] for n in trainable if ".modules_to_save." in n}
    want = {"base_model.model.model.visual.merger"}
    if arch == "qwen3_vl":
        n_deep = len(peft_model.get_base_model().model.visual.deepstack_merger_list)
        want |= {f"base_model.model.model.visual.deepstack_merger_list.{i}" for i in range(n_deep)}
    assert saved == want
    assert all(groups[n] == pg.ALIGNER for n in trainable if ".modules_to_save." in n)


def test_an_untied_head_gets_its_own_trainable_coordinate_rows():
    """A 7B-style untied head: peft trains the coordinate rows of the embedding and of the head separately;
    the merged weights carry both, every other row of both matrices unchanged."""
    from tests.unit.test_merged_weights import tiny_qwen2

    model = tiny_qwen2(tied=False)
    before = {k: v.clone() for k, v in merged_named_weights(model)}
    rows = [80, 81, 95]
    peft_model = attach_adapter(model, AdapterConfig(kind=AdapterKind.lora, r=2, alpha=4, dropout=0.0), rows)
    deltas = [n for n, p in peft_model.named_parameters() if p.requires_grad and "trainable_tokens" in n]
    assert sorted(deltas) == ["base_model.model.lm_head.token_adapter.trainable_tokens_delta.default",
                              "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"]
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    ids = torch.tensor([[3, 80, 81, 7, 95, 4]])
    peft_model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    after = dict(merged_named_weights(peft_model))
    other = torch.ones(96, dtype=torch.bool)
    other[rows] = False
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert not torch.equal(after[name][rows], before[name][rows]), name
        assert torch.equal(after[name][other], before[name][other]), name


def test_resume_refuses_a_checkpoint_whose_adapter_the_config_does_not_build(tmp_path):
    """An adapter checkpoint resumes only with the same kind/r/alpha, a full one only without an adapter;
    each refusal names the settings that would resume it."""
    import json

    from coordexp.config.schema import AdapterConfig, AdapterKind
    from coordexp.trainer.adapters import resume_adapter_problem

    full, lora = tmp_path / "full", tmp_path / "lora"
    full.mkdir()
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "use_dora": False}))
    none = AdapterConfig()
    same = AdapterConfig(kind=AdapterKind.lora, r=8, alpha=16)
    assert resume_adapter_problem(full, none) is None and resume_adapter_problem(lora, same) is None
    assert resume_adapter_problem(lora, none) == (
        f"{lora} holds a lora adapter (r 8) but model.adapter.kind is none: resume with the run's adapter "
        "settings (model.adapter.kind=lora model.adapter.r=8 model.adapter.alpha=16)")
    assert resume_adapter_problem(lora, AdapterConfig(kind=AdapterKind.dora, r=8, alpha=16)) == (
        f"{lora} holds a lora adapter with r 8, alpha 16; the config asks for dora with r 8, alpha 16: "
        "resume with model.adapter.kind=lora model.adapter.r=8 model.adapter.alpha=16")
    assert resume_adapter_problem(full, same).startswith(f"{full} holds full weights (no adapter) but "
                                                         "model.adapter.kind is lora")


def test_a_rank_above_every_target_layers_rank_is_refused(tiny_model_dir):
    model, tok = load(tiny_model_dir)
    ids = TokenizerAdapter(tok).coord_token_ids
    widest = max(min(m.in_features, m.out_features) for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ("q_proj", "v_proj"))
    with pytest.raises(ConfigError) as err:
        attach_adapter(model, AdapterConfig(kind=AdapterKind.lora, r=100_000,
                                            target_modules=["q_proj", "v_proj"]), ids)
    assert err.value.problems == [
        f"model.adapter.r: 100000 exceeds the rank of every target layer (the widest is {widest}): an update "
        f"of that rank costs more than the layer itself; use r <= {widest} (LoRA ranks are usually 8-64)"]
    attach_adapter(load(tiny_model_dir)[0], AdapterConfig(kind=AdapterKind.lora, r=widest,
                                                          target_modules=["q_proj", "v_proj"]), ids)
