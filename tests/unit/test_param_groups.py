"""Parameter groups: the family tables against the real transformers classes (meta-device instantiation of
each tiny family's config), peft-wrapped names, and the partition rules."""

from __future__ import annotations

import re

import pytest
import torch

from coordexp.models import param_groups as pg
from coordexp.models.tiny import TinyModelSpec, _vl_config


class _Ids:
    """Stands in for the tokenizer when only the vision token ids of the config are needed."""

    def convert_tokens_to_ids(self, token: str) -> int:
        return {"<|vision_start|>": 90, "<|vision_end|>": 91, "<|image_pad|>": 92, "<|video_pad|>": 93}[token]


def _common(spec: TinyModelSpec) -> dict:
    return {"vocab_size": 100, "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_hidden_layers, "num_attention_heads": spec.num_attention_heads,
            "num_key_value_heads": spec.num_key_value_heads,
            "max_position_embeddings": spec.max_position_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
            "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": 1, "pad_token_id": 0}


def meta_model(arch: str):
    """The tiny model of ``arch`` (the tiny factory's own config) on the meta device: real module names."""
    import transformers

    spec = TinyModelSpec(arch=arch)
    if arch in ("qwen2", "qwen3"):
        cls = "Qwen2" if arch == "qwen2" else "Qwen3"
        extra = {} if arch == "qwen2" else {"head_dim": spec.head_dim}
        config = getattr(transformers, f"{cls}Config")(**_common(spec), **extra)
        model_cls = getattr(transformers, f"{cls}ForCausalLM")
    else:
        config, model_cls = _vl_config(spec, _common(spec), _Ids())
    with torch.device("meta"):
        return model_cls(config), config


