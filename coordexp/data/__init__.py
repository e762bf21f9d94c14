"""Data layer: JSONL dataset, prompt construction, synthetic task generator, tiny local model factory.

Importing this package does not import torch, transformers or vLLM (the model factory imports them
when it builds).
"""

from coordexp.data.jsonl import (
    DataValidationError,
    DetectionObject,
    DetectionSample,
    JsonlDetectionDataset,
    load_jsonl,
    parse_record,
)
from coordexp.data.prompt import PromptSpec, build_messages, instruction_text, scene_text
from coordexp.data.synthetic import SyntheticSpec, generate_records, write_synthetic_jsonl

_LAZY = {"TinyModelSpec", "ensure_tiny_model", "read_build_info"}


def __getattr__(name: str):
    # Lazy, so `python -m coordexp.data.tiny_model` does not import the module twice.
    if name in _LAZY:
        from coordexp.data import tiny_model

        return getattr(tiny_model, name)
    raise AttributeError(f"module 'coordexp.data' has no attribute {name!r}")

__all__ = [
    "DataValidationError",
    "DetectionObject",
    "DetectionSample",
    "JsonlDetectionDataset",
    "PromptSpec",
    "SyntheticSpec",
    "TinyModelSpec",
    "build_messages",
    "ensure_tiny_model",
    "generate_records",
    "instruction_text",
    "load_jsonl",
    "parse_record",
    "read_build_info",
    "scene_text",
    "write_synthetic_jsonl",
]
