"""`python -m coordexp.train +experiment=<leaf> [overrides]` (Hydra app; `-m` sweeps; `--cfg job`)."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from coordexp.cli import run_hydra, run_job
from coordexp.config.load import RESOLVED_CONFIG_NAME, save_resolved
from coordexp.config.paths import CONF_DIR
from coordexp.config.schema import TrainConfig
from coordexp.errors import disk_full_is_an_error, exit_on_error
from coordexp.telemetry.record import say


def split_run_note(output_dir: str, hydra_dir: str) -> str | None:
    """The note a run gets when ``training.output_dir`` is not Hydra's run dir (the run then lives in two
    folders); None when they are the same folder."""
    if Path(output_dir).resolve() == Path(hydra_dir).resolve():
        return None
    return (f"note: training.output_dir={output_dir} is not the run dir Hydra made ({hydra_dir}): "
            f"checkpoints, metrics and TensorBoard go to the first, train.log and .hydra/ stay in the "
            f"second; to keep the run in one folder set hydra.run.dir={output_dir} instead")


def run(cfg: TrainConfig) -> int:
    """Save the resolved config into the run dir, then the run's whole lifecycle (coordexp.launch.run)."""
    run_dir = Path(cfg.training.output_dir)
    note = split_run_note(cfg.training.output_dir, HydraConfig.get().runtime.output_dir)
    if note:
        say(note)
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
