"""Rollout batch types and the one entry every rollout goes through.

A backend (in-process HF ``generate``, the ``swift rollout`` server) takes prompt token ids plus the chat
messages they came from, decodes in micro-batches of ``decode_batch_size`` (the single rollout batching knob,
train and eval alike), and returns the generated ids with each sequence's repeat-terminate flag.
:func:`generate_rollouts` calls the backend and checks that every rollout continued exactly the learner's
prompt (Channel B, in-training rollout evals and ``coordexp.eval`` alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from coordexp.errors import LearnerError

__all__ = [
    "PromptMismatchError",
    "Rollout",
    "RolloutBackend",
    "RolloutBatch",
    "check_same_prompt",
    "cut_at_stop",
    "generate_rollouts",
    "hit_max_new_tokens",
]


@dataclass
class Rollout:
    prompt_ids: list[int]
    token_ids: list[int]          # generated tokens, up to and including the first stop token
    triggered: int                # 1 if repeat-terminate forced EOS on this sequence
    hit_max_new_tokens: bool      # generation budget exhausted without a stop token


@dataclass
class RolloutBatch:
    rollouts: list[Rollout]
    seconds: float
    repeat_terminate_active: int  # 1 only when activation is proven for this backend
    decode_batch_sizes: list[int] = field(default_factory=list)


class RolloutBackend(Protocol):
    def generate(self, prompt_ids: Sequence[list[int]], messages: Sequence[list[dict[str, Any]]],
                 seed: int, vision: Sequence[dict[str, Any] | None] | None = None) -> RolloutBatch:
        """``vision``: per prompt, the image processor's tensors (``pixel_values``, ``image_grid_thw``) of a
        vision-language model, or None."""
        ...


class PromptMismatchError(LearnerError):
    """A rollout's prompt ids differ from the learner's: nothing may be trained or scored on it."""


def generate_rollouts(backend: RolloutBackend, samples: Sequence, prompts: Sequence,
                      seed: int) -> RolloutBatch:
    """Roll out encoded prompts (``coordexp.models.prompts.EncodedPrompt``) of ``samples``: in-process
    backends use the ids and vision inputs, a server renders the messages (image paths) itself. Raises
    :class:`PromptMismatchError` when a rollout did not continue the learner's prompt ids."""
    vision = [p.vision for p in prompts]
    batch = backend.generate([p.ids for p in prompts], [s.messages for s in samples], seed,
                             vision=vision if any(v is not None for v in vision) else None)
    for sample, prompt, rollout in zip(samples, prompts, batch.rollouts):
        check_same_prompt(sample, list(prompt.ids), list(rollout.prompt_ids))
    return batch


def check_same_prompt(sample, own: list[int], served: list[int]) -> None:
    if served == own:
        return
    first = next((k for k, (a, b) in enumerate(zip(own, served)) if a != b), min(len(own), len(served)))
    raise PromptMismatchError(
        f"sample {sample.source}: the rollout's prompt ({len(served)} tokens) differs from the learner's "
        f"({len(own)} tokens, image placeholders expanded) from token {first} on; the server's chat template "
        f"must render the prompt exactly as the learner does: same system turn, same image placeholders "
        f"(ms-swift --template; docs/vlm.md)")


def cut_at_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """``tokens`` up to and including the first stop id (all of them when none occurs)."""
    out: list[int] = []
    for t in tokens:
        out.append(int(t))
        if t in stop_ids:
            break
    return out


def hit_max_new_tokens(generated: Sequence[int], stop_ids: Sequence[int], max_new_tokens: int,
                       length_finish: bool = False) -> bool:
    """The generation budget ran out: no stop id at the end, and either ``max_new_tokens`` tokens were
    generated or the backend reported a length finish (e.g. vLLM's ``finish_reason == "length"`` when the
    context limit came first)."""
    stopped = bool(generated) and generated[-1] in stop_ids
    return not stopped and (len(generated) >= max_new_tokens or length_finish)
