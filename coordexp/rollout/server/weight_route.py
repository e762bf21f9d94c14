"""``POST /coordexp/load_weights/`` (:data:`~coordexp.protocol.LOAD_WEIGHTS_ROUTE`), installed into
the ``swift rollout`` app by the plugin: every rollout worker loads a safetensors file the learner wrote.
Runs in the server's main process; FastAPI is imported when the route is installed."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

from coordexp.protocol import LOAD_WEIGHTS_ROUTE, WORKER_METHOD

__all__ = ["install_weight_sync_route"]


def _say(msg: str) -> None:
    print(f"[coordexp swift plugin pid={os.getpid()}] {msg}", file=sys.stderr, flush=True)


def install_weight_sync_route(deploy: Any) -> None:
    """``POST /coordexp/load_weights/ {"path": <safetensors>, "timeout_s": t}``: every rollout worker (all DP
    engines, every TP rank through ``collective_rpc``) loads the file with ``model.load_weights``. Answers
    ``{"workers": [<per-worker report>], "seconds": s}``; 400 for a bad path, 500 when a worker failed (its
    traceback is in the server log), 504 when the workers did not finish within ``timeout_s``."""
    from fastapi import Body, Depends, HTTPException

    lock = asyncio.Lock()

    async def load_weights(payload: dict = Body(...)):  # noqa: B008 - FastAPI declares bodies so
        path = payload.get("path") if isinstance(payload, dict) else None
        if not isinstance(path, str) or not os.path.isabs(path):
            raise HTTPException(
                status_code=400, detail=f"coordexp: 'path' must be an absolute path, got {path!r}"
            )
        if not os.path.isfile(path):
            raise HTTPException(
                status_code=400,
                detail=f"coordexp: weights file {path} does not exist on the server host (the learner's "
                "run dir must be on a filesystem the server can read)",
            )
        try:
            timeout_s = float(payload.get("timeout_s", 600.0))
        except (TypeError, ValueError):
            raise HTTPException(status_code=400, detail="coordexp: 'timeout_s' must be a number") from None
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        kwargs = {"method": WORKER_METHOD, "args": (path,), "timeout": timeout_s}
        async with lock:
            for conn in deploy.connections:
                conn.send({"type": "call", "method": "collective_rpc", "kwargs": kwargs})
            try:
                replies = [loop.run_in_executor(None, c.recv) for c in deploy.connections]
                results = await asyncio.wait_for(asyncio.gather(*replies), timeout_s)
            except TimeoutError:
                _say(f"ERROR weight load from {path} did not finish within {timeout_s:g} s")
                raise HTTPException(
                    status_code=504,
                    detail=f"coordexp: rollout workers did not load {path} within {timeout_s:g} s",
                ) from None
        if any(r is None for r in results):
            raise HTTPException(
                status_code=500,
                detail=f"coordexp: a rollout worker failed to load weights from {path}; see the server log",
            )
        workers = [w for r in results for w in (r if isinstance(r, list) else [r])]
        _say(f"loaded weights from {path} into {len(workers)} worker(s) in {time.monotonic() - t0:.2f} s")
        return {"workers": workers, "seconds": round(time.monotonic() - t0, 4), "step": payload.get("step")}

    guard = getattr(deploy, "_require_api_key", None)
    deps = [Depends(guard())] if callable(guard) else []
    deploy.app.post(LOAD_WEIGHTS_ROUTE, dependencies=deps)(load_weights)
