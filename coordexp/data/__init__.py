"""Data layer: JSONL dataset, prompt construction, synthetic task generator.

Importing this package does not import torch, transformers or vLLM.
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

__all__ = [
    "DataValidationError",
    "DetectionObject",
    "DetectionSample",
    "JsonlDetectionDataset",
    "PromptSpec",
    "SyntheticSpec",
    "build_messages",
    "generate_records",
    "instruction_text",
    "load_jsonl",
    "parse_record",
    "scene_text",
    "write_synthetic_jsonl",
]
