"""Rules by kind of value, whatever the key (finite numbers, named strings, typed list items, the library
choices of a few keys), the raw-value rules OmegaConf would hide by coercing, and the writable-directory
probe. :func:`coordexp.config.validate.problems` applies :func:`value_problems` after the cross-field
rules."""

from __future__ import annotations

import dataclasses
import math
import tempfile
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from coordexp.config.keys import _type_at
from coordexp.config.metric_names import BEST_MODEL_METRICS, EVAL_METRICS
from coordexp.config.schema import TrainConfig
from coordexp.config.trackers import tracker_problems

#: The longest wait a timeout may ask for, in seconds: finite, and within what sockets and threads accept.
MAX_WAIT_S = 7 * 24 * 3600.0
#: numpy's seed range (transformers.set_seed seeds numpy as well).
MAX_SEED = 2**32 - 1
#: transformers ``SchedulerType`` names the learner builds from ``training.lr_scheduler_type`` alone. With
#: UNSUPPORTED_LR_SCHEDULERS they cover the whole enum (a test compares them with transformers').
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
_NEEDS_KWARGS = "needs lr_scheduler_kwargs ({}), which coordexp does not pass"
_STEPS_ON_METRIC = ("steps on an eval metric in 'min' mode, while every metric_for_best_model coordexp "
                    "accepts is higher-is-better")
UNSUPPORTED_LR_SCHEDULERS = {
    "cosine_with_min_lr": _NEEDS_KWARGS.format("min_lr or min_lr_rate"),
    "cosine_warmup_with_min_lr": _NEEDS_KWARGS.format("min_lr or min_lr_rate"),
    "warmup_stable_decay": _NEEDS_KWARGS.format("num_decay_steps"),
    "reduce_lr_on_plateau": _STEPS_ON_METRIC,
    "greedy": _STEPS_ON_METRIC,
}
#: Bytes the directory probe writes (and removes): room for the run's first files (Hydra's .hydra/, the
#: resolved config, the metadata).
WRITE_PROBE_BYTES = 256 << 10
#: String keys that may be empty (free text). Every other string names something: a path, a host, a run.
FREE_TEXT_KEYS = frozenset({"data.system_prompt"})


def kind_of(value: object) -> str:
    """How a value reads in a message: "a mapping", "a list", "a boolean", "null", "a str", ..."""
    return {dict: "a mapping", list: "a list", bool: "a boolean", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}")


