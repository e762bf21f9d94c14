"""HF backend of repeat-aware termination: a batch-aware transformers ``LogitsProcessor``.

Pass it to ``model.generate(..., logits_processor=LogitsProcessorList([guard]))``. For every row it keeps a
:class:`~coordexp.repeat_rules.SequenceState` fed with that row's generated tokens only (the prompt,
left padding included, is everything before the first call's length), and before each sampled token it
sets an offending row's scores to ``-inf`` except the EOS/stop id(s) (``0.0``). Other rows are untouched.

After ``generate`` returns, :meth:`RepeatTerminateGuard.triggered_flags` says which rows were forced
(``1``) - a real record of what the guard did, not a post-hoc guess. A row stops being tracked once it
has produced a stop id (after that ``generate`` only appends padding to it).

Greedy and sampling decoding only: beam search reorders rows between steps, which this guard does not
follow.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import LogitsProcessor

from coordexp.repeat_rules import (
    ObjectOpenMatcher,
    RepeatTerminateConfig,
    SequenceState,
    object_open_matcher,
    parse_config,
)
from coordexp.rollout.force_eos import force_eos_rows
from coordexp.rollout.scoring import stop_ids_of

__all__ = ["RepeatTerminateGuard", "build_hf_guard"]


class RepeatTerminateGuard(LogitsProcessor):
    """Forces EOS per row when a repeat-terminate rule fires; records which rows it forced.

    Args:
        config: the ``repeat_terminate`` settings (dataclass or mapping).
        stop_ids: EOS/stop token id(s); forced rows may only produce these.
        matcher: the record-start counter of the tokenizer (needed when ``max_object_keys`` is set);
            see :func:`~coordexp.repeat_rules.object_open_matcher`.
        prompt_length: padded prompt length (``input_ids.shape[1]`` given to ``generate``). Default:
            the sequence length seen at the first call, which is the prompt length for ``generate``.

    One instance serves one ``generate`` call; :meth:`reset` makes it reusable.
    """

    def __init__(
        self,
        config: RepeatTerminateConfig,
        stop_ids: Iterable[int],
        matcher: ObjectOpenMatcher | None = None,
        prompt_length: int | None = None,
    ):
        self.config = parse_config(config)
        self.stop_ids = tuple(sorted({int(i) for i in stop_ids}))
        if not self.stop_ids or min(self.stop_ids) < 0:
            raise ValueError(f"stop_ids must be non-empty non-negative token ids, got {stop_ids!r}")
        self.matcher = matcher
        if self.config.enabled and self.config.max_object_keys is not None and matcher is None:
            raise ValueError("max_object_keys is set but no object-opening matcher was given")
        self._prompt_length_arg = prompt_length
        self.reset()

    def reset(self) -> None:
        self.prompt_length: int | None = self._prompt_length_arg
        self._states: list[SequenceState] = []
        self._consumed = 0
        self._done: list[bool] = []
        self._forced: list[int] = []

    def _init_rows(self, batch: int, seq_len: int) -> None:
        if self.prompt_length is None:
            self.prompt_length = seq_len
        if seq_len < self.prompt_length:
            raise ValueError(
                f"input_ids has {seq_len} columns, fewer than prompt_length={self.prompt_length}"
            )
        self._states = [SequenceState(self.config, self.matcher) for _ in range(batch)]
        self._done = [False] * batch
        self._forced = [0] * batch
        self._consumed = self.prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch, seq_len = input_ids.shape
        if not self._states:
            self._init_rows(batch, seq_len)
        elif batch != len(self._states):
            raise ValueError(
                f"batch size changed from {len(self._states)} to {batch} between calls "
                "(beam search or a reused guard?); call reset() between generate calls"
            )
        if not self.config.enabled:
            return scores
        if seq_len > self._consumed:
            new = input_ids[:, self._consumed : seq_len].tolist()
            stop = self.stop_ids
            for row, toks in enumerate(new):
                if self._done[row]:
                    continue
                st = self._states[row]
                for t in toks:
                    if t in stop:
                        self._done[row] = True
                        break
                    st.push(t)
            self._consumed = seq_len
        rows = [r for r, st in enumerate(self._states) if not self._done[r] and st.fired]
        if rows:
            for r in rows:
                self._forced[r] = 1
            force_eos_rows(scores, rows, self.stop_ids)
        return scores

    def triggered_flags(self) -> list[int]:
        """Per row of the last ``generate`` call: 1 if the guard forced EOS on it, else 0."""
        return list(self._forced)


def build_hf_guard(
    config: RepeatTerminateConfig,
    tokenizer,
    prompt_length: int | None = None,
    stop_ids: Iterable[int] | None = None,
) -> RepeatTerminateGuard:
    """A guard wired to ``tokenizer``: forced rows may emit any id of the checkpoint's stop-token set
    (``scoring.stop_ids_of``, unless given), its record-start counter (only when ``max_object_keys`` is
    set)."""
    cfg = parse_config(config)
    if stop_ids is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id; pass stop_ids explicitly")
        stop_ids = stop_ids_of(tokenizer)
    matcher = object_open_matcher(tokenizer) if cfg.max_object_keys is not None else None
    return RepeatTerminateGuard(cfg, stop_ids=stop_ids, matcher=matcher, prompt_length=prompt_length)
