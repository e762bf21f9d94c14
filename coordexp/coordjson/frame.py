"""The token frame: text = concatenation of per-token decoded pieces, with each token's char span."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
        ends = np.cumsum(np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces)))
        starts = ends - np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        return cls(np.asarray(ids, dtype=np.int64), pieces, starts, ends, "".join(pieces))

    def __len__(self) -> int:
        return len(self.pieces)

    def tokens_at(self, chars: np.ndarray | Sequence[int]) -> np.ndarray:
        """Index of the (non-empty) token holding each char position."""
        return np.searchsorted(self.ends, np.asarray(chars, dtype=np.int64), side="right")

    def token_span(self, span: Span) -> tuple[int, int]:
        """[first, stop) of the tokens overlapping the non-empty char span."""
        first, last = self.tokens_at([span[0], span[1] - 1])
        return int(first), int(last) + 1

    def exact_tokens(self, spans: np.ndarray) -> np.ndarray:
        """For each (start, end) char span, the index of the one token spanning exactly it, else -1."""
        spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
        if len(self) == 0:
            return np.full(len(spans), -1, dtype=np.int64)
        index = np.minimum(self.tokens_at(spans[:, 0]), len(self) - 1)
        exact = (self.starts[index] == spans[:, 0]) & (self.ends[index] == spans[:, 1])
        return np.where(exact, index, -1)


def encode_exactly(text: str, encode: EncodeFn, decode_token: DecodeTokenFn) -> tuple[list[int], list[str]] | None:
    """Encode `text`; None unless its tokens, decoded one at a time, spell `text` exactly."""
    ids = [int(t) for t in encode(text)]
    pieces = [decode_token(t) for t in ids]
    return (ids, pieces) if "".join(pieces) == text else None
