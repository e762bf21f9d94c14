"""Paths in a config mean the same whatever the working directory: relative ones are taken from where the
command was started (Hydra's ``hydra.runtime.cwd``), so ``hydra.job.chdir=true``, which moves the job into
its run dir, changes neither the tiny-model cache nor the data a run reads (``hydra.utils.to_absolute_path``
is Hydra's own rule for this, applied here to every path field of the schema)."""

from __future__ import annotations

from pathlib import Path

from hydra.utils import to_absolute_path

from coordexp.config.schema import TrainConfig

#: Every path field of the schema (a test checks that no ``*path``/``*_dir``/``*_jsonl``/``*_root`` field is
#: missing here). ``training.resume_from_checkpoint`` keeps its keyword ``latest``.
PATH_FIELDS = (
    "model.path",
    "data.train_jsonl",
    "data.val_jsonl",
    "training.output_dir",
    "training.logging_dir",
    "training.resume_from_checkpoint",
    "vllm.server.image_root",
)
KEYWORDS = ("latest",)


def absolute_path(value: str, base: str | None = None) -> str:
    """``value`` absolute: as it is, or against ``base`` (default: where the command started)."""
    if base is None:
        return to_absolute_path(value)  # Hydra's rule: against the original cwd inside a Hydra job
    return value if Path(value).is_absolute() else str(Path(base) / value)


def absolute_paths(obj: TrainConfig, base: str | None = None) -> TrainConfig:
    """Make every relative path field of ``obj`` absolute (in place), against ``base`` or, without it, the
    directory the command started in. Empty, unset and keyword values are left alone."""
    for dotted in PATH_FIELDS:
        *parents, name = dotted.split(".")
        node = obj
        for part in parents:
            node = getattr(node, part)
        value = getattr(node, name)
        if isinstance(value, str) and value and value not in KEYWORDS:
            setattr(node, name, absolute_path(value, base))
    return obj
