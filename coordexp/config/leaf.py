"""The one-hop experiment-leaf contract and the pre-composition check of a command line.

A leaf (conf/experiment/**.yaml) selects group options and pins its own knobs; it never includes
another leaf, and it literally pins every high-signal knob below. The same check runs in the loader
(before Hydra composes) and in the test over every leaf.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from coordexp.config.errors import raise_if
from coordexp.config.keys import key_problems, path_problems
from coordexp.config.paths import (
    CONF_DIR,
    EXPERIMENT_DIR,
    available_experiments,
    config_roots,
    is_config_group,
)
from coordexp.config.value_rules import flatten, raw_value_problems

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

#: Pinned too by every leaf that selects a vision-language model (a tiny *_vl model, or a local checkpoint
#: unless its config.json is readable and has no vision_config; the preflight confirms VL-ness from it).
VL_LEAF_KNOBS = ("training.vit_lr", "training.aligner_lr")
DEFAULT_MODEL_OPTION = "tiny"  # conf/train.yaml's defaults


def _has_path(raw: Mapping[str, Any], dotted: str) -> bool:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def leaf_file(name: str, config_dir: str | Path | None = None) -> Path:
    """The file of leaf ``name``: the first ``experiment/<name>.yaml`` in Hydra's search order (the package's
    conf/, then the user's ``--config-dir``); the package's path when none exists."""
    for root in config_roots(config_dir):
        if (root / "experiment" / f"{name}.yaml").is_file():
            return root / "experiment" / f"{name}.yaml"
    return EXPERIMENT_DIR / f"{name}.yaml"


def _is_leaf_name(name: str) -> bool:
    """A relative path below conf/experiment/ without '..' segments (nothing outside the tree loads)."""
    parts = name.replace("\\", "/").split("/")
    return bool(name) and not name.startswith("/") and ".." not in parts and "" not in parts


def leaf_problems(name: str, config_dir: str | Path | None = None) -> list[str]:
    """Every contract violation of experiment leaf ``name`` (the package's or, with ``config_dir``, the
    user's own), all at once."""
    where = f"conf/experiment/{name}.yaml"
    if config_dir:
        where += f" or {Path(config_dir).resolve() / 'experiment' / name}.yaml"
    if not _is_leaf_name(name) or not leaf_file(name, config_dir).is_file():
        hint = "" if _is_leaf_name(name) else " (a leaf name is a path below conf/experiment/, without '..')"
        return [f"+experiment={name}: no such experiment leaf ({where}){hint}; available: "
                f"{', '.join(available_experiments(config_dir))}"]
    path = leaf_file(name, config_dir)
    if path.is_relative_to(EXPERIMENT_DIR):
        return leaf_file_problems(path, f"conf/experiment/{name}.yaml")
    return leaf_file_problems(path, str(path))


def _defaults_targets(entry: Any, group: str) -> list[str]:
    """The configs (paths below conf/, normalized, no extension) a defaults-list entry of a config in
    ``group`` loads: absolute entries start at conf/, relative ones at the config's own group."""
    if isinstance(entry, Mapping):
        paths = []
        for key, options in entry.items():
            key = str(key).split("@", 1)[0].replace("override ", "").replace("optional ", "").strip()
            for option in options if isinstance(options, list) else [options]:
                if option is not None and str(option) != "???":
                    paths.append(f"{key}/{option}")
    else:
        text = str(entry).split("@", 1)[0].strip()
        paths = [] if text == "_self_" else [text]
    return [posixpath.normpath(p[1:] if p.startswith("/") else f"{group}/{p}") for p in paths]


def _other_leaf_problem(entry: Any, group: str) -> str | None:
    for target in _defaults_targets(entry, group):
        if target == ".." or target.startswith("../"):
            return f"defaults entry {entry!r} loads a config from outside conf/ ({target})"
        if target == "experiment" or target.startswith("experiment/"):
            return (f"defaults entry {entry!r} includes another leaf (conf/{target}.yaml); leaves are one "
                    f"hop: select group options with absolute paths (/model, /data, /rollout, /vllm, "
                    f"/stage2_ab/schedule) and pin knobs instead")
    return None


def _model_option(raw: Mapping[str, Any]) -> str:
    """The /model option a leaf's defaults list selects (the primary config's default otherwise)."""
    for entry in raw.get("defaults", []) or []:
        if isinstance(entry, Mapping):
            for key, option in entry.items():
                key = str(key).replace("override ", "").replace("optional ", "").strip().split("@", 1)[0]
                if key.lstrip("/") == "model" and isinstance(option, str):
                    return option
    return DEFAULT_MODEL_OPTION


def selects_vision_language(raw: Mapping[str, Any], conf_root: Path) -> bool:
    """Whether a leaf (raw YAML) selects a vision-language model: the model option it selects, with the
    leaf's own ``model:`` keys on top, is a tiny ``*_vl`` arch, or a local checkpoint whose config.json is not
    readable here or has a ``vision_config``."""
    option = _model_option(raw)
    model: dict[str, Any] = {}
    for root in (conf_root, CONF_DIR):
        file = root / "model" / f"{option}.yaml"
        if file.is_file():
            model = dict(yaml.safe_load(file.read_text()) or {})
            break
    if isinstance(raw.get("model"), Mapping):
        model.update(raw["model"])
    if str(model.get("kind", "tiny")) == "tiny":
        return str(model.get("tiny_arch", "qwen2")).endswith("_vl")
    try:
        config = json.loads((Path(str(model.get("path"))).expanduser() / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return True  # a production placeholder path: Qwen-VL class, confirmed by the preflight
    return not isinstance(config, Mapping) or config.get("vision_config") is not None


def leaf_file_problems(path: Path, where: str) -> list[str]:
    text = path.read_text()
    raw = yaml.safe_load(text) or {}
    problems: list[str] = []
    if not text.lstrip().startswith("# @package _global_"):
        problems.append(f"{where}: a leaf must start with '# @package _global_'")
    # relative defaults entries start at the leaf's own group, below the nearest experiment/ folder (the
    # package's conf/ or the user's --config-dir); a file elsewhere counts as a top leaf
    group, resolved, conf_root = "experiment", path.resolve(), CONF_DIR
    for parent in resolved.parents:
        if parent.name == "experiment":
            group = resolved.parent.relative_to(parent.parent).as_posix()
            conf_root = parent.parent
            break
    for entry in raw.get("defaults", []) or []:
        problem = _other_leaf_problem(entry, group)
        if problem:
            problems.append(f"{where}: {problem}")
    missing = [k for k in REQUIRED_LEAF_KNOBS if not _has_path(raw, k)]
    vl_missing = ([k for k in VL_LEAF_KNOBS if not _has_path(raw, k)]
                  if selects_vision_language(raw, conf_root) else [])
    if missing or vl_missing:
        why = "; ".join(([] if not missing else ["every leaf pins them"])
                        + ([] if not vl_missing else ["a leaf that selects a vision-language model also pins "
                                                      "the vision tower's and the aligner's learning rates"]))
        problems.append(f"{where}: missing required knobs: {', '.join(missing + vl_missing)} ({why})")
    problems += [f"{where}: {p}" for p in key_problems(raw)]
    body = {k: v for k, v in raw.items() if k not in ("defaults", "hydra")}
    problems += [f"{where}: {p}" for p in raw_value_problems(flatten(body))]
    return problems


def _parse_overrides(argv: Sequence[str]):
    """Hydra's override objects; a line Hydra cannot parse is a ConfigError naming its key (all at once)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    overrides, problems = [], []
    for arg in (a for a in argv if not a.startswith("-")):
        try:
            overrides += parser.parse_overrides([arg])
        except OverrideParseException as err:
            key, sep, value = arg.partition("=")
            detail = " ".join(str(err).split("\n")[-2:-1] or [str(err)]).strip()
            if not sep:
                problems.append(f"{arg}: not an override: write key=value (+key=value adds a key, ~key "
                                f"deletes one); Hydra: {detail}")
            elif not value.isascii() and value[:1] not in ("'", '"', "[", "{") and "'" not in value:
                problems.append(f"{key}: cannot parse the value of override '{arg}': Hydra reads unquoted "
                                f"values in ASCII only; quote it (the shell's double quotes keep Hydra's "
                                f"single quotes): \"{key}='{value}'\"")
            else:
                problems.append(f"{key}: cannot parse the value of override '{arg}': {detail}. An "
                                f"unterminated '${{' or an unbalanced bracket or quote? Quote the value or "
                                f"close it")
    raise_if(problems)
    return overrides


def _override_values(ov) -> list[Any]:
    """The values an override assigns (every value of a simple sweep; none for deletions and globs)."""
    if ov.is_delete():
        return []
    try:
        return list(ov.sweep_iterator()) if ov.is_sweep_override() else [ov.value()]
    except Exception:  # noqa: BLE001 - a sweep kind without plain values (glob): Hydra checks those itself
        return []


def experiment_from_argv(argv: Sequence[str]) -> str | None:
    for ov in _parse_overrides(argv):
        if ov.key_or_group == "experiment" and not ov.is_delete():
            return str(ov.value())
    return None


def _has_submitit() -> bool:
    import importlib.util

    return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None


def check_command_line(argv: Sequence[str], need_experiment: bool = True,
                       config_dir: str | Path | None = None) -> None:
    """Pre-composition checks of ``argv`` overrides and the selected leaf (``config_dir``: the user's own
    config dir, ``--config-dir``, with its leaves and groups); raises ConfigError."""
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
        if key == "hydra/launcher" and str(ov.value()).startswith("submitit") and not _has_submitit():
            problems.append(f"{ov.input_line}: Hydra's submitit launcher is not installed: pip install "
                            f"hydra-submitit-launcher (docs/runbook.md, Clusters)")
            continue
        if key.startswith(("hydra.", "hydra/")) or key == "hydra" or is_config_group(key, config_dir):
            continue
        problem = path_problems(key)
        if problem:
            problems.append(f"{problem} (from command-line override '{ov.input_line}')")
            continue
        problems += [f"{p} (from command-line override '{ov.input_line}')"
                     for p in raw_value_problems((key, value) for value in _override_values(ov))]
    if experiment is None:
        if need_experiment:
            problems.insert(0, "no experiment selected: add +experiment=<name>; available: "
                               + ", ".join(available_experiments(config_dir)))
    else:
        problems += leaf_problems(experiment, config_dir)
    raise_if(problems)
