"""Registers the schema in Hydra's ConfigStore (primary config lists `coordexp_schema` first) and the
`${coordexp_run_dir:}` resolver leaves use for training.output_dir."""

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from coordexp.config.schema import TrainConfig

SCHEMA_NAME = "coordexp_schema"


def _run_dir() -> str:
    """The job's output dir (each multirun job has its own); `hydra.run.dir` where no job runs yet
    (`--cfg job`, preflight)."""
    hydra_cfg = HydraConfig.get()
    return OmegaConf.select(hydra_cfg, "runtime.output_dir", default=None) or hydra_cfg.run.dir


def register_configs() -> None:
    """Store the schema (once per process: turning the dataclasses into a config takes ~40 ms) and the
    resolver."""
    if SCHEMA_NAME + ".yaml" not in ConfigStore.instance().repo:
        ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)
    if not OmegaConf.has_resolver("coordexp_run_dir"):
        OmegaConf.register_new_resolver("coordexp_run_dir", _run_dir)
