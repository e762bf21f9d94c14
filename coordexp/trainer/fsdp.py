"""The sharded learner (``training.fsdp``): FSDP2 through the Trainer's ``fsdp`` / ``fsdp_config``.

accelerate turns ``TrainingArguments(fsdp=True, fsdp_config=...)`` into a ``FullyShardedDataParallelPlugin``
(``fsdp_version: 2`` = ``torch.distributed.fsdp.fully_shard``): every decoder layer and vision block of the
Qwen families becomes its own FSDP unit (transformer auto-wrap on :data:`WRAP_CLASSES`, the class names of
transformers 5.19), the rest of the model the root unit. Activation checkpointing goes through
``fsdp_config["activation_checkpointing"]`` instead of the Trainer's ``gradient_checkpointing`` flag (the
flag would add a redundant all-gather in the backward; transformers warns, accelerate requires the FSDP
option: transformers issue 30404). Mixed precision (``training.precision``) becomes accelerate's FSDP2
``MixedPrecisionPolicy``; frozen groups and peft adapters need nothing here (FSDP2 shards each parameter on
its own, so a unit may mix frozen and trainable parameters).

CUDA only: on CPU accelerate does not run FSDP at all, it silently wraps the model in DDP
(``DistributedType.MULTI_CPU``), so :func:`require_cuda` refuses such a run with a clear message. The sharded
weight gather the sync uses is proven on CPU with torch's own ``fully_shard`` on gloo
(:mod:`coordexp.trainer.sharded_sync`); this wiring only on a GPU machine (docs/runbook.md "Sharded learner").
"""

from __future__ import annotations

from typing import Any

from coordexp.errors import LearnerError

__all__ = ["FSDP_NEEDS_CUDA", "WRAP_CLASSES", "fsdp_config", "hf_gradient_checkpointing",
           "refuse_tied_adapter", "require_cuda", "ties_embeddings", "training_arguments", "wrap_classes"]

#: Decoder-layer and vision-block classes of the Qwen families (transformers 5.19 class names): each
#: instance becomes one FSDP unit. Order: text decoders, then VL decoders, then vision blocks.
WRAP_CLASSES = (
    "Qwen2DecoderLayer",
    "Qwen3DecoderLayer",
    "Qwen2VLDecoderLayer",
    "Qwen2_5_VLDecoderLayer",
    "Qwen3VLTextDecoderLayer",
    "Qwen2VLVisionBlock",
    "Qwen2_5_VLVisionBlock",
    "Qwen3VLVisionBlock",
)

FSDP_NEEDS_CUDA = (
    "training.fsdp: true needs CUDA GPUs for the learner, and this learner has none: on CPU accelerate does "
    "not shard at all, it silently runs plain DDP (DistributedType.MULTI_CPU). Fix: set training.fsdp=false "
    "on a CPU machine (DDP over training.nproc_per_node ranks), or run on a machine with CUDA GPUs (in "
    "server mode: vllm.device: cuda and vllm.learner_gpus)"
)


def require_cuda(cuda_available: bool) -> None:
    """Raise :class:`~coordexp.errors.LearnerError` (:data:`FSDP_NEEDS_CUDA`) when there is no CUDA device."""
    if not cuda_available:
        raise LearnerError(FSDP_NEEDS_CUDA)


def ties_embeddings(model) -> bool:
    """Whether the checkpoint ties its head to its input embedding (``tie_word_embeddings``, top level or
    in the text config of a vision-language model)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))


def refuse_tied_adapter(model) -> None:
    """Raise :class:`~coordexp.errors.LearnerError` for a peft adapter on a tied-embedding checkpoint.

    accelerate (1.15) shards a tied embedding and head as one unit, recognising the tie by
    ``get_input_embeddings().weight is get_output_embeddings().weight``. peft's trainable coordinate rows wrap
    both modules, so the test fails, the shared weight lands in two units, and ``fully_shard`` crashes
    before the first step (seen on an H200 with torch 2.11: "Invariant encountered: value was None")."""
    if hasattr(model, "peft_config") and ties_embeddings(model):
        raise LearnerError(
            "training.fsdp with model.adapter.kind lora/dora is not supported on a checkpoint that ties its "
            "head to its input embedding (tie_word_embeddings: true): accelerate cannot see the tie through "
            "peft's trainable coordinate rows and fails to shard the shared weight. Fix: train the adapter "
            "with training.fsdp=false (DDP: the adapter's gradients and optimizer state are small), or "
            "train the full weights (model.adapter.kind=none) with FSDP")


def wrap_classes(model) -> list[str]:
    """The :data:`WRAP_CLASSES` present in ``model`` (accelerate fails on a class name the model lacks), in
    :data:`WRAP_CLASSES` order. A model of another family falls back to its own ``_no_split_modules`` (what
    accelerate would use); neither -> :class:`~coordexp.errors.LearnerError`."""
    present = {type(m).__name__ for m in model.modules()}
    names = [c for c in WRAP_CLASSES if c in present]
    if not names:
        names = [c for c in (getattr(model, "_no_split_modules", None) or []) if c in present]
    if not names:
        raise LearnerError(
            f"training.fsdp: {type(model).__name__} has none of the decoder-layer / vision-block classes "
            f"FSDP wraps ({', '.join(WRAP_CLASSES)}) and no _no_split_modules; coordexp shards Qwen2/Qwen3 "
            f"and Qwen2-VL/Qwen2.5-VL/Qwen3-VL checkpoints only: set training.fsdp=false")
    return names


def fsdp_config(model, activation_checkpointing: bool) -> dict[str, Any]:
    """The Trainer's ``fsdp_config`` for ``model``: FSDP2, full sharding (parameters resharded after each
    forward), transformer auto-wrap on :func:`wrap_classes`, activation checkpointing through FSDP, full
    (HF-format) state dicts in checkpoints, so resume, eval and export read them like any checkpoint."""
    return {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": wrap_classes(model),
        "reshard_after_forward": True,
        "activation_checkpointing": bool(activation_checkpointing),
        "state_dict_type": "FULL_STATE_DICT",
        "cpu_ram_efficient_loading": False,
    }


def hf_gradient_checkpointing(training) -> bool:
    """The Trainer's own ``gradient_checkpointing`` flag: ``training.gradient_checkpointing`` unless FSDP
    checkpoints the activations instead (:func:`fsdp_config`)."""
    return bool(training.gradient_checkpointing) and not training.fsdp


def training_arguments(training, model, cuda_available: bool) -> dict[str, Any]:
    """``TrainingArguments`` keywords for ``training`` (the ``training.*`` config): ``{}`` without
    ``training.fsdp``; else ``fsdp`` and ``fsdp_config`` (after :func:`require_cuda` and
    :func:`refuse_tied_adapter`)."""
    if not training.fsdp:
        return {}
    require_cuda(cuda_available)
    refuse_tied_adapter(model)
    return {"fsdp": True, "fsdp_config": fsdp_config(model, training.gradient_checkpointing)}
