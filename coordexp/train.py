"""`python -m coordexp.train +experiment=<leaf> [overrides]` (Hydra app; `-m` sweeps; `--cfg job`)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from coordexp.cli import run_hydra, run_job
from coordexp.config.load import RESOLVED_CONFIG_NAME, save_resolved
from coordexp.config.paths import CONF_DIR
from coordexp.config.schema import TrainConfig
from coordexp.errors import disk_full_is_an_error, exit_on_error


def run(cfg: TrainConfig) -> int:
    """Save the resolved config into the run dir, then the run's whole lifecycle (coordexp.launch.run)."""
    run_dir = Path(cfg.training.output_dir)
    with exit_on_error(), disk_full_is_an_error(RESOLVED_CONFIG_NAME, run_dir):
        node = cfg.training.node_rank  # multi-node: each node's ranks read their own copy of the shared dir
        name = RESOLVED_CONFIG_NAME if node == 0 else f"resolved_config.node{node}.yaml"
        resolved = save_resolved(cfg, run_dir / name)
    from coordexp.launch.run import run_experiment  # heavy imports only when a run really starts

    return run_experiment(cfg, run_dir, resolved)


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def hydra_task(cfg: DictConfig) -> int:
    return run_job(cfg, run, "job")


def main() -> None:
    run_hydra(hydra_task)


if __name__ == "__main__":
    main()
