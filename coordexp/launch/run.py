"""What `python -m coordexp.train` does once the config is valid: record the run, then train with one
in-process learner or a torchrun group on the saved config (ranks never re-compose Hydra)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from coordexp.config.schema import TrainConfig
from coordexp.launch import metadata


def learner_command(cfg: TrainConfig, resolved: Path) -> list[str]:
    nproc = cfg.training.nproc_per_node
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "coordexp.trainer.learner", "--config", str(resolved)]


def run_experiment(cfg: TrainConfig, run_dir: Path, resolved: Path) -> int:
    metadata.write(run_dir, cfg, resolved)
    if cfg.training.nproc_per_node == 1:
        from coordexp.trainer.learner import LearnerError, train

        try:
            return train(cfg, run_dir)
        except LearnerError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(learner_command(cfg, resolved), env=env)
