"""The tiny models' tokenizer: a byte-level BPE trained locally on the synthetic task's chat transcripts, with
the normalizer and pre-tokenizer that transformers' ``Qwen2Tokenizer`` rebuilds (so raw ``tokenizers``,
``AutoTokenizer`` and vLLM give identical ids), plus the special, coordinate and vision tokens.

The split regex is read from the installed transformers (not re-typed here); tokenizers and transformers are
imported when a tokenizer is trained, so the model factory's folder lookup stays light.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

from coordexp.coordjson import NUM_BINS, CoordObject, FieldOrder, bin_to_token, serialize_objects
from coordexp.data.prompt import PromptSpec, build_messages, instruction_text
from coordexp.data.synthetic import SyntheticSpec, generate_record

__all__ = ["IM_END", "IM_START", "PAD_TOKEN", "SPECIAL_TOKENS", "STRUCTURAL_PIECES", "VISION_TOKENS",
           "VL_DEFAULT_SYSTEM",
           "coord_tokens", "corpus_texts", "qwen2_split_regex", "structural_report", "train_tokenizer"]

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
#: Qwen2-VL's default system turn (the tiny VLM's chat template adds it).
VL_DEFAULT_SYSTEM = "You are a helpful assistant."
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# Text pieces between coordinate tokens in CoordJSON answers; used to report which are fused tokens.
STRUCTURAL_PIECES = (
    '{"objects": [{"desc": "',
    '", "bbox_2d": [',
    ", ",
    "]}, {\"desc\": \"",
    "]}]}",
    '{"objects": [{"bbox_2d": [',
    '], "desc": "',
    '"}, {"bbox_2d": [',
    '"}]}',
)


def coord_tokens() -> list[str]:
    return [bin_to_token(k) for k in range(NUM_BINS)]


# ----------------------------------------------------------------------------------------------- corpus

_ADDED_RE = re.compile(r"<\|coord_\d+\|>|<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>|<\|vision_\w+\|>"
                       r"|<\|image_pad\|>|<\|video_pad\|>")


def qwen2_split_regex() -> str:
    from transformers.models.qwen2 import tokenization_qwen2

    return tokenization_qwen2.PRETOKENIZE_REGEX


def _render_chatml(messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
    # Python twin of CHATML_TEMPLATE for string contents (used only to make the BPE corpus).
    out = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return out + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def _render_answer(objects: Sequence[dict[str, Any]], order: str) -> str:
    coord_objects = [CoordObject(o["desc"], tuple(o["bbox_2d"])) for o in objects]
    return serialize_objects(coord_objects, FieldOrder(order))


def corpus_texts(spec: Any) -> list[str]:
    """Chat transcripts of the synthetic task (both field orders, with and without a system turn)."""

    # The corpus covers more objects and a finer grid than the default task, so the merges are generic.
    task = SyntheticSpec(min_objects=1, max_objects=6, grid=1000)
    texts = []
    for i in range(spec.corpus_records):
        rec = generate_record(spec.corpus_seed, i, task)
        order = ("desc_first", "geometry_first")[i % 2]
        system = "You are a helpful assistant." if i % 3 == 0 else None
        messages = build_messages(rec, PromptSpec(object_field_order=order, system_prompt=system,
                                                  scene="text"))
        messages.append({"role": "assistant", "content": _render_answer(rec["objects"], order)})
        texts.append(_render_chatml(messages, add_generation_prompt=False))
    # A little plain text so common words, digits and punctuation get merges too.
    texts += [
        f"Image {w}x{h}, {n} objects. The answer is 0 1 2 3 4 5 6 7 8 9 and 10, 100, 999."
        for w, h, n in ((640, 480, 1), (800, 600, 2), (512, 512, 3), (1024, 768, 4))
    ]
    if spec.is_vision_language:  # image prompts: the instruction after the vision placeholder, no object list
        placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
        for i in range(spec.corpus_records // 4):
            rec = generate_record(spec.corpus_seed + 1, i, task)
            order = ("desc_first", "geometry_first")[i % 2]
            messages = [{"role": "system", "content": VL_DEFAULT_SYSTEM},
                        {"role": "user", "content": placeholder + instruction_text(order)},
                        {"role": "assistant", "content": _render_answer(rec["objects"], order)}]
            texts.append(_render_chatml(messages, add_generation_prompt=False))
    return texts


def _training_segments(texts: Sequence[str]) -> Iterator[str]:
    # Added/special tokens are cut out before the BPE model sees text, so train on what lies between.
    for text in texts:
        for seg in _ADDED_RE.split(text):
            if seg:
                yield seg


# ----------------------------------------------------------------------------------------------- build


def train_tokenizer(spec: Any, corpus: Sequence[str]):
    """The BPE of a ``TinyModelSpec`` (vocabulary size, minimum frequency, arch) trained on ``corpus``."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(qwen2_split_regex()), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.bpe_vocab_size,
        min_frequency=spec.bpe_min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, nothing unknown
        show_progress=False,
    )
    tok.train_from_iterator(_training_segments(corpus), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in coord_tokens()])
    if spec.is_vision_language:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in VISION_TOKENS])
    return tok


def structural_report(tok) -> dict[str, list[str]]:
    return {piece: tok.encode(piece, add_special_tokens=False).tokens for piece in STRUCTURAL_PIECES}
