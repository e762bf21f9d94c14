"""Parameter groups of the supported model families: which parameter belongs to the language model
(``llm``), the vision tower (``vit``) or the aligner (``aligner``).

The groups carry their own learning rate (``training.learning_rate`` for ``llm``, ``training.vit_lr``,
``training.aligner_lr``) and can be frozen (``model.freeze_llm`` / ``freeze_vit`` / ``freeze_aligner``).
Membership comes from the family's module names as the transformers 5 classes name them (checked
against a meta-device instantiation of each family in tests/unit/test_param_groups.py):

=============  ===========================================================  ==============================
family         vision tower (``vit``)                                       aligner
=============  ===========================================================  ==============================
qwen2, qwen3   none (text models: every parameter is ``llm``)               none
qwen2_vl       ``model.visual.*`` (patch_embed, blocks)                     ``model.visual.merger.*``
qwen2_5_vl     ``model.visual.*`` (patch_embed, blocks)                     ``model.visual.merger.*``
qwen3_vl       ``model.visual.*`` (patch_embed, pos_embed, blocks)          ``model.visual.merger.*`` and
                                                                            ``model.visual.deepstack_merger_list.*``
=============  ===========================================================  ==============================

Everything else (decoder layers, embeddings, final norm, ``lm_head``) is ``llm``. The checkpoint layout
of the Qwen-VL families on disk (``visual.*`` at the top level, as the original Hugging Face releases store
it) maps the same way. Wrapped names are unwrapped first: peft (``base_model.model.<name>``, with
``.base_layer``, ``lora_A/B.<adapter>``, ``lora_magnitude_vector``, ``modules_to_save.<adapter>``,
``original_module``, ``token_adapter`` after the module path), DDP/accelerate (``module.``) and
``torch.compile`` (``_orig_mod.``).

Pure Python: names in, names out; :func:`partition` and :func:`group_counts` only iterate
``named_parameters()``-style pairs. Errors: :class:`ParamGroupError` (a ``ValueError``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ALIGNER",
    "FAMILIES",
    "GROUPS",
    "LLM",
    "VIT",
    "Family",
    "ParamGroupError",
    "family",
    "group_counts",
    "group_of",
    "is_vision_language",
    "model_type_of",
    "partition",
    "strip_wrappers",
]

LLM, VIT, ALIGNER = "llm", "vit", "aligner"
GROUPS = (LLM, VIT, ALIGNER)

#: Leading segments added by wrappers around the HF model, removed (repeatedly, in any order) before matching.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")


class ParamGroupError(ValueError):
    """An unknown family, or a group configured for a model that has no parameter in it."""


@dataclass(frozen=True)
class Family:
    """One family's table: name prefixes (after :func:`strip_wrappers`) of the aligner and vision tower.
    Aligner prefixes are tried first (the aligner lives inside the vision module)."""

    model_type: str
    vit: tuple[str, ...] = ()
    aligner: tuple[str, ...] = ()

    @property
    def is_vision_language(self) -> bool:
        return bool(self.vit)

    @property
    def groups(self) -> tuple[str, ...]:
        return GROUPS if self.is_vision_language else (LLM,)

    def group_of(self, name: str) -> str:
        plain = strip_wrappers(name)
        if any(plain.startswith(p) for p in self.aligner):
            return ALIGNER
        if any(plain.startswith(p) for p in self.vit):
            return VIT
        return LLM


def _qwen_vl(model_type: str, *aligner_modules: str) -> Family:
    # transformers 5 classes: model.visual.*; released checkpoints on disk: visual.*
    roots = ("model.visual.", "visual.")
    return Family(model_type, vit=roots,
                  aligner=tuple(f"{r}{m}." for r in roots for m in aligner_modules))


FAMILIES: dict[str, Family] = {
    "qwen2": Family("qwen2"),
    "qwen3": Family("qwen3"),
    "qwen2_vl": _qwen_vl("qwen2_vl", "merger"),
    "qwen2_5_vl": _qwen_vl("qwen2_5_vl", "merger"),
    "qwen3_vl": _qwen_vl("qwen3_vl", "merger", "deepstack_merger_list"),
}


def strip_wrappers(name: str) -> str:
    """``name`` without the wrapper prefixes (peft ``base_model.model.``, DDP ``module.``, compile
    ``_orig_mod.``). Suffixes such as ``.base_layer.weight`` are kept: they follow the module path."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def family(model_type: str) -> Family:
    """The table of ``model_type`` (config.json's ``model_type``); ParamGroupError for any other family."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ParamGroupError(
            f"model_type '{model_type}' has no parameter-group table; supported: {', '.join(FAMILIES)} "
            f"(coordexp/models/param_groups.py)") from None


def group_of(name: str, model_type: str) -> str:
    """The group (``llm`` | ``vit`` | ``aligner``) of parameter ``name`` (plain or wrapped) of a
    ``model_type`` model. Raises ParamGroupError for an unknown family."""
    return family(model_type).group_of(name)


def model_type_of(config: Any) -> str:
    """``model_type`` of a transformers config object or a config.json mapping."""
    value = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    if not value:
        raise ParamGroupError("the model config has no model_type")
    return str(value)


def is_vision_language(config: Any) -> bool:
    """Whether a checkpoint is vision-language: its config (a transformers config or config.json as a
    mapping) has a ``vision_config``. That is the rule the preflight and the learner apply."""
    if isinstance(config, Mapping):
        return config.get("vision_config") is not None
    return getattr(config, "vision_config", None) is not None


def partition(named_parameters: Iterable[tuple[str, Any]], model_type: str,
              required: Iterable[str] = ()) -> dict[str, list[tuple[str, Any]]]:
    """Split ``(name, parameter)`` pairs into the family's groups, in order, each parameter in exactly one.

    ``required``: groups that must have at least one parameter (the ones the config sets a learning rate
    for or freezes); a required group that matches nothing, or that the family does not have, raises
    ParamGroupError naming the family. The returned mapping has a key for each of the family's groups.
    """
    fam = family(model_type)
    out: dict[str, list[tuple[str, Any]]] = {g: [] for g in fam.groups}
    for name, param in named_parameters:
        out[fam.group_of(name)].append((name, param))
    problems = []
    for group in dict.fromkeys(required):
        if group not in GROUPS:
            raise ParamGroupError(f"unknown parameter group '{group}'; groups: {', '.join(GROUPS)}")
        if group not in out:
            problems.append(f"'{group}' (the {model_type} family is a text model: its only group is llm)")
        elif not out[group]:
            problems.append(f"'{group}' (no parameter name of this {model_type} model starts with "
                            f"{' or '.join(getattr(fam, group) or ('<anything>',))})")
    if problems:
        raise ParamGroupError(f"parameter group(s) configured but matching nothing in the {model_type} "
                              f"model: {'; '.join(problems)}")
    return out


def group_counts(named_parameters: Iterable[tuple[str, Any]], model_type: str) -> dict[str, tuple[int, int]]:
    """``{group: (total, trainable)}`` element counts (``numel``; ``requires_grad`` decides trainable) over
    ``(name, parameter)`` pairs, shared tensors counted once (a tied head)."""
    fam = family(model_type)
    counts = {g: [0, 0] for g in fam.groups}
    seen: set[int] = set()
    for name, param in named_parameters:
        key = id(param)
        if key in seen:
            continue
        seen.add(key)
        c = counts[fam.group_of(name)]
        c[0] += param.numel()
        c[1] += param.numel() if getattr(param, "requires_grad", False) else 0
    return {g: (a, b) for g, (a, b) in counts.items()}
