"""Rollouts from the ``swift rollout`` server(s): the server implementation of the RolloutBackend interface.

``ServerRolloutBackend.generate(prompt_ids, messages, seed)`` sends the chat messages (the server renders the
prompt with the model's chat template) through :class:`~coordexp.rollout.server_client.RolloutClient` and
returns a :class:`~coordexp.rollout.batch.RolloutBatch`:

* ``Rollout.prompt_ids`` are the server's ``prompt_token_ids``; ``generate_rollouts`` compares them with the
  learner's own prompt ids and fails the step (or the eval) when they differ;
* ``Rollout.token_ids``: generated ids up to and including the first stop (EOS) token;
* ``Rollout.triggered``: the server's ``coordexp.repeat_terminate_triggered`` field only (never the finish
  reason); the client fails when the field is missing while the feature is enabled;
* ``Rollout.hit_max_new_tokens``: the budget ran out without a stop token (``finish_reason == "length"``);
* requests are seeded per rank (the trainer's seed mixes in the rank) and per position (``seed + i``);
* ``repeat_terminate_active`` is 1 only after the activation probe (:mod:`coordexp.rollout.probe`) passed
  against every server **from this learner process**, at first use. The orchestrator probes at server start
  too (fail fast before the learner is built), but the learner does not trust a claim it cannot check: the
  server may have been replaced since, or the learner may run on its own against ``reuse_existing`` servers.
  The probe is two short requests per server per process (about 0.1 s on the tiny CPU model).

The backend only talks to the servers. Weight sync is the learner's job: the Stage-2 trainer pushes its
weights (:class:`~coordexp.trainer.weight_sync.WeightSync`) before it asks for rollouts.

With several servers, :meth:`ServerRolloutBackend.log_request_counts` (the learner calls it when training
ends, also on failure) writes one line per rank to the console and the run's ``train.log``:
``[coordexp rollout] rank R: requests per rollout server: <url>=<n>, ...`` - the requests each server
answered (a run-log line, not a metric: metric names are a fixed registry, server URLs are not).

Server failures become :class:`ServerBackendError` (a ``LearnerError``: printed without a traceback, exit 2)
naming the server, the call and the cause.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coordexp.checkpoint import read_generation_config
from coordexp.config.contract import RolloutContract
from coordexp.errors import LearnerError
from coordexp.rollout.batch import (
    Rollout,
    RolloutBatch,
    cut_at_stop,
    decoding_settings,
    hit_max_new_tokens,
    log_ignored_checkpoint_defaults,
)
from coordexp.rollout.probe import ProbeError, run_probe
from coordexp.rollout.server_client import (
    DEFAULT_STOP,
    DecodeParams,
    InferRequest,
    RolloutClient,
    RolloutResult,
    RolloutServerError,
)
from coordexp.telemetry.record import say

__all__ = ["ServerBackendError", "ServerRolloutBackend", "relative_image_paths"]


class ServerBackendError(LearnerError):
    """The rollout server failed, answered garbage, or a weight sync failed (the message says which)."""


def relative_image_paths(messages: Sequence[dict[str, Any]], image_root: str) -> list[dict[str, Any]]:
    """The messages with image paths under ``image_root`` made relative to it: the server resolves them
    against its ROOT_IMAGE_DIR (``vllm.server.image_root``, or the same folder on a shared filesystem)."""
    root = Path(image_root)
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{**part, "image": _relative(part["image"], root)} if part.get("type") == "image"
                       else part for part in content]
        out.append({**message, "content": content})
    return out


def _relative(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:  # outside the root (e.g. a val split elsewhere): absolute, for a shared filesystem
        return str(path)


class ServerRolloutBackend:
    def __init__(self, contract: RolloutContract, stop_ids: Sequence[int], *,
                 client: RolloutClient | None = None, checkpoint_dir: str | None = None,
                 stop_words: Sequence[str] | None = None):
        """``stop_ids``: the checkpoint's stop-token set (``scoring.stop_ids_of``); ``stop_words``: the same
        tokens as text, sent as the request's ``stop`` (ms-swift turns a one-token stop word into a stop id);
        ``checkpoint_dir``: the served checkpoint, to log which of its generation_config decoding defaults the
        requests override."""
        if contract.backend != "vllm" or not contract.server_base_urls:
            raise ServerBackendError(
                "ServerRolloutBackend needs rollout_matching.rollout_backend=vllm and vllm.server.base_urls"
            )
        self.contract = contract
        self.stop_ids = [int(i) for i in stop_ids]
        self.checkpoint_dir = checkpoint_dir
        self.stop_words = tuple(stop_words) if stop_words else DEFAULT_STOP
        self.client = client or RolloutClient(
            list(contract.server_base_urls),
            decode_batch_size=contract.decode_batch_size,
            repeat_terminate_enabled=contract.repeat_terminate.enabled,
            infer_timeout_s=contract.infer_timeout_s,
            request_timeout_s=contract.request_timeout_s,
        )
        self._active: int | None = None  # repeat_terminate_active, once the probe decided it

    def log_request_counts(self) -> str:
        """Print (and return) this rank's per-server request counts (see the module docstring)."""
        line = (f"[coordexp rollout] rank {os.environ.get('RANK', '0')}: requests per rollout server: "
                f"{self.client.counts_line()}")
        say(line)
        return line

    def _ensure_active(self) -> int:
        if self._active is not None:
            return self._active
        if not self.contract.repeat_terminate.enabled:
            self._active = 0
            return 0
        eos = tuple(self.stop_ids) or None  # the forced token may be any stop id
        for url in self.client.base_urls:
            try:
                run_probe(url, timeout_s=self.contract.infer_timeout_s, eos_token_id=eos)
            except ProbeError as exc:
                raise ServerBackendError(
                    f"repeat-terminate is enabled but not proven active on {url}: {exc}"
                ) from None
        self._active = 1
        return 1

    def _to_rollout(self, r: RolloutResult) -> Rollout:
        gen = cut_at_stop(r.token_ids, self.stop_ids)
        return Rollout(
            prompt_ids=list(r.prompt_token_ids),
            token_ids=gen,
            triggered=int(r.repeat_terminate_triggered or 0),
            hit_max_new_tokens=hit_max_new_tokens(gen, self.stop_ids, self.contract.max_new_tokens,
                                                  length_finish=r.finish_reason == "length"),
        )

    def decode_params(self, seed: int | None) -> DecodeParams:
        """Every sampling field of the request, from ``rollout_matching.*`` alone: ms-swift fills a field a
        request leaves unset from the checkpoint's generation_config (and vLLM would, too), so none is left
        unset. The request's stop words are the stop-token set (vLLM also adds the generation_config's EOS
        list to every request)."""
        s = decoding_settings(self.contract)
        if self.checkpoint_dir:
            log_ignored_checkpoint_defaults("server", read_generation_config(self.checkpoint_dir), s)
        return DecodeParams(max_tokens=s["max_new_tokens"], temperature=s["temperature"], top_p=s["top_p"],
                            top_k=s["top_k"] if s["top_k"] > 0 else -1, min_p=s["min_p"],
                            repetition_penalty=s["repetition_penalty"], seed=seed, stop=self.stop_words)

    def generate(
        self, prompt_ids: Sequence[list[int]], messages: Sequence[list[dict[str, Any]]], seed: int,
        vision=None
    ) -> RolloutBatch:
        """``vision`` (the learner's pixel inputs) is not sent: the server loads the images named in the
        messages itself, relative to its ROOT_IMAGE_DIR."""
        try:
            active = self._ensure_active()
            start = time.perf_counter()
            if not messages:
                return RolloutBatch([], 0.0, active, [])
            c = self.contract
            params = self.decode_params(seed)
            reqs = [InferRequest(messages=relative_image_paths(m, c.image_root)) for m in messages]
            sizes = [b - a for _, a, b in self.client.plan(len(reqs))]
            results = self.client.infer(reqs, params)
        except RolloutServerError as exc:
            raise ServerBackendError(f"rollout server failure: {exc}") from None
        rollouts = [self._to_rollout(r) for r in results]
        return RolloutBatch(rollouts, time.perf_counter() - start, active, sizes)
