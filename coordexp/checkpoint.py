"""Facts about a checkpoint folder read from its JSON files only (no torch, no transformers).

The launcher, the rollout client side and the learner all ask these questions of the same folder; one
module answers them so the answers cannot drift apart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = [
    "CHATML_TEMPLATE",
    "is_tiny_checkpoint",
    "is_vision_language",
    "model_type",
    "read_config",
    "read_eos_token_id",
    "read_generation_config",
    "read_stop_ids",
]

# ChatML, identical to ms-swift's `chatml` template (no default system turn, no BOS). String contents
# render as is; list contents render their text parts only. The tiny text models ship it; a folder that
# carries it was built by or trained from them.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` as a dict; ``{}`` when it is missing or not JSON."""
    try:
        value = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def model_type(model_dir: str | os.PathLike) -> str | None:
    """``config.json``'s ``model_type`` (e.g. ``qwen2``, ``qwen2_5_vl``); None when unknown."""
    return read_config(model_dir).get("model_type")


def is_vision_language(model_dir: str | os.PathLike) -> bool:
    """True for a vision-language checkpoint (its ``config.json`` has a ``vision_config``)."""
    return "vision_config" in read_config(model_dir)


def is_tiny_checkpoint(model_dir: str | os.PathLike) -> bool:
    """A folder of the tiny text model or trained from it (e.g. ``<run_dir>/checkpoint-N``): its chat
    template is the tiny model's ChatML."""
    try:
        return (Path(model_dir) / "chat_template.jinja").read_text() == CHATML_TEMPLATE
    except OSError:
        return False


def read_eos_token_id(model_dir: str | os.PathLike) -> int | None:
    """The tokenizer's EOS id from the folder's tokenizer files; None if it cannot be determined."""
    d = Path(model_dir)
    try:
        tc = json.loads((d / "tokenizer_config.json").read_text())
        eos = tc.get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if not isinstance(eos, str):
            return None
        tj_path = d / "tokenizer.json"
        if tj_path.is_file():
            tj = json.loads(tj_path.read_text())
            for tok in tj.get("added_tokens", []):
                if tok.get("content") == eos:
                    return int(tok["id"])
            vocab = (tj.get("model") or {}).get("vocab") or {}
            if isinstance(vocab, dict) and eos in vocab:
                return int(vocab[eos])
        for tid, tok in (tc.get("added_tokens_decoder") or {}).items():
            if isinstance(tok, dict) and tok.get("content") == eos:
                return int(tid)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


def read_generation_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """``generation_config.json`` as a dict; ``{}`` when it is missing or not JSON."""
    try:
        value = json.loads((Path(model_dir) / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def read_stop_ids(model_dir: str | os.PathLike, tokenizer_eos: int | None = None) -> tuple[int, ...]:
    """The checkpoint's stop-token set: the tokenizer's EOS (``tokenizer_eos`` when given, else read from
    the tokenizer files), then every id of ``generation_config.json``'s ``eos_token_id`` (an int or a list:
    Qwen2.5-VL lists two), in that order, without repeats. Generation stops at the first of them on every
    backend (HF ``generate``, the vLLM server, which adds the same list to a request's stop ids), the
    forced-EOS processor may emit any of them, and the parser, the rollout trimming and the metrics stop at
    them. The tokenizer's EOS comes first: it is the end-of-turn token targets close with. ``()`` when
    neither file names one."""
    eos = tokenizer_eos if tokenizer_eos is not None else read_eos_token_id(model_dir)
    listed = read_generation_config(model_dir).get("eos_token_id")
    listed = [listed] if isinstance(listed, int) else listed if isinstance(listed, list) else []
    ids = ([int(eos)] if eos is not None else []) + [int(i) for i in listed
                                                      if isinstance(i, int) and not isinstance(i, bool)]
    return tuple(dict.fromkeys(i for i in ids if i >= 0))
