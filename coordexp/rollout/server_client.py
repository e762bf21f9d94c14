"""Learner-side client of the ``swift rollout`` server.

Routes: ``POST /infer/``, ``GET /health/``, ``GET /get_world_size/``.

Only ``requests`` is needed (no torch). One :class:`RolloutClient` serves every server in
``vllm.server.base_urls``:

* requests are split over the servers in contiguous chunks weighted by each server's ``/get_world_size/``
  (its data-parallel engines), and each server receives micro-batches of at most
  ``decode_batch_size * world_size`` requests per ``/infer/`` call; servers are called in parallel;
* every call has a timeout (connect ``min(10, t)``, read ``t``); a failed call (connection error, timeout,
  HTTP 5xx) is retried **once** on a fresh connection, then a :class:`RolloutServerError` names the server,
  the call and the cause. HTTP 4xx and malformed bodies fail at once;
* every ``/infer/`` call asks for the coordexp plugin's wrapper with the header
  ``X-Coordexp-Response: wrapped`` (``protocol.WRAPPER_HEADER``; clients that do not ask get ms-swift's plain
  shape); a response must be a list with one item per request; each item is either the wrapper
  ``{"response": <RolloutOutput>, "coordexp": {"repeat_terminate_triggered": 0|1}}`` or, from a server
  without the plugin, a bare ``RolloutOutput``. The trigger flag is read from the ``coordexp`` field only
  (never from ``finish_reason``); when repeat-terminate is enabled a missing field is an error naming it;
* every call (``/health/`` too) carries the API key as ``Authorization: Bearer <key>`` (ms-swift's
  ``--api_key`` check) when one is given or set in :data:`~coordexp.protocol.ENV_SERVER_API_KEY`; an HTTP
  401 names that variable;
* the payload carries messages, sampling settings and (optionally, per request) ``data_dict.vllm_xargs``;
  it never carries logits processors (those are registered once at server start).

Why one module (> 400 lines): the request payload, the response validation and the per-server chunk
planning are one wire contract with ms-swift's ``/infer/``; split, each half would restate the other's shapes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import requests

from coordexp.protocol import (
    ENV_ENABLE,
    ENV_SERVER_API_KEY,
    FLAG_KEY,
    IDENTITY_ROUTE,
    RESPONSE_KEY,
    WRAPPER_HEADER,
    WRAPPER_VALUE,
    auth_headers,
)

__all__ = [
    "DecodeParams",
    "InferRequest",
    "MalformedResponseError",
    "RolloutClient",
    "RolloutResult",
    "RolloutServerError",
    "build_infer_payload",
    "check_health",
    "get_health",
    "get_identity",
    "get_world_size",
    "parse_infer_response",
    "post_infer",
    "split_weighted",
]

DEFAULT_STOP = ("<|im_end|>",)


class RolloutServerError(RuntimeError):
    """The rollout server could not be reached, failed, or answered something unusable."""


class MalformedResponseError(RolloutServerError):
    """The server answered, but the body does not have the expected shape (the message names the field)."""


@dataclass(frozen=True)
class InferRequest:
    """One rollout: chat messages (ending with the user turn), optional images (path/URL/base64), optional
    per-request vLLM extra args (``SamplingParams.extra_args``, e.g. repeat-terminate overrides)."""

    messages: Sequence[Mapping[str, Any]]
    images: Sequence[str] = ()
    vllm_xargs: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class DecodeParams:
    """Every sampling field of a request is sent (none left for the server to fill from the checkpoint's
    generation_config); top_k -1 and min_p 0 are off."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: Sequence[str] = DEFAULT_STOP
    logprobs: bool = False


@dataclass(frozen=True)
class RolloutResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    #: 0/1 from the server's ``coordexp`` field; None when the server sent no field (feature disabled).
    repeat_terminate_triggered: int | None
    base_url: str = field(default="", compare=False)


