"""Tiny local model factory: a random-weight Qwen2/Qwen3 causal LM, or a Qwen2-VL vision-language model,
with a locally trained tokenizer.

Nothing is downloaded. :func:`ensure_tiny_model` builds (once) and returns a ``save_pretrained`` folder
that ``AutoTokenizer`` / ``AutoModelForCausalLM`` (offline), vLLM and ``swift rollout`` all load.

Tokenizer (the trap this module exists to avoid): for ``model_type: qwen2`` folders, transformers'
``AutoTokenizer`` returns ``Qwen2Tokenizer``, which *rebuilds* the normalizer (NFC) and the
pre-tokenizer (Qwen2 split regex, digits one by one, then byte-level without its own regex) and ignores
the ones stored in ``tokenizer.json``. The BPE is therefore trained with exactly that normalizer and
pre-tokenizer, so raw ``tokenizers``, ``PreTrainedTokenizerFast``, ``AutoTokenizer`` and vLLM produce
identical ids. The split regex is read from the installed transformers (not re-typed here) and is part
of the build hash.

Vocabulary: BPE pieces trained on a corpus of the synthetic task's chat transcripts (prompts and
CoordJSON answers in both field orders), then the special tokens ``<|endoftext|>`` (pad),
``<|im_start|>``, ``<|im_end|>`` (EOS), then 1000 *non-special* added tokens ``<|coord_0|>`` ..
``<|coord_999|>`` with contiguous ids (one id each; they survive ``skip_special_tokens=True``).

Vision-language (``arch`` ``qwen2_vl``, ``qwen2_5_vl`` or ``qwen3_vl``): the same tokenizer plus the Qwen-VL
vision tokens (``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>``, ``<|video_pad|>``, special), a
one-block vision tower (patch 14, or 16 for Qwen3-VL; 2x2 merge) and the Qwen2-VL image processor
(``preprocessor_config.json``, the family's common one) capped at ``max_pixels``; the chat template renders an
image part as ``<|vision_start|><|image_pad|><|vision_end|>`` and adds Qwen2-VL's default system turn. The
learner expands each ``<|image_pad|>`` to the image's merged patch count (``coordexp.models.prompts``).

Folder name: ``<cache_dir>/tiny-<arch>-<12 hex of the build hash>``. The build happens in a temporary
sibling folder and is published with one ``rename``; a file lock makes concurrent callers (DDP ranks)
wait for the first builder instead of building twice, and the rename race is handled too.

Why one module (> 400 lines): the folder's build hash, its atomic publication and the config of every tiny
architecture (text and VL) are one recipe; the tokenizer training lives in ``tiny_tokenizer``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from coordexp.checkpoint import CHATML_TEMPLATE
from coordexp.coordjson import NUM_BINS, bin_to_token
from coordexp.models.tiny_tokenizer import (
    IM_END,
    IM_START,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    VISION_TOKENS,
    VL_DEFAULT_SYSTEM,
    coord_tokens,
    corpus_texts,
    qwen2_split_regex,
    structural_report,
    train_tokenizer,
)

__all__ = [
    "CHATML_TEMPLATE",
    "IM_END",
    "IM_START",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "SPEC_FILE",
    "VISION_TOKENS",
    "VL_ARCHS",
    "VL_CHAT_TEMPLATE",
    "TinyModelSpec",
    "TinyVisionSpec",
    "build_tiny_model",
    "corpus_texts",
    "ensure_tiny_model",
    "main",
    "read_build_info",
    "tiny_config",
    "tiny_model_dir",
]

VL_ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
SPEC_FILE = "coordexp_tiny_model.json"  # written last; its presence marks a complete folder
FORMAT_VERSION = 1

# Qwen2-VL style: default system turn, image parts as vision placeholders (expanded by the learner).
VL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + VL_DEFAULT_SYSTEM + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

@dataclass(frozen=True)
class TinyVisionSpec:
    """The vision tower and image processor of the VL archs (``embed_dim`` is the vision width)."""

    depth: int = 1
    embed_dim: int = 32
    num_heads: int = 1
    mlp_ratio: int = 2
    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 224 * 224


@dataclass(frozen=True)
class TinyModelSpec:
    """Everything that determines the built folder; its hash names the folder."""

    arch: str = "qwen2"  # "qwen2" | "qwen3" | "qwen2_vl" | "qwen2_5_vl" | "qwen3_vl"
    seed: int = 0
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 32  # vLLM's CPU attention supports head sizes >= 32 only
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    bpe_vocab_size: int = 1024  # BPE pieces incl. the 256-byte alphabet and the 3 special tokens
    bpe_min_frequency: int = 2
    corpus_records: int = 2000
    corpus_seed: int = 7
    vision: TinyVisionSpec | None = None  # set for VL archs (defaulted by __post_init__)

    @property
    def is_vision_language(self) -> bool:
        return self.arch in VL_ARCHS

    def __post_init__(self) -> None:
        if self.arch not in ("qwen2", "qwen3", *VL_ARCHS):
            raise ValueError(f"arch must be one of qwen2, qwen3, {', '.join(VL_ARCHS)}; got {self.arch!r}")
        if self.arch in VL_ARCHS and self.vision is None:  # Qwen3-VL uses 16 px patches
            vision = TinyVisionSpec(patch_size=16, min_pixels=64 * 64, max_pixels=256 * 256) \
                if self.arch == "qwen3_vl" else TinyVisionSpec()
            object.__setattr__(self, "vision", vision)
        if self.arch not in VL_ARCHS and self.vision is not None:
            raise ValueError(f"vision settings need a vision-language arch ({', '.join(VL_ARCHS)})")
        if (self.hidden_size != self.num_attention_heads * self.head_dim
                and self.arch not in ("qwen3", "qwen3_vl")):
            raise ValueError(f"{self.arch} derives head_dim = hidden_size / num_attention_heads; "
                             "they must agree")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")


def _spec_digest(spec: TinyModelSpec, corpus: Sequence[str]) -> str:
    h = hashlib.sha256()
    spec_dict = {k: v for k, v in asdict(spec).items()
                 if not (k == "vision" and v is None)}  # text names unchanged
    payload = {
        "format_version": FORMAT_VERSION,
        "spec": spec_dict,
        "split_regex": qwen2_split_regex(),
        "chat_template": _chat_template(spec),
        "corpus_sha256": hashlib.sha256("\x00".join(corpus).encode()).hexdigest(),
    }
    h.update(json.dumps(payload, sort_keys=True).encode())
    return h.hexdigest()


def _chat_template(spec: TinyModelSpec) -> str:
    return VL_CHAT_TEMPLATE if spec.arch in VL_ARCHS else CHATML_TEMPLATE


def _folder_name(spec: TinyModelSpec, corpus: Sequence[str]) -> str:
    return f"tiny-{spec.arch}-{_spec_digest(spec, corpus)[:12]}"


def tiny_model_dir(cache_dir: str | os.PathLike, spec: TinyModelSpec,
                   corpus: Sequence[str] | None = None) -> Path:
    """Where :func:`ensure_tiny_model` puts (or finds) the folder for ``spec``."""
    corpus = corpus if corpus is not None else corpus_texts(spec)
    return Path(cache_dir) / _folder_name(spec, corpus)


def build_tiny_model(out_dir: str | os.PathLike, spec: TinyModelSpec,
                     corpus: Sequence[str] | None = None) -> dict:
    """Build the folder's content into ``out_dir`` (no locking, no atomicity; see ensure_tiny_model)."""
    import tokenizers
    import torch
    import transformers
    from transformers import GenerationConfig

    corpus = corpus if corpus is not None else corpus_texts(spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    raw = train_tokenizer(spec, corpus)
    hf_tok, ids, coord0, (config, Model) = _tokenizer_and_config(spec, raw)
    vocab_size = len(hf_tok)
    config.dtype = torch.float32
    torch.manual_seed(spec.seed)
    model = Model(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=ids[IM_END], pad_token_id=ids[PAD_TOKEN], bos_token_id=None, do_sample=False
    )
    with _quiet_progress_bars():
        model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    if spec.arch in VL_ARCHS:
        _image_processor(spec.vision).save_pretrained(out)
    _check_reload_ids(out, raw, corpus)

    info = {
        "format_version": FORMAT_VERSION,
        "name": _folder_name(spec, corpus),
        "spec": asdict(spec),
        "digest": _spec_digest(spec, corpus),
        "corpus_records": len(corpus),
        "vocab_size": vocab_size,
        "bpe_vocab_size": raw.get_vocab_size(with_added_tokens=False),
        "special_token_ids": ids,
        "coord_token_id_0": coord0,
        "coord_token_id_999": coord0 + NUM_BINS - 1,
        "vision_token_ids": {t: hf_tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
        if spec.arch in VL_ARCHS else None,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "structural_tokens": structural_report(raw),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "python": sys.version.split()[0],
        },
    }
    (out / SPEC_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def tiny_config(spec: TinyModelSpec, corpus: Sequence[str] | None = None):
    """The transformers config of the tiny model of ``spec`` without building it (no weights, nothing
    written): the tokenizer is trained in memory for its vocabulary size and token ids (about a second).
    The memory planner reads parameter counts from it (coordexp.planning)."""
    corpus = corpus if corpus is not None else corpus_texts(spec)
    return _tokenizer_and_config(spec, train_tokenizer(spec, corpus))[3][0]


def _tokenizer_and_config(spec: TinyModelSpec, raw):
    """(HF tokenizer, special-token ids, first coordinate-token id, (config, model class)) of ``spec`` with
    the trained tokenizer ``raw``."""
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=None,
        extra_special_tokens=[IM_START, IM_END, *(VISION_TOKENS if spec.arch in VL_ARCHS else ())],
        model_max_length=spec.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = _chat_template(spec)
    vocab_size = len(hf_tok)
    ids = {t: hf_tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    coord0 = hf_tok.convert_tokens_to_ids(bin_to_token(0))
    if [hf_tok.convert_tokens_to_ids(t) for t in coord_tokens()] != list(range(coord0, coord0 + NUM_BINS)):
        raise RuntimeError("coordinate tokens did not get contiguous ids")

    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[PAD_TOKEN],
    }
    if spec.arch in VL_ARCHS:
        return hf_tok, ids, coord0, _vl_config(spec, common, hf_tok)
    if spec.arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return hf_tok, ids, coord0, (Qwen2Config(**common), Qwen2ForCausalLM)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return hf_tok, ids, coord0, (Qwen3Config(**common, head_dim=spec.head_dim), Qwen3ForCausalLM)


def _vl_config(spec: TinyModelSpec, common: dict[str, Any], hf_tok):
    """(config, model class) of the tiny VLM of ``spec.arch``: the same text tower sizes, a one-block vision
    tower whose merger projects to the text width."""
    import transformers

    v = spec.vision
    head_dim = spec.head_dim if spec.arch == "qwen3_vl" else spec.hidden_size // spec.num_attention_heads
    third = head_dim // 2 // 3  # M-RoPE splits the rotary half into (temporal, height, width) sections
    text = {**common, "rope_parameters": {**common["rope_parameters"],
                                          "mrope_section": [head_dim // 2 - 2 * third, third, third]}}
    vision = {"depth": v.depth, "num_heads": v.num_heads, "patch_size": v.patch_size,
              "spatial_merge_size": v.merge_size, "temporal_patch_size": 2}
    if spec.arch == "qwen2_vl":
        vision.update(embed_dim=v.embed_dim, hidden_size=spec.hidden_size, mlp_ratio=v.mlp_ratio)
        names = ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration")
    elif spec.arch == "qwen2_5_vl":
        vision.update(hidden_size=v.embed_dim, intermediate_size=v.embed_dim * v.mlp_ratio,
                      out_hidden_size=spec.hidden_size, window_size=v.patch_size * v.merge_size * 4,
                      fullatt_block_indexes=[v.depth - 1])
        names = ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration")
    else:
        text["head_dim"] = head_dim
        text["rope_parameters"]["mrope_interleaved"] = True
        vision.update(hidden_size=v.embed_dim, intermediate_size=v.embed_dim * v.mlp_ratio,
                      out_hidden_size=spec.hidden_size, num_position_embeddings=64,
                      deepstack_visual_indexes=[v.depth - 1])
        names = ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration")
    ids = {t: hf_tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    config = getattr(transformers, names[0])(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    return config, getattr(transformers, names[1])


def _image_processor(v: TinyVisionSpec):
    # The PIL implementation: the CPU stack has no torchvision. Saved as "Qwen2VLImageProcessor", so stacks
    # with torchvision load the default backend from the same file.
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=v.min_pixels, max_pixels=v.max_pixels, patch_size=v.patch_size,
                                    merge_size=v.merge_size, temporal_patch_size=2)


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _check_reload_ids(out: Path, raw, corpus: Sequence[str]) -> None:
    """Fail the build if AutoTokenizer (what every consumer loads) disagrees with the trained tokenizer."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(out)
    probes = [corpus[0], corpus[1], corpus[-1], "x1=123, y 2024: <|coord_7|><|coord_999|> naïve ÅΩ 日本 ]}]}"]
    for text in probes:
        want = raw.encode(text, add_special_tokens=False).ids
        got = reloaded.encode(text, add_special_tokens=False)
        if got != want:
            raise RuntimeError(f"tokenizer round trip through AutoTokenizer ({type(reloaded).__name__}) "
                               f"changed ids for {text[:60]!r}: the normalizer/pre-tokenizer setup no "
                               "longer matches")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _complete(folder: Path) -> bool:
    return (folder / SPEC_FILE).is_file()


def ensure_tiny_model(
    cache_dir: str | os.PathLike,
    arch: str = "qwen2",
    seed: int = 0,
    *,
    spec: TinyModelSpec | None = None,
) -> Path:
    """Return the folder of the tiny model for (arch, seed), building it first if absent.

    Safe to call from several processes at once (DDP ranks): one builds, the others wait on a lock
    and then reuse the published folder. ``spec`` overrides every build knob (``arch``/``seed`` are
    then ignored).
    """
    spec = spec or TinyModelSpec(arch=arch, seed=seed)
    cache = Path(cache_dir).expanduser().resolve()
    corpus = corpus_texts(spec)
    final = tiny_model_dir(cache, spec, corpus)
    if _complete(final):
        return final
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / f".{final.name}.lock"):
        if _complete(final):
            return final
        if final.exists():
            raise RuntimeError(f"{final} exists but is not a complete tiny model (no {SPEC_FILE}); remove it")
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.building.", dir=cache))
        try:
            build_tiny_model(tmp, spec, corpus)
            for f in tmp.iterdir():  # mkdtemp makes 0700; the folder is shared (server, other ranks)
                f.chmod(0o644)
            tmp.chmod(0o755)
            try:
                os.rename(tmp, final)
            except OSError:
                if not _complete(final):  # lost a race against a builder that bypassed the lock
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_build_info(model_dir: str | os.PathLike) -> dict:
    """The build record (spec, ids, versions, fused structural tokens) of a tiny model folder."""
    return json.loads((Path(model_dir) / SPEC_FILE).read_text())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coordexp.models.tiny",
                                description="Build (if absent) the tiny local model and print its folder.")
    p.add_argument("--out", required=True, help="cache directory the model folder is created in")
    p.add_argument("--arch", choices=("qwen2", "qwen3", *VL_ARCHS), default="qwen2")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(ensure_tiny_model(args.out, arch=args.arch, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
