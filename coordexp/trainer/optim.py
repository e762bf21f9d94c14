"""Parameter groups at model load and in the optimizer: freezing (``model.freeze_llm`` / ``freeze_vit`` /
``freeze_aligner``) and one learning rate per group (``training.learning_rate`` for the language model,
``training.vit_lr``, ``training.aligner_lr``; null = learning_rate).

Group membership is the family table of :mod:`coordexp.models.param_groups`. The optimizer gets one param
group per (group x decay / no decay) that has a trainable parameter, each carrying its group's ``lr`` and a
``name`` such as ``"vit/decay"`` (torch keeps extra keys, so the rates and names can be read back from
``optimizer.param_groups`` and its state dict). Weight decay excludes biases and norms: the Trainer's own
``get_decay_parameter_names``. The Trainer's LR scheduler (a ``LambdaLR``) scales each group's own initial
``lr`` by the same factor, so warmup and decay keep the configured ratios.

Errors: :class:`~coordexp.errors.ConfigError` (exit 2) for a vision knob on a text checkpoint, a configured
group that matches no parameter, or a model with nothing left to train.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from coordexp.config.errors import ConfigError
from coordexp.config.schema import Precision, TrainConfig, enum_value
from coordexp.config.validate import unset_hint
from coordexp.models import param_groups as pg

__all__ = ["GroupPlan", "apply_freezing", "group_table", "optimizer_param_groups", "plan_groups",
           "precision_arguments", "prepare_model"]

VISION_KNOBS = ("model.freeze_vit", "model.freeze_aligner", "training.vit_lr", "training.aligner_lr")


@dataclass(frozen=True)
class GroupPlan:
    """What the config asks of each parameter group of one checkpoint family."""

    model_type: str
    lrs: dict[str, float]            # group -> peak learning rate (the family's groups only)
    frozen: frozenset[str]           # groups whose every parameter gets requires_grad=False
    required: tuple[str, ...]        # groups the config names explicitly: they must match a parameter


def _set_vision_knobs(cfg: TrainConfig) -> list[str]:
    m, t = cfg.model, cfg.training
    values = {"model.freeze_vit": m.freeze_vit, "model.freeze_aligner": m.freeze_aligner,
              "training.vit_lr": t.vit_lr is not None, "training.aligner_lr": t.aligner_lr is not None}
    return [k for k in VISION_KNOBS if values[k]]


def plan_groups(cfg: TrainConfig, model_config: Any) -> GroupPlan:
    """The GroupPlan of ``cfg`` for a checkpoint with this transformers config (or config.json mapping).

    Raises ConfigError: a vision knob set for a text checkpoint (no ``vision_config``), or an unsupported
    family (its parameters could not be grouped)."""
    try:
        model_type = pg.model_type_of(model_config)
        fam = pg.family(model_type)
    except pg.ParamGroupError as err:
        raise ConfigError([f"model.path: {err}"]) from None
    vl = pg.is_vision_language(model_config)
    if not vl or not fam.is_vision_language:
        knobs = _set_vision_knobs(cfg)
        if knobs:
            raise ConfigError([f"{k}: the {model_type} checkpoint is a text model (its config.json has no "
                               f"vision_config): only the language model group exists; {unset_hint(k)}"
                               for k in knobs])
    m, t = cfg.model, cfg.training
    lrs = {pg.LLM: t.learning_rate}
    frozen = {pg.LLM} if m.freeze_llm else set()
    required: list[str] = []
    if fam.is_vision_language:
        lrs[pg.VIT] = t.vit_lr if t.vit_lr is not None else t.learning_rate
        lrs[pg.ALIGNER] = t.aligner_lr if t.aligner_lr is not None else t.learning_rate
        frozen |= {g for g, f in ((pg.VIT, m.freeze_vit), (pg.ALIGNER, m.freeze_aligner)) if f}
        required = [g for g, set_ in ((pg.VIT, m.freeze_vit or t.vit_lr is not None),
                                      (pg.ALIGNER, m.freeze_aligner or t.aligner_lr is not None)) if set_]
    return GroupPlan(model_type, lrs, frozenset(frozen), (pg.LLM, *required))


def apply_freezing(model, plan: GroupPlan) -> dict[str, list[str]]:
    """Set ``requires_grad=False`` on every parameter of the frozen groups (adapter parameters included: a
    frozen group trains nothing). Never turns a parameter on (peft's frozen base weights stay frozen).
    Returns ``{group: [parameter names]}``. Raises ConfigError when a required group matches nothing or no
    parameter is left to train."""
    try:
        parts = pg.partition(model.named_parameters(), plan.model_type, required=plan.required)
    except pg.ParamGroupError as err:
        raise ConfigError([f"model: {err}"]) from None
    for group in plan.frozen:
        for _, param in parts[group]:
            param.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError([f"model.freeze_*: every parameter of the {plan.model_type} model is frozen "
                           f"({', '.join(sorted(plan.frozen))}): nothing would train; unfreeze a group"])
    return {g: [n for n, _ in ps] for g, ps in parts.items()}


def optimizer_param_groups(model, plan: GroupPlan, weight_decay: float,
                           decay_names: Iterable[str]) -> list[dict[str, Any]]:
    """Optimizer param groups: one per (group x decay/no-decay) with a trainable parameter, in the order
    llm, vit, aligner; each ``{"params", "lr", "weight_decay", "name"}``. ``decay_names``: the parameter
    names that get weight decay (the Trainer's ``get_decay_parameter_names(model)``)."""
    decay = set(decay_names)
    parts = pg.partition(model.named_parameters(), plan.model_type)
    out = []
    for group, params in parts.items():
        for suffix, wd, pick in (("decay", weight_decay, True), ("no_decay", 0.0, False)):
            chosen = [p for n, p in params if p.requires_grad and (n in decay) == pick]
            if chosen:
                out.append({"params": chosen, "lr": plan.lrs[group], "weight_decay": wd,
                            "name": f"{group}/{suffix}"})
    return out


def group_table(model, plan: GroupPlan) -> list[str]:
    """One line per group: total / trainable parameters, learning rate, frozen or not (the learner prints
    it at start)."""
    counts = pg.group_counts(model.named_parameters(), plan.model_type)
    lines = []
    for group, (total, trainable) in counts.items():
        state = "frozen" if group in plan.frozen else f"lr {plan.lrs[group]:g}"
        lines.append(f"{group:<8} {total:>14,d} params  {trainable:>14,d} trainable  {state}")
    return lines


def precision_arguments(training, cuda: bool) -> dict[str, Any]:
    """TrainingArguments for ``training.precision`` and ``training.gradient_checkpointing``: ``bf16`` /
    ``fp16`` turn on accelerate's autocast around the model's forward (the master weights keep
    ``model.dtype``; fp16 adds a gradient scaler); checkpointing is the non-reentrant torch.utils.checkpoint
    (works with ``inputs_embeds``, frozen embeddings and peft). Raises ConfigError for fp16 without CUDA."""
    precision = enum_value(training.precision)
    if precision == Precision.fp16.value and not cuda:
        raise ConfigError(["training.precision: fp16 needs a CUDA GPU (CPU autocast has no fp16 gradient "
                           "scaling) and this learner has none: use bf16 (CPU autocast) or fp32"])
    args: dict[str, Any] = {"bf16": precision == Precision.bf16.value,
                            "fp16": precision == Precision.fp16.value}
    if training.gradient_checkpointing and not training.fsdp:  # FSDP checkpoints itself (trainer/fsdp.py)
        args.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    return args


def prepare_model(model, cfg: TrainConfig) -> GroupPlan:
    """At model load (after any adapter is attached): the GroupPlan of ``cfg`` for ``model``, the frozen
    groups frozen, and with activation checkpointing and frozen input embeddings the embeddings' output
    made to require grad (transformers' ``enable_input_require_grads``, so checkpointed layers always see an
    input in the graph). Raises ConfigError (see :func:`plan_groups`, :func:`apply_freezing`)."""
    plan = plan_groups(cfg, model.config)
    apply_freezing(model, plan)
    if cfg.training.gradient_checkpointing:
        embed = model.get_input_embeddings()
        if embed is not None and not any(p.requires_grad for p in embed.parameters()):
            model.enable_input_require_grads()
    return plan
