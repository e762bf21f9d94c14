"""training.fsdp: the exact fsdp_config the learner hands the Trainer, what accelerate makes of it, the
refusal without CUDA (learner and config validation), and the multi-node config rules."""

import subprocess
import sys

import pytest
import torch
from transformers import TrainingArguments

from coordexp.config.load import compose, to_train_config
from coordexp.config.validate import multinode_problems, run_dir_problems
from coordexp.errors import ConfigError, LearnerError
from coordexp.trainer import fsdp
from tests.conftest import REPO_ROOT


def resolved(*overrides: str):
    return to_train_config(compose(list(overrides)))


def meta_model(kind: str):
    """A small model of each family, on the meta device (no weights allocated)."""
    from transformers import (
        AutoModelForCausalLM,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2Config,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen3Config,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 128}
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 32,
              "embed_dim": 32}
    with torch.device("meta"):
        if kind == "qwen2":
            return AutoModelForCausalLM.from_config(Qwen2Config(**text))
        if kind == "qwen3":
            return AutoModelForCausalLM.from_config(Qwen3Config(head_dim=8, **text))
        if kind == "qwen2_vl":
            return Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision))
        if kind == "qwen2_5_vl":
            return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text,
                                                                       vision_config=vision))
        return Qwen3VLForConditionalGeneration(Qwen3VLConfig(
            text_config={**text, "head_dim": 8, "rope_scaling": {"rope_type": "default",
                                                                   "mrope_section": [1, 1, 2]}},
            vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4,
                           "out_hidden_size": 32, "deepstack_visual_indexes": [1]}))


@pytest.mark.parametrize("kind,classes", [
    ("qwen2", ["Qwen2DecoderLayer"]),
    ("qwen3", ["Qwen3DecoderLayer"]),
    ("qwen2_vl", ["Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"]),
    ("qwen2_5_vl", ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"]),
    ("qwen3_vl", ["Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock"]),
])
def test_fsdp_config_wraps_the_family_layers(kind, classes):
    model = meta_model(kind)
    assert fsdp.fsdp_config(model, activation_checkpointing=True) == {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": classes,
        "reshard_after_forward": True,
        "activation_checkpointing": True,
        "state_dict_type": "FULL_STATE_DICT",
        "cpu_ram_efficient_loading": False,
    }


def test_accelerate_plugin_arguments_from_the_learner_config():
    """What transformers hands accelerate's FullyShardedDataParallelPlugin (FSDP2, our wrap classes, FSDP's
    activation checkpointing); the Trainer's own flag stays off under FSDP."""
    cfg = resolved("+experiment=smoke/a_only", "rollout=hf", "training.fsdp=true",
                   "training.gradient_checkpointing=true")
    model = meta_model("qwen2_vl")
    kwargs = fsdp.training_arguments(cfg.training, model, cuda_available=True)
    args = TrainingArguments(output_dir="/tmp/unused", use_cpu=True, report_to="none",
                             gradient_checkpointing=fsdp.hf_gradient_checkpointing(cfg.training), **kwargs)
    assert args.fsdp is True and args.gradient_checkpointing is False
    assert args.fsdp_plugin_args == {
        "fsdp_version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_cls_names_to_wrap": "Qwen2VLDecoderLayer,Qwen2VLVisionBlock",
        "cpu_ram_efficient_loading": False,
        "state_dict_type": "FULL_STATE_DICT",
        "activation_checkpointing": True,
        "reshard_after_forward": True,
    }
    from coordexp.trainer.optim import precision_arguments

    assert "gradient_checkpointing" not in precision_arguments(cfg.training, cuda=True)  # FSDP's own instead
    off = resolved("+experiment=smoke/a_only", "rollout=hf", "training.gradient_checkpointing=true")
    assert fsdp.training_arguments(off.training, model, cuda_available=False) == {}
    assert fsdp.hf_gradient_checkpointing(off.training) is True
    assert precision_arguments(off.training, cuda=False)["gradient_checkpointing"] is True


def test_fsdp_without_cuda_is_refused():
    cfg = resolved("+experiment=smoke/a_only", "rollout=hf", "training.fsdp=true")
    with pytest.raises(LearnerError) as err:
        fsdp.training_arguments(cfg.training, meta_model("qwen2"), cuda_available=False)
    assert str(err.value) == fsdp.FSDP_NEEDS_CUDA
    assert "DistributedType.MULTI_CPU" in str(err.value) and "training.fsdp=false" in str(err.value)


def test_an_adapter_on_a_tied_checkpoint_is_refused_with_the_fix():
    from tests.unit.test_merged_weights import adapted, tiny_qwen2

    cfg = resolved("+experiment=smoke/a_only", "rollout=hf", "training.fsdp=true")
    with pytest.raises(LearnerError) as err:
        fsdp.training_arguments(cfg.training, adapted("dora", tied=True), cuda_available=True)
    assert "tie_word_embeddings: true" in str(err.value) and "training.fsdp=false" in str(err.value)
    for model in (adapted("lora", tied=False), tiny_qwen2(tied=True)):  # untied adapter; tied full weights
        args = fsdp.training_arguments(cfg.training, model, cuda_available=True)
        assert args["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["Qwen2DecoderLayer"]
    vl = meta_model("qwen2_vl")
    vl.config.text_config.tie_word_embeddings = True  # read from the text config of a VL checkpoint too
    assert fsdp.ties_embeddings(vl)


def test_other_families_use_their_no_split_modules_or_are_refused():
    class Layer(torch.nn.Module):
        pass

    class Other(torch.nn.Module):
        _no_split_modules = ("Layer",)

        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Layer()])

    assert fsdp.wrap_classes(Other()) == ["Layer"]
    Other._no_split_modules = ()
    with pytest.raises(LearnerError, match="none of the decoder-layer"):
        fsdp.wrap_classes(Other())


