"""``POST /coordexp/load_weights/`` (:data:`~coordexp.protocol.LOAD_WEIGHTS_ROUTE`), installed into
the ``swift rollout`` app by the plugin: every rollout worker loads a safetensors file the learner wrote; and
``GET /coordexp/identity/`` (:data:`~coordexp.protocol.IDENTITY_ROUTE`): which server this is and which
weights it holds. Runs in the server's main process; FastAPI is imported when the routes are installed.

Two guards: the route loads only files under :data:`~coordexp.protocol.ENV_WEIGHTS_ROOT` (the launcher sets
it to the run dir, or to a sweep's dir; anything else, a symlink out of it included, is refused with HTTP
403), and :func:`install_api_key` gives ms-swift's own bearer-token check the key in
:data:`~coordexp.protocol.ENV_SERVER_API_KEY` (the secret stays out of the command line, ms-swift's logged
arguments and the run dir)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

from coordexp.protocol import (
    ENV_SERVER_API_KEY,
    ENV_SERVER_NONCE,
    ENV_WEIGHTS_ROOT,
    IDENTITY_ROUTE,
    LOAD_WEIGHTS_ROUTE,
    WORKER_METHOD,
)

__all__ = ["install_api_key", "install_identity_route", "install_weight_sync_route", "outside_root_problem"]


def _say(msg: str) -> None:
    print(f"[coordexp swift plugin pid={os.getpid()}] {msg}", file=sys.stderr, flush=True)


def install_api_key(deploy: Any) -> None:
    """ms-swift's ``--api_key`` from :data:`~coordexp.protocol.ENV_SERVER_API_KEY` (a key given on the
    command line wins). ms-swift's route guard reads ``deploy.args.api_key`` on every request, so setting it
    while the routes are installed protects every route but ``/health/``."""
    key = os.environ.get(ENV_SERVER_API_KEY)
    if key and not getattr(deploy.args, "api_key", None):
        deploy.args.api_key = key
        _say(f"API key from ${ENV_SERVER_API_KEY}: every route but /health/ needs it")


def outside_root_problem(path: str, root: str | None) -> str | None:
    """Why the route must not load ``path``: no root configured, or ``path`` (symlinks resolved) is not
    under ``root``; None when it may."""
    if not root:
        return (f"this server was started without {ENV_WEIGHTS_ROOT}, so it loads no weight files; the "
                f"coordexp launcher sets it to the run dir (a server you start yourself: export "
                f"{ENV_WEIGHTS_ROOT}=<the run dir, or a folder above it>)")
    real, base = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, base]) != base:
        return (f"{path} is outside this server's weights root {base} ({ENV_WEIGHTS_ROOT}); only files under "
                f"it are loaded: restart the server with --weights-root <a folder that holds the run dir> "
                f"(python -m coordexp.launch.server), or put the run dir under {base}")
    return None


def install_weight_sync_route(deploy: Any) -> None:
    """``POST /coordexp/load_weights/ {"path": <safetensors>, "timeout_s": t}``: every rollout worker (all DP
    engines, every TP rank through ``collective_rpc``) loads the file with ``model.load_weights``. Answers
    ``{"workers": [<per-worker report>], "seconds": s}``; 400 for a bad path, 500 when a worker failed (its
    traceback is in the server log), 403 for a file outside :data:`~coordexp.protocol.ENV_WEIGHTS_ROOT`,
    504 when the workers did not finish within ``timeout_s``."""
    from fastapi import Body, HTTPException

    lock = asyncio.Lock()

    async def load_weights(payload: dict = Body(...)):  # noqa: B008 - FastAPI declares bodies so
        path = payload.get("path") if isinstance(payload, dict) else None
        if not isinstance(path, str) or not os.path.isabs(path):
            raise HTTPException(
                status_code=400, detail=f"coordexp: 'path' must be an absolute path, got {path!r}"
            )
        refused = outside_root_problem(path, os.environ.get(ENV_WEIGHTS_ROOT))
        if refused:
            _say(f"refused a weight load: {refused}")
            raise HTTPException(status_code=403, detail=f"coordexp: {refused}")
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
        deploy._coordexp_loaded = path
        _say(f"loaded weights from {path} into {len(workers)} worker(s) in {time.monotonic() - t0:.2f} s")
        return {"workers": workers, "seconds": round(time.monotonic() - t0, 4), "step": payload.get("step")}

    deploy.app.post(LOAD_WEIGHTS_ROUTE, dependencies=_api_key_guard(deploy))(load_weights)


def install_identity_route(deploy: Any) -> None:
    """``GET /coordexp/identity/``: ``{"nonce", "pid", "model", "weights_root", "loaded"}`` (see
    :data:`~coordexp.protocol.IDENTITY_ROUTE`); behind the API key like every route but ``/health/``."""
    def identity():
        return {"nonce": os.environ.get(ENV_SERVER_NONCE), "pid": os.getpid(),
                "model": getattr(getattr(deploy, "args", None), "model", None),
                "weights_root": os.environ.get(ENV_WEIGHTS_ROOT),
                "loaded": getattr(deploy, "_coordexp_loaded", None)}

    deploy.app.get(IDENTITY_ROUTE, dependencies=_api_key_guard(deploy))(identity)


def _api_key_guard(deploy: Any) -> list:
    """The route dependencies that apply ms-swift's bearer-token check (``deploy._require_api_key``), if
    this ms-swift has it."""
    from fastapi import Depends

    guard = getattr(deploy, "_require_api_key", None)
    return [Depends(guard())] if callable(guard) else []
