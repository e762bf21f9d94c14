"""A desc is plain text: it must not hold one of the tokenizer's special or added tokens (``<|im_end|>``,
``<|coord_5|>``, ...). The tokenizer would encode such a substring as that very token, so the Channel-A target
would teach the model to stop, or to write a coordinate, in the middle of a label."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from coordexp.data.jsonl import MAX_REPORTED_ERRORS, DataValidationError

__all__ = ["check_descs", "special_token_pattern"]


def special_token_pattern(tokens: Iterable[str]) -> re.Pattern[str] | None:
    """One regex matching any of ``tokens`` (longest first), None when there are none."""
    words = sorted({t for t in tokens if t}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, words))) if words else None


def check_descs(samples: Sequence[Any], pattern: re.Pattern[str] | None) -> None:
    """Raise one :class:`DataValidationError` listing every ``file:line`` whose object desc holds a token
    ``pattern`` matches (:func:`special_token_pattern` of the tokenizer's special and added tokens)."""
    if pattern is None:
        return
    found = []
    for sample in samples:
        for j, obj in enumerate(sample.objects):
            hit = pattern.search(obj.desc)
            if hit:
                found.append(f"{sample.source}: objects[{j}].desc {obj.desc!r} holds the tokenizer's special "
                             f"token {hit.group()!r}; a desc is plain text: remove or rewrite it")
    if found:
        raise DataValidationError(found[:MAX_REPORTED_ERRORS], len(found))