def test_config_validation_refuses_fsdp_on_a_cpu_server_run():
    with pytest.raises(ConfigError) as err:
        resolved("+experiment=smoke/ab_mixed", "rollout=vllm_server", "vllm.device=cpu", "training.fsdp=true")
    (problem,) = [p for p in err.value.problems if p.startswith("training.fsdp")]
    assert "DistributedType.MULTI_CPU" in problem and "training.fsdp=false" in problem


def test_learner_refuses_fsdp_without_cuda_before_loading_the_model(tmp_path):
    """A real run: rollout=hf (the device is not in the config), no GPU here: exit 2 and the message."""
    cmd = [sys.executable, "-m", "coordexp.train", "+experiment=smoke/a_only", "rollout=hf",
           f"hydra.run.dir={tmp_path / 'run'}", "training.fsdp=true", "model.tiny_stage1_steps=0"]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert fsdp.FSDP_NEEDS_CUDA in out.stdout + out.stderr
    assert "Traceback" not in out.stderr


def test_multinode_rules():
    ok = resolved("+experiment=smoke/a_only", "rollout=hf", "training.nnodes=2", "training.node_rank=1",
                  "training.rdzv_endpoint=10.0.0.1:29400", "training.nproc_per_node=1")
    assert multinode_problems(ok) == []
    with pytest.raises(ConfigError) as err:
        resolved("+experiment=smoke/a_only", "rollout=hf", "training.nnodes=2", "training.node_rank=2")
    assert "training.node_rank: 2 is outside [0, nnodes=2)" in err.value.problems
    assert any(p.startswith("training.rdzv_endpoint: is required when training.nnodes > 1")
               for p in err.value.problems)
    with pytest.raises(ConfigError) as err:
        resolved("+experiment=smoke/a_only", "rollout=hf", "training.nnodes=2",
                 "training.rdzv_endpoint=node0")
    assert "training.rdzv_endpoint: 'node0' is not host:port (port 1..65535), e.g. 10.0.0.1:29400" in \
        err.value.problems
    assert run_dir_problems(1, [], multirun=False) == []
    assert run_dir_problems(2, ["hydra.run.dir=/shared/run"], multirun=False) == []
    (missing,) = run_dir_problems(2, ["training.nnodes=2"], multirun=False)
    assert missing.startswith("hydra.run.dir: must be given explicitly with training.nnodes=2")
    (sweep,) = run_dir_problems(2, ["hydra.run.dir=/x"], multirun=True)
    assert "cannot run a sweep" in sweep


def test_world_size_counts_every_node():
    """effective_batch_size counts every rank of every node: 2 nodes x 1 rank x 4 per device -> 2 steps"""
    from coordexp.config.validate import derived_grad_accumulation

    cfg = resolved("+experiment=smoke/a_only", "rollout=hf", "training.nnodes=2",
                   "training.rdzv_endpoint=127.0.0.1:29400", "training.per_device_train_batch_size=4",
                   "training.effective_batch_size=16")
    assert derived_grad_accumulation(cfg) == 2
    with pytest.raises(ConfigError) as err:
        resolved("+experiment=smoke/a_only", "rollout=hf", "training.nnodes=3",
                 "training.rdzv_endpoint=127.0.0.1:29400", "training.per_device_train_batch_size=4",
                 "training.effective_batch_size=16")
    assert any("x nproc_per_node x nnodes = 12" in p for p in err.value.problems)


def test_preflight_refuses_multinode_without_a_run_dir(capsys):
    from coordexp import preflight

    with pytest.raises(SystemExit) as exit_:
        preflight.main(["+experiment=smoke/a_only", "rollout=hf", "training.nnodes=2",
                        "training.rdzv_endpoint=127.0.0.1:29400"])
    assert exit_.value.code == 2
    assert "hydra.run.dir: must be given explicitly with training.nnodes=2" in capsys.readouterr().err
