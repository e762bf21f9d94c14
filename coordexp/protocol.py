"""The wire protocol between the learner, the launcher and the rollout-server process: every name that
crosses a process boundary, spelled once. Stdlib only (the server process imports it before vLLM).

Environment of the server process (set by the launcher, read by the ms-swift plugin and the processor):
:data:`ENV_ENABLE` (guard), :data:`ENV_CONFIG_JSON` (the ``rollout_matching.repeat_terminate`` subtree),
:data:`ENV_SERVER_DEVICE`, :data:`ENV_WEIGHTS_ROOT`. Environment of the learner: :data:`ENV_INITIAL_WEIGHTS`,
:data:`ENV_RUN_ID`. Of both: :data:`ENV_SERVER_API_KEY`.

The answer's record keys and their order (:class:`FieldOrder`) are here too: the config, the server's
prompts and the learner's parser agree on them, and the config imports them without the coordjson package.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from enum import Enum
from typing import Any

# ---- environment ------------------------------------------------------------------------------------
#: Guard: the plugin patches ms-swift only when this is ``1`` in the server's environment.
ENV_ENABLE = "COORDEXP_ENABLE_VLLM_REPEAT_TERMINATE_INJECTION"
#: The server-wide repeat-terminate settings, as :func:`repeat_terminate_json`.
ENV_CONFIG_JSON = "COORDEXP_VLLM_REPEAT_TERMINATE_CONFIG_JSON"
#: ``cpu`` or ``cuda``: the device the server runs on.
ENV_SERVER_DEVICE = "COORDEXP_SERVER_DEVICE"
#: Set for the learner when the orchestrator started the server from the very checkpoint it loads.
ENV_INITIAL_WEIGHTS = "COORDEXP_SERVER_INITIAL_WEIGHTS"
#: The run id the orchestrator gives the learner and the servers it starts.
ENV_RUN_ID = "COORDEXP_RUN_ID"
#: First port of the NCCL weight-sync groups (one port per server).
ENV_NCCL_GROUP_PORT = "COORDEXP_NCCL_GROUP_PORT"
#: The API key of the rollout servers (learner, launcher and server). ms-swift's ``--api_key``: every route
#: but ``/health/`` then needs ``Authorization: Bearer <key>``. Required when a server is reachable beyond
#: loopback (a non-loopback ``vllm.server.host`` or base URL); never written to the run dir or a command line.
ENV_SERVER_API_KEY = "COORDEXP_SERVER_API_KEY"
#: The folder under which the server's weight-loading route accepts files (the run dir, or a sweep's dir).
ENV_WEIGHTS_ROOT = "COORDEXP_WEIGHTS_ROOT"
#: A random token the launcher gives each server it starts; :data:`IDENTITY_ROUTE` answers it, so the launcher
#: tells its own server from another one that answers the same port.
ENV_SERVER_NONCE = "COORDEXP_SERVER_NONCE"
#: The run's console record (``<run_dir>/train.log``): every process of a run (orchestrator, learner ranks)
#: appends the lines it shows on the console (``coordexp.telemetry.record.say``) to this file.
ENV_CONSOLE_LOG = "COORDEXP_CONSOLE_LOG"
#: The run's record in its run dir: written by the orchestrator, updated and read by the learner (resume,
#: the end-of-run summary's eval command).
METADATA_NAME = "run_metadata.json"

# ---- requests and responses ---------------------------------------------------------------------------
#: Key inside vLLM ``SamplingParams.extra_args`` (``vllm_xargs`` over HTTP) holding per-request overrides.
XARGS_KEY = "coordexp_repeat_terminate"
#: Where a rollout worker leaves the flag for the server's main process (inside ``rollout_infos``).
FLAG_INFO_KEY = "coordexp_repeat_terminate_triggered"
#: ``/infer/`` output item for a client that asks for it (:data:`WRAPPER_HEADER`):
#: ``{RESPONSE_KEY: {FLAG_KEY: 0|1}, "response": <ms-swift output>}``.
RESPONSE_KEY = "coordexp"
FLAG_KEY = "repeat_terminate_triggered"
#: Request header with which coordexp's client asks ``/infer/`` for the wrapper above (value
#: :data:`WRAPPER_VALUE`). Clients that do not send it (ms-swift's own ``VLLMClient``, a GRPO trainer) get
#: ms-swift's plain ``RolloutOutput`` items, with the flag as ``rollout_infos[FLAG_INFO_KEY]`` (0|1), so a
#: coordexp server stays a drop-in ``swift rollout``.
WRAPPER_HEADER = "X-Coordexp-Response"
WRAPPER_VALUE = "wrapped"

# ---- server-side classes and routes -------------------------------------------------------------------
#: The vLLM logits processor registered at engine start.
PROCESSOR_FQCN = "coordexp.rollout.vllm_processor:RepeatTerminateLogitsProcessor"
#: The vLLM worker extension (ms-swift's NCCL methods plus the file loader).
WORKER_EXTENSION_FQCN = "coordexp.rollout.server.worker.CoordexpWorkerExtension"
#: ms-swift's own worker extension, which the coordexp one subclasses.
SWIFT_WORKER_EXTENSION = "swift.pipelines.infer.rollout.WeightSyncWorkerExtension"
#: ``POST {"path": <safetensors>, "step": s, "timeout_s": t}``: every rollout worker loads the file.
LOAD_WEIGHTS_ROUTE = "/coordexp/load_weights/"
#: The worker-extension method the route reaches over vLLM's ``collective_rpc``.
WORKER_METHOD = "coordexp_load_weights"
#: ``GET``: ``{"nonce", "pid", "model", "weights_root", "loaded"}``: which server this is (its
#: :data:`ENV_SERVER_NONCE`, process id, ``--model`` folder, weights root) and the last weights file the
#: load route loaded into it (null: it still holds ``model``).
IDENTITY_ROUTE = "/coordexp/identity/"


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The request headers that carry ``api_key`` (ms-swift's bearer-token check); ``{}`` without a key."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (``127.0.0.0/8``, ``::1``): a server bound there is
    reachable from this machine only."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def repeat_terminate_json(values: Mapping[str, Any]) -> str:
    """The one serialization of the repeat-terminate settings that crosses a process boundary (the
    environment of the server, the probe's per-request overrides)."""
    return json.dumps(dict(values), separators=(",", ":"), sort_keys=False)


DESC_KEY = "desc"
BBOX_KEY = "bbox_2d"


class FieldOrder(str, Enum):
    """Key order inside each record of an answer; a record in the other order is invalid."""

    desc_first = "desc_first"
    geometry_first = "geometry_first"

    @property
    def keys(self) -> tuple[str, str]:
        return (DESC_KEY, BBOX_KEY) if self is FieldOrder.desc_first else (BBOX_KEY, DESC_KEY)
