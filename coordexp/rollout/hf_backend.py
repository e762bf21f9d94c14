"""In-process rollouts: the HF ``model.generate`` implementation of the RolloutBackend interface, with the
repeat-terminate HF guard attached (:mod:`coordexp.rollout.hf_guard`)."""

from __future__ import annotations

import time
from typing import Any

import torch

from coordexp.config.contract import RolloutContract
from coordexp.models.prompts import concat_vision
from coordexp.rollout.batch import Rollout, RolloutBatch, cut_at_stop, hit_max_new_tokens
from coordexp.rollout.hf_guard import build_hf_guard

__all__ = ["HFRolloutBackend"]


class HFRolloutBackend:
    """In-process `model.generate` (left-padded micro-batches) with the repeat-terminate HF guard."""

    def __init__(self, model_getter, tokenizer, contract: RolloutContract, image_token_id: int | None = None):
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
            result.append(Rollout(ids, gen, flags[row] if flags else 0,
                                  hit_max_new_tokens(gen, self.stop_ids, c.max_new_tokens)))
        return result
