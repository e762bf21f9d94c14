"""One length rule for training samples, checked when the data is loaded and reused for every segment built
later: a sample's prompt + answer tokens must fit ``vllm.max_model_len - rollout_matching.max_new_tokens``
(with ``training.packing``, ``training.packing_length`` instead of ``vllm.max_model_len`` when smaller).

Why that limit: a Channel-B target is the rollout prefix (at most ``max_new_tokens``) + the unmatched GT
objects (at most the whole answer) + closure, so prompt + answer <= max_model_len - max_new_tokens keeps
every sequence the learner or the server builds for the sample within the context. A record past it is
refused up front with ``file:line``, its token count and the limit, instead of a forward pass that runs for
minutes over a million positions.

Counting is the caller's (it needs the model's tokenizer and prompt encoder); ``upper_bound`` lets it skip
the tokenizer for samples that cannot be too long (a byte-level BPE token covers at least one byte).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from coordexp.data.jsonl import MAX_REPORTED_ERRORS, DataValidationError

__all__ = ["TokenLimit", "check_lengths", "oversize_error", "token_limit"]


class TokenLimit:
    """``limit`` tokens for prompt + answer, where the number comes from and the setting that raises it (for
    messages)."""

    def __init__(self, limit: int, origin: str, knob: str = "vllm.max_model_len"):
        self.limit = int(limit)
        self.origin = origin
        self.knob = knob

    def __repr__(self) -> str:
        return f"TokenLimit({self.limit}, {self.origin!r})"


def token_limit(cfg: Any) -> TokenLimit:
    """The limit of a typed config (``TrainConfig``): the server context, or with ``training.packing`` the
    pack length when it is smaller (every Channel-B segment of the sample must fit one pack), minus the
    rollout budget."""
    total, origin = cfg.vllm.max_model_len, "vllm.max_model_len"
    if cfg.training.packing and cfg.training.packing_length < total:
        total, origin = cfg.training.packing_length, "training.packing_length"
    budget = cfg.rollout_matching.max_new_tokens
    return TokenLimit(total - budget, f"{origin} {total} - rollout_matching.max_new_tokens {budget}", origin)


def oversize_error(source: str, n_tokens: int, limit: TokenLimit,
                   what: str = "prompt + answer") -> str | None:
    """``source: N tokens (what) > limit L (origin): ...`` when ``n_tokens`` does not fit, else None."""
    if n_tokens <= limit.limit:
        return None
    return (f"{source}: {n_tokens} tokens ({what}) exceed the limit of {limit.limit} ({limit.origin}); "
            f"shorten or drop the record, or raise {limit.knob}"
            + (" (the model's context permitting)" if limit.knob == "vllm.max_model_len" else ""))


def check_lengths(samples: Sequence[Any], count: Callable[[Any], int], limit: TokenLimit,
                  upper_bound: Callable[[Any], int] | None = None) -> None:
    """Raise one :class:`DataValidationError` listing every sample (``sample.source`` is ``file:line``) whose
    ``count(sample)`` exceeds ``limit``; ``upper_bound(sample) <= limit`` skips counting that sample."""
    found = []
    for sample in samples:
        if upper_bound is not None and upper_bound(sample) <= limit.limit:
            continue
        error = oversize_error(sample.source, count(sample), limit)
        if error:
            found.append(error)
    if found:
        raise DataValidationError(found[:MAX_REPORTED_ERRORS], len(found))
