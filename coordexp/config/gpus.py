"""Does a config's GPU plan fit the machine it is checked on? The plan needs every GPU in
``vllm.server_gpus`` (a server the launcher starts on ``vllm.device: cuda``) and ``vllm.learner_gpus``; the
machine shows the GPUs the NVIDIA driver lists, within ``CUDA_VISIBLE_DEVICES``. Stdlib only (preflight
imports neither torch nor CUDA)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from coordexp.config.schema import RolloutBackend, ServerDevice, TrainConfig

NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")


def visible_gpus(environ: Mapping[str, str] | None = None, proc: Path = NVIDIA_PROC) -> int:
    """GPUs this process could use: the driver's count (``/proc/driver/nvidia/gpus``, else ``nvidia-smi
    -L``), capped by ``CUDA_VISIBLE_DEVICES``; 0 without an NVIDIA driver."""
    env = os.environ if environ is None else environ
    present = len(list(proc.iterdir())) if proc.is_dir() else 0
    if present == 0 and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
            present = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.TimeoutExpired):
            present = 0
    mask = env.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return present
    ids = [x.strip() for x in mask.split(",") if x.strip()]
    if "-1" in ids:
        ids = ids[:ids.index("-1")]
    return min(len(ids), present)


def cuda_server(cfg: TrainConfig) -> bool:
    """Server mode with ``vllm.device: cuda``: where ``vllm.server_gpus`` and ``vllm.learner_gpus`` apply."""
    server_mode = cfg.rollout_matching.rollout_backend == RolloutBackend.vllm
    return server_mode and cfg.vllm.device == ServerDevice.cuda


def gpu_plan(cfg: TrainConfig, visible: int | None = None) -> dict[str, Any]:
    """``{"needed", "visible", "satisfiable", "server_gpus", "learner_gpus"}`` for a config on this node:
    the servers' GPUs on node 0 only (the other nodes start no server). GPU ids index the visible GPUs, so
    ``needed`` is the highest id + 1 (``[6, 7]`` needs 8 GPUs, not 2)."""
    v = cfg.vllm
    on_gpu = cuda_server(cfg)
    starts_servers = on_gpu and not v.server.reuse_existing and cfg.training.node_rank == 0
    server = sorted(set(v.server_gpus)) if starts_servers else []
    learner = sorted(set(v.learner_gpus)) if on_gpu else []
    needed = max([*server, *learner], default=-1) + 1
    seen = visible_gpus() if visible is None else visible
    return {"needed": needed, "visible": seen, "satisfiable": needed <= seen,
            "server_gpus": server, "learner_gpus": learner}


def gpu_plan_problem(plan: Mapping[str, Any], experiment: str) -> str | None:
    """One line for a plan this machine cannot run, naming the way out; None when it fits."""
    if plan["satisfiable"]:
        return None
    on_cpu = ("drop vllm=gpu (a smoke leaf's server runs on the CPU)" if experiment.startswith("smoke/") else
              "use a smoke/* leaf (docs/quickstart.md; your own data on a CPU: docs/own_data.md)")
    return (f"+experiment={experiment} needs {plan['needed']} GPUs (vllm.server_gpus {plan['server_gpus']}, "
            f"vllm.learner_gpus {plan['learner_gpus']}; vllm.device: cuda) and this machine shows "
            f"{plan['visible']}: run it on a node with {plan['needed']} GPUs, or on a CPU {on_cpu}")
