"""A tiny VL checkpoint without coordinate tokens, made from the tiny VLM (tests of add_coord_tokens)."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file, save_file

ID_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def strip_coord_tokens(src, dst, *, untie: bool = False):
    """A copy of tiny VL checkpoint ``src`` without the 1000 coordinate tokens: their added tokens and
    embedding rows removed, later ids (the vision tokens) moved down. ``untie`` adds a separate output
    head."""
    dst.mkdir(parents=True)
    tok = json.loads((src / "tokenizer.json").read_text())
    coord_ids = {a["id"] for a in tok["added_tokens"] if a["content"].startswith("<|coord_")}
    assert len(coord_ids) == 1000
    vocab = 1 + max(a["id"] for a in tok["added_tokens"])
    keep = [i for i in range(vocab) if i not in coord_ids]
    new_id = {old: new for new, old in enumerate(keep)}
    tok["added_tokens"] = [dict(a, id=new_id[a["id"]]) for a in tok["added_tokens"]
                           if a["id"] not in coord_ids]
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((src / "config.json").read_text())
    for key in ID_KEYS:
        config[key] = new_id[config[key]]
    config["text_config"]["vocab_size"] = len(keep)
    weights = load_file(src / "model.safetensors")
    weights = {k: (v[keep].clone() if v.shape[0] == vocab else v) for k, v in weights.items()}
    if untie:
        config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = False
        gen = torch.Generator().manual_seed(0)
        weights["lm_head.weight"] = torch.randn(weights["model.embed_tokens.weight"].shape, generator=gen)
    (dst / "config.json").write_text(json.dumps(config))
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    for name in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                 "preprocessor_config.json"):
        shutil.copy(src / name, dst / name)
    return dst, keep
