"""Rollout backends behind one interface: in-process HF generate, or the `swift rollout` server.

Both take prompt token ids plus the chat messages they came from, decode in micro-batches of
``decode_batch_size`` (the single rollout batching knob, train and eval alike), and return the
generated token ids with the repeat-terminate flag of each sequence.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from coordexp.config.contract import RolloutContract
from coordexp.trainer.learner import LearnerError
from coordexp.trainer.prompts import concat_vision


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
                 seed: int, vision: Sequence[dict[str, torch.Tensor] | None] | None = None
                 ) -> RolloutBatch: ...


class PromptMismatchError(LearnerError):
    """A rollout's prompt ids differ from the learner's: nothing may be trained or scored on it."""


def generate_rollouts(backend: RolloutBackend, samples: Sequence, prompts: Sequence,
                      seed: int) -> RolloutBatch:
    """Roll out encoded prompts (``coordexp.trainer.prompts.EncodedPrompt``) of ``samples``: in-process
    backends use the ids and vision inputs, a server renders the messages (image paths) itself. Every
    rollout must come back with the learner's prompt ids (Channel B, in-training and offline eval alike)."""
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
    out: list[int] = []
    for t in tokens:
        out.append(int(t))
        if t in stop_ids:
            break
    return out


class HFRolloutBackend:
    """In-process `model.generate` (left-padded micro-batches) with the repeat-terminate HF guard."""

    def __init__(self, model_getter, tokenizer, contract: RolloutContract, image_token_id: int | None = None):
        from coordexp.rollout.hf_guard import build_hf_guard

        self._model_getter = model_getter   # returns the unwrapped model (DDP wraps it after init)
        self.tokenizer = tokenizer
        self.contract = contract
        self.image_token_id = image_token_id
        self.stop_ids = [tokenizer.eos_token_id]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._guard_factory = lambda: build_hf_guard(contract.repeat_terminate, tokenizer,
                                                     stop_ids=self.stop_ids)

    @torch.no_grad()
    def generate(self, prompt_ids, messages, seed: int, vision=None) -> RolloutBatch:
        model = self._model_getter()
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        rollouts: list[Rollout] = []
        sizes: list[int] = []
        dbs = self.contract.decode_batch_size
        try:
            for chunk_start in range(0, len(prompt_ids), dbs):
                chunk = [list(p) for p in prompt_ids[chunk_start: chunk_start + dbs]]
                chunk_vision = (vision[chunk_start: chunk_start + dbs] if vision is not None
                                else [None] * len(chunk))
                sizes.append(len(chunk))
                rollouts += self._generate_chunk(model, chunk, chunk_vision, seed + chunk_start)
        finally:
            model.train(was_training)
        active = int(self.contract.repeat_terminate.enabled)  # the guard is in-process: attached == enabled
        return RolloutBatch(rollouts, time.perf_counter() - start, active, sizes)

    def _generate_chunk(self, model, chunk: list[list[int]], vision, seed: int) -> list[Rollout]:
        width = max(len(p) for p in chunk)
        device = next(model.parameters()).device
        input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long, device=device)
        attention = torch.zeros_like(input_ids)
        for row, ids in enumerate(chunk):
            input_ids[row, width - len(ids):] = torch.tensor(ids, device=device)
            attention[row, width - len(ids):] = 1
        model_inputs = {k: v.to(device)
                        for k, v in concat_vision(vision, self.image_token_id, input_ids).items()}
        guard = self._guard_factory()
        c = self.contract
        sampling = c.temperature > 0
        kwargs: dict[str, Any] = {"do_sample": sampling}
        if sampling:
            kwargs.update(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k if c.top_k > 0 else None)
            torch.manual_seed(seed)
        out = model.generate(
            input_ids=input_ids, attention_mask=attention, max_new_tokens=c.max_new_tokens,
            logits_processor=[guard] if c.repeat_terminate.enabled else None,
            repetition_penalty=c.repetition_penalty, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
            **model_inputs, **kwargs)
        flags = guard.triggered_flags() if c.repeat_terminate.enabled else [0] * len(chunk)
        result = []
        for row, ids in enumerate(chunk):
            gen = cut_at_stop(out[row, width:].tolist(), self.stop_ids)
            hit_max = len(gen) >= c.max_new_tokens and gen[-1] not in self.stop_ids
            result.append(Rollout(ids, gen, flags[row] if flags else 0, hit_max))
        return result
