"""The token frame: text = concatenation of per-token decoded pieces, with each token's char span.

Byte-level BPE splits a multi-byte UTF-8 character over several tokens; decoded one at a time, such tokens
give U+FFFD. So a token's piece may carry raw bytes instead: ``raw_piece`` spells a token's bytes as a
``surrogateescape`` string (every byte that is not part of a whole character in that token becomes one
U+DC80..U+DCFF code point). ``frame_pieces`` turns such pieces into the exact text: the bytes of all tokens,
decoded as the tokenizer's own ``decode`` does (UTF-8, invalid bytes -> U+FFFD), each character given to
the token that holds its last byte. A token that holds leading bytes of the next character (``carries``;
its piece is ``""`` when it holds nothing else) belongs to every span that starts at that character
(``token_spans``), so token positions and masks stay exact.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from coordexp.coordjson.serialize import Span

EncodeFn = Callable[[str], Sequence[int]]
DecodeTokenFn = Callable[[int], str]

_RAW_BYTE_RE = re.compile("[\udc80-\udcff]")  # a byte carried by a piece (surrogateescape)
_REPLACEMENT_CHAR = "\ufffd"
# GPT-2 byte-level alphabet: printable latin-1 bytes stand for themselves, the other 68 bytes (in order) for
# chr(256), chr(257), ...
_PRINTABLE_BYTES = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                    *range(ord("\xae"), ord("\xff") + 1)]
_BYTE_OF_CHAR = {chr(b): b for b in _PRINTABLE_BYTES} | {
    chr(256 + n): b for n, b in enumerate(b for b in range(256) if b not in set(_PRINTABLE_BYTES))
}


def raw_piece(vocab_token: str, decoded: str) -> str:
    """The piece of one token, lossless: its bytes in ``surrogateescape`` form when ``vocab_token`` (the
    vocabulary string, e.g. ``convert_ids_to_tokens(id)``) is a byte-level BPE token whose bytes decode to
    ``decoded`` (the tokenizer's ``decode([id])``); else ``decoded`` itself (added and special tokens,
    tokenizers that are not byte-level)."""
    if _REPLACEMENT_CHAR not in decoded:
        return decoded  # whole characters: nothing to recover
    try:
        data = bytes(_BYTE_OF_CHAR[c] for c in vocab_token)
    except KeyError:
        return decoded
    return data.decode("utf-8", "surrogateescape") if data.decode("utf-8", "replace") == decoded else decoded


def frame_pieces(pieces: Sequence[str]) -> tuple[str, ...]:
    """Exact per-token text of a token sequence whose pieces may carry raw bytes (see ``raw_piece``)."""
    return _exact_pieces(pieces)[0]


def _exact_pieces(pieces: Sequence[str]) -> tuple[tuple[str, ...], np.ndarray | None]:
    """(exact pieces, per token: does it end with leading bytes of the next character; None if none do).

    Each character goes to the token holding its last byte, a U+FFFD for invalid bytes too: the decoder
    only emits it when the next byte arrives, possibly in the next token, so it is moved back there."""
    pieces = tuple(pieces)
    if not pieces or not _RAW_BYTE_RE.search("".join(pieces)):
        return pieces, None
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    out, carries = [""] * len(pieces), np.zeros(len(pieces), dtype=bool)
    holder = -1  # the last token that gave the decoder bytes
    for i, piece in enumerate(pieces):
        data = piece.encode("utf-8", "surrogateescape")
        if not data:
            continue
        text = ""
        if decoder.getstate()[0]:  # bytes of an unfinished character are pending from earlier tokens
            text, data = decoder.decode(data[:1]), data[1:]
            completed_fffd = text == _REPLACEMENT_CHAR and not decoder.getstate()[0]  # EF BF BD itself
            if text.startswith(_REPLACEMENT_CHAR) and not completed_fffd:
                out[holder] += _REPLACEMENT_CHAR  # this byte showed the pending ones invalid: theirs
                carries[holder] = False
                text = text[1:]
        out[i] = text + decoder.decode(data)
        carries[i] = bool(decoder.getstate()[0])
        holder = i
    if holder >= 0 and (rest := decoder.decode(b"", final=True)):  # cut off mid-character at the end
        out[holder] += rest
        carries[holder] = False
    return tuple(out), carries


@dataclass(frozen=True)
class TokenFrame:
    ids: np.ndarray  # int64
    pieces: tuple[str, ...]
    starts: np.ndarray  # char start of each token in `text`
    ends: np.ndarray  # char end (exclusive)
    text: str
    carries: np.ndarray | None = None  # bool: the token ends with leading bytes of the char at `ends`

    @classmethod
    def from_pieces(cls, ids: Sequence[int], pieces: Sequence[str]) -> TokenFrame:
        if len(ids) != len(pieces):
            raise ValueError(f"{len(ids)} token ids but {len(pieces)} decoded pieces")
        pieces, carries = _exact_pieces(pieces)
        lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        return cls._from_lengths(np.asarray(ids, dtype=np.int64), pieces, lengths, "".join(pieces), carries)

    @classmethod
    def _from_lengths(
        cls, ids: np.ndarray, pieces: tuple[str, ...], lengths: np.ndarray, text: str,
        carries: np.ndarray | None = None,
    ) -> TokenFrame:
        ends = np.cumsum(lengths)
        carries = carries if carries is not None and carries.any() else None
        return cls(ids, pieces, ends - lengths, ends, text, carries)

    @classmethod
    def concat(cls, frames: Sequence[TokenFrame]) -> TokenFrame:
        carries = None
        if any(f.carries is not None for f in frames):
            carries = np.concatenate([f.carries if f.carries is not None else np.zeros(len(f), dtype=bool)
                                      for f in frames])
        return cls._from_lengths(
            np.concatenate([f.ids for f in frames]),
            tuple(chain.from_iterable(f.pieces for f in frames)),
            np.concatenate([f.ends - f.starts for f in frames]),
            "".join(f.text for f in frames),
            carries,
        )

    def slice(self, first: int, stop: int) -> TokenFrame:
        """Tokens [first, stop) as a frame of their own."""
        text = self.text[self.starts[first] : self.ends[stop - 1]] if stop > first else ""
        lengths = (self.ends - self.starts)[first:stop]
        carries = self.carries[first:stop] if self.carries is not None else None
        return TokenFrame._from_lengths(self.ids[first:stop], self.pieces[first:stop], lengths, text, carries)

    def __len__(self) -> int:
        return len(self.pieces)

    def tokens_at(self, chars: np.ndarray | Sequence[int]) -> np.ndarray:
        """Index of the (non-empty) token holding each char position."""
        return np.searchsorted(self.ends, np.asarray(chars, dtype=np.int64), side="right")

    def token_spans(self, spans: Sequence[Span]) -> list[tuple[int, int]]:
        """[first, stop) of the tokens overlapping each non-empty char span, plus the tokens right before it
        that hold leading bytes of its first character (``carries``)."""
        if not spans:
            return []
        bounds = np.asarray(spans, dtype=np.int64).reshape(-1, 2) - [0, 1]
        tokens = self.tokens_at(bounds.reshape(-1)).reshape(-1, 2) + [0, 1]
        out = [(first, stop) for first, stop in tokens.tolist()]
        if self.carries is not None:
            carries, ends = self.carries, self.ends
            for n, ((first, stop), start) in enumerate(zip(out, bounds[:, 0].tolist(), strict=True)):
                while first > 0 and carries[first - 1] and ends[first - 1] == start:
                    first -= 1
                out[n] = (first, stop)
        return out

    def exact_tokens(self, spans: np.ndarray) -> np.ndarray:
        """For each (start, end) char span, the index of the one token spanning exactly it, else -1."""
        spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
        if len(self) == 0:
            return np.full(len(spans), -1, dtype=np.int64)
        index = np.minimum(self.tokens_at(spans[:, 0]), len(self) - 1)
        exact = (self.starts[index] == spans[:, 0]) & (self.ends[index] == spans[:, 1])
        return np.where(exact, index, -1)


def encode_frame(text: str, encode: EncodeFn, decode_token: DecodeTokenFn) -> TokenFrame:
    """Encode `text` and decode each resulting token alone."""
    ids = [int(t) for t in encode(text)]
    return TokenFrame.from_pieces(ids, [decode_token(t) for t in ids])


def spelled(text: str, encode: EncodeFn, decode_token: DecodeTokenFn) -> str:
    """``text`` as the tokenizer writes it: encoded, then decoded (its normalizer applied, e.g. NFC turns
    ``e`` + U+0301 into ``é``). A model trained on ``text`` can only ever write this spelling."""
    return encode_frame(text, encode, decode_token).text


def encode_exactly(text: str, encode: EncodeFn, decode_token: DecodeTokenFn) -> TokenFrame | None:
    """Encode `text`; None unless its tokens, decoded one at a time, spell `text` exactly."""
    frame = encode_frame(text, encode, decode_token)
    return frame if frame.text == text else None
