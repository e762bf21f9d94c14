"""The token frame: text = concatenation of per-token decoded pieces, with each token's char span."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from coordexp.coordjson.serialize import Span

EncodeFn = Callable[[str], Sequence[int]]
DecodeTokenFn = Callable[[int], str]


@dataclass(frozen=True)
class TokenFrame:
    ids: np.ndarray  # int64
    pieces: tuple[str, ...]
    starts: np.ndarray  # char start of each token in `text`
    ends: np.ndarray  # char end (exclusive)
    text: str

    @classmethod
    def from_pieces(cls, ids: Sequence[int], pieces: Sequence[str]) -> TokenFrame:
        if len(ids) != len(pieces):
            raise ValueError(f"{len(ids)} token ids but {len(pieces)} decoded pieces")
        pieces = tuple(pieces)
        lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        return cls._from_lengths(np.asarray(ids, dtype=np.int64), pieces, lengths, "".join(pieces))

    @classmethod
    def _from_lengths(
        cls, ids: np.ndarray, pieces: tuple[str, ...], lengths: np.ndarray, text: str
    ) -> TokenFrame:
        ends = np.cumsum(lengths)
        return cls(ids, pieces, ends - lengths, ends, text)

    @classmethod
    def concat(cls, frames: Sequence[TokenFrame]) -> TokenFrame:
        return cls._from_lengths(
            np.concatenate([f.ids for f in frames]),
            tuple(chain.from_iterable(f.pieces for f in frames)),
            np.concatenate([f.ends - f.starts for f in frames]),
            "".join(f.text for f in frames),
        )

    def slice(self, first: int, stop: int) -> TokenFrame:
        """Tokens [first, stop) as a frame of their own."""
        text = self.text[self.starts[first] : self.ends[stop - 1]] if stop > first else ""
        lengths = (self.ends - self.starts)[first:stop]
        return TokenFrame._from_lengths(self.ids[first:stop], self.pieces[first:stop], lengths, text)

    def __len__(self) -> int:
        return len(self.pieces)

    def tokens_at(self, chars: np.ndarray | Sequence[int]) -> np.ndarray:
        """Index of the (non-empty) token holding each char position."""
        return np.searchsorted(self.ends, np.asarray(chars, dtype=np.int64), side="right")

    def token_spans(self, spans: Sequence[Span]) -> list[tuple[int, int]]:
        """[first, stop) of the tokens overlapping each non-empty char span."""
        if not spans:
            return []
        bounds = np.asarray(spans, dtype=np.int64).reshape(-1, 2) - [0, 1]
        tokens = self.tokens_at(bounds.reshape(-1)).reshape(-1, 2) + [0, 1]
        return [(first, stop) for first, stop in tokens.tolist()]

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


def encode_exactly(text: str, encode: EncodeFn, decode_token: DecodeTokenFn) -> TokenFrame | None:
    """Encode `text`; None unless its tokens, decoded one at a time, spell `text` exactly."""
    frame = encode_frame(text, encode, decode_token)
    return frame if frame.text == text else None
