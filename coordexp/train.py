"""`python -m coordexp.train +experiment=<leaf> [overrides]` (Hydra app; `-m` sweeps; `--cfg job`)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from coordexp.config.errors import exit_on_config_error
from coordexp.config.leaf import check_command_line
from coordexp.config.load import RESOLVED_CONFIG_NAME, save_resolved, to_train_config
from coordexp.config.paths import CONF_DIR
from coordexp.config.store import register_configs


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def hydra_task(cfg: DictConfig) -> int:
    with exit_on_config_error():
        train_cfg = to_train_config(cfg)
    run_dir = Path(train_cfg.training.output_dir)
    resolved = save_resolved(train_cfg, run_dir / RESOLVED_CONFIG_NAME)
    from coordexp.launch.run import run_experiment  # heavy imports only when a run really starts

    code = run_experiment(train_cfg, run_dir, resolved)
    if code != 0:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise RuntimeError(f"job {run_dir} failed with exit code {code}")  # the sweep reports it
        sys.exit(code)
    return code


def main() -> None:
    register_configs()
    if "--help" not in sys.argv and "-h" not in sys.argv and "--hydra-help" not in sys.argv:
        with exit_on_config_error():
            check_command_line(_overrides(sys.argv[1:]))
    cfg_kind = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a in ("--cfg", "-c")), None)
    if cfg_kind == "job" and "--resolve" not in sys.argv:
        sys.argv.append("--resolve")  # `--cfg job` prints the resolved config, ready to diff
    hydra_task()


def _overrides(args: list[str]) -> list[str]:
    """Hydra overrides among the CLI args (flags like -m, --cfg job, --resolve are skipped)."""
    out, skip_next = [], False
    for arg in args:
        if skip_next:
            skip_next = False
        elif arg in ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"):
            skip_next = arg not in ("--info", "-i")
        elif not arg.startswith("-"):
            out.append(arg)
    return out


if __name__ == "__main__":
    main()
