"""The preflight memory planner (coordexp.planning): exact parameter counts of the published Qwen-VL
checkpoints from their config.json on the meta device, the activation formula against the tensors autograd
really saves, a plan computed by hand, LoRA/DoRA counts against peft's, and the CLI's exit 2 with the table
and the fixes for a plan that does not fit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from coordexp.config.load import compose, to_train_config
from coordexp.planning.activations import layer_bytes_per_token
from coordexp.planning.inventory import PlanError, inventory
from coordexp.planning.memory import GIB, memory_plan
from coordexp.planning.report import plan_table

REPO_ROOT = Path(__file__).resolve().parents[2]

# Published hyperparameters (the checkpoints' config.json, flat Qwen2.5-VL layout as released).
VISION_25 = {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
             "num_heads": 16, "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2,
             "temporal_patch_size": 2,
             "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2}
TOKENS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
          "vision_end_token_id": 151653}
QWEN25_VL_7B = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
                "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                "tie_word_embeddings": False, "hidden_act": "silu", "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
                **TOKENS, "vision_config": {**VISION_25, "out_hidden_size": 3584}}
QWEN25_VL_3B = {**QWEN25_VL_7B, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
                "tie_word_embeddings": True, "vision_config": {**VISION_25, "out_hidden_size": 2048}}
QWEN3_VL_8B = {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", **TOKENS,
               "tie_word_embeddings": False,
               "text_config": {"model_type": "qwen3_vl_text", "head_dim": 128, "hidden_act": "silu",
                               "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 151936,
                               "rms_norm_eps": 1e-6, "rope_theta": 5000000,
                               "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                                "rope_type": "default"}},
               "vision_config": {"model_type": "qwen3_vl", "deepstack_visual_indexes": [8, 16, 24],
                                 "depth": 27, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152,
                                 "in_channels": 3, "intermediate_size": 4304, "num_heads": 16,
                                 "num_position_embeddings": 2304, "out_hidden_size": 4096, "patch_size": 16,
                                 "spatial_merge_size": 2, "temporal_patch_size": 2}}


def checkpoint(tmp_path: Path, config: dict, name: str = "ckpt") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def prod_cfg(folder: Path, *overrides: str):
    """The production leaf on ``folder``; a full fine-tune (the leaf's DoRA off) unless an override sets the
    adapter."""
    full = [] if any(o.startswith("model.adapter.kind=") for o in overrides) else ["model.adapter.kind=none"]
    return to_train_config(compose(["+experiment=ab_mixed", f"model.path={folder}", *full, *overrides]))


@pytest.mark.parametrize("config, published", [
    (QWEN25_VL_7B, 8.29e9),   # Qwen2.5-VL-7B-Instruct: 8.29B
    (QWEN25_VL_3B, 3.75e9),   # Qwen2.5-VL-3B-Instruct: 3.75B
    (QWEN3_VL_8B, 8.77e9),    # Qwen3-VL-8B-Instruct: 8.77B
], ids=["qwen2.5-vl-7b", "qwen2.5-vl-3b", "qwen3-vl-8b"])
def test_published_checkpoints_count_within_one_percent(tmp_path, config, published):
    inv = inventory(prod_cfg(checkpoint(tmp_path, config)))
    assert abs(inv.total - published) / published < 0.01, inv.total
    assert inv.adapter_params == 0 and inv.trainable == inv.total  # full fine-tune, nothing frozen
    assert sum(g.total for g in inv.groups.values()) == inv.total
    assert inv.vision is not None and inv.vision.depth == config["vision_config"]["depth"]
    assert (inv.vision.gated_mlp, inv.text.tied) == ((config["model_type"] == "qwen2_5_vl"),
                                                      config["tie_word_embeddings"])


def test_groups_freezing_and_rates_follow_the_learner_rules(tmp_path):
    folder = checkpoint(tmp_path, QWEN25_VL_3B)
    inv = inventory(prod_cfg(folder, "model.freeze_vit=true"))
    assert inv.groups["vit"].frozen and inv.groups["vit"].trainable == 0 and inv.groups["vit"].lr is None
    assert inv.groups["aligner"].lr == 5e-5 and inv.groups["llm"].lr == 2e-5
    assert inv.trainable == inv.groups["llm"].total + inv.groups["aligner"].total


def test_dora_on_a_vl_checkpoint_counted_by_hand(tmp_path):
    """Qwen2.5-VL-3B, DoRA r 16 on the language model's 7 projections, vision tower frozen: per layer
    r * (in + out) for LoRA A/B + out for the DoRA magnitude, the 1000 coordinate rows of the tied
    embedding, and the aligner trained in full next to the adapter (a modules_to_save copy)."""
    inv = inventory(prod_cfg(checkpoint(tmp_path, QWEN25_VL_3B), "model.adapter.kind=dora",
                             "model.freeze_vit=true"))
    shapes = [(2048, 2048), (2048, 256), (2048, 256), (2048, 2048),  # q, k, v, o (in, out)
              (2048, 11008), (2048, 11008), (11008, 2048)]           # gate, up, down
    per_layer = sum(16 * (i + o) + o for i, o in shapes)
    assert per_layer == 860160
    rows = 1000 * 2048
    merger = 1280 + (5120 * 5120 + 5120) + (5120 * 2048 + 2048)  # ln_q, mlp.0, mlp.2
    assert inv.groups["llm"].trainable == 36 * per_layer + rows
    assert (inv.groups["vit"].trainable, inv.groups["vit"].frozen) == (0, True)
    assert inv.groups["aligner"].trainable == merger == 36708608
    assert inv.trainable == inv.adapter_params == 36 * per_layer + rows + merger == 69722368


def test_lora_and_dora_counts_equal_peft(tmp_path):
    """The plan's meta-device count (the learner's attach_adapter on the meta model) against peft on a real
    (small) Qwen2 model: the same trainable and total counts for LoRA and DoRA (coordinate rows through
    trainable_token_indices included)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from coordexp.coordjson import NUM_BINS

    config = Qwen2Config(vocab_size=2000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    folder = tmp_path / "qwen2"
    config.save_pretrained(folder)
    for kind in ("lora", "dora"):
        cfg = to_train_config(compose(["+experiment=smoke/a_only", "model=local", f"model.path={folder}",
                                       f"model.adapter.kind={kind}", "model.adapter.r=8"]))
        inv = inventory(cfg)
        torch.manual_seed(0)
        peft_model = get_peft_model(Qwen2ForCausalLM(config), LoraConfig(
            r=8, lora_alpha=16, target_modules=list(cfg.model.adapter.target_modules),
            use_dora=kind == "dora",
            trainable_token_indices={"embed_tokens": list(range(1000, 1000 + NUM_BINS))}))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert inv.trainable == trainable, kind
        assert inv.total == sum(p.numel() for p in peft_model.parameters()), kind


def saved_bytes(model, seq: int, bf16: bool) -> int:
    """Bytes of the tensors autograd saves inside the decoder layers for a ``seq``-token forward (unique
    storages)."""
    import torch

    seen: dict[int, int] = {}
    inside = [False]

    def pack(t):
        if inside[0]:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    hooks = [h for layer in model.model.layers
             for h in (layer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True)),
                       layer.register_forward_hook(lambda *a: inside.__setitem__(0, False)))]
    ids = torch.randint(0, model.config.vocab_size, (1, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return sum(seen.values())


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_layer_formula_equals_the_tensors_autograd_saves(bf16):
    """Per token, each decoder layer keeps exactly what activations.layer_bytes_per_token counts, plus the
    rotary cos/sin all layers share: measured as the growth of the saved bytes from 128 to 256 tokens, which
    cancels the parameter-sized tensors (weights, autocast's weight copies)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    h, heads, kv_heads, inter = 256, 8, 2, 512
    config = Qwen2Config(vocab_size=500, hidden_size=h, intermediate_size=inter, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config)
    head_dim = h // heads
    want = layer_bytes_per_token(h, h, kv_heads * head_dim, inter, heads, 4, 2 if bf16 else None)
    got = (saved_bytes(model, 256, bf16) - saved_bytes(model, 128, bf16)) / 128
    assert got == 2 * want + 2 * head_dim * 4  # two layers + float32 cos/sin


def test_a_plan_computed_by_hand(tmp_path):
    """Qwen2 text model, vocab 1000, hidden 64, MLP 128, 2 layers, 4 heads / 2 KV heads (head_dim 16), tied
    head; float32, no autocast, DDP over 2 ranks, no packing: 2 rows of 256 tokens per micro-batch."""
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
                ).save_pretrained(tmp_path / "m")
    cfg = to_train_config(compose([
        "+experiment=smoke/a_only", "model=local", f"model.path={tmp_path / 'm'}", "model.dtype=float32",
        "training.precision=fp32", "training.nproc_per_node=2", "training.per_device_train_batch_size=2",
        "training.effective_batch_size=4", "training.packing=false", "vllm.max_model_len=256",
        "stage2_ab.n_softctx_iter=1", "training.device_memory_gib=1"]))
    # parameters: embedding 1000*64; per layer q 64*64+64, k and v 64*32+32 each, o 64*64, gate/up/down
    # 3*64*128, two norms 2*64; final norm 64
    layer = (64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64
    n = 1000 * 64 + 2 * layer + 64
    assert n == 138304
    plan = memory_plan(cfg)
    lp = plan.learner
    assert plan.inventory.total == plan.inventory.trainable == n
    assert lp.weights == 4 * n == 553216                       # float32
    assert lp.gradients == 2 * 4 * n == 1106432                # + DDP's bucket copy (2 ranks)
    assert lp.optimizer == 2 * 4 * n == 1106432                # AdamW exp_avg + exp_avg_sq
    assert lp.master_copies == 0 and lp.fsdp_gathered == 0     # no autocast, no FSDP
    # activations, per token of one layer (float32): RMSNorm x, x*rsqrt, output 3*64*4 + rsqrt 4 (twice);
    # attention q, k, v, output (2*64 + 2*32)*4 + log-sum-exp 4*4; MLP 4*128*4
    per_layer = 2 * (3 * 64 * 4 + 4) + (2 * 64 + 2 * 32) * 4 + 4 * 4 + 4 * 128 * 4
    assert lp.activations.layer_bytes_per_token == per_layer == 4376
    tokens = 2 * 256
    shared = 2 * 16 * 4 + (3 * 64 * 4 + 4)                    # rotary cos/sin, final norm
    head = 1000 * (4 + 8)                                     # logits float32, CE rows + log-softmax
    assert lp.activations.total == tokens * (2 * per_layer + shared + head) == 11085824
    assert lp.step_temporary == 4 * n
    assert lp.total == 553216 + 1106432 + 1106432 + 11085824 == 13851904
    assert plan.fits is True and plan.device_source == "training.device_memory_gib"
    # checkpointing keeps each layer's input (64 float32 per token) and recomputes one layer
    ckpt = memory_plan(to_train_config(compose([*_argv(cfg), "training.gradient_checkpointing=true"])))
    assert ckpt.learner.activations.total == tokens * (2 * 64 * 4 + shared + head) + tokens * per_layer


def _argv(cfg) -> list[str]:
    return ["+experiment=smoke/a_only", "model=local", f"model.path={cfg.model.path}", "model.dtype=float32",
            "training.precision=fp32", "training.nproc_per_node=2", "training.per_device_train_batch_size=2",
            "training.effective_batch_size=4", "training.packing=false", "vllm.max_model_len=256",
            "stage2_ab.n_softctx_iter=1", "training.device_memory_gib=1"]


def test_server_kv_capacity_and_the_smaller_decode_batch(tmp_path):
    """7B bf16 server on a 20 GiB GPU: 15.4 GiB of weights leave (0.85 x 20 GiB - weights) / (2 x 28 layers
    x 4 KV heads x 128 x 2 bytes) tokens of KV cache, fewer than 4 x 12000: refused, a smaller decode batch
    suggested."""
    folder = checkpoint(tmp_path, QWEN25_VL_7B)
    plan = memory_plan(prod_cfg(folder, "training.fsdp=true", "training.nproc_per_node=8",
                                "vllm.learner_gpus=[0,1,2,3,4,5,6,7]", "vllm.server_gpus=[8]",
                                "vllm.data_parallel_size=1"), device_bytes=20 * GIB)
    sp = plan.server
    assert sp.kv_bytes_per_token == 2 * 28 * 4 * 128 * 2 == 57344
    assert sp.weights_per_gpu == plan.inventory.base_params * 2
    assert sp.capacity_tokens == (int(20 * GIB * 0.85) - sp.weights_per_gpu) // 57344
    assert sp.needed_tokens == 4 * 12000 and sp.capacity_tokens < 48000
    assert any("KV cache holds" in p for p in plan.problems)
    assert sp.capacity_tokens // 12000 == 2
    assert any(f.startswith("rollout_matching.decode_batch_size=2 ") for f in plan.fixes), plan.fixes


def test_a_cpu_server_leaf_is_never_told_to_shard():
    """FSDP needs GPUs and the config check refuses it next to a CPU server: the fixes do not offer it."""
    cfg = to_train_config(compose(["+experiment=smoke/ab_mixed", "training.device_memory_gib=0.00001"]))
    fixes = memory_plan(cfg).fixes
    assert fixes and not any("fsdp" in f for f in fixes), fixes
    assert any(f.startswith("training.gradient_checkpointing=true") for f in fixes), fixes


def test_no_checkpoint_is_reported_and_with_the_knob_is_an_error(tmp_path):
    """A checkpoint on another machine: the contract stands and the plan says why it is missing; asking for
    the check (training.device_memory_gib) makes it an error."""
    from coordexp.preflight import memory_section

    plan, table = memory_section(prod_cfg(tmp_path))
    assert plan == {"error": f"model.path '{tmp_path}' has no config.json: the memory plan counts parameters "
                             "from it (pass model.path=<local checkpoint dir>)"}
    assert table == f"warning: no memory plan: {plan['error']}"
    with pytest.raises(PlanError, match="device_memory_gib is set but the memory plan cannot be made"):
        memory_section(prod_cfg(tmp_path, "training.device_memory_gib=80"))


def test_tiny_model_plan_needs_no_build_and_counts_like_the_built_model(tmp_path, tiny_model_dir):
    from coordexp.models.tiny import read_build_info

    cfg = to_train_config(compose(["+experiment=smoke/a_only", f"model.path={tmp_path / 'cache'}"]))
    plan = memory_plan(cfg)
    assert plan.inventory.total == read_build_info(tiny_model_dir)["num_parameters"]
    assert not (tmp_path / "cache").exists()  # nothing built


def preflight(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordexp.preflight", "+experiment=ab_mixed", *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_cli_refuses_a_7b_full_fp32_ddp_plan_on_80gb_and_passes_bf16_fsdp_with_checkpointing(tmp_path):
    folder = checkpoint(tmp_path, QWEN25_VL_7B)
    full = "model.adapter.kind=none"  # the leaf trains DoRA; this test plans a full fine-tune
    out = preflight(f"model.path={folder}", full, "training.precision=fp32", "training.fsdp=false",
                    "training.gradient_checkpointing=false", "training.device_memory_gib=80")
    assert out.returncode == 2, out.stderr
    plan = json.loads(out.stdout)["memory_plan"]  # stdout stays one JSON object
    assert (plan["fits"], plan["learner"]["sharding"], plan["parameters"]) == (False, "ddp", 8292166656)
    assert plan["learner"]["weights"] == 4 * 8292166656
    err = out.stderr
    assert err.startswith("error: the memory plan of +experiment=ab_mixed does not fit the device:\n")
    for needle in ("weights", "gradients", "optimizer state", "master copies", "activations", "DOES NOT FIT",
                   "fixes (each alone, then together):", "training.fsdp=true",
                   "training.gradient_checkpointing=true", "model.adapter.kind=lora",
                   "all of the above together"):
        assert needle in err, needle

    out = preflight(f"model.path={folder}", full, "training.precision=bf16",
                    "training.gradient_checkpointing=true", "training.fsdp=true", "training.nproc_per_node=8",
                    "vllm.learner_gpus=[0,1,2,3,4,5,6,7]",
                    "vllm.server_gpus=[8,9,10,11,12,13]", "training.device_memory_gib=80")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)["memory_plan"]
    assert (plan["fits"], plan["learner"]["sharding"], plan["learner"]["world_size"]) == (True, "fsdp", 8)
    assert plan["learner"]["weights"] == -(-4 * 8292166656 // 8)
    assert "  fits" in out.stderr and "FSDP gathered units" in out.stderr


@pytest.mark.parametrize("gib", ["0", "-1", "1e30", "4097"])
def test_device_memory_must_be_a_devices_size(gib):
    from coordexp.config.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        to_train_config(compose(["+experiment=smoke/a_only", f"training.device_memory_gib={gib}"]))
    assert (f"training.device_memory_gib: {float(gib)} must be in (0, 4096] (GiB of one GPU, e.g. 80), or "
            f"null for the detected GPU's") in str(err.value)
    to_train_config(compose(["+experiment=smoke/a_only", "training.device_memory_gib=141"]))


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_vision_block_estimate_is_within_ten_percent_of_the_saved_tensors(bf16):
    """The vision-block count is an estimate (fused qkv, window attention in chunks): per patch it stays
    within 10% of what autograd saves in a Qwen2.5-VL vision tower (measured: -1.2% fp32, +6.1% bf16)."""
    import torch
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    from coordexp.planning.activations import vision_block_bytes_per_token

    torch.manual_seed(0)
    vc = Qwen2_5_VLConfig(vision_config={
        "depth": 2, "hidden_size": 256, "intermediate_size": 512, "num_heads": 4, "patch_size": 14,
        "spatial_merge_size": 2, "out_hidden_size": 256, "window_size": 112, "fullatt_block_indexes": [1],
        "temporal_patch_size": 2}).vision_config
    vc._attn_implementation = "sdpa"
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(vc)

    def saved(side: int) -> int:
        seen: dict[int, int] = {}
        inside = [False]

        def pack(t):
            if inside[0]:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        hooks = [h for b in tower.blocks
                 for h in (b.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True)),
                           b.register_forward_hook(lambda *a: inside.__setitem__(0, False)))]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            tower(torch.randn(side * side, 3 * 2 * 14 * 14), grid_thw=torch.tensor([[1, side, side]]))
        for h in hooks:
            h.remove()
        return sum(seen.values())

    measured = (saved(32) - saved(16)) / (32 * 32 - 16 * 16)
    planned = 2 * vision_block_bytes_per_token(256, 512, 4, True, 4, 2 if bf16 else None)
    assert abs(planned / measured - 1) < 0.10, (planned, measured)


def test_detected_gpu_memory_reads_nvidia_smi_within_cuda_visible_devices(tmp_path, monkeypatch):
    """No GPU here: a stand-in ``nvidia-smi`` prints what the real one prints for
    ``--query-gpu=index,memory.total --format=csv,noheader,nounits``; the plan takes the smallest visible GPU
    and says where the number came from."""
    from coordexp.planning.memory import detected_gpu_memory

    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nprintf '0, 81559\\n1, 40960\\n2, 81559\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert detected_gpu_memory() == 40960 << 20
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")
    assert detected_gpu_memory() == 81559 << 20
    folder = checkpoint(tmp_path, QWEN25_VL_3B)
    plan = memory_plan(prod_cfg(folder))
    assert (plan.device_bytes, plan.device_source) == (81559 << 20, "detected GPU")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert detected_gpu_memory() is None


def test_the_loss_head_counts_no_image_placeholder(tmp_path):
    """The learner computes logits only at positions that predict a supervised token
    (coordexp.trainer.kept_logits): the head term of a Qwen2.5-VL-7B pack counts its non-image tokens,
    ``(tokens - image tokens) x vocab x (2 bf16 logits + 4 float32 copy + 8 CE rows and log-softmax)``, plus
    the bf16 logits of the second soft self-context pass (``unroll`` keeps both graphs)."""
    from coordexp.planning.inventory import inventory
    from coordexp.planning.memory import estimate_activations

    cfg = prod_cfg(checkpoint(tmp_path, QWEN25_VL_7B), "training.precision=bf16",
                   "stage2_ab.softctx_grad_mode=unroll", "stage2_ab.n_softctx_iter=2")
    act = estimate_activations(cfg, inventory(cfg))
    assert act.passes == 2 and 0 < act.image_tokens < act.tokens
    text_tokens = act.tokens - act.image_tokens
    assert act.head_bytes == text_tokens * 152064 * (2 + 4 + 8) + text_tokens * 152064 * 2


def test_the_fixes_of_a_plan_with_every_memory_setting_on_are_ones_the_config_accepts(tmp_path):
    """DoRA, FSDP, checkpointing, bf16 on a 16 GiB device: the learner fix left is shorter packs, then a
    bigger world or a smaller model; the server's tensor parallelism keeps the GPUs per server (6 = 3 x 2),
    so the override the fix names passes the config check."""
    folder = checkpoint(tmp_path, QWEN25_VL_7B)
    cfg = prod_cfg(folder, "model.adapter.kind=dora", "training.fsdp=true")
    plan = memory_plan(cfg, device_bytes=16 * GIB)
    assert plan.fixes[0].startswith("training.packing_length=6000 (shorter packs): ")
    assert plan.fixes[1].startswith("with all of that, a rank needs ")
    assert plan.fixes[1].endswith(": shard over more learner ranks (training.fsdp=true with more "
                                  "training.nproc_per_node / training.nnodes), or train a smaller model")
    assert plan.fixes[2] == ("vllm.tensor_parallel_size=2 vllm.data_parallel_size=3 (split the weights over "
                             "more GPUs), or a higher vllm.gpu_memory_utilization")
    prod_cfg(folder, "model.adapter.kind=dora", "training.fsdp=true", "vllm.tensor_parallel_size=2",
             "vllm.data_parallel_size=3")  # accepted
    odd = prod_cfg(folder, "model.adapter.kind=dora", "training.fsdp=true", "vllm.data_parallel_size=1",
                   "vllm.server_gpus=[0]")
    assert memory_plan(odd, device_bytes=16 * GIB).fixes[-1].startswith(
        "vllm.tensor_parallel_size=2 with 2 GPUs per server (vllm.server_gpus: 2 in all)")
    assert "fixes:\n" in plan_table(plan, cfg) and "then together" not in plan_table(plan, cfg)
