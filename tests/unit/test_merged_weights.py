"""merged_named_weights: the server's weights of a peft model equal peft's own merge_and_unload() (on a deep
copy), under the base model's HF names, and computing them leaves the trained copy bit-identical."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from coordexp.trainer.merged_weights import is_peft_model, merged_named_weights
from coordexp.trainer.sync_transport import named_weights

#: merge_and_unload runs the same tensor ops (peft's get_delta_weight, DoRA's norm rule, index_copy) on the
#: same fp32 values; results agree to the last bit in practice, asserted to 1e-6 absolute.
ATOL = 1e-6


def tiny_qwen2(tied: bool, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    return Qwen2ForCausalLM(cfg).eval()


def adapted(kind: str, tied: bool, rows=(80, 81, 95), modules_to_save=("norm",)):
    model = tiny_qwen2(tied)
    tokens = list(rows) if tied else {"embed_tokens": list(rows), "lm_head": list(rows)}
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=kind == "dora",
                     target_modules=["q_proj", "v_proj", "down_proj"], trainable_token_indices=tokens,
                     modules_to_save=list(modules_to_save))
    peft_model = get_peft_model(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # "trained" adapters: lora_B starts at zero, token rows and magnitudes at the base
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return peft_model


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("tied", [True, False])
def test_merged_weights_equal_merge_and_unload_and_leave_the_model_untouched(kind, tied):
    model = adapted(kind, tied)
    before = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    merged = dict(merged_named_weights(model))
    assert torch.is_grad_enabled()  # the generator never leaks no_grad to its consumer

    reference = copy.deepcopy(model).merge_and_unload()
    expected = dict(reference.named_parameters())
    assert list(merged) == list(expected)  # base names, the order named_parameters gives
    assert not any(k.startswith("base_model") or "lora_" in k or "base_layer" in k or "token_adapter" in k
                   or "modules_to_save" in k or "original_module" in k for k in merged)
    for name, t in merged.items():
        assert t.shape == expected[name].shape and t.dtype == expected[name].dtype, name
        assert not t.requires_grad, name
        torch.testing.assert_close(t, expected[name].detach(), rtol=0, atol=ATOL, msg=name)

    # the adapters really are folded in: q_proj moved off the base, the token rows are the trained ones
    base = tiny_qwen2(tied)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[q], base.state_dict()[q])
    delta = model.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    assert torch.equal(merged["model.embed_tokens.weight"][[80, 81, 95]], delta.detach())
    assert torch.equal(merged["model.embed_tokens.weight"][:80], base.model.embed_tokens.weight[:80].detach())
    if not tied:
        head = model.base_model.model.lm_head.token_adapter.trainable_tokens_delta["default"]
        assert torch.equal(merged["lm_head.weight"][[80, 81, 95]], head.detach())
    # modules_to_save: the trained copy, under the original name
    saved = model.base_model.model.model.norm.modules_to_save["default"].weight
    assert torch.equal(merged["model.norm.weight"], saved.detach())

    after = snapshot(model)
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)  # bit-identical trained copy
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(getattr(m, "merged", False) for m in model.modules() if hasattr(m, "merged_adapters"))


def test_dtype_is_the_one_cast_and_gather_sees_every_parameter_once_in_a_fixed_order():
    model = adapted("dora", tied=True)
    seen: list[int] = []

    def gather(t):
        seen.append(t.data_ptr())
        return t.clone()

    out = dict(merged_named_weights(model, "bfloat16", gather=gather))
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    params = {p.data_ptr() for p in model.parameters()}
    # every parameter the merge reads passes through gather (base weights, lora_A/B, magnitudes, token
    # rows, the modules_to_save copies); the frozen originals of modules_to_save are never read
    originals = {p.data_ptr() for n, p in model.named_parameters() if ".original_module." in n}
    assert originals and set(seen) == params - originals
    again: list[int] = []
    dict(merged_named_weights(model, gather=lambda t: (again.append(t.data_ptr()), t)[1]))
    assert again == seen  # the same order every time (collective gathers must match across ranks)


def test_plain_model_is_its_unique_parameters_and_the_transport_uses_the_merge():
    plain = tiny_qwen2(tied=True)
    assert not is_peft_model(plain)
    names = [n for n, _ in merged_named_weights(plain)]
    assert names == [n for n, _ in plain.named_parameters()] and "lm_head.weight" not in names
    model = adapted("lora", tied=True)
    assert is_peft_model(model)
    sent = named_weights(model, "float32")  # what the file transport writes
    assert set(sent) == set(dict(merged_named_weights(model)))


def test_unsupported_peft_layer_is_refused_not_sent_unmerged():
    model = get_peft_model(tiny_qwen2(tied=False), LoraConfig(r=2, target_modules=["embed_tokens"]))
    with pytest.raises(NotImplementedError, match="embed_tokens.*only LoRA/DoRA on nn.Linear"):
        dict(merged_named_weights(model))
