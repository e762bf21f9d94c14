"""``training.report_to``: the experiment trackers a run logs to, checked before anything starts, and how
each runs without a network (wandb offline, mlflow on a local file store) unless the user's environment
says otherwise."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from coordexp.config.schema import ReportTo

#: The Python package each tracker needs and how to install it.
PACKAGES = {ReportTo.wandb: ("wandb", "pip install wandb"), ReportTo.mlflow: ("mlflow", "pip install mlflow")}


def tracker_problems(report_to: Iterable[ReportTo]) -> list[str]:
    """A problem per tracker whose package is not installed (naming the pip install), and per duplicate."""
    problems, seen = [], set()
    for i, tracker in enumerate(report_to):
        tracker = ReportTo(tracker)
        if tracker in seen:
            problems.append(f"training.report_to[{i}]: '{tracker.value}' is listed twice")
        seen.add(tracker)
        package, install = PACKAGES.get(tracker, (None, None))
        if package and importlib.util.find_spec(package) is None:
            problems.append(f"training.report_to[{i}]: '{tracker.value}' is not installed in this "
                            f"environment: {install}, or drop it from training.report_to (tensorboard needs "
                            f"nothing)")
    return problems


def tracker_environment(report_to: Iterable[ReportTo], run_dir: Path,
                        environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables that keep the trackers local (set only where the user has not set them):
    wandb offline with its files in the run dir, mlflow on the file store ``<run_dir>/mlruns``."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    trackers = {ReportTo(r) for r in report_to}
    if ReportTo.wandb in trackers:
        out.update({k: v for k, v in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(run_dir)))
                    if k not in env})
    if ReportTo.mlflow in trackers and "MLFLOW_TRACKING_URI" not in env:
        out["MLFLOW_TRACKING_URI"] = (Path(run_dir) / "mlruns").resolve().as_uri()
        if "MLFLOW_ALLOW_FILE_STORE" not in env:  # mlflow 3 refuses its file store unless told so
            out["MLFLOW_ALLOW_FILE_STORE"] = "true"
    return out
