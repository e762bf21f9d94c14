"""Packaging of the Hydra launcher plugin: installed with the project, discovered by Hydra, selectable as
``hydra/launcher=coordexp`` - checked in a fresh interpreter outside the repo (so only the installed
(editable) project can make ``hydra_plugins.coordexp_launcher`` importable, not the working directory)."""

from __future__ import annotations

import configparser
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_setup_cfg_lists_every_coordexp_package_and_the_plugin():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = {p.strip() for p in cfg["options"]["packages"].split() if p.strip()}
    on_disk = {"coordexp"} | {
        "coordexp." + ".".join(d.relative_to(REPO / "coordexp").parts)
        for d in (REPO / "coordexp").rglob("*")
        if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))
    }
    assert on_disk <= listed, f"add to setup.cfg [options] packages: {sorted(on_disk - listed)}"
    assert {"hydra_plugins", "hydra_plugins.coordexp_launcher"} <= listed
    package_dir = cfg["options"]["package_dir"]
    assert "hydra_plugins = launchers/hydra_plugins" in package_dir
    assert not (REPO / "launchers" / "hydra_plugins" / "__init__.py").exists(), (
        "hydra_plugins is a namespace package"
    )
    assert (REPO / "launchers" / "hydra_plugins" / "coordexp_launcher" / "coordexp_launcher.py").is_file()


PROBE = r"""
import json, sys
import hydra_plugins
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.core.config_store import ConfigStore
launchers = [f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Launcher)]
repo = ConfigStore.instance().repo
print(json.dumps({"path": [str(p) for p in hydra_plugins.__path__], "launchers": launchers,
                  "stored": sorted(repo["hydra"]["launcher"].keys())}))
"""


def test_hydra_discovers_the_installed_launcher_from_outside_the_repo(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:] + "\n(run `pip install -e .` after changing setup.cfg)"
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert any(p.endswith("launchers/hydra_plugins") for p in info["path"]), info
    assert "hydra_plugins.coordexp_launcher.coordexp_launcher.CoordexpLauncher" in info["launchers"]
    assert "coordexp.yaml" in info["stored"]


def test_launcher_group_composes_with_the_train_config():
    from coordexp.config.load import compose

    cfg = compose(["+experiment=smoke/ab_mixed", "hydra/launcher=coordexp"])
    assert cfg.hydra.launcher._target_ == "hydra_plugins.coordexp_launcher.coordexp_launcher.CoordexpLauncher"
    assert cfg.hydra.launcher.share_server is True
