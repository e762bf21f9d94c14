"""The one resolver used by train, preflight, eval and every learner rank.

DictConfig (from Hydra) -> typed, validated ``TrainConfig``. Learner ranks never re-compose from
argv: they load the resolved config the orchestrator saved, through the same schema and rules.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from coordexp.config import validate
from coordexp.config.cwd import absolute_paths
from coordexp.config.errors import ConfigError, raise_if
from coordexp.config.gpus import gpu_plan, gpu_plan_problem
from coordexp.config.leaf import _parse_overrides, check_command_line
from coordexp.config.paths import CONF_DIR
from coordexp.config.schema import TrainConfig
from coordexp.config.store import register_configs
from coordexp.config.validate import run_dir_problems
from coordexp.config.value_rules import data_file_problems, dir_problems

RESOLVED_CONFIG_NAME = "resolved_config.yaml"


def to_train_config(cfg: DictConfig, training: bool = True) -> TrainConfig:
    """Resolve, type and validate a composed config; raises ConfigError listing every problem. Relative
    path fields become absolute against the directory the command started in (``hydra.runtime.cwd``), so
    ``hydra.job.chdir=true`` moves no cache or data path (:mod:`coordexp.config.cwd`). ``training``: the
    config is for training (False for an evaluation: no training data is required)."""
    cfg = cfg.copy()
    start_dir = OmegaConf.select(cfg, "hydra.runtime.cwd", default=None, throw_on_resolution_failure=False)
    if "hydra" in cfg:
        with open_dict(cfg):
            del cfg["hydra"]
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        raise_if([f"{key}: missing value: pin it in the experiment leaf or pass {key}=..."
                  for key in missing])
        OmegaConf.resolve(cfg)
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError([f"{key}: {getattr(err, 'msg', str(err)).splitlines()[0]}"]) from None
    assert isinstance(obj, TrainConfig), type(obj)
    absolute_paths(obj, start_dir)
    raise_if(validate.problems(obj, training=training))
    return obj


def save_resolved(obj: TrainConfig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(obj)))
    return path


def load_saved(path: Path | str) -> TrainConfig:
    """Re-validate a saved resolved config (what every learner rank reads)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: saved config not found"])
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or str(path)
        raise ConfigError([f"{key}: {getattr(err, 'msg', str(err)).splitlines()[0]} (in {path})"]) from None
    return to_train_config(merged)


def compose(overrides: Sequence[str], config_dir: str | Path | None = None) -> DictConfig:
    """Compose like `python -m coordexp.train <overrides>` does, without running anything.

    Hydra-only interpolations (``${hydra:...}``) resolve as in a real run; the run dir is not created.
    ``config_dir``: the user's own config dir (``--config-dir``), searched after the package's conf/ as
    Hydra does (through ``hydra.searchpath``).
    """
    register_configs()
    check_command_line(overrides, config_dir=config_dir)
    overrides = list(overrides)
    if config_dir and not any(o.startswith("hydra.searchpath=") for o in overrides):
        overrides.append(f"hydra.searchpath=['file://{Path(config_dir).resolve()}']")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="train", overrides=overrides, return_hydra_config=True)
    except HydraException as err:
        cause = err.__cause__
        key = getattr(cause, "full_key", None)
        detail = (getattr(cause, "msg", None) or str(cause or err)).splitlines()[0]
        if "is not a ListConfig, list or tuple" in detail:  # a list key given one bare value
            detail += f" Fix: write a list in brackets, {key}=[a,b] (quote the word for the shell)"
        raise ConfigError([f"{key}: {detail} ({str(err).splitlines()[0]})" if key else str(err)]) from None
    HydraConfig.instance().set_config(cfg)
    return cfg


def sweep_jobs(overrides: Sequence[str]) -> list[tuple[list[str], str]]:
    """The jobs of a command line, as (overrides, label): one per combination of its sweep values (a plain
    run is one job with an empty label). Hydra expands sweeps the same way (cartesian product, in order)."""
    axes: list[list[tuple[str, str]]] = []
    for ov in _parse_overrides(overrides):
        if not ov.is_sweep_override():
            axes.append([(ov.input_line, "")])
            continue
        try:
            values = list(ov.sweep_string_iterator())
        except Exception:  # noqa: BLE001 - glob sweeps: leave them to Hydra; the other values are checked
            values = []
        key = ov.get_key_element()
        axes.append([(f"{key}={v}", f"{key}={v}") for v in values] or [("", "")])
    return [([o for o, _ in combo if o], " ".join(lbl for _, lbl in combo if lbl))
            for combo in itertools.product(*axes)]


def resolve_composed(cfg: DictConfig) -> None:
    """Resolve every interpolation of a composed config (a copy; nothing is typed or validated): what
    ``--cfg job`` needs to print it. Raises ConfigError naming the key that does not resolve."""
    cfg = cfg.copy()
    if "hydra" in cfg:
        with open_dict(cfg):
            del cfg["hydra"]
    try:
        OmegaConf.to_container(cfg, resolve=True)  # (unlike OmegaConf.resolve, its errors name the key)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError([f"{key}: {(getattr(err, 'msg', None) or str(err)).splitlines()[0]}"]) from None