def _shape(name: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", name)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_vl_families_split_the_real_module_names(arch):
    model, config = meta_model(arch)
    assert pg.is_vision_language(config) and pg.model_type_of(config) == arch
    names = [n for n, _ in model.named_parameters()]
    groups = {n: pg.group_of(n, arch) for n in names}
    aligner = {_shape(n) for n, g in groups.items() if g == "aligner"}
    vit = {_shape(n) for n, g in groups.items() if g == "vit"}
    llm = {_shape(n) for n, g in groups.items() if g == "llm"}
    # the aligner: exactly the merger (and Qwen3-VL's deepstack mergers)
    want_aligner_roots = {"model.visual.merger."} | (
        {"model.visual.deepstack_merger_list.N."} if arch == "qwen3_vl" else set())
    assert aligner and all(any(n.startswith(r) for r in want_aligner_roots) for n in aligner)
    assert {r for r in want_aligner_roots if any(n.startswith(r) for n in aligner)} == want_aligner_roots
    # the vision tower: every other model.visual.* parameter (patch embedding and blocks at least)
    assert all(n.startswith("model.visual.") for n in vit)
    assert any(n.startswith("model.visual.patch_embed.") for n in vit)
    assert any(n.startswith("model.visual.blocks.N.") for n in vit)
    assert not any(n.startswith("model.visual.") for n in llm)
    # the language model: decoder, embeddings, final norm (and the head, tied here)
    assert "model.language_model.embed_tokens.weight" in llm
    assert "model.language_model.norm.weight" in llm
    assert any(n.startswith("model.language_model.layers.N.") for n in llm)
    # a partition covers each parameter exactly once, with every group present
    parts = pg.partition(model.named_parameters(), arch, required=("llm", "vit", "aligner"))
    flat = [n for g in parts.values() for n, _ in g]
    assert sorted(flat) == sorted(names) and len(set(flat)) == len(flat)


def test_untied_head_is_llm_and_disk_layout_maps_the_same():
    assert pg.group_of("lm_head.weight", "qwen2_5_vl") == "llm"
    # released Qwen-VL checkpoints store the vision module at the top level
    assert pg.group_of("visual.blocks.0.attn.qkv.weight", "qwen2_5_vl") == "vit"
    assert pg.group_of("visual.merger.mlp.0.weight", "qwen2_5_vl") == "aligner"
    assert pg.group_of("visual.deepstack_merger_list.1.norm.weight", "qwen3_vl") == "aligner"
    assert pg.group_of("visual.deepstack_merger_list.1.norm.weight", "qwen2_vl") == "vit"
    assert pg.group_of("model.layers.0.mlp.up_proj.weight", "qwen2_vl") == "llm"


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_text_families_have_only_llm(arch):
    model, config = meta_model(arch)
    assert not pg.is_vision_language(config)
    parts = pg.partition(model.named_parameters(), arch)
    assert list(parts) == ["llm"] and len(parts["llm"]) == len(list(model.parameters()))
    with pytest.raises(pg.ParamGroupError, match=rf"'vit' \(the {arch} family is a text model"):
        pg.partition(model.named_parameters(), arch, required=("vit",))


@pytest.mark.parametrize(("name", "want"), [
    ("base_model.model.model.visual.blocks.0.attn.qkv.base_layer.weight", "vit"),
    ("base_model.model.model.visual.blocks.0.attn.qkv.lora_A.default.weight", "vit"),
    ("base_model.model.model.visual.merger.mlp.0.lora_B.default.weight", "aligner"),
    ("base_model.model.model.visual.deepstack_merger_list.0.linear_fc1.lora_magnitude_vector.default.weight",
     "aligner"),
    ("base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_A.default.weight", "llm"),
    ("base_model.model.model.language_model.embed_tokens.token_adapter.trainable_tokens_delta.default",
     "llm"),
    ("base_model.model.lm_head.modules_to_save.default.weight", "llm"),
    ("module.base_model.model.model.visual.patch_embed.proj.weight", "vit"),
    ("_orig_mod.model.visual.merger.linear_fc2.bias", "aligner"),
])
def test_wrapped_names(name, want):
    assert pg.group_of(name, "qwen3_vl") == want


def test_peft_wrapped_tiny_vl_model_partitions_every_parameter():
    from peft import LoraConfig, get_peft_model

    model, _ = meta_model("qwen2_5_vl")
    model = model.to_empty(device="cpu")
    peft_model = get_peft_model(model, LoraConfig(
        r=2, target_modules=["q_proj", "qkv", "mlp.0"], modules_to_save=["ln_q"]))
    names = [n for n, _ in peft_model.named_parameters()]
    parts = pg.partition(peft_model.named_parameters(), "qwen2_5_vl", required=pg.GROUPS)
    assert sorted(n for g in parts.values() for n, _ in g) == sorted(names)
    lora = {g: [n for n, _ in ps if "lora_A" in n] for g, ps in parts.items()}
    assert lora["vit"] and lora["aligner"] and lora["llm"]  # adapters of each group stay in the group
    saved = [n for n, _ in parts["aligner"] if ".modules_to_save." in n]
    assert saved == ["base_model.model.model.visual.merger.ln_q.modules_to_save.default.weight"]


def test_required_group_matching_nothing_names_the_family():
    model, _ = meta_model("qwen2_vl")
    no_merger = [(n, p) for n, p in model.named_parameters() if ".merger." not in n]
    with pytest.raises(pg.ParamGroupError, match=r"qwen2_vl model: 'aligner' \(no parameter name"):
        pg.partition(no_merger, "qwen2_vl", required=("aligner",))


def test_unknown_family_and_group():
    with pytest.raises(pg.ParamGroupError, match="model_type 'llama' has no parameter-group table; "
                                                 "supported: qwen2, qwen3, qwen2_vl"):
        pg.group_of("model.layers.0.weight", "llama")
    with pytest.raises(pg.ParamGroupError, match="unknown parameter group 'head'"):
        pg.partition([], "qwen2", required=("head",))


def test_group_counts_total_and_trainable():
    model, _ = meta_model("qwen3_vl")
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith("model.visual.blocks."))
    counts = pg.group_counts(model.named_parameters(), "qwen3_vl")
    total = sum(p.numel() for p in model.parameters())
    assert sum(c[0] for c in counts.values()) == total
    blocks = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.visual.blocks."))
    assert counts["vit"][0] - counts["vit"][1] == blocks
    assert counts["llm"][0] == counts["llm"][1] and counts["aligner"][0] == counts["aligner"][1] > 0


def test_config_json_mapping():
    assert pg.is_vision_language({"model_type": "qwen2_vl", "vision_config": {"depth": 1}})
    assert not pg.is_vision_language({"model_type": "qwen2"})
    assert pg.model_type_of({"model_type": "qwen3"}) == "qwen3"
