"""The weights a rollout server needs, computed from the learner's model without touching it.

:func:`merged_named_weights` yields ``(base HF name, tensor)``:

* a plain model: its unique parameters (tied weights once, as ``named_parameters()`` lists them);
* a peft model (LoRA / DoRA adapters, ``trainable_token_indices``, ``modules_to_save``): the *base* model's
  names, every active adapter folded in, one module at a time, never written back:

  - LoRA ``Linear``: ``W + delta`` with peft's own ``lora.Linear.get_delta_weight`` (``B @ A * scaling``,
    transposed for ``fan_in_fan_out``), evaluated on the gathered tensors;
  - DoRA: peft's merge rule (``peft.tuners.lora.variants.DoraLinearVariant.merge_safe``): the column norm
    ``||W + delta||`` from peft's ``DoraLinearLayer.get_weight_norm`` (scaling 1: the delta is already
    scaled), then ``(magnitude / norm) * (W + delta)``;
  - trainable token rows (``TrainableTokensWrapper``; a tied head shares the rows): the base matrix with the
    trained rows copied in (peft's ``TrainableTokensLayer.get_merged_weights``), under the wrapped module's
    name (``model.embed_tokens.weight``; a head with its own rows: ``lm_head.weight``);
  - ``modules_to_save``: the trained copy's parameters under the original module's name;
  - adapter tensors themselves (``lora_A``, ``lora_B``, magnitudes, token deltas) are never yielded.

``gather`` (default: identity) is applied to every parameter tensor before it is used, always in the same
order (a depth-first walk of the modules), so collective gathers match on every rank: FSDP2 passes
``lambda t: t.full_tensor()``. ``dtype`` (a torch dtype or its name) is the one cast of a sync, applied to
each floating-point result. Nothing is computed with autograd, and no module state (weights, merged flags,
DoRA caches) changes: the trained copy stays bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import torch

__all__ = ["is_peft_model", "merged_named_weights"]

Gather = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _peft():
    """peft's layer types (imported on first use: a plain model never needs peft)."""
    from peft import PeftModel
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

    return SimpleNamespace(PeftModel=PeftModel, LoraLayer=LoraLayer, LoraLinear=LoraLinear,
                           BaseTunerLayer=BaseTunerLayer, ModulesToSaveWrapper=ModulesToSaveWrapper,
                           TrainableTokensWrapper=TrainableTokensWrapper)


def is_peft_model(model) -> bool:
    """True for a ``peft.PeftModel`` or a module tree with peft layers injected."""
    modules = getattr(model, "modules", None)
    if modules is None:
        return False
    try:
        p = _peft()
    except ImportError:  # no peft installed: no peft model either
        return False
    if isinstance(model, p.PeftModel):
        return True
    return any(isinstance(m, (p.BaseTunerLayer, p.ModulesToSaveWrapper, p.TrainableTokensWrapper))
               for m in modules())


def _target_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, str(dtype))


def _cast(t: torch.Tensor, target: torch.dtype | None) -> torch.Tensor:
    t = t.detach()
    if target is not None and t.is_floating_point() and t.dtype != target:
        t = t.to(target)
    return t


def merged_named_weights(model, dtype=None, gather: Gather | None = None) -> Iterator[tuple[str, Any]]:
    """``(base HF name, tensor)`` of every weight the server loads, adapters folded in (see the module doc).

    ``model``: a ``transformers`` model or a ``peft.PeftModel`` around one (unwrapped from DDP). ``dtype``:
    cast floating-point results to it (torch dtype or name, e.g. ``"bfloat16"``; None keeps each tensor's
    dtype). ``gather``: applied to every parameter tensor before use (default identity; FSDP2: full_tensor).
    Shapes are the base model's (``[out, in]`` for linear weights, ``[vocab, hidden]`` for embeddings).
    Raises ``NotImplementedError`` for a peft layer type other than LoRA/DoRA ``Linear``, trainable tokens or
    ``modules_to_save`` (e.g. LoRA on an embedding), rather than sending unmerged weights.
    """
    target = _target_dtype(dtype)
    gather = gather or _identity
    if not is_peft_model(model):
        for name, p in model.named_parameters():  # named_parameters() skips tied duplicates
            with torch.no_grad():
                t = _cast(gather(p.detach()), target)
            yield name, t
        return
    p = _peft()
    root = model.get_base_model() if isinstance(model, p.PeftModel) else model
    seen: set[int] = set()
    for name, t in _walk(root, "", gather, p, seen):
        yield name, _cast(t, target)


def _fresh(param, seen: set[int]) -> bool:
    """First time this parameter object is met (tied weights are yielded once, like named_parameters)."""
    if id(param) in seen:
        return False
    seen.add(id(param))
    return True