def _leaves(node: object, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted path, declared type, value) of every non-dataclass field of a typed config, depth first."""
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):  # type: ignore[arg-type]
        value, path = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, path + ".")
        else:
            yield path, hints[f.name], value


def _optional_of(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), True
    return tp, False


def _is_a(value: object, tp: Any) -> bool:
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def nonfinite_keys(cfg: TrainConfig) -> set[str]:
    """Keys holding nan or +-inf: :func:`value_problems` names them so, before any range rule would."""
    return {path for path, _, value in _leaves(cfg) if isinstance(value, float) and not math.isfinite(value)}


def value_problems(cfg: TrainConfig, reported: Iterable[str] = ()) -> list[str]:
    """Rules by kind of value plus the library choices, first problem per key only (``reported``: keys that
    already have one)."""
    out: list[str] = []
    seen = set(reported)

    def need(ok: bool, path: str, message: str) -> None:
        if not ok and path not in seen:
            seen.add(path)
            out.append(f"{path}: {message}")

    for path, declared, value in _leaves(cfg):
        tp, optional = _optional_of(declared)
        if value is None:
            continue
        if tp is float:
            need(math.isfinite(value), path, f"{value} is not a finite number")
        elif tp is str and path not in FREE_TEXT_KEYS:
            need(bool(value.strip()), path, "is empty, but it names something: set it"
                 + (" (or null to leave it unset)" if optional else ""))
        elif typing.get_origin(tp) is list:
            (item_tp,) = typing.get_args(tp)
            for i, item in enumerate(value):
                need(_is_a(item, item_tp), f"{path}[{i}]",
                     f"{kind_of(item)} {item!r} where a list item of type {item_tp.__name__} belongs")

    t, v = cfg.training, cfg.vllm
    sched = t.lr_scheduler_type
    choices = f"use one of {', '.join(LR_SCHEDULERS)}"
    need(sched not in UNSUPPORTED_LR_SCHEDULERS, "training.lr_scheduler_type",
         f"'{sched}' {UNSUPPORTED_LR_SCHEDULERS.get(sched)}; {choices}")
    need(sched in LR_SCHEDULERS, "training.lr_scheduler_type",
         f"'{sched}' is not a transformers scheduler (transformers.SchedulerType); {choices}")
    metric = t.metric_for_best_model
    best = f"use one of {', '.join(BEST_MODEL_METRICS)}"
    need(metric in EVAL_METRICS, "training.metric_for_best_model",
         f"'{metric}' is not a metric the rollout eval logs (docs/metrics.md); {best}")
    need(EVAL_METRICS.get(metric, True), "training.metric_for_best_model",
         f"'{metric}' is a metric where higher is not better, but the learner keeps the checkpoint with the "
         f"highest value; {best}")
    out.extend(tracker_problems(t.report_to))
    limit = cfg.data.val_sample_limit
    need(limit is None or limit >= 1, "data.val_sample_limit",
         f"{limit}: must be >= 1, or null for every held-out sample (training.eval_strategy: no turns eval "
         "off)")
    need(cfg.data.image_check_samples >= 1, "data.image_check_samples",
         f"{cfg.data.image_check_samples}: must be >= 1 (data.image_check: all checks every record)")
    need(v.server.log_tail_lines >= 0, "vllm.server.log_tail_lines", "must be >= 0 (0 prints no log tail)")
    for path, seed in (("seed", cfg.seed), ("data.synthetic.seed", cfg.data.synthetic.seed)):
        need(0 <= seed <= MAX_SEED, path, f"{seed} is outside [0, 2**32 - 1] (numpy's seed range)")
    for path, wait in (("vllm.server.startup_timeout_s", v.server.startup_timeout_s),
                       ("vllm.server.infer_timeout_s", v.server.infer_timeout_s),
                       ("vllm.server.request_timeout_s", v.server.request_timeout_s),
                       ("vllm.sync.timeout_s", v.sync.timeout_s)):
        need(wait <= MAX_WAIT_S, path,
             f"{wait} s is longer than {MAX_WAIT_S:.0f} s (7 days), the longest wait coordexp accepts")
    return out


def _is_interpolation(value: object) -> bool:
    return isinstance(value, str) and "${" in value


def raw_value_problems(values: Iterable[tuple[str, Any]]) -> list[str]:
    """Rules OmegaConf would hide by coercing, applied to raw ``(dotted path, value)`` pairs of a leaf file or
    a command-line override: a boolean key takes true or false only (OmegaConf turns 2 or 'yes' into true)."""
    out = []
    for path, value in values:
        declared = _type_at(path)
        if declared is bool and not isinstance(value, bool) and not _is_interpolation(value):
            out.append(f"{path}: {value!r} is not a boolean: use true or false")
    return out


def flatten(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every non-mapping value of a raw mapping (lists are values)."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from flatten(value, f"{prefix}.{key}" if prefix else str(key))
    elif prefix:
        yield prefix, node


def _dir_problem(path: Path) -> str | None:
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return "exists and is not a directory" if probe == path else f"cannot be created: '{probe}' is a file"
    try:  # a folder and a small file in it: a disk too full for the run's first files fails here
        with tempfile.TemporaryDirectory(dir=probe, prefix=".coordexp-write-check-") as tmp:
            Path(tmp, "probe").write_bytes(bytes(WRITE_PROBE_BYTES))
    except OSError as err:
        where = "" if probe == path else f" (nothing can be created in '{probe}')"
        return f"is not writable{where}: {err.strerror or err}"
    return None


def data_file_problems(cfg: TrainConfig, training: bool = True) -> list[str]:
    """The JSONL files the run reads: ``data.train_jsonl`` (``training``) and ``data.val_jsonl`` must be
    files, checked before anything starts (the model load, a server)."""
    keys = (("data.train_jsonl", cfg.data.train_jsonl),) if training else ()
    out = []
    for key, raw in (*keys, ("data.val_jsonl", cfg.data.val_jsonl)):
        if raw and not Path(raw).expanduser().is_file():
            what = "is a folder, not a JSONL file" if Path(raw).expanduser().is_dir() else "does not exist"
            out.append(f"{key}: '{raw}' {what}")
    return out


def dir_problems(dirs: Iterable[tuple[str, str | None]]) -> list[str]:
    """Directories a run creates and writes, as ``(key, path)``: each must be a directory or creatable, and
    writable. Probes by creating (and removing) an empty folder; nothing else is left behind. A path at or
    below one already reported is not reported again."""
    out: list[str] = []
    failed: list[Path] = []
    for key, raw in dirs:
        path = Path(raw).expanduser().absolute() if raw else None
        if path is None or any(path == f or f in path.parents for f in failed):
            continue
        problem = _dir_problem(path)
        if problem:
            failed.append(path)
            out.append(f"{key}: '{raw}' {problem}")
    return out
