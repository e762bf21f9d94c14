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

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from coordexp.coordjson import CoordVocab

QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
EOS_TOKEN = "<|im_end|>"
WORDS = "red blue green yellow square circle triangle cat dog person car tree small large the of a".split()
_COORD_LITERAL_RE = re.compile(r"<\|coord_\d+\|>")


def _corpus_document(rng: random.Random) -> str:
    records = []
    for _ in range(rng.randint(0, 4)):
        desc = json.dumps(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))))
        bbox = "[" + ", ".join(f"<|coord_{rng.randint(0, 999)}|>" for _ in range(4)) + "]"
        if rng.random() < 0.5:
            records.append('{"desc": %s, "bbox_2d": %s}' % (desc, bbox))
        else:
            records.append('{"bbox_2d": %s, "desc": %s}' % (bbox, desc))
    return '{"objects": [' + ", ".join(records) + "]}"


@dataclass(frozen=True)
class BpeTestTokenizer:
    tokenizer: Tokenizer
    coord_vocab: CoordVocab
    eos_id: int
    piece_table: tuple[str, ...]  # every id decoded alone, as a trainer adapter would precompute it

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode_token(self, token_id: int) -> str:
        return self.piece_table[token_id]

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.piece_table[t] for t in ids]

    def token_id(self, piece: str) -> int | None:
        return self.tokenizer.token_to_id(piece) if piece.startswith("<|") else _id_of_piece(self, piece)


def _id_of_piece(tok: BpeTestTokenizer, piece: str) -> int | None:
    matches = [i for i, p in enumerate(tok.piece_table) if p == piece]
    return matches[0] if matches else None


@functools.lru_cache(maxsize=1)
def build_test_tokenizer() -> TestTokenizer:
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
    table = tuple(tok.decode([i], skip_special_tokens=False) for i in range(tok.get_vocab_size()))
    return BpeTestTokenizer(tok, CoordVocab.from_vocab(tok.get_vocab()), tok.token_to_id(EOS_TOKEN), table)
