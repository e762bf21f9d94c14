"""Where the config tree lives (independent of the working directory)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
EXPERIMENT_DIR = CONF_DIR / "experiment"


def config_roots(config_dir: str | Path | None = None) -> list[Path]:
    """Where configs are looked up, in Hydra's order: the package's conf/, then the user's own config dir
    (``--config-dir``), which Hydra searches after the primary config's dir."""
    return [CONF_DIR, *([Path(config_dir).resolve()] if config_dir else [])]


def available_experiments(config_dir: str | Path | None = None) -> list[str]:
    names: set[str] = set()
    for root in config_roots(config_dir):
        leaves = root / "experiment"
        names.update(str(p.relative_to(leaves).with_suffix("")) for p in leaves.rglob("*.yaml"))
    return sorted(names)


def is_config_group(name: str, config_dir: str | Path | None = None) -> bool:
    return any((root / name.replace(".", "/")).is_dir() for root in config_roots(config_dir))
