"""CoordJSON: coord-token codec, serializer, strict rollout parser and teacher-forcing targets (pure core)."""

from coordexp.coordjson.codec import (
    MAX_BIN,
    NUM_BINS,
    CoordVocab,
    bin_to_norm,
    bin_to_pixel,
    bin_to_token,
    bins_to_pixel_box,
    pixel_box_to_bins,
    pixel_to_bin,
    token_to_bin,
    try_token_to_bin,
)
from coordexp.coordjson.frame import TokenFrame, encode_exactly
from coordexp.coordjson.parse import DroppedRecord, FallbackReason, ParsedObject, ParsedRollout, parse_rollout
from coordexp.coordjson.scan import DropReason
from coordexp.coordjson.serialize import (
    CONTAINER_CLOSURE,
    CONTAINER_HEADER,
    CoordObject,
    FieldOrder,
    canonical_order,
    serialize_append_fragment,
    serialize_objects,
    serialize_record,
    sort_objects,
)

__all__ = [
    "CONTAINER_CLOSURE",
    "CONTAINER_HEADER",
    "MAX_BIN",
    "NUM_BINS",
    "CoordObject",
    "CoordVocab",
    "DropReason",
    "DroppedRecord",
    "FallbackReason",
    "FieldOrder",
    "ParsedObject",
    "ParsedRollout",
    "TokenFrame",
    "bin_to_norm",
    "bin_to_pixel",
    "bin_to_token",
    "bins_to_pixel_box",
    "canonical_order",
    "encode_exactly",
    "parse_rollout",
    "pixel_box_to_bins",
    "pixel_to_bin",
    "serialize_append_fragment",
    "serialize_objects",
    "serialize_record",
    "sort_objects",
    "token_to_bin",
    "try_token_to_bin",
]
