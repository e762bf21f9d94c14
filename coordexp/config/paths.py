"""Where the config tree lives (independent of the working directory)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
EXPERIMENT_DIR = CONF_DIR / "experiment"


def available_experiments() -> list[str]:
    return sorted(str(p.relative_to(EXPERIMENT_DIR).with_suffix("")) for p in EXPERIMENT_DIR.rglob("*.yaml"))


def is_config_group(name: str) -> bool:
    return (CONF_DIR / name.replace(".", "/")).is_dir()