# ----------------------------------------------------------------------------------------------- payload


def build_infer_payload(reqs: Sequence[InferRequest], params: DecodeParams, seed: int | None) -> dict:
    """The ``/infer/`` body for one micro-batch (one shared request_config; per-request data in data_dict)."""
    infer_requests = []
    for r in reqs:
        item: dict[str, Any] = {"messages": [dict(m) for m in r.messages]}
        if r.images:
            item["images"] = list(r.images)
        if r.vllm_xargs:
            item["data_dict"] = {"vllm_xargs": json.loads(json.dumps(dict(r.vllm_xargs)))}
        infer_requests.append(item)
    request_config = {
        "n": 1,
        "max_tokens": int(params.max_tokens),
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
        "top_k": int(params.top_k),
        "min_p": float(params.min_p),
        "repetition_penalty": float(params.repetition_penalty),
        "presence_penalty": float(params.presence_penalty),
        "frequency_penalty": float(params.frequency_penalty),
        "num_beams": 1,
        "seed": None if seed is None else int(seed) & 0x7FFFFFFF,
        "stop": list(params.stop),
        "return_details": True,
        "logprobs": bool(params.logprobs),
        "stream": False,
    }
    return {"infer_requests": infer_requests, "request_config": request_config}


def _expect(cond: bool, where: str, what: str, got: Any) -> None:
    if not cond:
        text = repr(got)
        raise MalformedResponseError(f"malformed /infer/ response: {where} {what}, got {text[:300]}")


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def parse_infer_response(
    body: Any, n_expected: int, require_flag: bool, base_url: str = ""
) -> list[RolloutResult]:
    """Check and unpack a ``/infer/`` JSON body (see the module docstring for the accepted shapes)."""
    _expect(isinstance(body, list), "body", "must be a JSON list", body)
    _expect(
        len(body) == n_expected,
        "body",
        f"must have {n_expected} items (one per request)",
        f"{len(body)} items",
    )
    out = []
    for i, item in enumerate(body):
        where = f"item {i}"
        _expect(isinstance(item, dict), where, "must be an object", item)
        if item.get("object") == "error" or "error" in item and "response" not in item:
            raise RolloutServerError(f"/infer/ {where} is an error from the server: {json.dumps(item)[:500]}")
        flag: int | None = None
        if RESPONSE_KEY in item:
            cx = item[RESPONSE_KEY]
            _expect(
                isinstance(cx, dict) and FLAG_KEY in cx,
                f"{where}.{RESPONSE_KEY}",
                f"must be an object with '{FLAG_KEY}'",
                cx,
            )
            flag = cx[FLAG_KEY]
            _expect(
                isinstance(flag, int) and not isinstance(flag, bool) and flag in (0, 1),
                f"{where}.{RESPONSE_KEY}.{FLAG_KEY}",
                "must be 0 or 1",
                flag,
            )
            flag = int(flag)
            rollout = item.get("response")
            _expect(
                isinstance(rollout, dict), f"{where}.response", "must be an object (RolloutOutput)", rollout
            )
            where = f"{where}.response"
        else:
            if require_flag:
                raise MalformedResponseError(
                    f"/infer/ {where} has no '{RESPONSE_KEY}.{FLAG_KEY}' field although "
                    "rollout_matching.repeat_terminate.enabled is true: the server was started without the "
                    "coordexp plugin (swift rollout --external_plugins "
                    f"coordexp/rollout/server/swift_plugin.py with {ENV_ENABLE}=1)"
                )
            rollout = item
        chat = rollout.get("response")
        _expect(
            isinstance(chat, dict), f"{where}.response", "must be an object (ChatCompletionResponse)", chat
        )
        if chat.get("object") == "error":
            raise RolloutServerError(f"/infer/ {where} is an error from the server: {json.dumps(chat)[:500]}")
        choices = chat.get("choices")
        _expect(
            isinstance(choices, list) and len(choices) >= 1,
            f"{where}.response.choices",
            "must be a non-empty list",
            choices,
        )
        choice = choices[0]
        _expect(isinstance(choice, dict), f"{where}.response.choices[0]", "must be an object", choice)
        token_ids = choice.get("token_ids")
        _expect(
            _int_list(token_ids),
            f"{where}.response.choices[0].token_ids",
            "must be a list of ints (request_config.return_details=true)",
            token_ids,
        )
        message = choice.get("message")
        _expect(
            isinstance(message, dict) and isinstance(message.get("content"), str),
            f"{where}.response.choices[0].message.content",
            "must be a string",
            message,
        )
        prompt_ids = chat.get("prompt_token_ids")
        _expect(
            _int_list(prompt_ids) and len(prompt_ids) > 0,
            f"{where}.response.prompt_token_ids",
            "must be a non-empty list of ints",
            prompt_ids,
        )
        out.append(
            RolloutResult(
                prompt_token_ids=list(prompt_ids),
                token_ids=list(token_ids),
                text=message["content"],
                finish_reason=choice.get("finish_reason"),
                repeat_terminate_triggered=flag,
                base_url=base_url,
            )
        )
    return out


