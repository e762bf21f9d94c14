"""Fixtures shared by the rollout integration tests (tiny model, vLLM/swift environment)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Environment every vLLM / swift process of these tests needs on the CPU stack.
VLLM_CPU_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MODELSCOPE_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_PLUGINS": "none",  # ms-swift's vLLM plugin imports torchvision (absent on the CPU stack)
    # the first request with logprobs compiles a kernel; keep the inductor cache between runs
    "TORCHINDUCTOR_CACHE_DIR": str(REPO_ROOT / ".cache" / "torchinductor"),
}


@pytest.fixture(scope="module")
def vllm_cpu_env():
    """VLLM_CPU_ENV applied to os.environ for a module (engine processes inherit it)."""
    mp = pytest.MonkeyPatch()
    for k, v in VLLM_CPU_ENV.items():
        mp.setenv(k, v)
    yield dict(VLLM_CPU_ENV)
    mp.undo()


def live_descendants(pgid: int) -> list[int]:
    """PIDs still in process group ``pgid`` (from /proc), zombies excluded."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            out.append(int(d))
    return out


@pytest.fixture(scope="session")
def cpu_env_vars() -> dict:
    """VLLM_CPU_ENV as a fixture (for server specs: ``spec.extra_env.update(cpu_env_vars)``)."""
    return dict(VLLM_CPU_ENV)


@pytest.fixture(scope="session")
def group_members():
    """``group_members(pgid) -> [pid, ...]``: live processes of a process group."""
    return live_descendants
