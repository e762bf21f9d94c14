"""Parameter-efficient adapters for the learner (``model.adapter``), built with peft.

``kind: lora`` / ``dora`` wraps the loaded model with ``peft.get_peft_model`` and a ``LoraConfig``
(``use_dora`` for DoRA, Liu et al. 2024, arXiv:2402.09353; peft's implementation):

* **where:** ``nn.Linear`` modules of the *language model* whose names end with one of
  ``model.adapter.target_modules`` (``q_proj`` or a dotted suffix such as ``self_attn.q_proj``). The vision
  tower and aligner of a vision-language checkpoint are excluded by the family's group table
  (:mod:`coordexp.models.param_groups`; Qwen2.5-VL's vision blocks also have ``gate_proj``/``up_proj``/
  ``down_proj``): peft gets a regular expression that matches exactly those modules, and the wrapped set is
  checked against it.
* **how much:** ``r``, ``alpha`` (peft's ``lora_alpha``: scale ``alpha / r``), ``dropout``.
* **coordinate tokens:** ``<|coord_0|>`` .. ``<|coord_999|>`` are new tokens, so their embedding rows and
  head rows must train even though every base weight is frozen. peft's ``trainable_token_indices`` trains
  exactly those rows (a ``TrainableTokensWrapper`` around the input embedding; the head shares the rows when
  it is tied to the embedding, an untied head gets its own trainable rows); nothing else of the 150k-row
  matrices trains or is saved.
* ``modules_to_save``: modules trained in full next to the adapters (peft copies them; saved with the
  adapter). The embedding and the head are refused there (their coordinate rows already train; full
  embedding training under an adapter is ``kind: none``).
* **vision tower and aligner** of a vision-language model: the adapter is the language model's; a group
  that is not frozen (``model.freeze_vit`` / ``freeze_aligner`` false) trains in full next to it, through
  ``modules_to_save`` (at ``training.vit_lr`` / ``aligner_lr``). A light DoRA run on a VL checkpoint
  therefore sets ``freeze_vit: true`` (and usually trains the small aligner).

Checkpoints then hold the adapter (``adapter_model.safetensors`` + ``adapter_config.json``, peft's
``save_pretrained``, which the Trainer calls for a peft model) and the tokenizer/processor; the rollout server
gets the merged weights (:mod:`coordexp.trainer.merged_weights`); ``coordexp.eval`` and
``coordexp.models.export`` load base + adapter (:mod:`coordexp.models.adapter_checkpoint`).

Errors: :class:`~coordexp.config.errors.ConfigError` (exit 2) for a target that matches no linear layer of
the language model, a target that is not linear, a ``modules_to_save`` entry that matches nothing or names the
embedding/head, or an unsupported family.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from coordexp.config.errors import ConfigError
from coordexp.config.schema import AdapterConfig, enum_value
from coordexp.models import param_groups as pg

__all__ = ["ADAPTER_KINDS", "adapter_targets", "attach_adapter", "coordinate_rows_module_names",
           "full_group_modules", "target_regex", "unfrozen_vision_groups"]

ADAPTER_KINDS = ("lora", "dora")


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list entry: the module name equals the entry or ends with ``.<entry>``."""
    return name == target or name.endswith("." + target)


def adapter_targets(model, adapter: AdapterConfig, model_type: str) -> list[str]:
    """Full names of the language model's ``nn.Linear`` modules that ``adapter.target_modules`` selects, in
    module order. Raises ConfigError naming every target that selects nothing (with the linear layer names
    the language model has) or that selects a layer that is not ``nn.Linear``."""
    try:
        fam = pg.family(model_type)
    except pg.ParamGroupError as err:
        raise ConfigError([f"model.adapter: {err}"]) from None
    head = model.get_output_embeddings()
    llm = [(n, m) for n, m in model.named_modules()
           if n and m is not head and fam.group_of(n + ".weight") == pg.LLM]  # the head: token rows
    linear = [n for n, m in llm if isinstance(m, torch.nn.Linear)]
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    problems, chosen = [], set()
    for target in adapter.target_modules:
        hits = [n for n, m in llm if _matches(n, target)]
        not_linear = sorted({type(m).__name__ for n, m in llm if _matches(n, target)
                             and not isinstance(m, torch.nn.Linear)})
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
            where = "language model" if fam.is_vision_language else "model"
            what = (f"names the output head ({head_name}), which adapters never target (its coordinate "
                    f"rows train as token rows)" if head_name and _matches(head_name, target) else
                    f"matches no module of the {where} of this {model_type} checkpoint (the output head is "
                    f"not a target either: its coordinate rows train as token rows)")
            problems.append(f"model.adapter.target_modules: '{target}' {what}; the linear layers are named "
                            f"{', '.join(leaves)}")
        elif not_linear:
            problems.append(f"model.adapter.target_modules: '{target}' selects {', '.join(not_linear)} "
                            f"module(s); adapters go on nn.Linear layers only (the coordinate rows of the "
                            f"embedding and head train through trainable token rows)")
        else:
            chosen.update(hits)
    if problems:
        raise ConfigError(problems)
    return [n for n in linear if n in chosen]


