"""Chat prompt construction: the one place that turns a sample into prompt messages.

Training (Channel A/B targets) and rollout (HF ``generate`` or the vLLM server) both call
:func:`build_messages`, so the prompt token ids are the same on both sides by construction. The
result is a list of OpenAI-style chat messages ending with the user turn; the caller renders it with
the tokenizer's chat template and ``add_generation_prompt=True`` (the tiny model's template is ChatML
and matches ms-swift's ``chatml`` template byte for byte, which adds no default system turn).

User-turn layout::

    <instruction for the field order>
    Objects:                                   # scene="text" only
    red square <|coord_0|> <|coord_111|> <|coord_333|> <|coord_444|>
    blue star <|coord_222|> <|coord_222|> <|coord_555|> <|coord_999|>

``scene="text"`` is the synthetic text-only task: the objects themselves, in answer order, are the
observation (for ``geometry_first`` each line is coordinates first, then desc). ``scene="images"`` is
the real VLM case: the user turn holds the images followed by the instruction, never the objects.
``scene="auto"`` picks ``images`` when the sample has images, else ``text``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from coordexp.coordjson import FieldOrder, bin_to_token

__all__ = [
    "FIELD_ORDERS",
    "SCENES",
    "PromptSpec",
    "build_messages",
    "instruction_text",
    "scene_text",
]

FIELD_ORDERS = ("desc_first", "geometry_first")
SCENES = ("auto", "text", "images")

_INSTRUCTIONS = {
    "desc_first": 'List all objects as CoordJSON, each {"desc", "bbox_2d"}, top to bottom, '
                  'then left to right.',
    "geometry_first": 'List all objects as CoordJSON, each {"bbox_2d", "desc"}, top to bottom, '
                      'then left to right.',
}


@dataclass(frozen=True)
class PromptSpec:
    object_field_order: str = "desc_first"
    system_prompt: str | None = None
    scene: str = "auto"

    def __post_init__(self) -> None:
        order = self.object_field_order  # a FieldOrder (a str enum) or its plain value
        if order not in FIELD_ORDERS:
            raise ValueError(f"object_field_order must be one of {FIELD_ORDERS}, got {order!r}")
        object.__setattr__(self, "object_field_order", FieldOrder(self.object_field_order).value)
        if self.scene not in SCENES:
            raise ValueError(f"scene must be one of {SCENES}, got {self.scene!r}")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError("system_prompt must be a string or None, "
                             f"got {type(self.system_prompt).__name__}")


def instruction_text(object_field_order: str = "desc_first") -> str:
    """The task instruction for the given object field order."""
    try:
        return _INSTRUCTIONS[object_field_order]
    except KeyError:
        raise ValueError(f"object_field_order must be one of {FIELD_ORDERS}, "
                         f"got {object_field_order!r}") from None


def _obj_parts(obj: Any) -> tuple[str, Sequence[int]]:
    if isinstance(obj, Mapping):
        return obj["desc"], obj["bbox_2d"]
    return obj.desc, obj.bbox_2d


def scene_text(objects: Iterable[Any], object_field_order: str = "desc_first") -> str:
    """The text observation of the synthetic task: one line per object, in the given order.

    ``objects`` are mappings ``{"desc", "bbox_2d"}`` or objects with ``.desc`` / ``.bbox_2d``;
    ``bbox_2d`` holds norm1000 ints.
    """
    lines = ["Objects:"]
    for obj in objects:
        desc, box = _obj_parts(obj)
        coords = " ".join(bin_to_token(int(v)) for v in box)
        lines.append(f"{desc} {coords}" if object_field_order == "desc_first" else f"{coords} {desc}")
    return "\n".join(lines)


def build_messages(sample: Any, spec: PromptSpec | None = None) -> list[dict[str, Any]]:
    """Prompt messages (system turn if configured, then the user turn) for one sample.

    ``sample`` is a :class:`coordexp.data.jsonl.DetectionSample`, or a raw record mapping with
    ``objects`` and optional ``images``. Text-only scenes give string contents; image scenes give a
    content list ``[{"type": "image", "image": path}, ..., {"type": "text", "text": ...}]``.
    """
    spec = spec or PromptSpec()
    if isinstance(sample, Mapping):
        images = list(sample.get("images") or [])
        objects = sample["objects"]
    else:
        images = list(getattr(sample, "images", ()) or ())
        objects = sample.objects
    scene = spec.scene
    if scene == "auto":
        scene = "images" if images else "text"
    if scene == "images" and not images:
        raise ValueError("scene='images' but the sample has no images")

    instruction = instruction_text(spec.object_field_order)
    messages: list[dict[str, Any]] = []
    if spec.system_prompt:
        messages.append({"role": "system", "content": spec.system_prompt})
    if scene == "text":
        messages.append({"role": "user",
                         "content": instruction + "\n" + scene_text(objects, spec.object_field_order)})
    else:
        content: list[dict[str, Any]] = [{"type": "image", "image": str(p)} for p in images]
        content.append({"type": "text", "text": instruction})
        messages.append({"role": "user", "content": content})
    return messages
