"""Position ids of a vision-language batch: Qwen-VL's multimodal rotary positions (mRoPE), computed from the
token ids by the model's own ``get_rope_index``. Needed whenever the model is fed ``inputs_embeds`` (soft
self-context) or several segments share one row (packing), where it cannot derive them itself."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["mrope_position_ids"]


def mrope_position_ids(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       model_inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """``[3, B, T]`` mRoPE position ids for a batch with images (the model's ``get_rope_index``: text tokens
    count up on all three rows, an image's tokens take its (t, h, w) grid); None for a text batch or a model
    without multimodal rotary positions (its forward derives 1-D positions itself)."""
    if hasattr(model, "get_base_model"):  # a peft model: its .model is the wrapped top-level model
        model = model.get_base_model()
    core = getattr(model, "model", None)
    rope_index = getattr(core, "get_rope_index", None)
    if rope_index is None or "image_grid_thw" not in model_inputs:
        return None
    position_ids, _ = rope_index(input_ids, mm_token_type_ids=model_inputs["mm_token_type_ids"],
                                 image_grid_thw=model_inputs["image_grid_thw"], attention_mask=attention_mask)
    return position_ids
