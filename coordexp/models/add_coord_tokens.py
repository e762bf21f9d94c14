"""``python -m coordexp.models.add_coord_tokens --src <ckpt> --dst <new folder>``: give a checkpoint the 1000
coordinate tokens ``<|coord_0|>`` .. ``<|coord_999|>``.

What it does (docs/own_data.md, "A checkpoint without coordinate tokens"):

1. adds every missing ``<|coord_k|>`` to the tokenizer as one added, non-special, non-normalized token (so
   ``decode(..., skip_special_tokens=True)`` keeps it and it is never split); tokens already there keep
   their ids;
2. grows the input embedding matrix (and the output head when it is not tied) to the tokenizer's length
   when it is smaller (Qwen checkpoints carry spare rows, which are used first); the rows of the existing
   tokens are not touched;
3. initialises each new row ``k`` as ``mean + scale * std * sin(pi * f * k / 999 + phase)`` over the
   existing tokens' rows (``mean``, ``std`` per dimension; one low frequency ``f`` in [0.5, 4] and one phase
   per dimension, from a fixed seed). Why: the mean row makes a new token look like an average token, so
   the model's outputs barely move (its logit is an average logit); the smooth ordered term makes bin
   ``k`` start close to bins ``k +- 1`` and far from distant bins, so the coordinate geometry is ordered
   from the first step and bins are not interchangeable. The output head rows (untied) get the same rule
   from the head's own rows, and a bias (if any) the mean bias;
4. saves model and tokenizer into ``--dst`` and copies every other file of ``--src`` (image/video
   processor config, chat template, generation config, ...) that the save did not write; records what it
   did in ``coordexp_coord_tokens.json``.

Idempotent: a checkpoint whose tokenizer already encodes every ``<|coord_k|>`` as one token is left alone
(nothing is written; the message says so). ``--dst`` must be a new or empty folder: nothing is overwritten.
Problems the user can fix end with ``error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coordexp.coordjson import NUM_BINS
from coordexp.errors import CoordexpError, run_reporting
from coordexp.models.progress import progress_bars_on_a_terminal_only

RECORD_FILE = "coordexp_coord_tokens.json"
DEFAULT_SCALE = 0.25
SEED = 1000
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")

__all__ = ["AddCoordTokensError", "add_coord_tokens", "coord_rows", "main", "missing_coord_tokens"]


class AddCoordTokensError(CoordexpError, ValueError):
    """A problem with --src or --dst the user can fix (printed as one ``error:`` screen, exit code 2)."""


def coord_token(k: int) -> str:
    return f"<|coord_{k}|>"


def missing_coord_tokens(tokenizer) -> list[int]:
    """Bins k whose ``<|coord_k|>`` is not one token of ``tokenizer`` (absent, or encoded as several ids)."""
    vocab = tokenizer.get_vocab()
    missing = []
    for k in range(NUM_BINS):
        t = coord_token(k)
        if t not in vocab or tokenizer.encode(t, add_special_tokens=False) != [vocab[t]]:
            missing.append(k)
    return missing


def coord_rows(existing, bins: Sequence[int], scale: float = DEFAULT_SCALE, seed: int = SEED):
    """Initial rows for coordinate bins ``bins``: float32 tensor ``[len(bins), d]`` from ``existing``
    (``[n, d]``, the rows of the tokens the checkpoint already has) by the rule in the module docstring."""
    import torch

    existing = existing.detach().float()
    mean, std = existing.mean(0), existing.std(0) if existing.shape[0] > 1 else torch.zeros(existing.shape[1])
    gen = torch.Generator().manual_seed(seed)
    d = existing.shape[1]
    freq = 0.5 + 3.5 * torch.rand(d, generator=gen)
    phase = 2 * math.pi * torch.rand(d, generator=gen)
    k = torch.tensor([float(b) for b in bins])[:, None]
    return mean + scale * std * torch.sin(math.pi * freq * k / (NUM_BINS - 1) + phase)


def _model_class(src: Path):
    import transformers

    try:
        config = json.loads((src / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise AddCoordTokensError(f"--src {src}: no readable config.json ({err}); pass a checkpoint folder "
                                  f"(save_pretrained output)") from None
    vision = "vision_config" in config
    return transformers.AutoModelForImageTextToText if vision else transformers.AutoModelForCausalLM


def _check_dst(src: Path, dst: Path) -> None:
    if dst.resolve() == src.resolve():
        raise AddCoordTokensError(f"--dst {dst} is --src: write to a new folder (the source checkpoint is "
                                  f"never modified)")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise AddCoordTokensError(f"--dst {dst} exists and is not empty: pass a new folder (nothing is "
                                  f"overwritten)")


def add_coord_tokens(src: str | Path, dst: str | Path, *, scale: float = DEFAULT_SCALE) -> dict[str, Any]:
    """Add the missing coordinate tokens of checkpoint ``src`` and save the result into ``dst``.

    Returns a summary: ``added`` (count; 0 means nothing was written), ``ids`` (first, last new id),
    ``rows`` (embedding rows before, after), ``tied``. Raises :class:`AddCoordTokensError`."""
    import torch
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise AddCoordTokensError(f"--src {src}: not a checkpoint folder (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as err:
        raise AddCoordTokensError(f"--src {src}: the tokenizer does not load ({err})") from None
    missing = missing_coord_tokens(tokenizer)
    if not missing:
        return {"added": 0, "src": str(src), "dst": None}
    _check_dst(src, dst)
    model_class = _model_class(src)
    try:
        model = model_class.from_pretrained(src, dtype="auto")
    except (OSError, ValueError) as err:
        raise AddCoordTokensError(f"--src {src}: the model does not load ({err})") from None
    old_len = len(tokenizer)
    tokenizer.add_tokens([AddedToken(coord_token(k), special=False, normalized=False) for k in missing])
    new_ids = [tokenizer.convert_tokens_to_ids(coord_token(k)) for k in missing]
    emb = model.get_input_embeddings()
    rows_before = emb.num_embeddings
    if len(tokenizer) > rows_before:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is None or head.weight.data_ptr() == emb.weight.data_ptr()
    known = min(old_len, rows_before)  # rows of tokens the checkpoint had (not its spare rows)
    index = torch.tensor(new_ids)
    with torch.no_grad():
        emb.weight[index] = coord_rows(emb.weight[:known], missing, scale).to(emb.weight.dtype)
        if not tied:
            head.weight[index] = coord_rows(head.weight[:known], missing, scale, seed=SEED + 1).to(
                head.weight.dtype)
            if getattr(head, "bias", None) is not None:
                head.bias[index] = head.bias[:known].float().mean().to(head.bias.dtype)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and not (dst / f.name).exists() and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    summary = {"added": len(missing), "src": str(src), "dst": str(dst), "ids": [min(new_ids), max(new_ids)],
               "contiguous": new_ids == list(range(new_ids[0], new_ids[0] + len(new_ids))),
               "rows": [rows_before, model.get_input_embeddings().num_embeddings], "tied": tied,
               "init": {"rule": "mean + scale * std * sin(pi * f * k / 999 + phase)", "scale": scale,
                        "seed": SEED, "rows_used": known},
               "copied": copied}
    (dst / RECORD_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    _verify(dst)
    return summary


def _verify(dst: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(dst)
    still = missing_coord_tokens(tokenizer)
    if still:
        raise RuntimeError(f"{dst}: after adding, {len(still)} coordinate tokens still do not encode as one "
                           f"token (first: {coord_token(still[0])})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coordexp.models.add_coord_tokens",
                                     description="Add <|coord_0|>..<|coord_999|> to a checkpoint.")
    parser.add_argument("--src", type=Path, required=True, help="checkpoint folder to read")
    parser.add_argument("--dst", type=Path, required=True, help="new folder to write")
    parser.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                        help=f"size of the ordered component in units of the per-dimension std "
                             f"(default {DEFAULT_SCALE})")
    args = parser.parse_args(argv)
    progress_bars_on_a_terminal_only()
    summary = run_reporting(lambda: add_coord_tokens(args.src, args.dst, scale=args.scale))
    if isinstance(summary, int):
        return summary
    if not summary["added"]:
        print(f"{args.src} already has all {NUM_BINS} coordinate tokens as single tokens: nothing to do, "
              f"nothing written (use {args.src} as model.path)")
        return 0
    rows = summary["rows"]
    print(f"added {summary['added']} coordinate tokens (ids {summary['ids'][0]}..{summary['ids'][1]}) to "
          f"{args.dst}; embedding rows {rows[0]} -> {rows[1]} ({'tied' if summary['tied'] else 'untied'} "
          f"head); copied {', '.join(summary['copied']) or 'nothing else'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