def hydra_dir_of(cfg: DictConfig, multirun: bool = False) -> tuple[str, str | None]:
    """(key, path) of the folder Hydra makes for a composed config: ``hydra.sweep.dir`` of a sweep, else
    ``hydra.run.dir``."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    return key, OmegaConf.select(cfg, key)


def start_problems(obj: TrainConfig, job: Sequence[str], hydra_dir: tuple[str, str | None], *,
                   multirun: bool = False, training: bool = True, this_machine: bool = True) -> list[str]:
    """What a run checks before it starts anything (the train and eval entry points, and the preflight):
    one run dir for every node, the dirs it writes (``hydra_dir`` from :func:`hydra_dir_of`, and a single
    run's output and logging dirs; probed), the JSONL files it reads and (``this_machine``: not for the
    preflight, which may run on a login node and reports it as a warning) the GPUs it needs here."""
    dirs = [hydra_dir]
    if not multirun:
        dirs += [("training.output_dir", obj.training.output_dir),
                 ("training.logging_dir", obj.training.logging_dir)]
    gpus = gpu_plan_problem(gpu_plan(obj), obj.experiment) if this_machine else None
    return (run_dir_problems(obj.training.nnodes, job, multirun) + dir_problems(dirs)
            + data_file_problems(obj, training) + ([f"vllm.device: {gpus}"] if gpus else []))


#: Hydra launchers that run a sweep's jobs on this machine (any other, e.g. submitit, runs them elsewhere)
LOCAL_LAUNCHERS = ("hydra._internal.core_plugins.basic_launcher.BasicLauncher",
                   "hydra_plugins.coordexp_launcher.coordexp_launcher.CoordexpLauncher")


def runs_here(cfg: DictConfig, multirun: bool) -> bool:
    """The job runs on this machine: a plain run, or a sweep whose launcher is a local one (a Slurm sweep
    is checked on a login node without the GPUs its jobs get)."""
    target = OmegaConf.select(cfg, "hydra.launcher._target_", default=None, throw_on_resolution_failure=False)
    return not multirun or target in LOCAL_LAUNCHERS


@dataclass
class ComposedJob:
    """One job of a command line, composed (what :func:`check_before_start` hands back for ``--cfg``)."""

    cfg: DictConfig
    overrides: list[str]
    label: str
    hydra_dir: tuple[str, str | None]


def _for_every_job(labelled: Sequence[tuple[str, Any]], check: Callable[[Any], None]) -> None:
    """Run ``check`` on every job of ``labelled`` ((label, job) pairs); raise one ConfigError listing every
    problem once, with the sweep jobs it concerns when not all of them."""
    found: dict[str, list[str]] = {}
    for label, item in labelled:
        try:
            check(item)
        except ConfigError as err:
            for problem in err.problems:
                found.setdefault(problem, []).append(label)
        except OmegaConfBaseException as err:  # an interpolation in the hydra node itself
            key = getattr(err, "full_key", None) or "hydra"
            found.setdefault(f"{key}: {getattr(err, 'msg', str(err)).splitlines()[0]}", []).append(label)
    raise_if([problem if len(labels) == len(labelled) else f"{problem} (sweep job {', '.join(labels)})"
              for problem, labels in found.items()])


def check_before_start(overrides: Sequence[str], *, multirun: bool = False, writes: bool = True,
                       validate: bool = True, config_dir: str | Path | None = None,
                       training: bool = True) -> list[ComposedJob]:
    """What the Hydra entry points (train, eval) run before Hydra starts anything: every job of the command
    line is composed, resolved and validated as its task will be, and (``writes``: a real run, not --cfg)
    the directories it writes are checked. ``validate=False``: composition and interpolation only (before
    ``--cfg`` prints; :func:`validate_composed` follows the print with the jobs returned here, so nothing
    is composed twice). ``config_dir``: the user's ``--config-dir``. ``training``: validate as training
    configs (False for an evaluation: see :func:`to_train_config`). Raises one ConfigError listing every
    problem of every job."""
    if not multirun:  # Hydra's own message for this is a raw "Ambiguous value" with exit 1
        raise_if([f"{ov.input_line}: several values are a sweep, which needs -m on the command line; for one "
                  f"run give one value, for a list write {ov.get_key_element()}=[a,b], for text with a comma "
                  f"quote it: {ov.get_key_element()}='a,b'"
                  for ov in _parse_overrides(overrides) if ov.is_sweep_override()])
    composed: list[ComposedJob] = []

    def check(item: tuple[list[str], str]) -> None:
        job, label = item
        cfg = compose(job, config_dir=config_dir)
        done = ComposedJob(cfg, job, label, hydra_dir_of(cfg, multirun))
        if validate:
            _validate(done, multirun=multirun, writes=writes, training=training)
        else:
            resolve_composed(cfg)
            composed.append(done)

    _for_every_job([(label, (job, label)) for job, label in sweep_jobs(overrides)], check)
    return composed


def validate_composed(composed: Sequence[ComposedJob], *, multirun: bool = False,
                      training: bool = True) -> None:
    """Validate jobs :func:`check_before_start` composed with ``validate=False`` (nothing is written, so
    only the run-dir rule among the start checks). Raises one ConfigError listing every problem."""
    _for_every_job([(job.label, job) for job in composed],
                   lambda job: _validate(job, multirun=multirun, writes=False, training=training))


def _validate(job: ComposedJob, *, multirun: bool, writes: bool, training: bool) -> None:
    """The config's problems and the command line's run-dir rule, reported together (an invalid value does
    not hide a sweep over several nodes); the start checks need a valid config."""
    try:
        obj = to_train_config(job.cfg, training=training)
    except ConfigError as err:
        nnodes = OmegaConf.select(job.cfg, "training.nnodes", default=1, throw_on_resolution_failure=False)
        extra = run_dir_problems(nnodes, job.overrides, multirun) if isinstance(nnodes, int) else []
        raise ConfigError([*err.problems, *extra], err.title) from None
    raise_if(start_problems(obj, job.overrides, job.hydra_dir, multirun=multirun, training=training,
                            this_machine=runs_here(job.cfg, multirun)) if writes
             else run_dir_problems(obj.training.nnodes, job.overrides, multirun))
