"""Typed config: schema, legacy keys, leaf contract, validation, normalization, preflight."""

from coordexp.config.errors import ConfigError
from coordexp.config.load import load_saved, to_train_config
from coordexp.config.schema import TrainConfig

__all__ = ["ConfigError", "TrainConfig", "load_saved", "to_train_config"]