def target_regex(targets: Sequence[str], model_type: str) -> str:
    """The regular expression (peft ``target_modules`` as a string: ``re.fullmatch`` on module names) that
    selects modules ending with one of ``targets`` outside the family's vision tower and aligner."""
    fam = pg.family(model_type)
    outside = "".join(f"(?!{re.escape(prefix)})" for prefix in (*fam.vit, *fam.aligner))
    ends = "|".join(re.escape(t) for t in targets)
    return rf"{outside}(?:.*\.)?(?:{ends})"


def coordinate_rows_module_names(model) -> dict[str, str]:
    """``{"embedding": name, "head": name or ""}``: module names of the input embedding and of an untied
    output head ("" when the head is tied to the embedding: peft ties its rows to the embedding's)."""
    names = {id(m): n for n, m in model.named_modules()}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is None or head.weight is embed.weight
    return {"embedding": names[id(embed)], "head": "" if tied else names[id(head)]}


def _check_modules_to_save(model, adapter: AdapterConfig, rows: dict[str, str]) -> None:
    problems = []
    names = [n for n, _ in model.named_modules() if n]
    for entry in adapter.modules_to_save:
        hits = [n for n in names if n.endswith(entry)]  # peft's rule for modules_to_save
        if not hits:
            problems.append(f"model.adapter.modules_to_save: '{entry}' matches no module of the model")
        elif any(h in (rows["embedding"], rows["head"], "lm_head") for h in hits):
            problems.append(f"model.adapter.modules_to_save: '{entry}' selects the embedding or the head; "
                            f"their coordinate-token rows already train (trainable token rows), and training "
                            f"the whole matrix next to an adapter is not supported: remove it, or use "
                            f"model.adapter.kind=none for a full fine-tune")
    if problems:
        raise ConfigError(problems)


def unfrozen_vision_groups(model_cfg) -> list[str]:
    """The vision-language groups ``model.freeze_vit`` / ``freeze_aligner`` leave trainable (a text model has
    no parameter in them: :func:`full_group_modules` then names nothing)."""
    return [g for g, frozen in ((pg.VIT, model_cfg.freeze_vit), (pg.ALIGNER, model_cfg.freeze_aligner))
            if not frozen]


def full_group_modules(model, model_type: str, groups: Sequence[str]) -> list[str]:
    """Names of the largest modules whose every parameter is in one of ``groups`` (``vit``, ``aligner``),
    for peft's ``modules_to_save`` (which refuses ``ModuleList``/``ModuleDict``: their elements are named
    instead, e.g. ``model.visual.blocks.0``). Raises RuntimeError when a parameter of ``groups`` sits
    directly on a module shared with another group (it could not train)."""
    fam = pg.family(model_type)
    wanted, names, stranded = set(groups), [], []
    if not wanted:
        return names

    def visit(prefix: str, module) -> None:
        kinds = {fam.group_of(prefix + n) for n, _ in module.named_parameters()}
        if not kinds & wanted:
            return
        container = isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict))
        if prefix and kinds <= wanted and len(kinds) == 1 and not container:
            names.append(prefix[:-1])
            return
        stranded.extend(prefix + n for n, _ in module.named_parameters(recurse=False)
                        if fam.group_of(prefix + n) in wanted)
        for n, child in module.named_children():
            visit(f"{prefix}{n}.", child)

    visit("", model)
    if stranded:
        raise RuntimeError(f"parameters {stranded} of group(s) {sorted(wanted)} sit on a module shared with "
                           f"another group: modules_to_save cannot train them alone")
    return names


