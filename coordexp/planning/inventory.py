"""What the config trains, counted exactly: the checkpoint's transformers config
(``model.path``/config.json, or the tiny model's config for ``model.kind: tiny``) instantiated on the meta
device (``torch.device("meta")``: shapes only, no weights read, no memory), its parameters split into the
``llm`` / ``vit`` / ``aligner`` groups of :mod:`coordexp.models.param_groups`, and what trains under
``model.freeze_*`` and ``model.adapter``.

Adapters and freezing are applied to the meta model by the learner's own code, in the learner's order
(:func:`coordexp.trainer.adapters.attach_adapter`: peft LoRA/DoRA on the language model's target layers, the
1000 coordinate-token rows through ``trainable_token_indices``, unfrozen vision groups in full through
``modules_to_save``; then :func:`coordexp.trainer.optim.prepare_model`: frozen groups, per-group rates), so
the counts are what the learner will train. peft keeps LoRA/DoRA weights in float32 when the base is
bfloat16/float16 (``autocast_adapter_dtype``).

Errors: :class:`PlanError` (exit 2) when the checkpoint has no config.json or transformers cannot build it;
:class:`~coordexp.errors.ConfigError` from the learner's own group rules (a vision knob on a text model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordexp.config.schema import ModelKind, TrainConfig, enum_value
from coordexp.coordjson import NUM_BINS
from coordexp.data.resize import DEFAULT_MAX_PIXELS
from coordexp.errors import CoordexpError
from coordexp.models import param_groups as pg
from coordexp.models.tiny import SPEC_FILE, TinyModelSpec, tiny_config, tiny_model_dir
from coordexp.trainer.adapters import attach_adapter, unfrozen_vision_groups
from coordexp.trainer.fsdp import WRAP_CLASSES
from coordexp.trainer.model_dir import refuse_adapter_checkpoint
from coordexp.trainer.optim import prepare_model

__all__ = ["GroupCount", "Inventory", "PlanError", "TextDims", "VisionDims", "inventory", "load_model_config",
           "meta_model"]


class PlanError(CoordexpError):
    """The memory plan cannot be made (no config.json, a config transformers cannot build), or it does not
    fit the device (the message then holds the table and the fixes)."""


@dataclass(frozen=True)
class TextDims:
    """The language model's shapes (``config.get_text_config()``)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool


@dataclass(frozen=True)
class VisionDims:
    """The vision tower's shapes; ``gated_mlp``: SwiGLU (Qwen2.5-VL) vs a two-layer GELU MLP (Qwen2-VL,
    Qwen3-VL); ``image_tokens``: merged tokens of one image at the image processor's ``max_pixels``."""

    depth: int
    width: int
    intermediate: int
    heads: int
    patch: int
    merge: int
    gated_mlp: bool
    image_tokens: int


@dataclass(frozen=True)
class GroupCount:
    total: int       # parameters of the group (adapter parameters included)
    trainable: int
    lr: float | None  # None: frozen
    frozen: bool


@dataclass(frozen=True)
class Inventory:
    """Exact parameter counts of one config's model (unique tensors: a tied head counts once)."""

    source: str                  # checkpoint folder, or "tiny <arch>"
    model_type: str
    text: TextDims
    vision: VisionDims | None
    groups: dict[str, GroupCount]
    base_params: int             # the checkpoint's parameters
    adapter_params: int          # parameters an adapter adds (LoRA/DoRA, token rows, modules_to_save copies)
    adapter_fp32_params: int     # of those, the LoRA/DoRA weights peft keeps in float32
    trainable: int
    matmul_params: int           # weights of Linear/Conv layers (what autocast casts to the compute dtype)
    largest_block: int           # parameters of the largest decoder layer / vision block (an FSDP unit)
    root_params: int             # parameters outside every block (FSDP's root unit)

    @property
    def total(self) -> int:
        return self.base_params + self.adapter_params


def load_model_config(cfg: TrainConfig) -> tuple[Any, str, dict[str, Any]]:
    """(transformers config, source, image-processor settings) of the model ``cfg`` trains. ``kind: local``:
    ``model.path``/config.json (and preprocessor_config.json when present); ``kind: tiny``: the built
    folder's config when it is in the cache, else :func:`coordexp.models.tiny.tiny_config` (nothing built).
    Raises PlanError for a missing or unreadable config.json."""
    from transformers import AutoConfig

    if cfg.model.kind == ModelKind.local:
        folder = Path(cfg.model.path)
        refuse_adapter_checkpoint(folder)  # what training says (exit 2), not "no config.json"
        if not (folder / "config.json").is_file():
            raise PlanError(f"model.path '{folder}' has no config.json: the memory plan counts parameters "
                            "from it (pass model.path=<local checkpoint dir>)")
        try:
            config = AutoConfig.from_pretrained(folder)
        except (ValueError, KeyError, OSError) as err:
            raise PlanError(f"model.path '{folder}': transformers cannot read config.json ({err})") from None
        pre = folder / "preprocessor_config.json"
        processor = json.loads(pre.read_text()) if pre.is_file() else {}
        return config, str(folder), processor
    spec = TinyModelSpec(arch=enum_value(cfg.model.tiny_arch))
    folder = tiny_model_dir(Path(cfg.model.path).expanduser(), spec)
    config = AutoConfig.from_pretrained(folder) if (folder / SPEC_FILE).is_file() else tiny_config(spec)
    processor = {"max_pixels": spec.vision.max_pixels} if spec.vision else {}
    return config, f"tiny {spec.arch}", processor


