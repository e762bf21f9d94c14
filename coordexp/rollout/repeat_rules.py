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
* ``max_object_keys`` (C, not None): at least C objects have been started, counted on the tokenizer's real
  encoding of an object opening (see :func:`derive_object_open_patterns`).

Incremental evaluation, O(1) per token whatever the length:

* consecutive run: one counter and the previous id;
* n-gram tail: the length ``m`` of the trailing run of positions ``i`` (``i >= n``) with
  ``tok[i] == tok[i - n]``. The last ``n * r`` tokens are ``r`` equal adjacent blocks iff every one of the
  last ``n * (r - 1)`` positions equals the token ``n`` before it, i.e. iff ``m >= n * (r - 1)`` (this also
  implies ``len >= n * r``). The token ``n`` back comes from a ring buffer of size ``n``;
* object openings: a deterministic automaton (Aho-Corasick, compiled to a full transition table over the
  few token ids that occur in any pattern) counts the positions where some opening pattern ends.

:func:`triggered` is the stateless twin (direct tail comparisons and a naive pattern scan); tests prove it
agrees with the incremental engine on every prefix of random sequences.
"""

from __future__ import annotations

import dataclasses
import json
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordexp.rollout.protocol import XARGS_KEY

__all__ = [
    "CONFIG_KEYS",
    "OBJECT_KEYS",
    "ObjectOpenMatcher",
    "RepeatTerminateConfig",
    "SequenceState",
    "config_from_json",
    "config_to_dict",
    "consistency_problem",
    "count_object_openings",
    "derive_object_open_patterns",
    "first_trigger_length",
    "forced_eos_flag",
    "merge_overrides",
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
#: Keys that open a CoordJSON object, for both field orders.
OBJECT_KEYS: tuple[str, ...] = ("desc", "bbox_2d")

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


class ObjectOpenMatcher:
    """Streaming matcher of a set of token-id patterns (the encodings of an object opening).

    Compiled once (Aho-Corasick goto/fail, then a full transition table restricted to the token ids
    that occur in some pattern; any other id goes back to the root). :meth:`step` is one dict lookup.
    Each *position* where at least one pattern ends counts once, so overlapping variants of the same
    opening never double count.
    """

    __slots__ = ("_accept", "_delta", "patterns")

    def __init__(self, patterns: Iterable[Sequence[int]]):
        pats = sorted({tuple(int(t) for t in p) for p in patterns if len(p) > 0})
        # A pattern that extends another one would count the same opening twice (at two positions).
        pats = [p for p in pats if not any(q != p and p[: len(q)] == q for q in pats)]
        self.patterns: tuple[tuple[int, ...], ...] = tuple(pats)
        goto: list[dict[int, int]] = [{}]
        accept = [False]
        for p in pats:
            s = 0
            for t in p:
                nxt = goto[s].get(t)
                if nxt is None:
                    goto.append({})
                    accept.append(False)
                    nxt = len(goto) - 1
                    goto[s][t] = nxt
                s = nxt
            accept[s] = True
        fail = [0] * len(goto)
        order: list[int] = []
        queue = deque(goto[0].values())
        while queue:
            s = queue.popleft()
            order.append(s)
            for t, nxt in goto[s].items():
                f = fail[s]
                while f and t not in goto[f]:
                    f = fail[f]
                cand = goto[f].get(t, 0)
                fail[nxt] = cand if cand != nxt else 0
                accept[nxt] = accept[nxt] or accept[fail[nxt]]
                queue.append(nxt)
        alphabet = sorted({t for p in pats for t in p})
        delta: list[dict[int, int]] = [{} for _ in goto]
        for s in [0] + order:  # BFS order: fail[s] is complete before s
            for t in alphabet:
                if t in goto[s]:
                    delta[s][t] = goto[s][t]
                elif s == 0:
                    delta[s][t] = 0
                else:
                    delta[s][t] = delta[fail[s]].get(t, 0)
            # drop transitions to the root: .get(t, 0) gives them back
            delta[s] = {t: d for t, d in delta[s].items() if d}
        self._delta = tuple(delta)
        self._accept = tuple(accept)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def step(self, state: int, token: int) -> tuple[int, bool]:
        nxt = self._delta[state].get(token, 0)
        return nxt, self._accept[nxt]

    def count(self, tokens: Iterable[int]) -> int:
        state, n = 0, 0
        delta, accept = self._delta, self._accept
        for t in tokens:
            state = delta[state].get(t, 0)
            n += accept[state]
        return n


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
        if cfg.enabled and cfg.max_object_keys is not None and not matcher:
            raise ValueError(
                "max_object_keys is set but no object-opening patterns were given "
                "(derive them with derive_object_open_patterns(tokenizer))"
            )
        self.cfg = cfg
        self.matcher = matcher
        self._enabled = bool(cfg.enabled)
        self._min = cfg.min_new_tokens
        self._k = cfg.max_consecutive_token_repeats
        ngram_on = cfg.ngram_size > 0 and cfg.ngram_repeats >= 2
        self._n = cfg.ngram_size if ngram_on else 0
        self._ngram_need = cfg.ngram_size * (cfg.ngram_repeats - 1) if ngram_on else 0
        self._cap = cfg.max_object_keys if matcher else None
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
            self._ac, hit = self.matcher.step(self._ac, token)
            if hit:
                self.objects += 1
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


def count_object_openings(tokens: Sequence[int], patterns: Iterable[Sequence[int]]) -> int:
    """Naive count of positions where some pattern ends (reference for :class:`ObjectOpenMatcher`)."""
    pats = ObjectOpenMatcher(patterns).patterns  # same de-duplication rules
    toks = list(tokens)
    n = 0
    for end in range(1, len(toks) + 1):
        if any(len(p) <= end and tuple(toks[end - len(p) : end]) == p for p in pats):
            n += 1
    return n


def triggered(
    config: RepeatTerminateConfig,
    generated_ids: Sequence[int],
    object_patterns: Iterable[Sequence[int]] | None = None,
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
        pats = list(object_patterns or ())
        if not pats:
            raise ValueError("max_object_keys is set but no object-opening patterns were given")
        if count_object_openings(ids, pats) >= cfg.max_object_keys:
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


# ----------------------------------------------------------------------------------------------- patterns

# Text before the "{" of an object opening in real CoordJSON (first object, later objects after either
# field order, with and without the space), and text after the key (desc: a string, bbox_2d: a list).
_LEFT_CONTEXTS = (
    '{"objects": [',
    '{"objects":[',
    "<|coord_7|>]}, ",
    "<|coord_7|>]},",
    '"red square"}, ',
    '"red square"},',
    "]}, ",
    '"}, ',
    "[",
    ", ",
)
_RIGHT_CONTEXTS = {
    "desc": ('": "red square", "bbox_2d": [', '":"red square"', '": "a'),
    "bbox_2d": ('": [<|coord_1|>, <|coord_2|>', '":[<|coord_1|>', '": [1'),
}


def _token_spans(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` and each token's character span in ``text``."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        spans = [tuple(s) for s in enc["offset_mapping"]]
        if len(ids) == len(spans) and all(b >= a for a, b in spans):
            return ids, spans  # type: ignore[return-value]
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    spans, prev = [], 0
    for i in range(len(ids)):
        cur = len(
            tokenizer.decode(ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        )
        spans.append((prev, cur))
        prev = cur
    return ids, spans


def derive_object_open_patterns(
    tokenizer: Any,
    keys: Sequence[str] = OBJECT_KEYS,
    left_contexts: Sequence[str] = _LEFT_CONTEXTS,
    right_contexts: Mapping[str, Sequence[str]] | None = None,
) -> tuple[tuple[int, ...], ...]:
    """Token sequences that open a CoordJSON object, as the tokenizer really encodes them.

    For every key (``desc`` for desc-first, ``bbox_2d`` for geometry-first objects), every left context
    (what precedes the ``{`` in real output) and every right context (what follows the key), encode the
    whole text and keep the tokens that overlap the characters of ``{"<key>``. BPE merges with
    neighbours (`` [{"``, ``}, {"``, ``desc":`` ...) therefore show up as their own variants.
    """
    rights = dict(_RIGHT_CONTEXTS)
    if right_contexts:
        rights.update(right_contexts)
    found: set[tuple[int, ...]] = set()
    for key in keys:
        opening = '{"' + key
        for left in left_contexts:
            for right in rights.get(key, ('"',)):
                text = left + opening + right
                start, end = len(left), len(left) + len(opening)
                ids, spans = _token_spans(tokenizer, text)
                cover = tuple(t for t, (a, b) in zip(ids, spans) if a < end and b > start)
                if not cover:
                    raise ValueError(f"could not locate {opening!r} in the encoding of {text!r}")
                found.add(cover)
    if not found:
        raise ValueError("no object-opening patterns derived")
    return tuple(sorted(found))
