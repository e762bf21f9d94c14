"""Repeat-aware termination: the pure rule engine shared by every backend.

No torch, no vLLM, no transformers import here. The HF guard (:mod:`coordexp.rollout.hf_guard`), the vLLM
logits processors (:mod:`coordexp.rollout.vllm_processor`) and the ms-swift server plugin
(:mod:`coordexp.rollout.server.swift_plugin`) all drive the same :class:`SequenceState`.

Rules (``rollout_matching.repeat_terminate``), evaluated *before each sampled token* over the tokens the
sequence has generated so far (never the prompt):

* nothing fires while fewer than ``min_new_tokens`` tokens have been generated;
* ``max_consecutive_token_repeats`` (K > 0): the trailing run of one token id has length >= K;
* ``ngram_size`` / ``ngram_repeats`` (n > 0, r >= 2): the last ``n * r`` tokens are ``r`` identical,
  back-to-back copies of the last ``n`` tokens;
* ``max_object_keys`` (C, not None): at least C records have been started: the parser's own definition of a
  record start (:mod:`coordexp.coordjson.record_start`), counted token by token (:class:`ObjectOpenMatcher`).

Incremental evaluation, O(1) per token whatever the length:

* consecutive run: one counter and the previous id;
* n-gram tail: the length ``m`` of the trailing run of positions ``i`` (``i >= n``) with
  ``tok[i] == tok[i - n]``. The last ``n * r`` tokens are ``r`` equal adjacent blocks iff every one of the
  last ``n * (r - 1)`` positions equals the token ``n`` before it, i.e. iff ``m >= n * (r - 1)`` (this also
  implies ``len >= n * r``). The token ``n`` back comes from a ring buffer of size ``n``;
* record starts: a character automaton run over each token's text, its effect per (state, token) cached, so
  one dict lookup per token.

:func:`triggered` is the stateless twin (direct tail comparisons and the automaton over the whole text);
tests prove it agrees with the incremental engine on every prefix of random sequences.

Why one module (> 400 lines): the config, the incremental engine and its stateless twin are one rule set;
the tests prove the twins agree, which only holds while they change together.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from coordexp.coordjson.record_start import RECORD_START, RecordStartCounter
from coordexp.protocol import XARGS_KEY

__all__ = [
    "CONFIG_KEYS",
    "ObjectOpenMatcher",
    "RepeatTerminateConfig",
    "SequenceState",
    "config_from_json",
    "config_to_dict",
    "consistency_problem",
    "count_object_openings",
    "first_trigger_length",
    "forced_eos_flag",
    "merge_overrides",
    "object_open_matcher",
    "parse_config",
    "problems",
    "triggered",
    "validate_overrides",
]


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class RepeatTerminateConfig:
    """``rollout_matching.repeat_terminate`` (the config schema registers this class as that node)."""

    enabled: bool = _help("Force EOS per sequence on degenerate repetition.", True)
    min_new_tokens: int = _help("No rule fires before this many generated tokens.", 8)
    max_consecutive_token_repeats: int = _help("Fire when the trailing run of one token id reaches this "
                                               "length (0 disables).", 16)
    ngram_size: int = _help("n of the n-gram rule (0 disables).", 8)
    ngram_repeats: int = _help("Fire when the last ngram_size tokens repeat back-to-back this many times "
                               "(0 disables; otherwise >= 2).", 3)
    max_object_keys: int | None = _help("Fire when this many objects have been started (null disables).",
                                        None)


#: The config keys, in schema order (single source: the schema dataclass).
CONFIG_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RepeatTerminateConfig))

_INT_KEYS = ("min_new_tokens", "max_consecutive_token_repeats", "ngram_size", "ngram_repeats")


# ----------------------------------------------------------------------------------------------- config


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def problems(values: Mapping[str, Any], where: str = "") -> list[str]:
    """Every type, range and cross-field problem of a (full or partial) mapping of repeat-terminate values,
    one line each with ``where`` as the dotted prefix. The one validation of these settings: the config
    schema check, the server plugin, the logits processor and per-request overrides all use it."""
    return _unknown(values, where) + _check_values(values, where)


def _check_values(values: Mapping[str, Any], where: str) -> list[str]:
    out: list[str] = []
    if "enabled" in values and not isinstance(values["enabled"], bool):
        out.append(f"{where}enabled: must be a bool, got {values['enabled']!r}")
    for key in _INT_KEYS:
        if key in values:
            v = values[key]
            if not _is_int(v) or v < 0:
                out.append(f"{where}{key}: must be an int >= 0, got {v!r}")
    if "ngram_repeats" in values and _is_int(values["ngram_repeats"]) and values["ngram_repeats"] == 1:
        out.append(f"{where}ngram_repeats: must be 0 (off) or >= 2: one occurrence is not a repeat")
    if "max_object_keys" in values:
        v = values["max_object_keys"]
        if v is not None and (not _is_int(v) or v < 1):
            out.append(f"{where}max_object_keys: must be null (off) or an int >= 1, got {v!r}")
    size, repeats = values.get("ngram_size"), values.get("ngram_repeats")
    if _is_int(size) and _is_int(repeats) and (size == 0) != (repeats == 0):
        out.append(f"{where}ngram_size: ngram_size and ngram_repeats must be both 0 (rule off) or both "
                   f"set, got {size} and {repeats}")
    return out


def _unknown(values: Mapping[str, Any], where: str) -> list[str]:
    bad = sorted(str(k) for k in values if k not in CONFIG_KEYS)
    if not bad:
        return []
    return [f"unknown key(s) {', '.join(where + k for k in bad)} (allowed: {', '.join(CONFIG_KEYS)})"]


def validate_overrides(overrides: Any, where: str = "") -> dict[str, Any]:
    """Check a partial override mapping (unknown keys, types, ranges); return it as a plain dict."""
    if not isinstance(overrides, Mapping):
        raise ValueError(f"{where or 'repeat_terminate overrides'} must be a mapping, got {overrides!r}")
    found = problems(overrides, where)
    if found:
        raise ValueError("invalid repeat_terminate settings: " + "; ".join(found))
    return dict(overrides)


def parse_config(value: Any, where: str = "") -> RepeatTerminateConfig:
    """A validated :class:`RepeatTerminateConfig` from a config object or a (full or partial) mapping.

    Missing keys take the schema defaults; unknown keys, wrong types and out-of-range values raise one
    ``ValueError`` listing every problem (with ``where`` as the dotted prefix of each key).
    """
    if isinstance(value, RepeatTerminateConfig):
        values = config_to_dict(value)
    elif isinstance(value, Mapping):
        values = dict(value)
    elif hasattr(value, "items") and callable(value.items):  # DictConfig and friends
        values = dict(value.items())
    elif all(hasattr(value, k) for k in CONFIG_KEYS):  # another config object with the same fields
        values = {k: getattr(value, k) for k in CONFIG_KEYS}
    else:
        raise ValueError(f"{where or 'repeat_terminate'} must be a mapping, got {type(value).__name__}")
    found = problems(values, where)
    if found:
        raise ValueError("invalid repeat_terminate settings: " + "; ".join(found))
    return RepeatTerminateConfig(**values)


def config_from_json(text: str, source: str = "repeat_terminate JSON") -> RepeatTerminateConfig:
    """Parse the JSON the launcher exports (``COORDEXP_VLLM_REPEAT_TERMINATE_CONFIG_JSON``)."""
    try:
        value = json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{source} is not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{source} must be a JSON object, got {text!r}")
    try:
        return parse_config(value)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


def config_to_dict(cfg: RepeatTerminateConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in CONFIG_KEYS}


def merge_overrides(
    base: RepeatTerminateConfig, overrides: Mapping[str, Any] | None
) -> RepeatTerminateConfig:
    """``base`` with the keys of a partial override mapping replaced; the result passes :func:`problems`
    (an override may not leave a half-set rule behind, e.g. ``ngram_repeats: 0`` with ``ngram_size: 8``).
    Raises ``ValueError`` naming every problem."""
    if not overrides:
        return base
    values = config_to_dict(base)
    values.update(validate_overrides(overrides, where=f"{XARGS_KEY}."))
    found = problems(values, where=f"{XARGS_KEY} (merged with the server defaults) ")
    if found:
        raise ValueError("invalid repeat_terminate settings: " + "; ".join(found))
    return RepeatTerminateConfig(**values)


# ----------------------------------------------------------------------------------------------- matcher


class ObjectOpenMatcher(RecordStartCounter):
    """The object cap's counter: record starts (``{``, JSON whitespace, ``"desc"`` or ``"bbox_2d"``) in the
    generated text, token by token. The definition is the parser's own
    (:mod:`coordexp.coordjson.record_start`), so the cap counts exactly the records the parser sees start,
    whatever whitespace the model writes and however the tokenizer merges the characters.
    :meth:`step` is one cached dict lookup; ``piece_of(id)`` is the token decoded alone."""

    __slots__ = ()

    def text(self, tokens: Iterable[int]) -> str:
        return "".join(self.piece(t) for t in tokens)


def object_open_matcher(tokenizer: Any) -> ObjectOpenMatcher:
    """The cap's counter for ``tokenizer`` (HF or vLLM's): each id decoded alone, on first use, cached."""
    @cache
    def piece(token: int) -> str:
        return tokenizer.decode([int(token)], skip_special_tokens=False)

    return ObjectOpenMatcher(piece)


# ----------------------------------------------------------------------------------------------- engine


class SequenceState:
    """Incremental rule state of one sequence. Feed generated tokens with :meth:`push`; read
    :attr:`fired` before sampling the next token."""

    __slots__ = (
        "_ac",
        "_cap",
        "_enabled",
        "_k",
        "_last",
        "_match_run",
        "_min",
        "_n",
        "_ngram_need",
        "_ring",
        "_run",
        "cfg",
        "length",
        "matcher",
        "objects",
    )

    def __init__(self, cfg: RepeatTerminateConfig, matcher: ObjectOpenMatcher | None = None):
        if cfg.enabled and cfg.max_object_keys is not None and matcher is None:
            raise ValueError(
                "max_object_keys is set but no object-opening matcher was given "
                "(object_open_matcher(tokenizer))"
            )
        self.cfg = cfg
        self.matcher = matcher
        self._enabled = bool(cfg.enabled)
        self._min = cfg.min_new_tokens
        self._k = cfg.max_consecutive_token_repeats
        ngram_on = cfg.ngram_size > 0 and cfg.ngram_repeats >= 2
        self._n = cfg.ngram_size if ngram_on else 0
        self._ngram_need = cfg.ngram_size * (cfg.ngram_repeats - 1) if ngram_on else 0
        self._cap = cfg.max_object_keys if matcher is not None else None
        self.reset()

    def reset(self) -> None:
        self.length = 0
        self._last = None
        self._run = 0
        self._ring = [0] * self._n if self._n else None
        self._match_run = 0
        self._ac = 0
        self.objects = 0

    def push(self, token: int) -> None:
        i = self.length
        if token == self._last:
            self._run += 1
        else:
            self._last = token
            self._run = 1
        n = self._n
        if n:
            ring = self._ring
            slot = i % n
            if i >= n and ring[slot] == token:
                self._match_run += 1
            else:
                self._match_run = 0
            ring[slot] = token
        if self._cap is not None:
            self._ac, hits = self.matcher.step(self._ac, token)
            self.objects += hits
        self.length = i + 1

    def extend(self, tokens: Iterable[int]) -> None:
        for t in tokens:
            self.push(t)

    @property
    def fired(self) -> bool:
        if not self._enabled or self.length < self._min:
            return False
        if self._k and self._run >= self._k:
            return True
        if self._n and self._match_run >= self._ngram_need:
            return True
        return self._cap is not None and self.objects >= self._cap

    def which(self) -> str | None:
        """Name of the first rule that fires now (diagnostics), or None."""
        if not self._enabled or self.length < self._min:
            return None
        if self._k and self._run >= self._k:
            return "max_consecutive_token_repeats"
        if self._n and self._match_run >= self._ngram_need:
            return "ngram"
        if self._cap is not None and self.objects >= self._cap:
            return "max_object_keys"
        return None


# ----------------------------------------------------------------------------------------------- stateless


def count_object_openings(tokens: Sequence[int], matcher: ObjectOpenMatcher) -> int:
    """Record starts in the text of ``tokens``, rescanned as a whole (reference for :meth:`ObjectOpenMatcher.
    step`, which caches per token)."""
    return RECORD_START.count(matcher.text(tokens))


def triggered(
    config: RepeatTerminateConfig,
    generated_ids: Sequence[int],
    matcher: ObjectOpenMatcher | None = None,
) -> bool:
    """Would the processor force EOS right after ``generated_ids`` (stateless, rescans the tail)?"""
    cfg = config
    if not cfg.enabled:
        return False
    ids = list(generated_ids)
    length = len(ids)
    if length < cfg.min_new_tokens:
        return False
    k = cfg.max_consecutive_token_repeats
    if k and length >= k and len(set(ids[length - k :])) == 1:
        return True
    n, r = cfg.ngram_size, cfg.ngram_repeats
    if n > 0 and r >= 2 and length >= n * r:
        tail = ids[length - n :]
        if all(ids[length - n * (j + 1) : length - n * j] == tail for j in range(1, r)):
            return True
    if cfg.max_object_keys is not None:
        if matcher is None:
            raise ValueError("max_object_keys is set but no object-opening matcher was given")
        if count_object_openings(ids, matcher) >= cfg.max_object_keys:
            return True
    return False


def first_trigger_length(
    config: RepeatTerminateConfig,
    generated_ids: Sequence[int],
    matcher: ObjectOpenMatcher | None = None,
) -> int | None:
    """Smallest L in [0, len(ids)] with ``triggered(ids[:L])``, or None (incremental, O(len))."""
    state = SequenceState(config, matcher)
    if state.fired:
        return 0
    for i, t in enumerate(generated_ids):
        state.push(t)
        if state.fired:
            return i + 1
    return None


def forced_eos_flag(
    config: RepeatTerminateConfig,
    generated_ids: Sequence[int],
    stop_ids: Iterable[int],
    matcher: ObjectOpenMatcher | None = None,
) -> int:
    """The trigger flag the server reports: exactly "the processor forced the last token".

    The processor forces EOS at the first step where the rule holds for the tokens generated so far,
    and a forced EOS ends the sequence. So the processor forced this sequence iff its last token is a
    stop id and the rule holds for everything before it: ``ids[-1] in stop_ids and
    triggered(ids[:-1])``. (``triggered`` is monotone up to the first firing, so this is the same as
    "the first trigger point is len(ids) - 1".)
    """
    ids = list(generated_ids)
    if not ids or ids[-1] not in set(stop_ids):
        return 0
    return int(first_trigger_length(config, ids[:-1], matcher) == len(ids) - 1)


def consistency_problem(
    config: RepeatTerminateConfig,
    generated_ids: Sequence[int],
    stop_ids: Iterable[int],
    matcher: ObjectOpenMatcher | None = None,
) -> str | None:
    """Why ``generated_ids`` could not have come out of an attached processor, or None.

    With the processor attached, the rule can first hold only at the very end: either at
    ``len - 1`` (then the last token is the forced stop id) or at ``len`` (the sequence ended for
    another reason just as the rule became true) or never.
    """
    ids = list(generated_ids)
    first = first_trigger_length(config, ids, matcher)
    if first is None or first >= len(ids):
        return None
    if first == len(ids) - 1 and ids[-1] in set(stop_ids):
        return None
    return (
        f"the repeat-terminate rule held after {first} generated tokens but the sequence went on to "
        f"{len(ids)} tokens (last id {ids[-1] if ids else None}); the logits processor did not act"
    )