def meta_model(config: Any):
    """The model class the learner loads (``AutoModelForImageTextToText`` for a config with a
    ``vision_config``, else ``AutoModelForCausalLM``) built from ``config`` on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if pg.is_vision_language(config) else AutoModelForCausalLM
    with torch.device("meta"):
        try:
            return auto.from_config(config)
        except (ValueError, KeyError) as err:
            raise PlanError(f"transformers cannot build a {config.model_type} model from its config ({err})"
                            ) from None


def _max_pixels(processor: dict[str, Any]) -> int:
    size = processor.get("size") or {}
    return int(processor.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
               or DEFAULT_MAX_PIXELS)


def _text_dims(config: Any) -> TextDims:
    t = config.get_text_config()
    heads = int(t.num_attention_heads)
    return TextDims(hidden=int(t.hidden_size), intermediate=int(t.intermediate_size),
                    layers=int(t.num_hidden_layers), heads=heads,
                    kv_heads=int(getattr(t, "num_key_value_heads", None) or heads),
                    head_dim=int(getattr(t, "head_dim", None) or t.hidden_size // heads),
                    vocab=int(t.vocab_size),
                    tied=bool(getattr(config, "tie_word_embeddings", False)))


def _vision_dims(config: Any, model, processor: dict[str, Any]) -> VisionDims | None:
    v = getattr(config, "vision_config", None)
    if v is None:
        return None
    width = int(getattr(v, "embed_dim", None) or v.hidden_size)  # Qwen2-VL names the width embed_dim
    intermediate = int(getattr(v, "intermediate_size", None) or width * v.mlp_ratio)
    gated = any(name.endswith("mlp.gate_proj") and ".visual." in f".{name}." for name, _ in
                model.named_modules())
    patch, merge = int(v.patch_size), int(v.spatial_merge_size)
    return VisionDims(depth=int(v.depth), width=width, intermediate=intermediate, heads=int(v.num_heads),
                      patch=patch, merge=merge, gated_mlp=gated,
                      image_tokens=_max_pixels(processor) // (patch * merge) ** 2)


def inventory(cfg: TrainConfig, config: Any | None = None, source: str | None = None,
              processor: dict[str, Any] | None = None) -> Inventory:
    """The :class:`Inventory` of ``cfg``'s model (``config``: a transformers config to use instead of the
    one :func:`load_model_config` finds). Raises PlanError, ConfigError."""
    import torch

    if config is None:
        config, source, processor = load_model_config(cfg)
    model = meta_model(config)
    model_type = pg.model_type_of(config)
    text = _text_dims(config)
    params = dict(model.named_parameters())  # unique tensors: a tied head is listed once
    param_ids = {id(p) for p in params.values()}
    base = {g: 0 for g in pg.family(model_type).groups}
    for name, p in params.items():
        base[pg.group_of(name, model_type)] += p.numel()

    matmul: set[int] = set()
    blocks: list[int] = []
    in_blocks: set[int] = set()
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv3d | torch.nn.Conv2d):
            matmul |= {id(p) for p in module.parameters(recurse=False)}
        if type(module).__name__ in WRAP_CLASSES:
            ps = {id(p): p.numel() for p in module.parameters()}
            blocks.append(sum(ps.values()))
            in_blocks |= set(ps)

    vision = _vision_dims(config, model, processor or {})
    # what the learner does at load (coordexp.trainer.learner.train): the adapter, then freezing
    base_params = sum(base.values())
    coord_ids = range(text.vocab - NUM_BINS, text.vocab)  # where the rows sit does not change any count
    model = attach_adapter(model, cfg.model.adapter, coord_ids, full_groups=unfrozen_vision_groups(cfg.model))
    plan = prepare_model(model, cfg)
    counts = pg.group_counts(model.named_parameters(), model_type)
    groups = {g: GroupCount(total=n, trainable=k, lr=None if g in plan.frozen else plan.lrs[g],
                            frozen=g in plan.frozen) for g, (n, k) in counts.items()}
    total = sum(n for n, _ in counts.values())
    lora = sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name)
    dtype_half = enum_value(cfg.model.dtype) in ("bfloat16", "float16")
    return Inventory(
        source=source or model_type, model_type=model_type, text=text,
        vision=vision, groups=groups,
        base_params=base_params, adapter_params=total - base_params,
        adapter_fp32_params=lora if dtype_half else 0,
        trainable=sum(c.trainable for c in groups.values()),
        matmul_params=sum(p.numel() for p in params.values() if id(p) in matmul),
        largest_block=max(blocks, default=0),
        root_params=sum(p.numel() for p in params.values() if id(p) in param_ids - in_blocks))
