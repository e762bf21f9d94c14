"""`python -m coordexp.plot <run_dir> [-o out.png]`: training curves of a run as one PNG.

Reads ``<run_dir>/metrics.jsonl`` (one JSON object per log step, written by the learner) and draws four
panels: loss components; rollout F1 (Channel-B steps and evals); truncation / forced-EOS / invalid rates
(train and eval); realized b_ratio with the channel of every step. Default output:
``<run_dir>/training_curves.png``. A missing or empty metrics file is an error (exit 2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

METRICS_NAME = "metrics.jsonl"
OUTPUT_NAME = "training_curves.png"

# drawn first, in this order; any other loss/* key of the run follows
LOSS_KEYS = ("loss/total", "loss/ce", "loss/bbox_smoothl1", "loss/bbox_ciou", "loss/coord_ce")
F1_SERIES = (("rollout/f1", "train B steps: F1 (gate)", "-"),
             ("eval_rollout/f1", "eval: F1 (gate)", "-"),
             ("eval_rollout/f1_iou50", "eval: F1@0.5", "--"),
             ("eval_rollout/f1_iou50_95", "eval: F1@[.5:.95]", ":"),
             ("eval_rollout/desc_match_iou50", "eval: desc match of TPs@0.5", "-."))


class PlotError(RuntimeError):
    pass


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl; a partial last line (run still writing) is skipped."""
    if not path.is_file():
        raise PlotError(f"{path}: no metrics file (is this a run dir of coordexp.train?)")
    lines = path.read_text().splitlines()
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if n == len(lines):
                print(f"warning: {path}:{n}: skipping a partial last line", file=sys.stderr)
                continue
            raise PlotError(f"{path}:{n}: not a JSON object") from None
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    if not records:
        raise PlotError(f"{path}: no metric records (empty file: the run logged nothing yet)")
    return records


def series(records: Sequence[dict], key: str, where=None) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        numeric = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if numeric and (where is None or where(r)):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def rate_series(records: Sequence[dict], num: str, den: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        if isinstance(r.get(num), (int, float)) and r.get(den):
            xs.append(r["step"])
            ys.append(float(r[num]) / float(r[den]))
    return xs, ys


def plot_run(run_dir_or_file: Path, output: Path | None = None) -> Path:
    import matplotlib  # only when a plot is drawn, and the headless backend before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src = Path(run_dir_or_file)
    metrics = src if src.is_file() else src / METRICS_NAME
    records = read_metrics(metrics)
    out = output_path(Path(output) if output else metrics.parent / OUTPUT_NAME)
    train = [r for r in records if "loss" in r or any(k.startswith("loss/") for k in r)]
    loss_keys = [k for k in LOSS_KEYS if any(k in r for r in train)]
    loss_keys += sorted({k for r in train for k in r if k.startswith("loss/")} - set(loss_keys))

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), constrained_layout=True)
    ax = axes[0][0]
    drawn = False
    for key in loss_keys:
        xs, ys = series(train, key)
        if xs:
            ax.plot(xs, ys, label=key, lw=1.4 if key == "loss/total" else 1.0)
            drawn = True
    if not drawn:
        xs, ys = series(train, "loss")
        ax.plot(xs, ys, label="loss")
    ax.set_title("loss components (per log step)")
    ax.set_xlabel("optimizer step")
    _finish(ax)

    ax = axes[0][1]
    for key, label, style in F1_SERIES:
        xs, ys = series(records, key)
        if xs:
            ax.plot(xs, ys, style, marker="o" if key.startswith("eval") else ".", ms=4, label=label)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("rollout F1 (and desc accuracy of matches)")
    ax.set_xlabel("optimizer step")
    _finish(ax)

    ax = axes[1][0]
    for prefix, marker, tag in (("rollout", ".", "train"), ("eval_rollout", "o", "eval")):
        for xs_ys, label in ((series(records, f"{prefix}/parse_truncated_rate"), "truncated"),
                             (rate_series(records, f"{prefix}/repeat_terminate_triggered_sequences",
                                          f"{prefix}/raw_rollouts"), "forced EOS"),
                             (series(records, f"{prefix}/invalid_rollout_rate"), "invalid rollout")):
            xs, ys = xs_ys
            if xs:
                ax.plot(xs, ys, marker=marker, ms=4, lw=1.0, ls="-" if tag == "train" else "--",
                        label=f"{tag}: {label}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("rollout rates (per rollout)")
    ax.set_xlabel("optimizer step")
    _finish(ax)

    ax = axes[1][1]
    xs, ys = series(train, "stage2_ab/b_ratio_realized")
    if xs:
        ax.plot(xs, ys, label="realized b_ratio", color="tab:purple")
    bx, by = series(train, "stage2/channel_b")
    if bx:
        ax.scatter(bx, by, s=8, color="tab:gray", label="channel of the step (1 = B)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Channel-B ratio")
    ax.set_xlabel("optimizer step")
    _finish(ax)

    fig.suptitle(f"{metrics.parent.name}: {len(train)} train log steps, "
                 f"{sum(1 for r in records if 'eval_rollout/f1' in r)} evals")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    except OSError as err:
        raise PlotError(f"cannot write {out}: {err.strerror or err}; pass -o <writable path>.png") from None
    finally:
        plt.close(fig)
    return out


def output_path(out: Path) -> Path:
    """The file the plot is written to: ``out``, ``out/<OUTPUT_NAME>`` for an existing folder, ``out.png``
    without a suffix. Raises PlotError for a suffix matplotlib cannot write."""
    from matplotlib.backend_bases import FigureCanvasBase

    if out.is_dir():
        return out / OUTPUT_NAME
    if not out.suffix:
        return out.with_name(out.name + ".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix[1:].lower() not in formats:
        raise PlotError(f"-o {out}: matplotlib cannot write .{out.suffix[1:]} files; use .png, .pdf or .svg")
    return out


def _finish(ax) -> None:
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data in metrics.jsonl", ha="center", va="center", transform=ax.transAxes,
                color="gray")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m coordexp.plot",
        description="Training curves of a coordexp run (from metrics.jsonl) as a PNG.")
    parser.add_argument("run_dir", type=Path,
                        help="run dir holding metrics.jsonl (or the metrics.jsonl itself)")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help=f"output PNG (default: <run_dir>/{OUTPUT_NAME})")
    ns = parser.parse_args(argv)
    try:
        out = plot_run(ns.run_dir, ns.output)
    except PlotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
