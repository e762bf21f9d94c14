"""CoordJSON: coord-token codec, serializer, strict rollout parser and teacher-forcing targets (pure core).

The names below are loaded on first use (PEP 562), so a module that needs one light part (the config needs
the record-start rule) does not load the parser and numpy with it."""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    'MAX_BIN': 'codec',
    'NUM_BINS': 'codec',
    'CoordVocab': 'codec',
    'bin_to_norm': 'codec',
    'bin_to_pixel': 'codec',
    'bin_to_token': 'codec',
    'bins_to_coco_box': 'codec',
    'bins_to_pixel_box': 'codec',
    'coco_box_to_pixel_box': 'codec',
    'pixel_box_to_bins': 'codec',
    'pixel_box_to_coco_box': 'codec',
    'pixel_to_bin': 'codec',
    'token_to_bin': 'codec',
    'try_token_to_bin': 'codec',
    'TokenFrame': 'frame',
    'encode_exactly': 'frame',
    'frame_pieces': 'frame',
    'raw_piece': 'frame',
    'spelled': 'frame',
    'DroppedRecord': 'parse',
    'FallbackReason': 'parse',
    'ParsedObject': 'parse',
    'ParsedRollout': 'parse',
    'parse_rollout': 'parse',
    'JSON_WHITESPACE': 'record_start',
    'RECORD_START': 'record_start',
    'RECORD_START_KEYS': 'record_start',
    'RecordStartAutomaton': 'record_start',
    'RecordStartCounter': 'record_start',
    'DropReason': 'scan',
    'CONTAINER_CLOSURE': 'serialize',
    'CONTAINER_HEADER': 'serialize',
    'CoordObject': 'serialize',
    'FieldOrder': 'serialize',
    'canonical_order': 'serialize',
    'lone_surrogate': 'serialize',
    'serialize_append_fragment': 'serialize',
    'serialize_objects': 'serialize',
    'serialize_record': 'serialize',
    'sort_objects': 'serialize',
    'GeometryGroup': 'target',
    'TargetInvariantError': 'target',
    'TeacherForcedTarget': 'target',
    'TokenRole': 'target',
    'build_channel_a_target': 'target',
    'build_channel_b_target': 'target',
    'role_ce_weights': 'target',
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 - the one list of public names is _EXPORTS


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
