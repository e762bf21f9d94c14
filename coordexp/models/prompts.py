"""Prompt encoding: a sample's chat messages -> the prompt token ids the learner trains on and the rollout
backend continues, plus the vision inputs of a vision-language model.

Text models: the tokenizer's chat template, tokenized without extra special tokens.

Vision-language models (Qwen2-VL / Qwen2.5-VL / Qwen3-VL family): the chat template renders each image part
as one image placeholder token (``<|image_pad|>``); the model's image processor turns the images into
``pixel_values`` and ``image_grid_thw``; each placeholder is expanded to the image's merged patch count
``t * h * w / merge_size**2`` -- what the family's ``*Processor`` does. The processor class itself is not
used because on the CPU stack (no torchvision) it cannot be built: its video processor needs torchvision.

The image processor's resize must leave every image at the record's ``width`` x ``height`` (the size the
norm1000 boxes refer to); :meth:`VisionPromptEncoder.check` fails before training when it would not.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from coordexp.checkpoint import is_vision_language
from coordexp.errors import CoordexpError
from coordexp.models.adapter_checkpoint import adapter_base, is_adapter_checkpoint, merge_adapter


class PromptError(CoordexpError, ValueError):
    """A sample cannot be encoded for this model (the message names the sample, the cause and the fix)."""


@dataclass
class EncodedPrompt:
    ids: list[int]
    vision: dict[str, torch.Tensor] | None = None  # pixel_values [patches, dim], image_grid_thw [images, 3]


class TextPromptEncoder:
    image_token_id: int | None = None  # set by the vision-language encoder
    image_processor: Any = None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def render(self, messages: Sequence[dict[str, Any]]) -> str:
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)

    def check(self, samples: Sequence[Any]) -> None:
        """Fail before training on samples this model cannot encode: for a text model, any with images."""
        for sample in samples:
            if sample.images:
                raise PromptError(f"sample {sample.source} has images but the model is text-only: use a "
                                  f"vision-language checkpoint (docs/vlm.md) or data without images")

    def image_tokens(self, sample) -> int:
        """Tokens the sample's images add to the rendered prompt (0 for a text model)."""
        return 0

    def encode(self, sample) -> EncodedPrompt:
        self.check([sample])
        text = self.render(sample.messages)
        return EncodedPrompt(list(self.tokenizer(text, add_special_tokens=False)["input_ids"]))


class VisionPromptEncoder(TextPromptEncoder):
    def __init__(self, tokenizer, image_processor, image_token_id: int):
        super().__init__(tokenizer)
        self.image_processor = image_processor
        self.image_token_id = int(image_token_id)
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.merge_size = int(image_processor.merge_size)
        self.patch_size = int(image_processor.patch_size)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the image processor resizes a ``width`` x ``height`` image to."""
        ip = self.image_processor
        smart_resize = sys.modules[type(ip).__module__].smart_resize  # the processor's own resize rule
        h, w = smart_resize(height, width, factor=self.patch_size * self.merge_size,
                            min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"])
        return w, h

    def image_tokens(self, sample) -> int:
        """Placeholder tokens of the sample's images, from the record's (post-resize) size (no image read)."""
        w, h = self.resized_size(sample.width, sample.height)
        return len(sample.images) * (w // self.patch_size) * (h // self.patch_size) // self.merge_size ** 2

    def check(self, samples: Sequence[Any], limit: int = 5) -> None:
        """Every image must come out of the processor's resize at the record's width x height."""
        problems = []
        for sample in samples:
            for path in sample.images:
                with Image.open(path) as im:  # reads the header only
                    on_disk = im.size
                resized = self.resized_size(*on_disk)
                if resized != (sample.width, sample.height):
                    problems.append(f"{sample.source}: {path.name} is {on_disk[0]}x{on_disk[1]}, the image "
                                    f"processor resizes it to {resized[0]}x{resized[1]}, but the record says "
                                    f"width={sample.width}, height={sample.height}")
        if problems:
            shown = "\n  ".join(problems[:limit]) + (f"\n  ... {len(problems) - limit} more"
                                                     if len(problems) > limit else "")
            raise PromptError(
                f"{len(problems)} image(s) do not match their record's width/height after the processor's "
                f"resize (boxes are norm1000 of that size):\n  {shown}\nFix: write the post-resize size into "
                f"width/height, or pre-resize the images to multiples of {self.patch_size * self.merge_size} "
                f"px within the processor's pixel limits (docs/vlm.md)")

    def encode(self, sample) -> EncodedPrompt:
        if not sample.images:
            return super().encode(sample)
        pieces = self.render(sample.messages).split(self.image_token)
        if len(pieces) - 1 != len(sample.images):
            raise PromptError(f"sample {sample.source}: the chat template rendered {len(pieces) - 1} image "
                              f"placeholder(s) for {len(sample.images)} image(s); the model's chat template "
                              f"must render one {self.image_token} per image part")
        images = []
        for path in sample.images:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        vision = dict(self.image_processor(images=images, return_tensors="pt"))
        counts = (vision["image_grid_thw"].prod(dim=-1) // self.merge_size ** 2).tolist()
        expanded = pieces[0] + "".join(self.image_token * int(n) + piece
                                       for n, piece in zip(counts, pieces[1:]))
        ids = list(self.tokenizer(expanded, add_special_tokens=False)["input_ids"])
        return EncodedPrompt(ids, {"pixel_values": vision["pixel_values"],
                                   "image_grid_thw": vision["image_grid_thw"]})


def concat_vision(visions: Sequence[dict[str, torch.Tensor] | None], image_token_id: int | None,
                  input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model kwargs for a batch whose rows carry ``visions`` (in row order); {} for a text-only batch."""
    present = [v for v in visions if v is not None]
    if not present:
        return {}
    return {"pixel_values": torch.cat([v["pixel_values"] for v in present]),
            "image_grid_thw": torch.cat([v["image_grid_thw"] for v in present]),
            "mm_token_type_ids": (input_ids == image_token_id).long()}


def load_model_and_prompts(model_dir: Path, dtype: str):
    """(model, tokenizer, prompt encoder) of a local checkpoint; a vision-language model when its config has
    a vision tower. An adapter checkpoint (``adapter_config.json``: a LoRA/DoRA learner's) loads its base
    model with the adapter merged in (:mod:`coordexp.models.adapter_checkpoint`), and its own tokenizer and
    image processor. Raises AdapterCheckpointError for an adapter whose base is missing."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch_dtype = getattr(torch, dtype)
    adapter = is_adapter_checkpoint(model_dir)
    weights_dir = adapter_base(model_dir) if adapter else model_dir

    def weights(model):
        return merge_adapter(model, model_dir) if adapter else model

    if not is_vision_language(weights_dir):
        return weights(AutoModelForCausalLM.from_pretrained(weights_dir, dtype=torch_dtype)), tokenizer, \
            TextPromptEncoder(tokenizer)
    model = weights(AutoModelForImageTextToText.from_pretrained(weights_dir, dtype=torch_dtype))
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    image_token_id = getattr(model.config, "image_token_id", None)
    if image_token_id is None:
        raise PromptError(f"{model_dir}: config.json has no image_token_id; not a Qwen-VL family checkpoint")
    return model, tokenizer, VisionPromptEncoder(tokenizer, image_processor, image_token_id)
