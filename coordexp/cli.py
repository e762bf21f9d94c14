"""What the Hydra entry points (``coordexp.train``, ``coordexp.eval``) share: the command-line pre-check
before Hydra composes, ``--cfg`` printing the resolved config, and how a job's exit code ends a single
run (``sys.exit``) or a sweep job (raise, so Hydra reports it)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from coordexp.config.load import check_before_start, to_train_config
from coordexp.config.schema import TrainConfig
from coordexp.config.store import register_configs
from coordexp.errors import exit_on_error

#: Hydra flags that take a value (the value is not an override).
_VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--experimental-rerun")


def hydra_overrides(args: list[str]) -> list[str]:
    """Hydra overrides among the CLI args (flags like -m, --cfg job, --resolve are skipped)."""
    out, skip_next = [], False
    for arg in args:
        if skip_next:
            skip_next = False
        elif arg in _VALUE_FLAGS or arg in ("--info", "-i"):
            skip_next = arg in _VALUE_FLAGS
        elif not arg.startswith("-"):
            out.append(arg)
    return out


def prepare_argv(extra: dict[str, str] | None = None) -> None:
    """Before ``@hydra.main`` runs: register the schema, check the command line (legacy and unknown keys,
    the leaf contract) unless help was asked for, make ``--cfg`` print the resolved config, and append the
    ``extra`` overrides (``key=value``) the user did not give."""
    register_configs()
    cfg_flag = any(a in ("--cfg", "-c") for a in sys.argv)
    if cfg_flag and "--resolve" not in sys.argv:
        sys.argv.append("--resolve")  # `--cfg job` prints the resolved config, ready to diff
    for key, value in (extra or {}).items():
        if not any(a.startswith(f"{key}=") for a in sys.argv[1:]):
            sys.argv.append(f"{key}={value}")
    if not any(a in ("--help", "-h", "--hydra-help", "--info", "-i") for a in sys.argv):
        with exit_on_error():  # every job composed and validated, its directories probed (not for --cfg)
            check_before_start(hydra_overrides(sys.argv[1:]), writes=not cfg_flag,
                               multirun=any(a in ("-m", "--multirun") for a in sys.argv))


def run_job(cfg: DictConfig, job: Callable[[TrainConfig], int], what: str) -> int:
    """Validate the composed config, run ``job`` and end with its exit code: ``sys.exit`` in a single run,
    an exception in a sweep job (Hydra's launcher reports it and goes on)."""
    with exit_on_error():
        train_cfg = to_train_config(cfg)
    code = job(train_cfg)
    if code != 0:
        out_dir: Any = Path(HydraConfig.get().runtime.output_dir)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise RuntimeError(f"{what} {out_dir} failed with exit code {code}")
        sys.exit(code)
    return code
