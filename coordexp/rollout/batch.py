"""Rollout batch types and the one entry every rollout goes through.

A backend (in-process HF ``generate``, the ``swift rollout`` server) takes prompt token ids plus the chat
messages they came from, decodes in micro-batches of ``decode_batch_size`` (the single rollout batching knob,
train and eval alike), and returns the generated ids with each sequence's repeat-terminate flag.
:func:`generate_rollouts` calls the backend and checks that every rollout continued exactly the learner's
prompt (Channel B, in-training rollout evals and ``coordexp.eval`` alike).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
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
    "decoding_settings",
    "generate_rollouts",
    "hit_max_new_tokens",
    "ignored_checkpoint_defaults",
    "log_ignored_checkpoint_defaults",
]

log = logging.getLogger("coordexp.rollout")

#: generation_config.json keys that are not decoding settings: token ids (the stop set takes the EOS list,
#: checkpoint.read_stop_ids) and bookkeeping.
_NOT_DECODING = frozenset({"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
                           "transformers_version", "_from_model_config"})
_logged: set[str] = set()


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


def decoding_settings(contract) -> dict[str, Any]:
    """Every sampling and beam setting of a rollout, from ``rollout_matching.*`` alone (HF names; a server
    request sends each of them, so nothing is left for the checkpoint's generation_config to fill in).
    ``top_k <= 0`` and ``min_p = 0`` are off; one beam; greedy when ``temperature == 0``."""
    return {"max_new_tokens": int(contract.max_new_tokens), "do_sample": contract.temperature > 0,
            "num_beams": 1, "temperature": float(contract.temperature), "top_p": float(contract.top_p),
            "top_k": int(contract.top_k), "min_p": 0.0,
            "repetition_penalty": float(contract.repetition_penalty)}


def ignored_checkpoint_defaults(checkpoint_config: Mapping[str, Any], settings: Mapping[str, Any]
                                ) -> dict[str, Any]:
    """The decoding defaults of a checkpoint's generation_config that rollouts ignore: every key but token
    ids whose value is not the one the rollout uses (``settings``, :func:`decoding_settings`)."""
    missing = object()
    return {k: v for k, v in checkpoint_config.items()
            if k not in _NOT_DECODING and settings.get(k, missing) != v}


def log_ignored_checkpoint_defaults(backend: str, checkpoint_config: Mapping[str, Any],
                                    settings: Mapping[str, Any]) -> dict[str, Any]:
    """Log, once per process and backend, which checkpoint decoding defaults are ignored; returns them."""
    ignored = ignored_checkpoint_defaults(checkpoint_config, settings)
    if ignored and backend not in _logged:
        _logged.add(backend)
        log.warning("coordexp rollouts (%s): ignoring the checkpoint's generation_config decoding defaults "
                    "%s; rollouts decode with rollout_matching.* only: %s", backend,
                    ", ".join(f"{k}={v!r}" for k, v in sorted(ignored.items())), dict(settings))
    return ignored
