"""What the Hydra entry points (``coordexp.train``, ``coordexp.eval``) share: the command-line pre-check
before Hydra composes, ``--cfg`` printing the resolved config, and how a job's exit code ends a single
run (``sys.exit``) or a sweep job (raise, so Hydra reports it)."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from coordexp.config.load import check_before_start, to_train_config, validate_composed
from coordexp.config.schema import TrainConfig
from coordexp.config.store import register_configs
from coordexp.errors import ConfigError, exit_on_error
from coordexp.protocol import ENV_CONSOLE_LOG


def hydra_args(args: list[str]) -> argparse.Namespace | None:
    """The command line as Hydra's own parser reads it (``hydra._internal.utils.get_args_parser``: the very
    parser ``@hydra.main`` uses, so every flag and the values it takes, ``--info defaults-tree``,
    ``-cd <dir>``, ``-sc`` with ``install=bash`` among the overrides, are read as Hydra reads them). None
    when it does not parse: Hydra itself then reports the usage error."""
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            return get_args_parser().parse_intermixed_args(args)
    except SystemExit:
        return None


def command_name(argv0: str | None = None) -> str:
    """How the user started this entry point: ``python -m coordexp.train`` for a module run (argv[0] is then
    the module's file), else the console script's name (``coordexp-train``)."""
    path = Path(argv0 if argv0 is not None else sys.argv[0])
    if path.suffix == ".py" and path.parent.name == "coordexp":
        return f"python -m coordexp.{path.stem}"
    return path.name


def hydra_overrides(args: list[str]) -> list[str]:
    """Hydra overrides among the CLI args (flags and their values, e.g. ``-m``, ``--cfg job``, ``--info
    defaults-tree``, ``--config-dir <dir>``, are skipped)."""
    ns = hydra_args(args)
    return list(ns.overrides) if ns is not None else []


def _flags_and_overrides(args: list[str], ns: argparse.Namespace) -> tuple[list[str], list[str]]:
    """``args`` split into flags (with their values) and the overrides, in their order."""
    pending, flags, overrides = list(ns.overrides), [], []
    for arg in args:
        if pending and arg == pending[0]:
            overrides.append(pending.pop(0))
        else:
            flags.append(arg)
    return flags, overrides


def _skips_the_check(ns: argparse.Namespace | None) -> bool:
    """Help, info and shell completion run nothing (``-sc install=bash`` carries Hydra's completion command
    among the overrides; ``--version`` exits inside the parser); a command line Hydra cannot parse is
    Hydra's to report."""
    return ns is None or bool(ns.help or ns.hydra_help or ns.info or ns.shell_completion)


def prepare_argv(extra: dict[str, str] | None = None, training: bool = True) -> argparse.Namespace | None:
    """Before ``@hydra.main`` runs: register the schema, check the command line (legacy and unknown keys,
    the leaf contract, the user's ``--config-dir`` leaves included) unless help, info or completion was
    asked for, make ``--cfg`` print the resolved config, and append the ``extra`` overrides
    (``key=value``) the user did not give. With ``--cfg`` only composition and interpolation are checked
    here (a failure prints nothing on stdout); :func:`check_after_print` validates after Hydra printed.
    ``training``: validate as a training config (False for an evaluation). Returns Hydra's reading of the
    command line."""
    register_configs()
    ns = hydra_args(sys.argv[1:])
    if ns is None:  # Hydra's own parser reports the usage error (exit 2), under the command's real name
        parser = get_args_parser()
        parser.prog = command_name()
        parser.parse_intermixed_args(sys.argv[1:])
        return None
    modes = [flag for flag, on in (("--run", ns.run), ("--multirun", ns.multirun), ("--cfg", ns.cfg),
                                   ("--info", ns.info), ("--shell-completion", ns.shell_completion)) if on]
    if len(modes) > 1:  # Hydra raises a bare ValueError for this
        with exit_on_error():
            raise ConfigError([f"{' and '.join(modes)} cannot be combined: Hydra runs one of --run, "
                               f"--multirun, --cfg, --info and --shell-completion; drop all but one"],
                              title="Invalid command line")
    flags, overrides = _flags_and_overrides(sys.argv[1:], ns)
    if ns.cfg in ("job", "all") and not ns.resolve:
        flags.append("--resolve")  # `--cfg job` prints the resolved config, ready to diff
    for key, value in (extra or {}).items():
        if not any(a.startswith(f"{key}=") for a in overrides):
            overrides.append(f"{key}={value}")
    sys.argv[1:] = [*flags, *overrides]  # Hydra's parser takes the overrides in one block, after the flags
    cfg_flag = ns.cfg is not None
    if not _skips_the_check(ns):
        with exit_on_error():  # every job composed and validated, its directories probed (not for --cfg)
            ns.composed = check_before_start(hydra_overrides(sys.argv[1:]), writes=not cfg_flag,
                                             validate=not cfg_flag, multirun=bool(ns.multirun),
                                             config_dir=ns.config_dir, training=training)
    return ns


def check_after_print(ns: argparse.Namespace | None, training: bool = True) -> None:
    """After ``--cfg`` printed a config: validate it as a run would and, if invalid, report every problem
    on stderr and exit 2, so someone diffing configs learns that one would be rejected."""
    if ns is None or ns.cfg is None or _skips_the_check(ns):
        return
    with exit_on_error():  # the jobs prepare_argv composed
        validate_composed(ns.composed, multirun=bool(ns.multirun), training=training)


def run_hydra(hydra_task: Callable[[], Any], extra: dict[str, str] | None = None,
              training: bool = True) -> None:
    """An entry point's main: :func:`prepare_argv`, the Hydra app, then :func:`check_after_print`
    (``training``: the configs are validated as training configs; False for an evaluation)."""
    ns = prepare_argv(extra, training)
    hydra_task()
    check_after_print(ns, training)


def console_record(hydra_cfg: Any) -> Path | None:
    """Make Hydra's job log file (``<run_dir>/<job name>.log``: ``train.log``, ``eval.log``) the run's console
    record: every line shown through :func:`coordexp.telemetry.record.say`, by this process and the learner
    processes it starts, is appended there. Without Hydra's file handler (``hydra/job_logging=disabled``)
    there is no record and no file."""
    filename = OmegaConf.select(hydra_cfg, "job_logging.handlers.file.filename", default=None)
    if not filename:
        os.environ.pop(ENV_CONSOLE_LOG, None)
        return None
    os.environ[ENV_CONSOLE_LOG] = str(Path(filename).resolve())
    return Path(filename)


def run_job(cfg: DictConfig, job: Callable[[TrainConfig], int], what: str, training: bool = True) -> int:
    """Validate the composed config (``training``: as a training config, see ``to_train_config``), run
    ``job`` and end with its exit code: ``sys.exit`` in a single run, an exception in a sweep job (Hydra's
    launcher reports it and goes on)."""
    record = console_record(HydraConfig.get())
    try:
        with exit_on_error():
            train_cfg = to_train_config(cfg, training=training)
        code = job(train_cfg)
    finally:  # a job that showed nothing leaves no empty train.log behind
        if record is not None and record.is_file() and record.stat().st_size == 0:
            record.unlink()
    if code != 0:
        out_dir: Any = Path(HydraConfig.get().runtime.output_dir)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise RuntimeError(f"{what} {out_dir} failed with exit code {code}")
        sys.exit(code)
    return code
