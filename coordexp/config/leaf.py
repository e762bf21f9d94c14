"""The one-hop experiment-leaf contract and the pre-composition check of a command line.

A leaf (conf/experiment/**.yaml) selects group options and pins its own knobs; it never includes
another leaf, and it literally pins every high-signal knob below. The same check runs in the loader
(before Hydra composes) and in the test over every leaf.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from coordexp.config.errors import raise_if
from coordexp.config.keys import key_problems, path_problems
from coordexp.config.paths import EXPERIMENT_DIR, available_experiments, is_config_group

REQUIRED_LEAF_KNOBS = (
    "model.path",
    "training.run_name",
    "training.output_dir",
    "training.logging_dir",
    "training.learning_rate",
    "training.effective_batch_size",
    "training.eval_strategy",
    "training.eval_steps",
    "training.save_strategy",
    "training.save_steps",
    "stage2_ab.schedule.b_ratio",
)


def _has_path(raw: Mapping[str, Any], dotted: str) -> bool:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def leaf_file(name: str) -> Path:
    return EXPERIMENT_DIR / f"{name}.yaml"


def leaf_problems(name: str) -> list[str]:
    """Every contract violation of experiment leaf ``name``, all at once."""
    path = leaf_file(name)
    where = f"conf/experiment/{name}.yaml"
    if not path.is_file():
        return [f"+experiment={name}: no such experiment leaf ({where}); available: "
                f"{', '.join(available_experiments())}"]
    return leaf_file_problems(path, where)


def leaf_file_problems(path: Path, where: str) -> list[str]:
    text = path.read_text()
    raw = yaml.safe_load(text) or {}
    problems: list[str] = []
    if not text.lstrip().startswith("# @package _global_"):
        problems.append(f"{where}: a leaf must start with '# @package _global_'")
    for entry in raw.get("defaults", []) or []:
        target = next(iter(entry)) if isinstance(entry, Mapping) else str(entry)
        if "experiment" in target.replace("override ", "").strip("/").split("/")[0]:
            problems.append(f"{where}: defaults entry {entry!r} includes another leaf; leaves are one hop: "
                            f"select group options (model, data, rollout, vllm, stage2_ab/schedule) and pin "
                            f"knobs instead")
    missing = [k for k in REQUIRED_LEAF_KNOBS if not _has_path(raw, k)]
    if missing:
        problems.append(f"{where}: missing required knobs: {', '.join(missing)} (every leaf pins them)")
    problems += [f"{where}: {p}" for p in key_problems(raw)]
    return problems


def _parse_overrides(argv: Sequence[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])


def experiment_from_argv(argv: Sequence[str]) -> str | None:
    for ov in _parse_overrides(argv):
        if ov.key_or_group == "experiment" and not ov.is_delete():
            return str(ov.value())
    return None


def check_command_line(argv: Sequence[str], need_experiment: bool = True) -> None:
    """Pre-composition checks of ``argv`` overrides and the selected leaf; raises ConfigError."""
    problems: list[str] = []
    overrides = _parse_overrides(argv)
    experiment = None
    for ov in overrides:
        key = ov.key_or_group
        if key == "experiment":
            if ov.is_sweep_override():
                problems.append("experiment: sweeping over leaves is not supported; run one leaf per sweep")
            elif not ov.is_delete():
                experiment = str(ov.value())
            continue
        if key.startswith(("hydra.", "hydra/")) or key == "hydra" or is_config_group(key):
            continue
        problem = path_problems(key)
        if problem:
            problems.append(f"{problem} (from command-line override '{ov.input_line}')")
    if experiment is None:
        if need_experiment:
            problems.insert(0, "no experiment selected: add +experiment=<name>; available: "
                               + ", ".join(available_experiments()))
    else:
        problems += leaf_problems(experiment)
    raise_if(problems)