def attach_adapter(model, adapter: AdapterConfig, coord_token_ids: Sequence[int],
                   full_groups: Sequence[str] = ()):
    """``model`` wrapped in a ``peft.PeftModel`` per ``adapter`` (``kind: none``: ``model`` itself).

    ``coord_token_ids``: vocabulary ids of ``<|coord_0|>``..``<|coord_999|>``
    (:class:`coordexp.rollout.scoring.TokenizerAdapter`), trained through peft's
    ``trainable_token_indices`` on the embedding (and on an untied head). ``full_groups``: the
    vision-language groups (``vit``, ``aligner``) that are not frozen: their modules train in full next to
    the adapter (peft ``modules_to_save``, at ``training.vit_lr`` / ``aligner_lr``), as
    :func:`full_group_modules` names them. After wrapping, the only trainable parameters are the adapter
    weights (``lora_A``/``lora_B``, DoRA magnitudes), the coordinate rows and the ``modules_to_save`` copies.
    Raises ConfigError (see the module doc)."""
    kind = enum_value(adapter.kind)
    if kind not in ADAPTER_KINDS:
        return model
    from peft import LoraConfig, get_peft_model  # the learner's stack; kept off config-only imports

    model_type = pg.model_type_of(model.config)
    targets = adapter_targets(model, adapter, model_type)
    modules = dict(model.named_modules())
    full_rank = max(min(modules[n].in_features, modules[n].out_features) for n in targets)
    if adapter.r > full_rank:
        raise ConfigError([f"model.adapter.r: {adapter.r} exceeds the rank of every target layer (the widest "
                           f"is {full_rank}): an update of that rank costs more than the layer itself; use "
                           f"r <= {full_rank} (LoRA ranks are usually 8-64)"])
    rows = coordinate_rows_module_names(model)
    _check_modules_to_save(model, adapter, rows)
    ids = sorted({int(i) for i in coord_token_ids})
    tokens = {rows["embedding"]: ids, **({rows["head"]: ids} if rows["head"] else {})}
    regex = target_regex(adapter.target_modules, model_type)
    full = [n for n in full_group_modules(model, model_type, full_groups) if n not in adapter.modules_to_save]
    config = LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                        use_dora=kind == "dora", target_modules=regex, trainable_token_indices=tokens,
                        modules_to_save=[*adapter.modules_to_save, *full] or None, bias="none",
                        task_type="CAUSAL_LM")
    try:
        wrapped = get_peft_model(model, config)
    except (ValueError, TypeError) as err:  # peft's own refusal (e.g. a module type it cannot wrap)
        raise ConfigError([f"model.adapter: peft refused the adapter: {err}"]) from None
    _check_wrapped(wrapped, targets, rows)
    return wrapped


def _check_wrapped(wrapped, targets: list[str], rows: dict[str, str]) -> None:
    """The modules peft wrapped are exactly the validated targets, and the coordinate rows train on the
    embedding and (tied or not) on the head. An internal-consistency check: failing it is a bug."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import TrainableTokensWrapper

    base = wrapped.get_base_model()
    got = [n for n, m in base.named_modules() if isinstance(m, LoraLayer)]
    if got != targets:
        raise RuntimeError(f"peft wrapped {got}, expected {targets}")
    if not isinstance(base.get_input_embeddings(), TrainableTokensWrapper):
        raise RuntimeError(f"the coordinate rows of {rows['embedding']} are not trainable (peft did not "
                           f"wrap it)")
    head = base.get_output_embeddings()
    if head is not None and not isinstance(head, TrainableTokensWrapper):
        raise RuntimeError("the head's coordinate rows are not trainable (peft did not wrap the head)")


def resume_adapter_problem(checkpoint, adapter: AdapterConfig) -> str | None:
    """Why ``checkpoint`` (a folder the run resumes from) cannot continue under ``adapter``, or None: an
    adapter checkpoint (peft's ``adapter_config.json``) resumes only with the same adapter kind, rank and
    alpha; a full checkpoint only without an adapter. Read from the files (nothing loaded)."""
    config = Path(checkpoint) / "adapter_config.json"
    kind = enum_value(adapter.kind)
    if not config.is_file():
        return None if kind == "none" else (
            f"{checkpoint} holds full weights (no adapter) but model.adapter.kind is {kind}: resume it with "
            f"model.adapter.kind=none, or start the adapter run from it (model.path=<its folder>)")
    saved = json.loads(config.read_text())
    was, r, alpha = "dora" if saved.get("use_dora") else "lora", saved.get("r"), saved.get("lora_alpha")
    fix = f"model.adapter.kind={was} model.adapter.r={r} model.adapter.alpha={alpha}"
    if kind == "none":
        return (f"{checkpoint} holds a {was} adapter (r {r}) but model.adapter.kind is none: resume with the "
                f"run's adapter settings ({fix})")
    if (was, r, alpha) != (kind, adapter.r, adapter.alpha):
        return (f"{checkpoint} holds a {was} adapter with r {r}, alpha {alpha}; the config asks for {kind} "
                f"with r {adapter.r}, alpha {adapter.alpha}: resume with {fix}")
    return None
