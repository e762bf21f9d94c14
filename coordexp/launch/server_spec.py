"""What a started rollout server is: :class:`ServerLaunchSpec` from a ``TrainConfig``, and the exact command
line and environment it turns into.

The command is ``python -m swift.cli.rollout ...``: the program ``swift rollout`` runs (ms-swift's ``swift``
entry point only re-executes that file in a child process). The repeat-terminate subtree is exported as JSON
in :data:`~coordexp.protocol.ENV_CONFIG_JSON` together with the guard
:data:`~coordexp.protocol.ENV_ENABLE`, for the server process only.

Several servers (``vllm.server.base_urls`` with N URLs, started here): server ``i`` gets the ``i``-th of N
equal contiguous slices of ``vllm.server_gpus`` (:func:`gpu_slice`) and, on CPU, the ``i``-th of N equal
contiguous slices of the cores this process may run on (:func:`cpu_slice`; the server process is pinned to
them, and its OpenMP threads, :func:`cpu_server_env`, run inside that slice). The API key and the
weights root reach the server through its environment, never its command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from coordexp import checkpoint, protocol
from coordexp.config.contract import server_image_root
from coordexp.config.schema import enum_value
from coordexp.config.validate import url_problem
from coordexp.errors import ServerStartError
from coordexp.repeat_rules import RepeatTerminateConfig, config_to_dict, parse_config

__all__ = ["PLUGIN_PATH", "ServerLaunchSpec", "build_command", "build_env", "check_server_python",
           "cpu_server_env", "cpu_slice", "gpu_slice", "launch_spec_from_config"]

PLUGIN_PATH = str(Path(__file__).resolve().parents[1] / "rollout" / "server" / "swift_plugin.py")
#: config.json model_types whose ms-swift template has the same name. ms-swift's own detection offers
#: look-alikes for them (qwen2_5_vl: also mimo_vl; qwen2_vl: also qvq) and picks by the folder's name, so a
#: renamed checkpoint (/ckpt/stage1) stops the server with "Failed to automatically match template_type".
SWIFT_FAMILY_TEMPLATES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def cpu_server_env(cores: int, engines: int = 1) -> dict[str, str]:
    """The environment a CPU server on ``cores`` cores with ``engines`` data-parallel engines adds (a user's
    own value in the environment wins).

    - vLLM's engine runs inside the server process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: its in-process
      client and single-process executor). With vLLM's default on CPU, an EngineCore process and a Worker
      process each busy-wait on the shared-memory queue between them, so a generation held both cores of a
      2-core machine and the learner's packs trained meanwhile ran 5x slower; in-process there is nothing to
      spin on, the server starts in half the time and the smoke trains faster (docs/benchmarks.md).
    - ``OMP_NUM_THREADS``: the cores less one, split over the engines, at least one per engine - for one
      engine, the threads vLLM's automatic binding gives its worker when it keeps a core for its scheduler
      process (``vllm.utils.ompmultiprocessing``).
    - OpenMP threads sleep as soon as a parallel region ends (passive wait; Intel's runtime reads
      ``KMP_BLOCKTIME``) instead of spinning on cores the learner's next forward needs.
    """
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(max(1, (cores - 1) // engines)),
            "OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}


@dataclass
class ServerLaunchSpec:
    """Everything that determines the server command line and environment."""

    model_dir: str
    port: int
    host: str = "127.0.0.1"
    device: str = "cpu"  # "cpu" | "cuda"
    dtype: str = "float32"
    max_model_len: int = 1024
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.85
    cpu_kvcache_space_gib: int = 1
    data_parallel_size: int = 1
    tensor_parallel_size: int = 1
    server_gpus: list[int] = field(default_factory=list)
    repeat_terminate: RepeatTerminateConfig = field(default_factory=RepeatTerminateConfig)
    model_type: str | None = None  # ms-swift --model_type (None: let ms-swift detect it)
    template: str | None = None  # ms-swift --template (None: the model's default template)
    plugin_path: str = PLUGIN_PATH
    python: str = sys.executable
    image_root: str | None = None  # ROOT_IMAGE_DIR: the folder request image paths are relative to
    extra_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)  # applied last (tests, site tweaks)
    #: CPU cores the server process is pinned to (``os.sched_setaffinity``); empty = not pinned
    cpus: list[int] = field(default_factory=list)
    #: the folder under which the weight-loading route accepts files (``ENV_WEIGHTS_ROOT``)
    weights_root: str | None = None
    #: the API key (``ENV_SERVER_API_KEY`` in the server's environment); None = the caller's environment's
    api_key: str | None = field(default=None, repr=False)


def gpu_slice(gpus: list[int], index: int, count: int) -> list[int]:
    """Server ``index`` of ``count``: its equal contiguous slice of ``gpus`` (the count must divide)."""
    if count < 1 or len(gpus) % count:
        raise ServerStartError(
            f"vllm.server_gpus ({len(gpus)} GPUs) does not split evenly over {count} servers")
    per = len(gpus) // count
    return list(gpus[index * per:(index + 1) * per])


def cpu_slice(cores: list[int], index: int, count: int) -> list[int]:
    """Server ``index`` of ``count``: its contiguous slice of ``cores`` (the first ``len % count`` slices get
    one core more); all of ``cores`` for a single server, or when there are fewer cores than servers (they
    then share every core rather than some getting none)."""
    cores = sorted(cores)
    if count <= 1 or len(cores) < count:
        return cores
    per, extra = divmod(len(cores), count)
    start = index * per + min(index, extra)
    return cores[start:start + per + (1 if index < extra else 0)]


def check_server_python(python: str, device: str = "cuda") -> None:
    """Fail fast (``ServerStartError``) when ``python`` cannot run the server: it must import coordexp and
    find ms-swift and vLLM (found, not imported: a second or so). ``device``: the server's (``vllm.device``),
    which names the extra to install (``server-cpu`` / ``server-gpu``)."""
    code = ("import importlib.util as u, coordexp.protocol; "
            "m = [n for n in ('swift', 'vllm') if u.find_spec(n) is None]; "
            "print(' '.join(m)); raise SystemExit(1 if m else 0)")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ServerStartError(f"vllm.server.python={python} cannot be run: {err}") from None
    if out.returncode != 0:
        missing = out.stdout.strip()
        extra = "server-cpu" if device == "cpu" else "server-gpu"
        why = (f"it lacks {missing}" if missing else
               f"it cannot import coordexp ({(out.stderr.strip().splitlines() or ['?'])[-1]})")
        raise ServerStartError(
            f"vllm.server.python={python} cannot run the rollout server: {why}; install the server stack "
            f"into that environment: {python} -m pip install -e '<coordexp checkout>[{extra}]' "
            "(docs/runbook.md)")


def launch_spec_from_config(
    cfg: Any, model_dir: str | os.PathLike, base_url: str | None = None, *, index: int = 0, count: int = 1,
    weights_root: str | os.PathLike | None = None,
) -> ServerLaunchSpec:
    """The launch spec of server ``index`` of the ``count`` a ``TrainConfig`` asks for, at ``base_url``
    (default: the first of ``vllm.server.base_urls``): its slice of ``vllm.server_gpus`` (CUDA) or of this
    process's cores (CPU, with more than one server). For the tiny model and checkpoints trained from it,
    ms-swift is told ``--model_type <qwen2|qwen3> --template chatml`` (its auto-detection is ambiguous for a
    bare Qwen2 folder); a Qwen-VL checkpoint gets its family's template (:data:`SWIFT_FAMILY_TEMPLATES`);
    ``vllm.server.template`` overrides both."""
    v = cfg.vllm
    urls = list(v.server.base_urls)
    url = base_url or (urls[0] if urls else None)
    if not url:
        raise ServerStartError("vllm.server.base_urls is empty: nowhere to start the rollout server")
    bad = url_problem(url)
    if bad:
        raise ServerStartError(f"vllm.server.base_urls entry {bad}")
    parsed = urlparse(url)
    model_dir = str(Path(model_dir).resolve())
    if not Path(model_dir).is_dir():
        raise ServerStartError(f"model directory {model_dir} does not exist")
    model_type, template, family = None, v.server.template, checkpoint.model_type(model_dir)
    if enum_value(cfg.model.kind) == "tiny" or checkpoint.is_tiny_checkpoint(model_dir):
        model_type = family or enum_value(cfg.model.tiny_arch)
        template = template or "chatml"
    elif template is None and family in SWIFT_FAMILY_TEMPLATES:
        template = family
    return ServerLaunchSpec(
        model_dir=model_dir,
        port=int(parsed.port),
        host=v.server.host,
        device=enum_value(v.device),
        dtype=enum_value(v.dtype),
        max_model_len=int(v.max_model_len),
        enforce_eager=bool(v.enforce_eager),
        gpu_memory_utilization=float(v.gpu_memory_utilization),
        cpu_kvcache_space_gib=int(v.cpu_kvcache_space_gib),
        data_parallel_size=int(v.data_parallel_size),
        tensor_parallel_size=int(v.tensor_parallel_size),
        server_gpus=gpu_slice(list(v.server_gpus), index, count) if enum_value(v.device) == "cuda" else [],
        cpus=(cpu_slice(sorted(os.sched_getaffinity(0)), index, count)
              if enum_value(v.device) == "cpu" and count > 1 and hasattr(os, "sched_getaffinity") else []),
        python=v.server.python or sys.executable,
        weights_root=str(Path(weights_root).resolve()) if weights_root else None,
        repeat_terminate=parse_config(
            cfg.rollout_matching.repeat_terminate, where="rollout_matching.repeat_terminate."
        ),
        model_type=model_type,
        template=template,
        image_root=server_image_root(cfg),
    )


def build_command(spec: ServerLaunchSpec) -> list[str]:
    cmd = [
        spec.python,
        "-m",
        "swift.cli.rollout",
        "--model",
        spec.model_dir,
        "--host",
        spec.host,
        "--port",
        str(spec.port),
        "--infer_backend",
        "vllm",
        "--torch_dtype",
        spec.dtype,
        "--vllm_max_model_len",
        str(spec.max_model_len),
        "--vllm_enforce_eager",
        "true" if spec.enforce_eager else "false",
        "--vllm_data_parallel_size",
        str(spec.data_parallel_size),
        "--vllm_tensor_parallel_size",
        str(spec.tensor_parallel_size),
        "--external_plugins",
        spec.plugin_path,
    ]
    if spec.device != "cpu":
        cmd += ["--vllm_gpu_memory_utilization", str(spec.gpu_memory_utilization)]
    if spec.model_type:
        cmd += ["--model_type", spec.model_type]
    if spec.template:
        cmd += ["--template", spec.template]
    return cmd + list(spec.extra_args)


def build_env(spec: ServerLaunchSpec, base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: ``base`` (default ``os.environ``) plus the coordexp variables."""
    env = dict(os.environ if base is None else base)
    env[protocol.ENV_ENABLE] = "1"
    env[protocol.ENV_CONFIG_JSON] = protocol.repeat_terminate_json(config_to_dict(spec.repeat_terminate))
    env[protocol.ENV_SERVER_DEVICE] = spec.device
    env["PYTHONUNBUFFERED"] = "1"
    if spec.weights_root:
        env[protocol.ENV_WEIGHTS_ROOT] = spec.weights_root
    if spec.api_key:
        env[protocol.ENV_SERVER_API_KEY] = spec.api_key
    if spec.image_root:
        env["ROOT_IMAGE_DIR"] = spec.image_root
    if spec.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(spec.cpu_kvcache_space_gib)
        # ms-swift's own vLLM general plugin imports torchvision, absent from the CPU stack.
        env.setdefault("VLLM_PLUGINS", "none")
        cores = len(spec.cpus) or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                   else os.cpu_count() or 1)
        for key, value in cpu_server_env(cores, spec.data_parallel_size).items():
            if not env.get(key):  # an empty value is unset (vLLM would fail to parse it)
                env[key] = value
    elif spec.server_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in spec.server_gpus)
    env.update({str(k): str(v) for k, v in spec.extra_env.items()})
    return env
