"""The one resolver used by train, preflight, eval and every learner rank.

DictConfig (from Hydra) -> typed, validated ``TrainConfig``. Learner ranks never re-compose from
argv: they load the resolved config the orchestrator saved, through the same schema and rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from coordexp.config import validate
from coordexp.config.errors import ConfigError, raise_if
from coordexp.config.schema import TrainConfig

RESOLVED_CONFIG_NAME = "resolved_config.yaml"


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Resolve, type and validate a composed config; raises ConfigError listing every problem."""
    cfg = cfg.copy()
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
    raise_if(validate.problems(obj))
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


def compose(overrides: Sequence[str]) -> DictConfig:
    """Compose like `python -m coordexp.train <overrides>` does, without running anything.

    Hydra-only interpolations (``${hydra:...}``) resolve as in a real run; the run dir is not created.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException

    from coordexp.config.leaf import check_command_line
    from coordexp.config.paths import CONF_DIR
    from coordexp.config.store import register_configs

    register_configs()
    check_command_line(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    except HydraException as err:
        cause = err.__cause__
        key = getattr(cause, "full_key", None)
        detail = (getattr(cause, "msg", None) or str(cause or err)).splitlines()[0]
        raise ConfigError([f"{key}: {detail} ({str(err).splitlines()[0]})" if key else str(err)]) from None
    HydraConfig.instance().set_config(cfg)
    return cfg


def sweep_jobs(overrides: Sequence[str]) -> list[tuple[list[str], str]]:
    """The jobs of a command line, as (overrides, label): one per combination of its sweep values (a plain
    run is one job with an empty label). Hydra expands sweeps the same way (cartesian product, in order)."""
    import itertools

    from coordexp.config.leaf import _parse_overrides

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


def check_before_start(overrides: Sequence[str], *, multirun: bool = False, writes: bool = True) -> None:
    """What the Hydra entry points (train, eval) run before Hydra starts anything: every job of the command
    line is composed, resolved and validated as its task will be, and (``writes``: a real run, not --cfg)
    the directories it writes are checked. Raises one ConfigError listing every problem of every job."""
    from coordexp.config.validate import dir_problems

    jobs = sweep_jobs(overrides)
    found: dict[str, list[str]] = {}
    for job, label in jobs:
        try:
            cfg = compose(job)
            dirs = ([("hydra.sweep.dir", OmegaConf.select(cfg, "hydra.sweep.dir"))] if multirun else
                    [("hydra.run.dir", OmegaConf.select(cfg, "hydra.run.dir"))])
            obj = to_train_config(cfg)
            if not multirun:
                dirs += [("training.output_dir", obj.training.output_dir),
                         ("training.logging_dir", obj.training.logging_dir)]
            raise_if(dir_problems(dirs) if writes else [])
        except ConfigError as err:
            for problem in err.problems:
                found.setdefault(problem, []).append(label)
        except OmegaConfBaseException as err:  # an interpolation in the hydra node itself
            key = getattr(err, "full_key", None) or "hydra"
            found.setdefault(f"{key}: {getattr(err, 'msg', str(err)).splitlines()[0]}", []).append(label)
    raise_if([problem if len(labels) == len(jobs) else f"{problem} (sweep job {', '.join(labels)})"
              for problem, labels in found.items()])
