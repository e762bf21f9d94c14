"""The image size a Qwen-VL family's image processor resizes an image to (its own ``smart_resize`` rule).

Qwen2-VL, Qwen2.5-VL and Qwen3-VL processors resize every image so that each side is a multiple of
``patch_size * merge_size`` (28 px for Qwen2/2.5-VL: 14 px patches, 32 px for Qwen3-VL: 16 px patches, 2x2
merge) and the pixel count lies in ``min_pixels..max_pixels``. The rule is transformers' own function from
the PIL-based Qwen2-VL image processor module (``image_processing_pil_qwen2_vl.smart_resize``; the
torchvision-backed module cannot be imported on the CPU stack), imported when first needed.

Defaults are the processor class defaults (``min_pixels`` 56*56 = 3136, ``max_pixels`` 28*28*1280 =
1003520). A real checkpoint may set other limits in its ``preprocessor_config.json`` (``min_pixels`` /
``max_pixels``, or ``size.shortest_edge`` / ``size.longest_edge``): pass those, or the learner's size check
will stop the run.
"""

from __future__ import annotations

#: family -> resize factor (patch_size * merge_size, pixels).
FAMILY_FACTOR: dict[str, int] = {"qwen2_vl": 28, "qwen2_5_vl": 28, "qwen3_vl": 32}
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280

__all__ = ["DEFAULT_MAX_PIXELS", "DEFAULT_MIN_PIXELS", "FAMILY_FACTOR", "family_resized_size"]


def family_resized_size(family: str, width: int, height: int, *, min_pixels: int = DEFAULT_MIN_PIXELS,
                        max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) in pixels that ``family``'s image processor resizes a ``width`` x ``height`` image to.

    Raises ValueError for an unknown family, non-positive sizes or limits, ``min_pixels > max_pixels``, or an
    aspect ratio over 200 (the processor's own limit)."""
    if family not in FAMILY_FACTOR:
        raise ValueError(f"unknown VL family {family!r} (known: {', '.join(FAMILY_FACTOR)})")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    h, w = smart_resize(int(height), int(width), factor=FAMILY_FACTOR[family], min_pixels=int(min_pixels),
                        max_pixels=int(max_pixels))
    return int(w), int(h)
