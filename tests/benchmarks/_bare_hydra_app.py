"""Baseline for bench_config_compose: a bare Hydra app composing the same tree and printing it."""

import hydra
from omegaconf import DictConfig, OmegaConf

from coordexp.config.store import register_configs

register_configs()


@hydra.main(config_path="../../conf", config_name="train", version_base="1.3")
def app(cfg: DictConfig) -> None:
    print(OmegaConf.to_yaml(cfg))


if __name__ == "__main__":
    app()
