"""A real byte-level BPE tokenizer for the Channel-B core tests, trained in-process on CoordJSON-like text.

Built like the project's tiny-model tokenizer: Qwen2 split regex + ByteLevel, 1000 `<|coord_k|>` added
tokens (atomic, not special), `<|im_end|>` as EOS. Training on CoordJSON text makes closing runs fuse into
single tokens (`]}]}`, `"}]}`, `]},`), which is what the prefix-cut re-encoding must handle.
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass

from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from coordexp.coordjson import (
    CoordObject,
    CoordVocab,
    FieldOrder,
    ParsedRollout,
    bin_to_token,
    parse_rollout,
    raw_piece,
    serialize_record,
)

QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
EOS_TOKEN = "<|im_end|>"
WORDS = [
    "red",
    "blue",
    "green",
    "yellow",
    "square",
    "circle",
    "triangle",
    "cat",
    "dog",
    "person",
    "car",
    "tree",
    "small",
    "large",
    "the",
    "of",
    "a",
]
_COORD_LITERAL_RE = re.compile(r"<\|coord_\d+\|>")


def _corpus_document(rng: random.Random) -> str:
    records = []
    for _ in range(rng.randint(0, 4)):
        desc = json.dumps(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))))
        bbox = "[" + ", ".join(f"<|coord_{rng.randint(0, 999)}|>" for _ in range(4)) + "]"
        pairs = [f'"desc": {desc}', f'"bbox_2d": {bbox}']
        records.append("{" + ", ".join(pairs if rng.random() < 0.5 else pairs[::-1]) + "}")
    return '{"objects": [' + ", ".join(records) + "]}"


@dataclass(frozen=True)
class BpeTestTokenizer:
    tokenizer: Tokenizer
    coord_vocab: CoordVocab
    eos_id: int
    piece_table: tuple[str, ...]  # every id alone, lossless (coordjson.raw_piece), as adapters precompute

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode_token(self, token_id: int) -> str:
        return self.piece_table[token_id]

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.piece_table[t] for t in ids]


@functools.lru_cache(maxsize=1)
def build_test_tokenizer() -> BpeTestTokenizer:
    rng = random.Random(1234)
    corpus = [_corpus_document(rng) for _ in range(3000)]
    # Coord literals become added tokens, so BPE only ever sees the text between them.
    segments = [part for doc in corpus for part in _COORD_LITERAL_RE.split(doc) if part]
    segments += ["Sure, here are the objects: ", "I see nothing.\n", "caf\u00e9 na\u00efve"]

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(segments, trainer)
    tok.add_tokens([AddedToken(f"<|coord_{k}|>", special=False, normalized=False) for k in range(1000)])
    # each id alone, lossless: a byte-level token holding part of a multi-byte character keeps its bytes
    table = tuple(raw_piece(tok.id_to_token(i), tok.decode([i], skip_special_tokens=False))
                  for i in range(tok.get_vocab_size()))
    return BpeTestTokenizer(tok, CoordVocab.from_vocab(tok.get_vocab()), tok.token_to_id(EOS_TOKEN), table)


def rollout_tokens(tok: BpeTestTokenizer, text: str, *, eos: bool = True) -> tuple[list[int], list[str]]:
    """Token ids of `text` (+ EOS) and their per-token pieces, as a rollout server would return them."""
    ids = tok.encode(text) + ([tok.eos_id] if eos else [])
    return ids, tok.pieces(ids)


def parse_ids(tok: BpeTestTokenizer, ids: list[int], field_order: FieldOrder | str) -> ParsedRollout:
    return parse_rollout(
        ids,
        tok.pieces(ids),
        coord_vocab=tok.coord_vocab,
        stop_ids=[tok.eos_id],
        field_order=field_order,
        encode=tok.encode,
        decode_token=tok.decode_token,
    )


def parse_text(
    tok: BpeTestTokenizer, text: str, field_order: FieldOrder | str, *, eos: bool = True
) -> ParsedRollout:
    return parse_ids(tok, rollout_tokens(tok, text, eos=eos)[0], field_order)


def tokenizer_fns(tok: BpeTestTokenizer) -> dict:
    """Keyword arguments the target builders take from the tokenizer."""
    return {
        "coord_vocab": tok.coord_vocab,
        "encode": tok.encode,
        "decode_token": tok.decode_token,
        "eos_id": tok.eos_id,
    }


# ---------------------------------------------------------------- rollout builders for property tests

DESC_PARTS = [
    "red",
    " ",
    "square",
    "cat",
    '"',
    "\\",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "<|coord_5|>",
    "\n",
    "é",
    "x y",
]
descs = st.lists(st.sampled_from(DESC_PARTS), min_size=1, max_size=5).map("".join).filter(lambda d: d.strip())


@st.composite
def bboxes(draw):
    x1, x2 = sorted(draw(st.lists(st.integers(0, 999), min_size=2, max_size=2)))
    y1, y2 = sorted(draw(st.lists(st.integers(0, 999), min_size=2, max_size=2)))
    return (x1, y1, x2, y2)


objects_lists = st.lists(st.builds(CoordObject, descs, bboxes()), max_size=6)
orders = st.sampled_from(list(FieldOrder))


def corrupted_record(kind, obj, order):
    desc = json.dumps(obj.desc, ensure_ascii=False)
    x1, y1, _, y2 = obj.bbox
    coords = "[" + ", ".join(bin_to_token(k) for k in obj.bbox) + "]"

    def record(desc_value, geometry, *extra):
        pairs = [("desc", desc_value), ("bbox_2d", geometry)]
        pairs = pairs if order is FieldOrder.desc_first else pairs[::-1]
        return "{" + ", ".join(f'"{key}": {value}' for key, value in pairs + list(extra)) + "}"

    swapped = FieldOrder.geometry_first if order is FieldOrder.desc_first else FieldOrder.desc_first
    return {
        "malformed": record(desc, coords).replace('": ', '" ', 1),  # the first key loses its colon
        "unexpected_keys": record(desc, coords, ("score", "1")),
        "missing_desc": '{"bbox_2d": ' + coords + "}",
        "missing_geometry": '{"desc": ' + desc + "}",
        "order_violation": serialize_record(obj, swapped),
        "invalid_desc": record("7", coords),
        "empty_desc": record('" "', coords),
        "wrong_arity": record(desc, coords[: coords.rindex(",")] + "]"),
        "non_coord_geometry": record(desc, "[1, 2, 3, 4]"),
        "bbox_invalid": record(desc, f"[<|coord_{x1 + 1}|>, <|coord_{y1}|>, <|coord_{x1}|>, <|coord_{y2}|>]"),
    }[kind]


KINDS = [
    "valid",
    "malformed",
    "unexpected_keys",
    "missing_desc",
    "missing_geometry",
    "order_violation",
    "invalid_desc",
    "empty_desc",
    "wrong_arity",
    "non_coord_geometry",
    "bbox_invalid",
]
