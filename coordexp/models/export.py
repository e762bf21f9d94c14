"""``python -m coordexp.models.export --checkpoint <ckpt> --out <dir> [--dtype bfloat16]``

Writes a deployable folder from a training checkpoint: full weights with any adapter folded in, loadable as
is by ``swift deploy`` / ``swift rollout`` / vLLM, by transformers' ``from_pretrained`` and by
``coordexp.eval`` (``model.path=<dir>``):

* an **adapter checkpoint** (``adapter_config.json``: a LoRA/DoRA learner's) is loaded onto its base and
  merged with peft's ``merge_and_unload`` in float32 (:mod:`coordexp.models.adapter_checkpoint`); the trained
  coordinate-token rows land in the embedding (and an untied head);
* a **full checkpoint** (``config.json`` + weights, a ``kind: none`` learner's) is re-saved the same way:
  weights, config and tokenizer only, without optimizer/scheduler/trainer state (decided: one command for
  both kinds, so a deploy script never has to know how the run trained).

The folder gets ``config.json`` + ``model.safetensors`` (in ``--dtype``; default: the base's own dtype),
``generation_config.json`` (the base's: stop tokens), the tokenizer with the coordinate vocabulary and chat
template, a vision-language model's image processor, the base's remaining non-weight files (e.g.
``preprocessor_config.json``), and ``coordexp_export.json`` (what was exported from where).

Errors (exit 2, one ``error:`` line): the checkpoint is not a checkpoint folder, an adapter's base is
missing, ``--out`` exists and is not empty, the tokenizer lacks the coordinate vocabulary.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from coordexp.errors import CoordexpError, run_reporting
from coordexp.models.adapter_checkpoint import ADAPTER_CONFIG, adapter_base, is_adapter_checkpoint
from coordexp.models.add_coord_tokens import missing_coord_tokens
from coordexp.models.progress import progress_bars_on_a_terminal_only
from coordexp.models.prompts import load_model_and_prompts

__all__ = ["EXPORT_RECORD", "ExportError", "export_checkpoint", "main"]

EXPORT_RECORD = "coordexp_export.json"
DTYPES = ("float32", "bfloat16", "float16")
#: Files of the base/checkpoint never copied into the export (weights are re-saved; training state dropped).
SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".msgpack", ".h5")
SKIP_PREFIXES = ("adapter_", "optimizer", "scheduler", "rng_state", "training_args")
SKIP_NAMES = {ADAPTER_CONFIG, "trainer_state.json", "README.md", EXPORT_RECORD}


class ExportError(CoordexpError):
    """The checkpoint cannot be exported (the message names the folder and the fix)."""


def _check_paths(checkpoint: Path, out: Path) -> None:
    if not checkpoint.is_dir():
        raise ExportError(f"--checkpoint {checkpoint}: no such folder")
    if not ((checkpoint / "config.json").is_file() or is_adapter_checkpoint(checkpoint)):
        raise ExportError(f"--checkpoint {checkpoint}: not a checkpoint folder (neither config.json nor "
                          f"{ADAPTER_CONFIG}); pass <run_dir>/checkpoint-<N>")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out}: exists and is not an empty folder; pass a new folder")
    if out.resolve() == checkpoint.resolve():
        raise ExportError("--out must differ from --checkpoint")


def _base_dtype(weights_dir: Path) -> str:
    try:
        cfg = json.loads((weights_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    value = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return value if value in DTYPES else "float32"


def export_checkpoint(checkpoint: Path, out: Path, dtype: str | None = None) -> dict:
    """Write the deployable folder ``out`` for ``checkpoint`` (see the module doc); returns the record
    written to ``out/coordexp_export.json``. ``dtype``: float32 | bfloat16 | float16 (None: the base's).
    Raises ExportError / AdapterCheckpointError (exit 2)."""
    checkpoint, out = Path(checkpoint), Path(out)
    _check_paths(checkpoint, out)
    adapter = is_adapter_checkpoint(checkpoint)
    weights_dir = adapter_base(checkpoint) if adapter else checkpoint
    dtype = dtype or _base_dtype(weights_dir)
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    model, tokenizer, prompts = load_model_and_prompts(checkpoint, "float32")  # merge in float32
    missing = missing_coord_tokens(tokenizer)
    if missing:
        raise ExportError(f"--checkpoint {checkpoint}: the tokenizer lacks {len(missing)} coordinate tokens "
                          f"(<|coord_{missing[0]}|> is not one token); add them to the base with python -m "
                          f"coordexp.models.add_coord_tokens")
    model = model.to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if prompts.image_processor is not None:
        prompts.image_processor.save_pretrained(out)
    copied = []
    for src in (checkpoint, weights_dir) if adapter else (checkpoint,):
        for f in sorted(src.iterdir()):
            if (f.is_file() and not (out / f.name).exists() and f.name not in SKIP_NAMES
                    and not f.name.startswith(SKIP_PREFIXES)
                    and not f.name.endswith(SKIP_SUFFIXES)):
                shutil.copy2(f, out / f.name)
                copied.append(f.name)
    record = {"checkpoint": str(checkpoint.resolve()), "base": str(weights_dir), "adapter": None,
              "dtype": dtype, "global_step": _global_step(checkpoint), "copied": copied}
    if adapter:
        cfg = json.loads((checkpoint / ADAPTER_CONFIG).read_text())
        record["adapter"] = {"kind": "dora" if cfg.get("use_dora") else "lora", "r": cfg.get("r"),
                             "alpha": cfg.get("lora_alpha"), "merged": "peft merge_and_unload (float32)"}
    (out / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _global_step(checkpoint: Path) -> int | None:
    try:
        return json.loads((checkpoint / "trainer_state.json").read_text()).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coordexp.models.export",
                                     description="Fold a checkpoint's adapter in; write a deployable folder.")
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="training checkpoint: <run_dir>/checkpoint-<N> (adapter or full)")
    parser.add_argument("--out", type=Path, required=True, help="new folder to write")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="weight dtype of the export (default: the base checkpoint's)")
    args = parser.parse_args(argv)
    progress_bars_on_a_terminal_only()
    record = run_reporting(lambda: export_checkpoint(args.checkpoint, args.out, args.dtype))
    if isinstance(record, int):
        return record
    what = (f"{record['adapter']['kind']} adapter (r {record['adapter']['r']}) merged into {record['base']}"
            if record["adapter"] else "full checkpoint re-saved")
    print(f"exported {args.checkpoint} -> {args.out}: {what}; {record['dtype']} weights; serve or evaluate "
          f"it with model.path={args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
