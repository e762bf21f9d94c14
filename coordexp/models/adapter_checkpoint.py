"""Adapter checkpoints: folders that hold a peft adapter (``adapter_config.json`` +
``adapter_model.safetensors``, written by the Trainer for a learner with ``model.adapter.kind: lora|dora``)
and the tokenizer/processor, but not the base weights.

The base is the folder named by ``adapter_config.json``'s ``base_model_name_or_path`` (peft records the
folder the learner loaded: the checkpoint with the coordinate vocabulary). :func:`merge_adapter` loads the
adapter onto a base model and folds it in with peft's ``merge_and_unload`` (LoRA: ``W + B A * alpha/r``;
DoRA: ``magnitude * (W + BA s) / ||W + BA s||``; the trained coordinate-token rows copied into the embedding
and head), so what evaluates or exports is a plain transformers model with the base's names: the same
weights the learner's weight sync sends to a rollout server.

Errors: :class:`AdapterCheckpointError` (exit 2) naming the folder and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

from coordexp.errors import CoordexpError

__all__ = ["ADAPTER_CONFIG", "AdapterCheckpointError", "adapter_base", "is_adapter_checkpoint",
           "merge_adapter"]

ADAPTER_CONFIG = "adapter_config.json"


class AdapterCheckpointError(CoordexpError):
    """An adapter checkpoint whose base cannot be found or whose adapter does not load."""


def is_adapter_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds a peft adapter (``adapter_config.json``) rather than full weights."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> Path:
    """The base checkpoint folder of the adapter checkpoint ``path`` (``base_model_name_or_path``, relative
    paths resolved against ``path``). Raises AdapterCheckpointError when it is unreadable or missing."""
    path = Path(path)
    try:
        data = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise AdapterCheckpointError(f"{path / ADAPTER_CONFIG}: not a readable adapter config ({err})") \
            from None
    base = data.get("base_model_name_or_path") if isinstance(data, dict) else None
    if not base:
        raise AdapterCheckpointError(f"{path / ADAPTER_CONFIG} names no base_model_name_or_path: set it to "
                                     f"the checkpoint folder the adapter was trained on")
    base_dir = Path(base) if Path(base).is_absolute() else (path / base)
    if not (base_dir / "config.json").is_file():
        raise AdapterCheckpointError(
            f"{path} is an adapter checkpoint (LoRA/DoRA) on the base model {base}, which is not a "
            f"checkpoint folder here (no config.json): make the base available at that path, or edit "
            f"base_model_name_or_path in {path / ADAPTER_CONFIG}")
    return base_dir.resolve()


def merge_adapter(base_model, path: str | Path):
    """``base_model`` (loaded from :func:`adapter_base`) with the adapter of ``path`` folded in (peft's
    ``PeftModel.from_pretrained`` then ``merge_and_unload``): a plain transformers model, in eval mode.
    Raises AdapterCheckpointError when peft cannot load the adapter onto this base."""
    from peft import PeftModel  # peft only for adapter checkpoints

    try:
        peft_model = PeftModel.from_pretrained(base_model, str(path), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise AdapterCheckpointError(f"{path}: the adapter does not load onto its base ({err})") from None
    return peft_model.merge_and_unload().eval()