def _walk(module, prefix: str, gather: Gather, p, seen: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """Depth-first, own parameters before children (the order of ``named_parameters``)."""
    if isinstance(module, p.TrainableTokensWrapper):
        yield from _trainable_tokens(module, prefix, gather, seen)
        return
    if isinstance(module, p.ModulesToSaveWrapper):
        active = [] if module.disable_adapters else module.active_adapters
        inner = module.modules_to_save[active[0]] if active else module.original_module
        yield from _walk(inner, prefix, gather, p, seen)
        return
    if isinstance(module, p.LoraLayer):
        yield from _lora(module, prefix, gather, p, seen)
        return
    if isinstance(module, p.BaseTunerLayer):
        raise NotImplementedError(f"merged weights: {prefix.rstrip('.')} is a {type(module).__name__}; only "
                                  f"LoRA/DoRA Linear layers, trainable tokens and modules_to_save are merged")
    for name, param in module.named_parameters(recurse=False):
        if _fresh(param, seen):
            with torch.no_grad():
                t = gather(param.detach())
            yield prefix + name, t
    for name, child in module.named_children():
        yield from _walk(child, f"{prefix}{name}.", gather, p, seen)


def _active(module) -> list[str]:
    return [] if module.disable_adapters else list(module.active_adapters)


def _lora(module, prefix: str, gather: Gather, p, seen: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """The base layer's weight with the active LoRA/DoRA adapters folded in, in peft's merge order."""
    own_delta = type(module).get_delta_weight is p.LoraLinear.get_delta_weight  # not a quantized subclass
    if not isinstance(module, p.LoraLinear) or not own_delta:
        raise NotImplementedError(f"merged weights: {prefix.rstrip('.')} is a {type(module).__name__}; only "
                                  f"LoRA/DoRA on nn.Linear is merged (model.adapter.target_modules)")
    base = module.get_base_layer()
    weight, bias = base.weight, getattr(base, "bias", None)
    adapters = [a for a in _active(module) if a in module.lora_A and a not in module.merged_adapters]
    if _fresh(weight, seen):
        with torch.no_grad():
            w = gather(weight.detach())
            for a in adapters:
                w = _merge_one(module, a, w, gather)
        yield prefix + "weight", w
    if bias is not None and _fresh(bias, seen):
        with torch.no_grad():
            b = gather(bias.detach())
            for a in adapters:
                if module.lora_bias.get(a, False):  # peft's merge: bias + B.bias * scaling
                    b = b + gather(module.lora_B[a].bias.detach()) * module.scaling[a]
        yield prefix + "bias", b


def _merge_one(module, adapter: str, w: torch.Tensor, gather: Gather) -> torch.Tensor:
    """``w`` with one adapter merged: peft's ``get_delta_weight`` on gathered tensors; DoRA as peft merges."""
    from peft.utils.other import transpose

    a_w = gather(module.lora_A[adapter].weight.detach())
    b_w = gather(module.lora_B[adapter].weight.detach())
    view = SimpleNamespace(lora_A={adapter: SimpleNamespace(weight=a_w)},
                           lora_B={adapter: SimpleNamespace(weight=b_w)},
                           fan_in_fan_out=module.fan_in_fan_out, scaling=module.scaling)
    delta = type(module).get_delta_weight(view, adapter)  # peft's own rule, on the gathered tensors
    dora = module.lora_magnitude_vector
    if adapter not in dora:  # vanilla LoRA: peft adds in place (W.data += delta: computed, then cast to W's)
        return (w + delta).to(w.dtype)
    layer = dora[adapter]
    magnitude = gather(layer.weight.detach())
    # peft's get_weight_norm without its cache decorator (which clears/stores the layer's ad hoc cache)
    norm_fn = type(layer).get_weight_norm.__wrapped__
    norm = norm_fn(layer, w, transpose(delta, module.fan_in_fan_out), scaling=1)
    factor = transpose((magnitude / norm).view(-1, 1), module.fan_in_fan_out)
    return (factor * (w + delta)).to(w.dtype)


def _trainable_tokens(wrapper, prefix: str, gather: Gather, seen: set[int]
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """The wrapped embedding/head matrix with the trained token rows copied in (peft's
    ``get_merged_weights``: ``index_copy`` of the rows, in adapter order). A head tied to the embedding shares
    the embedding's matrix and rows: it is yielded once, under the embedding's name."""
    layer = wrapper.token_adapter
    base = layer.base_layer
    weight = base.weight
    if _fresh(weight, seen):
        with torch.no_grad():
            w = gather(weight.detach())
            for a in ([] if wrapper.disable_adapters else layer.active_adapters):
                if a not in layer.trainable_tokens_delta or a in layer.merged_adapters:
                    continue
                index = torch.tensor(layer.token_indices[a], device=w.device)
                rows = gather(layer.trainable_tokens_delta[a].detach()).to(w)
                w = w.index_copy(0, index, rows)
        yield prefix + "weight", w
    for name, param in base.named_parameters(recurse=False):  # e.g. a head's bias
        if name != "weight" and _fresh(param, seen):
            with torch.no_grad():
                t = gather(param.detach())
            yield prefix + name, t
