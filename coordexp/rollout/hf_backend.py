"""In-process rollouts: the HF ``model.generate`` implementation of the RolloutBackend interface, with the
repeat-terminate HF guard attached (:mod:`coordexp.rollout.hf_guard`).

Decoding comes from an explicit ``GenerationConfig`` built from ``rollout_matching.*`` alone
(:func:`~coordexp.rollout.batch.decoding_settings`) with the checkpoint's stop-token set as ``eos_token_id``.
The checkpoint's own generation_config plays no part: ``generate`` fills every field a config leaves unset
from ``model.generation_config``, so that is swapped for an empty one during the call (a checkpoint saying
``num_beams: 2`` or ``do_sample: true`` would otherwise switch rollouts to beam search or sampling). What
was ignored is logged once."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from transformers import GenerationConfig

from coordexp.config.contract import RolloutContract
from coordexp.models.prompts import concat_vision
from coordexp.rollout.batch import (
    Rollout,
    RolloutBatch,
    cut_at_stop,
    decoding_settings,
    hit_max_new_tokens,
    log_ignored_checkpoint_defaults,
)
from coordexp.rollout.hf_guard import build_hf_guard
from coordexp.rollout.scoring import stop_ids_of

__all__ = ["HFRolloutBackend"]


class HFRolloutBackend:
    """In-process `model.generate` (left-padded micro-batches) with the repeat-terminate HF guard."""

    def __init__(self, model_getter, tokenizer, contract: RolloutContract, image_token_id: int | None = None):
        self._model_getter = model_getter   # returns the unwrapped model (DDP wraps it after init)
        self.tokenizer = tokenizer
        self.contract = contract
        self.image_token_id = image_token_id
        self.stop_ids = list(stop_ids_of(tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._guard_factory = lambda: build_hf_guard(contract.repeat_terminate, tokenizer,
                                                     stop_ids=self.stop_ids)

    def generation_config(self) -> GenerationConfig:
        """The explicit decoding config of every rollout: ``rollout_matching.*`` and the stop-token set."""
        s = decoding_settings(self.contract)
        kwargs = {"max_new_tokens": s["max_new_tokens"], "do_sample": s["do_sample"], "num_beams": 1,
                  "num_return_sequences": 1, "repetition_penalty": s["repetition_penalty"],
                  "eos_token_id": list(self.stop_ids), "pad_token_id": self.pad_id}
        if s["do_sample"]:  # top_k 0 = off (transformers); min_p unset = off
            kwargs.update(temperature=s["temperature"], top_p=s["top_p"], top_k=max(s["top_k"], 0))
        return GenerationConfig(**kwargs)

    @torch.no_grad()
    def generate(self, prompt_ids, messages, seed: int, vision=None) -> RolloutBatch:
        model = self._model_getter()
        log_ignored_checkpoint_defaults("hf", model.generation_config.to_diff_dict(),
                                        decoding_settings(self.contract))
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
        config = self.generation_config()
        if config.do_sample:
            torch.manual_seed(seed)
        with _without_checkpoint_defaults(model):
            out = model.generate(
                input_ids=input_ids, attention_mask=attention, generation_config=config,
                logits_processor=[guard] if c.repeat_terminate.enabled else None, **model_inputs)
        flags = guard.triggered_flags() if c.repeat_terminate.enabled else [0] * len(chunk)
        result = []
        for row, ids in enumerate(chunk):
            gen = cut_at_stop(out[row, width:].tolist(), self.stop_ids)
            result.append(Rollout(ids, gen, flags[row] if flags else 0,
                                  hit_max_new_tokens(gen, self.stop_ids, c.max_new_tokens)))
        return result


@contextlib.contextmanager
def _without_checkpoint_defaults(model) -> Iterator[None]:
    """``model.generation_config`` is an empty config for the duration: ``generate`` takes what the explicit
    config leaves unset from it, and must take nothing from the checkpoint."""
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved
