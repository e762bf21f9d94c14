"""Startup probe: prove that repeat-aware termination is *active* on a rollout server, not just wired.

One ``/infer/`` batch of two requests with the same prompt and sampling settings:

* request 0 carries per-request thresholds that must fire for any model: ``min_new_tokens=1`` and
  ``max_consecutive_token_repeats=1`` (after one generated token the trailing run has length 1, so the
  rule holds before the second token whatever the first one was). Expected: generation ends with the
  forced EOS as the 2nd token (``finish_reason == "stop"``, 2 completion tokens, last token EOS when the
  EOS id is known) and ``coordexp.repeat_terminate_triggered == 1``;
* request 1 is the control, ``{"enabled": false}`` for that request only. Expected: flag 0 and not
  shaped like a forced stop (it runs on, typically to ``max_tokens``).

The only way request 0 can escape the rule is a model that emits EOS as its very first token; that outcome
is inconclusive and retried with another seed (up to ``attempts`` times). Anything else that does not
match raises :class:`ProbeError` with what came back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

from coordexp.protocol import XARGS_KEY
from coordexp.rollout.server_client import (
    DecodeParams,
    InferRequest,
    RolloutResult,
    RolloutServerError,
    build_infer_payload,
    parse_infer_response,
    post_infer,
)

__all__ = ["PROBE_CONTROL", "PROBE_TRIGGER", "ProbeError", "ProbeReport", "check_probe_results", "run_probe"]

PROBE_TRIGGER = {
    "enabled": True,
    "min_new_tokens": 1,
    "max_consecutive_token_repeats": 1,
    "ngram_size": 0,
    "ngram_repeats": 0,
    "max_object_keys": None,
}
PROBE_CONTROL = {"enabled": False}
PROBE_MESSAGES = ({"role": "user", "content": "Detect every object and answer in CoordJSON."},)


class ProbeError(RolloutServerError):
    """The server does not demonstrably force EOS with the repeat-terminate processor."""


@dataclass(frozen=True)
class ProbeReport:
    base_url: str
    attempts: int
    seconds: float
    trigger: RolloutResult
    control: RolloutResult


def _describe(r: RolloutResult) -> str:
    return (
        f"finish_reason={r.finish_reason!r} completion_tokens={len(r.token_ids)} "
        f"last_token={r.token_ids[-1] if r.token_ids else None} "
        f"repeat_terminate_triggered={r.repeat_terminate_triggered}"
    )


def check_probe_results(
    trigger: RolloutResult, control: RolloutResult, max_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
) -> str | None:
    """None if the pair proves activation, ``"inconclusive"`` if request 0 stopped by itself at its first
    token, else the reason it does not. ``eos_token_id``: the checkpoint's stop-token set (or one id); the
    forced token may be any of them."""
    stops = None if eos_token_id is None else (
        {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(i) for i in eos_token_id})
    if trigger.repeat_terminate_triggered is None or control.repeat_terminate_triggered is None:
        return "the response has no coordexp.repeat_terminate_triggered field (plugin not active)"
    if (
        len(trigger.token_ids) == 1
        and trigger.finish_reason == "stop"
        and trigger.repeat_terminate_triggered == 0
    ):
        return "inconclusive"
    problems = []
    if trigger.repeat_terminate_triggered != 1:
        problems.append("request 0 (must trigger) came back with repeat_terminate_triggered=0")
    if len(trigger.token_ids) != 2 or trigger.finish_reason != "stop":
        problems.append(
            f"request 0 should stop with the forced EOS as its 2nd token, got {_describe(trigger)}"
        )
    if stops is not None and trigger.token_ids and trigger.token_ids[-1] not in stops:
        problems.append(f"request 0's last token is {trigger.token_ids[-1]}, not a stop id {sorted(stops)}")
    if control.repeat_terminate_triggered != 0:
        problems.append("request 1 (feature off for it) came back with repeat_terminate_triggered=1")
    if (
        len(control.token_ids) == 2
        and control.finish_reason == "stop"
        and max_tokens > 2
        and (stops is None or control.token_ids[-1] in stops)
    ):
        problems.append(f"request 1 (control) looks force-stopped too: {_describe(control)}")
    return "; ".join(problems) or None


def run_probe(
    base_url: str,
    *,
    timeout_s: float = 120.0,
    max_tokens: int = 16,
    eos_token_id: int | Sequence[int] | None = None,
    attempts: int = 3,
    seed: int = 1234,
    messages: Sequence[dict] = PROBE_MESSAGES,
    api_key: str | None = None,
) -> ProbeReport:
    """Run the probe against one server; returns the report or raises :class:`ProbeError`. ``api_key``:
    the server's (default: ``COORDEXP_SERVER_API_KEY`` from the environment)."""
    t0 = time.monotonic()
    params = DecodeParams(max_tokens=max_tokens, temperature=1.0, top_p=1.0, top_k=-1, seed=seed)
    reqs = [
        InferRequest(messages=list(messages), vllm_xargs={XARGS_KEY: PROBE_TRIGGER}),
        InferRequest(messages=list(messages), vllm_xargs={XARGS_KEY: PROBE_CONTROL}),
    ]
    last: list[RolloutResult] = []
    for attempt in range(1, attempts + 1):
        payload = build_infer_payload(reqs, params, seed + 1000 * attempt)
        try:
            body = post_infer(base_url, payload, timeout_s, api_key=api_key)
            results = parse_infer_response(body, 2, require_flag=True, base_url=base_url)
        except RolloutServerError as exc:
            raise ProbeError(f"repeat-terminate startup probe against {base_url} failed: {exc}") from None
        last = results
        verdict = check_probe_results(results[0], results[1], max_tokens, eos_token_id)
        if verdict is None:
            return ProbeReport(base_url, attempt, time.monotonic() - t0, results[0], results[1])
        if verdict != "inconclusive":
            raise ProbeError(
                f"repeat-terminate startup probe against {base_url}: the logits processor is not active: "
                f"{verdict}. Request 0 carried vllm_xargs {json.dumps({XARGS_KEY: PROBE_TRIGGER})}; "
                f"got request 0: {_describe(results[0])}; request 1: {_describe(results[1])}"
            )
    raise ProbeError(
        f"repeat-terminate startup probe against {base_url}: request 0 ended by itself at its first "
        f"token in all {attempts} attempts (the model emits EOS immediately), so activation "
        f"could not be shown; last: {_describe(last[0]) if last else 'nothing'}"
    )
