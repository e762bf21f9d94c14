"""Is the server that answers a URL the one a run needs? Pure rules over its ``/coordexp/identity/`` answer
(:data:`~coordexp.protocol.IDENTITY_ROUTE`, ``{"nonce", "pid", "model", "weights_root", "loaded"}``): a server
a run started must answer with that start's nonce; a reused one must load the run's weight files or - for an
eval, which pushes none - still serve the checkpoint as loaded."""

from __future__ import annotations

import os
from typing import Any

from coordexp.rollout.server.weight_route import outside_root_problem

__all__ = ["foreign_server_problem", "reuse_problem"]


def foreign_server_problem(ident: dict[str, Any] | None, nonce: str, url: str, port: int) -> str | None:
    """Why the server answering ``url`` is not the one started with ``nonce`` (another server holds ``port``:
    a run that started a moment earlier, both having found the port free; ``ident`` None: a server without
    the identity route); None when it is."""
    if ident is not None and ident.get("nonce") == nonce:
        return None
    who = f"process {ident.get('pid')} serving {ident.get('model')}" if ident else "not a coordexp server"
    return (f"{url} answers, but not as the rollout server this run started: another server holds port "
            f"{port} ({who}). Fix: stop that server or choose a free port in vllm.server.base_urls; to use a "
            f"server that is already running, set vllm.server.reuse_existing=true")


def reuse_problem(ident: dict[str, Any], url: str, pushes_from: str | None, serves: str | None) -> str | None:
    """Why the reused server at ``url`` does not fit the run: its weights root does not hold ``pushes_from``
    (the folder the learner writes weight files under), or it no longer serves ``serves`` as loaded (a
    training run pushed other weights into it, or it was started from another folder: an eval would report
    another model's numbers); None when it fits."""
    where = f"vllm.server.reuse_existing: the server at {url}"
    if pushes_from:
        problem = outside_root_problem(pushes_from, ident.get("weights_root"))
        if problem:
            return f"{where} cannot load this run's weight files: {problem}"
    if serves:
        fix = (f"drop vllm.server.reuse_existing=true to let the eval start a server from the checkpoint, or "
               f"restart that server from {serves}")
        loaded, model = ident.get("loaded"), ident.get("model")
        if loaded:
            return (f"{where} holds weights a training run pushed into it ({loaded}), not {serves}, and an "
                    f"eval pushes none: {fix}")
        if not model or os.path.realpath(model) != os.path.realpath(serves):
            return f"{where} serves {model}, not {serves}: {fix}"
    return None
