"""The shape of a ``/infer/`` output item, in the server's main process: ms-swift's own ``RolloutOutput`` with
the repeat-terminate flag in ``rollout_infos`` (stock clients), or coordexp's wrapper
``{"response": ..., "coordexp": {"repeat_terminate_triggered": 0|1}}`` for clients that ask for it with the
:data:`~coordexp.protocol.WRAPPER_HEADER` request header.
"""

from __future__ import annotations

import contextvars
import dataclasses
from typing import Any

from coordexp.protocol import FLAG_INFO_KEY, FLAG_KEY, RESPONSE_KEY, WRAPPER_HEADER, WRAPPER_VALUE

__all__ = ["WrapperHeaderMiddleware", "asks_for_wrapper", "plain_output", "to_plain", "wants_wrapper",
           "wrap_output"]


def to_plain(obj: Any) -> Any:
    """A JSON-ready plain structure of an ms-swift output (pydantic model, dataclass, containers)."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        return to_plain(dump())
    if hasattr(obj, "__dict__"):
        return {k: to_plain(v) for k, v in vars(obj).items() if not k.startswith("_")}
    return obj


def plain_output(output: Any) -> dict:
    """One ``/infer/`` item in ms-swift's own shape (a plain ``RolloutOutput``) with the flag, 0|1, in
    ``rollout_infos[FLAG_INFO_KEY]`` (what a client that did not ask for the wrapper gets)."""
    plain = to_plain(output)
    infos = plain.get("rollout_infos") if isinstance(plain, dict) else None
    if not isinstance(infos, dict) or FLAG_INFO_KEY not in infos:
        raise RuntimeError(
            "coordexp swift plugin: a rollout worker returned an output without the "
            f"'{FLAG_INFO_KEY}' flag; the plugin is not active in the worker processes"
        )
    infos[FLAG_INFO_KEY] = int(infos[FLAG_INFO_KEY])
    return plain


#: Whether the ``/infer/`` request being served asked for the wrapper (set per HTTP request).
_WANTS_WRAPPER: contextvars.ContextVar[bool] = contextvars.ContextVar("coordexp_wants_wrapper", default=False)
_WRAPPER_HEADER_BYTES = WRAPPER_HEADER.lower().encode()


def asks_for_wrapper(headers: Any) -> bool:
    """Whether raw ASGI ``headers`` (``[(name, value), ...]`` bytes) carry ``WRAPPER_HEADER: wrapped``."""
    return any(name.lower() == _WRAPPER_HEADER_BYTES
               and value.decode("latin-1").strip().lower() == WRAPPER_VALUE for name, value in headers or ())


class WrapperHeaderMiddleware:
    """ASGI middleware: records per request whether the client asked for coordexp's wrapper, for the
    patched ``SwiftRolloutDeploy.infer`` (same task, so the context variable reaches the endpoint)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        token = _WANTS_WRAPPER.set(asks_for_wrapper(scope.get("headers")))
        try:
            await self.app(scope, receive, send)
        finally:
            _WANTS_WRAPPER.reset(token)


def wrap_output(output: Any) -> dict:
    """One ``/infer/`` item: ``{"response": <plain output>, "coordexp": {FLAG_KEY: flag}}``."""
    plain = plain_output(output)
    flag = plain["rollout_infos"].pop(FLAG_INFO_KEY)
    return {"response": plain, RESPONSE_KEY: {FLAG_KEY: flag}}


def wants_wrapper() -> bool:
    """Whether the ``/infer/`` request being served asked for coordexp's wrapper."""
    return _WANTS_WRAPPER.get()