# ----------------------------------------------------------------------------------------------- HTTP


def _timeout(t: float) -> tuple[float, float]:
    return (min(10.0, float(t)), float(t))


def resolve_api_key(api_key: str | None = None) -> str | None:
    """``api_key``, else :data:`~coordexp.protocol.ENV_SERVER_API_KEY` from the environment, else None."""
    return api_key or os.environ.get(ENV_SERVER_API_KEY) or None


def _headers(api_key: str | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {**auth_headers(resolve_api_key(api_key)), **(extra or {})}


def _refused(url: str, r: requests.Response) -> str:
    """The message of a non-200 answer; a 401 says where the API key comes from."""
    msg = f"{url} returned HTTP {r.status_code}: {r.text[:300]}"
    if r.status_code == 401:
        msg += (f" (the server requires an API key: set {ENV_SERVER_API_KEY} to the key it was started with; "
                f"{'it is set but does not match' if resolve_api_key() else 'it is not set'})")
    return msg


def get_health(base_url: str, timeout_s: float = 5.0, session: requests.Session | None = None,
               api_key: str | None = None) -> dict:
    """``GET /health/`` body (raises RolloutServerError when unreachable or not 200)."""
    s = session or requests
    try:
        r = s.get(base_url.rstrip("/") + "/health/", timeout=_timeout(timeout_s), headers=_headers(api_key))
    except requests.RequestException as exc:
        raise RolloutServerError(f"GET {base_url}/health/ failed: {exc}") from None
    if r.status_code != 200:
        raise RolloutServerError(f"GET {base_url}/health/ returned HTTP {r.status_code}: {r.text[:300]}")
    try:
        return r.json()
    except ValueError:
        raise MalformedResponseError(f"GET {base_url}/health/ returned non-JSON: {r.text[:300]}") from None


def get_identity(base_url: str, timeout_s: float = 5.0, api_key: str | None = None) -> dict | None:
    """``GET /coordexp/identity/`` body (:data:`~coordexp.protocol.IDENTITY_ROUTE`); None when the server
    has no such route (not a coordexp server, or an older one). Raises RolloutServerError when unreachable,
    refused or malformed."""
    url = base_url.rstrip("/") + IDENTITY_ROUTE
    try:
        r = requests.get(url, timeout=_timeout(timeout_s), headers=_headers(api_key))
    except requests.RequestException as exc:
        raise RolloutServerError(f"GET {url} failed: {exc}") from None
    if r.status_code == 404:
        return None
    if r.status_code != 200:
        raise RolloutServerError(f"GET {_refused(url, r)}")
    try:
        body = r.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise MalformedResponseError(f"GET {url}: expected a JSON object, got {r.text[:300]}")
    return body


def check_health(base_url: str, timeout_s: float = 5.0, api_key: str | None = None) -> bool:
    try:
        get_health(base_url, timeout_s, api_key=api_key)
        return True
    except RolloutServerError:
        return False


def get_world_size(base_url: str, timeout_s: float = 30.0, session: requests.Session | None = None,
                   api_key: str | None = None) -> int:
    s = session or requests
    url = base_url.rstrip("/") + "/get_world_size/"
    try:
        r = s.get(url, timeout=_timeout(timeout_s), headers=_headers(api_key))
    except requests.RequestException as exc:
        raise RolloutServerError(f"GET {url} failed: {exc}") from None
    if r.status_code != 200:
        raise RolloutServerError(f"GET {_refused(url, r)}")
    try:
        ws = r.json()["world_size"]
    except (ValueError, KeyError, TypeError):
        raise MalformedResponseError(
            f'GET {url}: expected {{"world_size": int}}, got {r.text[:300]}'
        ) from None
    if not isinstance(ws, int) or isinstance(ws, bool) or ws < 1:
        raise MalformedResponseError(f"GET {url}: world_size must be an int >= 1, got {ws!r}")
    return ws


def post_infer(
    base_url: str,
    payload: dict,
    timeout_s: float,
    session_factory: Callable[[], requests.Session] = requests.Session,
    api_key: str | None = None,
) -> Any:
    """POST one ``/infer/`` body; one retry on a fresh session for transient failures; returns the JSON."""
    url = base_url.rstrip("/") + "/infer/"
    n = len(payload.get("infer_requests", ()))
    last: str | None = None
    for _attempt in (1, 2):
        session = session_factory()
        try:
            r = session.post(url, json=payload, timeout=_timeout(timeout_s),
                             headers=_headers(api_key, {WRAPPER_HEADER: WRAPPER_VALUE}))
        except requests.Timeout as exc:
            last = f"timed out after {timeout_s:g} s ({exc.__class__.__name__})"
            continue
        except requests.RequestException as exc:
            last = f"{exc.__class__.__name__}: {exc}"
            continue
        finally:
            with contextlib.suppress(Exception):
                session.close()
        if r.status_code >= 500:
            last = f"HTTP {r.status_code}: {r.text[:300]}"
            continue
        if r.status_code != 200:
            raise RolloutServerError(f"POST {_refused(url, r)} ({n} requests)")
        try:
            return r.json()
        except ValueError:
            raise MalformedResponseError(
                f"POST {url} returned a body that is not JSON: {r.text[:300]!r}"
            ) from None
    raise RolloutServerError(f"POST {url} ({n} requests) failed twice (one retry): {last}")


# ----------------------------------------------------------------------------------------------- client


def split_weighted(n: int, weights: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` chunks of ``range(n)``, one per weight, sizes proportional to the weights
    (largest remainders; deterministic)."""
    if not weights or any(w < 1 for w in weights):
        raise ValueError(f"weights must be positive, got {list(weights)}")
    total = sum(weights)
    exact = [n * w / total for w in weights]
    sizes = [math.floor(x) for x in exact]
    rest = n - sum(sizes)
    for i in sorted(range(len(weights)), key=lambda i: (-(exact[i] - sizes[i]), i))[:rest]:
        sizes[i] += 1
    out, start = [], 0
    for s in sizes:
        out.append((start, start + s))
        start += s
    return out


class RolloutClient:
    """Rollouts from one or more ``swift rollout`` servers (see the module docstring)."""

    def __init__(
        self,
        base_urls: Sequence[str],
        *,
        decode_batch_size: int,
        repeat_terminate_enabled: bool,
        infer_timeout_s: float = 120.0,
        request_timeout_s: float = 30.0,
        session_factory: Callable[[], requests.Session] = requests.Session,
        world_sizes: Sequence[int] | None = None,
        api_key: str | None = None,
    ):
        if not base_urls:
            raise ValueError("RolloutClient needs at least one base URL (vllm.server.base_urls)")
        if decode_batch_size < 1:
            raise ValueError(f"decode_batch_size must be >= 1, got {decode_batch_size}")
        self.base_urls = [u.rstrip("/") for u in base_urls]
        self.decode_batch_size = int(decode_batch_size)
        self.repeat_terminate_enabled = bool(repeat_terminate_enabled)
        self.infer_timeout_s = float(infer_timeout_s)
        self.request_timeout_s = float(request_timeout_s)
        self.session_factory = session_factory
        self._world_sizes = list(world_sizes) if world_sizes is not None else None
        self.api_key = resolve_api_key(api_key)
        self._lock = threading.Lock()
        #: requests each server answered (``/infer/`` items), by base URL: how the load was split
        self.request_counts: dict[str, int] = dict.fromkeys(self.base_urls, 0)

    @classmethod
    def from_config(cls, cfg: Any, **kwargs: Any) -> RolloutClient:
        """From a ``TrainConfig`` (``vllm.server.*`` and ``rollout_matching.*``)."""
        server = cfg.vllm.server
        rm = cfg.rollout_matching
        return cls(
            list(server.base_urls),
            decode_batch_size=rm.decode_batch_size,
            repeat_terminate_enabled=rm.repeat_terminate.enabled,
            infer_timeout_s=server.infer_timeout_s,
            request_timeout_s=server.request_timeout_s,
            **kwargs,
        )

    def world_sizes(self) -> list[int]:
        with self._lock:
            if self._world_sizes is None:
                self._world_sizes = [get_world_size(u, self.request_timeout_s, api_key=self.api_key)
                                     for u in self.base_urls]
            return list(self._world_sizes)

    def health(self) -> dict[str, dict]:
        return {u: get_health(u, self.request_timeout_s, api_key=self.api_key) for u in self.base_urls}

    def counts_line(self) -> str:
        """``url=n, ...``: requests each server answered so far (the learner logs it at the end)."""
        with self._lock:
            return ", ".join(f"{u}={n}" for u, n in self.request_counts.items())

    def plan(self, n: int) -> list[tuple[str, int, int]]:
        """``(base_url, start, end)`` micro-batches covering ``range(n)``."""
        ws = self.world_sizes()
        out = []
        for url, w, (a, b) in zip(self.base_urls, ws, split_weighted(n, ws)):
            step = self.decode_batch_size * w
            for s in range(a, b, step):
                out.append((url, s, min(b, s + step)))
        return out

    def infer(self, reqs: Sequence[InferRequest], params: DecodeParams) -> list[RolloutResult]:
        """Rollouts for ``reqs``, in order. Request ``i`` uses seed ``params.seed + i`` (when set)."""
        reqs = list(reqs)
        if not reqs:
            return []
        plan = self.plan(len(reqs))
        by_url: dict[str, list[tuple[int, int]]] = {}
        for url, a, b in plan:
            by_url.setdefault(url, []).append((a, b))
        results: list[RolloutResult | None] = [None] * len(reqs)

        def run(url: str) -> None:
            for a, b in by_url[url]:
                seed = None if params.seed is None else params.seed + a
                payload = build_infer_payload(reqs[a:b], params, seed)
                body = post_infer(url, payload, self.infer_timeout_s, self.session_factory, self.api_key)
                parsed = parse_infer_response(body, b - a, self.repeat_terminate_enabled, base_url=url)
                results[a:b] = parsed
                with self._lock:
                    self.request_counts[url] += b - a

        if len(by_url) == 1:
            run(next(iter(by_url)))
        else:
            with ThreadPoolExecutor(max_workers=len(by_url)) as pool:
                futures = [pool.submit(run, url) for url in by_url]
                for f in futures:
                    f.result()
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]
