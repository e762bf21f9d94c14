"""Text that is not ASCII, through real byte-level tokenizers: the token frame gives every desc exactly the
text the tokenizer's own ``decode`` gives, while token positions (coord slots, record spans, masks) stay
exact; descs holding a lone surrogate are dropped (rollouts) or refused (data).

Two tokenizers: the tiny model's (Qwen2 split regex + ByteLevel + NFC, trained on ASCII text, so every
non-ASCII character is split into byte tokens) and one trained here on emoji descs, whose merges put the
last bytes of a 4-byte character and the desc's closing quote into one token.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from coordexp.coordjson import (
    CoordObject,
    CoordVocab,
    FieldOrder,
    TokenRole,
    bin_to_token,
    build_channel_a_target,
    build_channel_b_target,
    parse_rollout,
    raw_piece,
    serialize_record,
)
from coordexp.data.jsonl import DataValidationError, JsonlDetectionDataset
from coordexp.evaluation import CocoImage, CocoObject, DetectionAggregate, SampleOutcome, coco_ap
from coordexp.matching import match_boxes

DESC_FIRST, GEOMETRY_FIRST = FieldOrder("desc_first"), FieldOrder("geometry_first")
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Latin accents, CJK, a 4-byte emoji, a combining mark with no precomposed form (NFC keeps it apart)
DESCS = ("crème brûlée", "红色方块", "\U0001F600 face", "x\u0301y")
# 4-byte emoji that all end in the byte 0x80: trained on them, BPE merges that byte with the closing quote
EMOJI = ("\U0001F600", "\U0001F640", "\U0001F400", "\U0001F480", "\U0001F300", "\U0001F340")


class Tok:
    """What the pure core takes from a tokenizer (encode, lossless per-token pieces, coord vocab, EOS)."""

    def __init__(self, encode, decode, vocab_token, vocab_size, vocab, eos_id):
        self.encode = encode
        self.decode = decode  # the tokenizer's own decode of a span (the reference)
        self.table = [raw_piece(vocab_token(i), decode([i])) for i in range(vocab_size)]
        self.coord_vocab = CoordVocab.from_vocab(vocab)
        self.eos_id = eos_id

    def decode_token(self, token_id: int) -> str:
        return self.table[token_id]

    def pieces(self, ids):
        return [self.table[i] for i in ids]

    def token_bytes(self, ids) -> list[bytes]:
        return [self.table[i].encode("utf-8", "surrogateescape") for i in ids]

    def fns(self) -> dict:
        return {"coord_vocab": self.coord_vocab, "encode": self.encode, "decode_token": self.decode_token}

    def parse(self, ids, order=FieldOrder.desc_first):
        return parse_rollout(ids, self.pieces(ids), stop_ids=[self.eos_id], field_order=order, **self.fns())


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    hf = tiny_tokenizer
    return Tok(lambda text: hf.encode(text, add_special_tokens=False),
               lambda ids: hf.decode(list(ids), skip_special_tokens=False), hf.convert_ids_to_tokens,
               len(hf), hf.get_vocab(), hf.eos_token_id)


@pytest.fixture(scope="module")
def emoji():
    # desc endings `<letter><emoji>",` / `"}` / `"}]}` (all emoji end in 0x80) and desc openings ` "<symbol>`
    # (U+2600..U+27BF all start with 0xE2): with 8 merges BPE makes `\x80",`, `\x80"}]}` and ` "\xe2`, not
    # whole characters
    rng = random.Random(0)
    segments = [rng.choice("abcdefgh") + rng.choice(EMOJI) + rng.choice(['",', '"}', '"}]}'])
                for _ in range(3000)]
    segments += [' "' + chr(rng.randint(0x2600, 0x27BF)) + rng.choice("abcdefgh") for _ in range(3000)]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                          use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(segments, trainers.BpeTrainer(
        vocab_size=265, special_tokens=["<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_tokens([AddedToken(bin_to_token(k), special=False, normalized=False) for k in range(1000)])
    return Tok(lambda text: tok.encode(text, add_special_tokens=False).ids,
               lambda ids: tok.decode(list(ids), skip_special_tokens=False), tok.id_to_token,
               tok.get_vocab_size(), tok.get_vocab(), tok.token_to_id("<|im_end|>"))


@pytest.fixture(scope="module")
def bpe():
    """The Channel-B core tests' tokenizer (tests/unit/_bpe.py): it fuses closing runs (`"}]}`, `"},`), so a
    re-encoded prefix end can follow a desc's last bytes."""
    from _bpe import build_test_tokenizer

    tk = build_test_tokenizer().tokenizer
    return Tok(lambda text: tk.encode(text, add_special_tokens=False).ids,
               lambda ids: tk.decode(list(ids), skip_special_tokens=False), tk.id_to_token,
               tk.get_vocab_size(), tk.get_vocab(), tk.token_to_id("<|im_end|>"))


def _byte_roles(tok: Tok, ids, roles, text_bytes: bytes, needle: bytes, start: int = 0) -> set[int]:
    """Roles of the tokens holding at least one byte of the first `needle` at or after byte `start`."""
    begin = text_bytes.index(needle, start)
    ends = np.cumsum([len(b) for b in tok.token_bytes(ids)])
    starts = ends - [len(b) for b in tok.token_bytes(ids)]
    return {int(roles[i]) for i in range(len(ids)) if starts[i] < begin + len(needle) and ends[i] > begin}


def _rollout(objs, order=FieldOrder.desc_first) -> str:
    return '{"objects": [' + ", ".join(serialize_record(o, order) for o in objs) + "]}"


# ---------------------------------------------------------------------------------------- the token frame


@pytest.mark.parametrize("desc", DESCS)
@pytest.mark.parametrize("tokenizer", ["tiny", "emoji"])
def test_desc_is_the_tokenizers_decode_of_its_span(desc, tokenizer, request):
    tok: Tok = request.getfixturevalue(tokenizer)
    objs = [CoordObject(desc, (10, 20, 300, 400)), CoordObject("cat", (500, 500, 600, 700))]
    ids = tok.encode(_rollout(objs)) + [tok.eos_id]
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the characters really are split across tokens
    parsed = tok.parse(ids)
    assert [(o.desc, o.bbox) for o in parsed.objects] == [(o.desc, o.bbox) for o in objs]
    frame = parsed.prefix_frame
    assert frame.text == tok.decode(parsed.prefix_ids) == _rollout(objs)[: -len("]}")]  # cut after the record
    for obj in parsed.objects:
        s, e = obj.desc_char_span
        assert frame.text[s:e] == obj.desc
        first, stop = obj.token_span
        record = frame.text[obj.char_span[0]:obj.char_span[1]]
        assert record in tok.decode(parsed.prefix_ids[first:stop])  # its tokens (straddling ones included)
        assert record not in tok.decode(parsed.prefix_ids[first + 1:stop])
        assert record not in tok.decode(parsed.prefix_ids[first:stop - 1])
        assert [tok.coord_vocab.bin_of(parsed.prefix_ids[p]) for p in obj.coord_positions] == list(obj.bbox)
    # the old frame (each token decoded alone) lost the text: U+FFFD instead of the characters
    lossy = parse_rollout(ids, [tok.decode([i]) for i in ids], stop_ids=[tok.eos_id],
                          field_order=FieldOrder.desc_first, **tok.fns())
    assert lossy.objects[0].desc != desc and "\ufffd" in lossy.objects[0].desc


@pytest.mark.parametrize("desc", ["\U0001F600", "\u2605x\U0001F640"])
def test_tokens_mixing_partial_characters_and_quotes(emoji, desc):
    """A token holding the last byte of an emoji with the closing quote (`\x80",`), and one holding the
    opening quote with the first byte of ★ (` "\xe2`): the desc is exact, the character sits in the token
    of its last byte, and every token holding a byte of the desc gets the desc's role and weight."""
    ids = emoji.encode(_rollout([CoordObject(desc, (1, 2, 3, 4))])) + [emoji.eos_id]
    raw = emoji.token_bytes(ids)
    assert b'\x80",' in raw
    assert (b' "\xe2' in raw) == desc.startswith("\u2605")
    parsed = emoji.parse(ids)
    assert [o.desc for o in parsed.objects] == [desc]
    frame = parsed.prefix_frame
    assert frame.text == emoji.decode(parsed.prefix_ids)
    closing = raw.index(b'\x80",')
    assert frame.pieces[closing] == desc[-1] + '",'
    if b' "\xe2' in raw:
        assert frame.pieces[raw.index(b' "\xe2')] == ' "'  # ★ completes two tokens later
    gt = [CoordObject(desc, (1, 2, 3, 4))]
    matched = build_channel_b_target(parsed, gt, [(0, 0)], field_order=FieldOrder.desc_first,
                                     eos_id=emoji.eos_id, desc_ce_weight=0.5, **emoji.fns())
    appended = build_channel_b_target(parsed, gt, [], field_order=FieldOrder.desc_first, eos_id=emoji.eos_id,
                                      desc_ce_weight=0.5, **emoji.fns())
    for target, role in ((matched, TokenRole.MATCHED_DESC), (appended, TokenRole.APPENDED_DESC)):
        ids = list(target.input_ids)
        text_bytes = b"".join(emoji.token_bytes(ids))
        start = len(b"".join(emoji.token_bytes(ids[: target.prefix_len])))  # appended: after the prefix
        start = start if role is TokenRole.APPENDED_DESC else 0
        assert _byte_roles(emoji, ids, target.roles, text_bytes, desc.encode(), start) == {role}
        assert [o.desc for o in emoji.parse(ids).objects] == [desc] * (1 + (role is TokenRole.APPENDED_DESC))


@pytest.mark.parametrize("tokenizer", ["tiny", "emoji"])
def test_channel_b_target_reencodes_non_ascii_gt(tokenizer, request):
    tok: Tok = request.getfixturevalue(tokenizer)
    gt = [CoordObject(d, (100 * i, 100 * i, 100 * i + 50, 100 * i + 60)) for i, d in enumerate(DESCS)]
    gt.append(CoordObject("\U0001F640\U0001F640", (600, 600, 700, 700)))
    ids = tok.encode(_rollout([gt[1]])) + [tok.eos_id]
    parsed = tok.parse(ids)
    match = match_boxes([o.bbox for o in parsed.objects], [g.bbox for g in gt], top_k=5, iou_gate=0.5,
                        fp_cost=0.5, fn_cost=2.0)
    assert match.index_pairs == [(0, 1)]
    target = build_channel_b_target(parsed, gt, match.index_pairs, field_order=FieldOrder.desc_first,
                                    eos_id=tok.eos_id, desc_ce_weight=0.5, **tok.fns())
    text_bytes = b"".join(tok.token_bytes(target.input_ids))
    prefix_bytes = len(b"".join(tok.token_bytes(target.input_ids[: target.prefix_len])))
    assert _byte_roles(tok, target.input_ids, target.roles, text_bytes, gt[1].desc.encode()) == {
        TokenRole.MATCHED_DESC}
    for g in gt[:1] + gt[2:]:  # appended: every byte of each desc is desc (weight desc_ce_weight)
        roles = _byte_roles(tok, target.input_ids, target.roles, text_bytes, g.desc.encode(), prefix_bytes)
        assert roles == {TokenRole.APPENDED_DESC}
    for group in target.geometry_groups:
        assert [tok.coord_vocab.bin_of(target.input_ids[p]) for p in group.positions] == list(group.gt_bins)
    # the target, read back by the parser, says exactly the GT
    again = tok.parse(list(target.input_ids))
    assert sorted((o.desc, o.bbox) for o in again.objects) == sorted((g.desc, g.bbox) for g in gt)
    whole = build_channel_a_target(gt, field_order=FieldOrder.geometry_first, eos_id=tok.eos_id,
                                   desc_ce_weight=1.0, **tok.fns())
    again = tok.parse(list(whole.input_ids), FieldOrder.geometry_first)
    assert sorted((o.desc, o.bbox) for o in again.objects) == sorted((g.desc, g.bbox) for g in gt)


def test_gt_desc_is_compared_as_the_tokenizer_spells_it(tiny):
    """The tiny tokenizer normalizes to NFC: a GT desc written with a combining acute (e + U+0301) is
    encoded as the one character é. The target check accepts that spelling (it is what the model learns
    to write); the written text decodes to the NFC form."""
    gt = [CoordObject("cafe\u0301", (10, 10, 200, 200))]
    target = build_channel_a_target(gt, field_order=FieldOrder.desc_first, eos_id=tiny.eos_id,
                                    desc_ce_weight=1.0, **tiny.fns())
    assert [o.desc for o in tiny.parse(list(target.input_ids)).objects] == ["caf\u00e9"]


def test_desc_metrics_count_non_ascii_descs(tiny):
    gt = [CoordObject(d, (100 * i, 100 * i, 100 * i + 80, 100 * i + 90)) for i, d in enumerate(DESCS)]
    parsed = tiny.parse(tiny.encode(_rollout(gt)) + [tiny.eos_id])
    agg = DetectionAggregate()
    agg.add(SampleOutcome(pred_boxes=[o.bbox for o in parsed.objects], gt_boxes=[g.bbox for g in gt],
                          pred_descs=[o.desc for o in parsed.objects], gt_descs=[g.desc for g in gt]))
    assert agg.summary()["iou50"]["desc_match"] == 1.0
    image = CocoImage(640, 480, [CocoObject(g.desc, g.bbox) for g in gt],
                      [CocoObject(o.desc, o.bbox) for o in parsed.objects])
    by_desc = coco_ap([image], "by_desc")
    assert (by_desc["categories"], by_desc["unknown_desc_predictions"]) == (4, 0)
    assert by_desc["AP"] == pytest.approx(1.0, abs=1e-12)  # COCOeval's mean over 4 categories


# ---------------------------------------------------------------------------------------- lone surrogates

LONE = '"cat \\ud835"'  # the JSON escape of half a surrogate pair, as a model writes it (ASCII text)


def test_rollout_desc_with_a_lone_surrogate_is_dropped_as_invalid_desc(tiny):
    good = serialize_record(CoordObject("dog", (500, 500, 600, 600)), FieldOrder.desc_first)
    bad = '{"desc": ' + LONE + ', "bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>]}'
    paired = '{"desc": "cat \\ud835\\udc00", "bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>]}'
    text = '{"objects": [' + f"{bad}, {good}, {paired}" + "]}"
    ids = tiny.encode(text) + [tiny.eos_id]
    parsed = tiny.parse(ids)
    assert [o.desc for o in parsed.objects] == ["dog", "cat \U0001D400"]  # a whole pair is a character
    assert parsed.drop_counts["invalid_desc"] == 1 and parsed.num_records == 3
    assert [r.reason.value for r in parsed.dropped_in_prefix] == ["invalid_desc"]
    target = build_channel_b_target(parsed, [CoordObject("dog", (500, 500, 600, 600))], [(0, 0)],
                                    field_order=FieldOrder.desc_first, eos_id=tiny.eos_id, desc_ce_weight=1.0,
                                    **tiny.fns())
    first, stop = parsed.dropped_in_prefix[0].token_span
    assert set(target.roles[first:stop].tolist()) <= {TokenRole.INVALID_RECORD, TokenRole.COORD}
    assert parsed.prefix_text.isascii() and "\\ud835" in parsed.prefix_text  # kept as written
    with pytest.raises(ValueError, match="lone surrogate U\\+D835 at index 4"):
        CoordObject(json.loads(LONE), (1, 2, 3, 4))


def test_data_line_with_a_lone_surrogate_fails_at_load_with_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    ok = {"width": 64, "height": 64, "objects": [{"desc": "caf\u00e9", "bbox_2d": [1, 2, 30, 40]}]}
    lines = [json.dumps(ok), json.dumps(ok).replace("caf\\u00e9", "cat \\ud835")]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataValidationError) as info:
        JsonlDetectionDataset(path)
    assert info.value.errors == [
        f"{path}:2: objects[0]: desc holds a lone surrogate U+D835 at index 4, which is not text "
        "(UTF-8 cannot encode it)"]
    bad = json.dumps(ok).encode().replace(b"caf", b"ca\xff")
    path.write_bytes(json.dumps(ok).encode() + b"\n" + bad + b"\n")
    with pytest.raises(DataValidationError) as info:
        JsonlDetectionDataset(path)
    offset = bad.index(b"\xff")
    assert info.value.errors == [f"{path}:2: not UTF-8 text: byte 0xff at byte offset {offset}"]
    path.write_text(json.dumps(ok) + "\n", encoding="utf-8")
    assert JsonlDetectionDataset(path)[0].objects[0].desc == "caf\u00e9"


# ---------------------------------------------------------------------------------------------- writers


def test_every_writer_takes_any_rollout_text(tiny_tokenizer, tmp_path):
    """Through the learner's own TokenizerAdapter and the eval pipeline's scoring: non-ASCII descs come out
    exact and a lone-surrogate desc is dropped; predictions.jsonl, the qualitative markdown, the PNGs and
    TensorBoard (images and text) are all written, also for a record that does hold a lone surrogate."""
    from torch.utils.tensorboard import SummaryWriter

    from coordexp.config.contract import rollout_contract
    from coordexp.config.load import compose, to_train_config
    from coordexp.data.jsonl import DetectionObject, DetectionSample
    from coordexp.evaluation.artifacts import write_predictions, write_qualitative
    from coordexp.evaluation.scoring import score_rollouts
    from coordexp.rollout.batch import Rollout
    from coordexp.rollout.scoring import TokenizerAdapter
    from coordexp.viz import write_sample_pngs

    hf = tiny_tokenizer
    adapter = TokenizerAdapter(hf)
    contract = rollout_contract(to_train_config(compose(["+experiment=smoke/ab_mixed", "rollout=hf"])))
    gt = [CoordObject("红色方块", (10, 20, 300, 400)), CoordObject("cafe\u0301", (500, 500, 600, 700))]
    sample = DetectionSample(index=0, source="val.jsonl:1", width=640, height=480,
                             objects=tuple(DetectionObject(g.desc, g.bbox) for g in gt))
    lone = '{"desc": ' + LONE + ', "bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>]}'
    text = _rollout([gt[0], CoordObject("caf\u00e9", gt[1].bbox)])[:-2] + ", " + lone + "]}"
    ids = adapter.encode(text) + [adapter.eos_id]
    records, agg, _ = score_rollouts([sample], [Rollout([1, 2], ids, 0, False)], adapter, contract)
    record = records[0]
    assert [p["desc"] for p in record["pred"]] == ["红色方块", "caf\u00e9"]
    assert record["text"] == hf.decode(ids) and record["dropped"] == {"invalid_desc": 1}
    assert agg.summary()["iou50"]["desc_match"] == 1.0  # GT e + U+0301 is spelled é by the tokenizer
    record["gt"][0]["desc"] = "x \ud835"  # whatever a file or a model wrote: writers still succeed
    out = write_predictions(records, tmp_path / "predictions.jsonl")
    assert json.loads(out.read_text(encoding="utf-8"))["gt"][0]["desc"] == "x \ud835"  # the JSON escape
    md = write_qualitative(records, tmp_path / "eval.md", title="t").read_text(encoding="utf-8")
    assert "红色方块" in md and "\\ud835" in md
    pngs = write_sample_pngs(records, tmp_path / "viz")
    assert len(pngs) == 1 and pngs[0][0].is_file()
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        writer.add_image("eval_viz/0", np.asarray(pngs[0][1]), 0, dataformats="HWC")
        writer.add_text("qualitative", md, 0)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------------------------- property

_NON_ASCII = st.sampled_from(["caf\u00e9", "红色方块", "\U0001F600", "\u2605x", "x\u0301y", "a\U0001F640b",
                              "cat"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokenizer=st.sampled_from(["tiny", "emoji", "bpe"]),
       descs=st.lists(_NON_ASCII, min_size=1, max_size=4), data=st.data())
def test_exact_frame_under_stray_bytes_and_cuts(request, tokenizer, descs, data):
    """Rollouts with non-ASCII descs, stray byte tokens (invalid UTF-8) inserted and cut anywhere: the
    parse never raises, its prefix text is the tokenizer's decode of the prefix ids, and the prefix closed
    with `]}` parses back to the same objects (no character is split by a re-encoded end)."""
    tok: Tok = request.getfixturevalue(tokenizer)
    objs = [CoordObject(d, (10 * i, 10 * i, 10 * i + 5, 10 * i + 5)) for i, d in enumerate(descs)]
    order = data.draw(st.sampled_from([DESC_FIRST, GEOMETRY_FIRST]))  # geometry-first records end `"}`
    ids = tok.encode(_rollout(objs, order))
    byte_tokens = [i for i, p in enumerate(tok.table) if len(p.encode("utf-8", "surrogateescape")) == 1
                   and p.encode("utf-8", "surrogateescape")[0] >= 0x80]
    for _ in range(data.draw(st.integers(0, 3))):  # often right before a closing quote: end of a desc
        quotes = [i for i, t in enumerate(ids) if tok.table[t].startswith('"')]
        near = quotes and data.draw(st.booleans())
        at = data.draw(st.sampled_from(quotes) if near else st.integers(0, len(ids)))
        ids.insert(at, data.draw(st.sampled_from(byte_tokens)))
    ids = ids[: data.draw(st.integers(0, len(ids)))]
    parsed = tok.parse(ids, order)
    assert parsed.prefix_frame.text == tok.decode(list(parsed.prefix_ids))
    closed = tok.parse(list(parsed.prefix_ids) + tok.encode("]}") + [tok.eos_id], order)
    assert [(o.desc, o.bbox) for o in closed.objects] == [(o.desc, o.bbox) for o in parsed.objects]


@pytest.mark.parametrize("stray", [False, True])
def test_a_re_encoded_prefix_end_never_splits_a_character(emoji, bpe, stray):
    """The cut after the last record falls inside a fused `\x80"}]}` token whose emoji began two tokens
    earlier: the re-encoded end takes those tokens in (else the kept leading bytes and the re-encoded
    character would decode to U+FFFD + emoji). With a stray invalid byte before the quote, its U+FFFD stays
    in the byte's own token (else the re-encoded end would carry a second one)."""
    desc = "a\U0001F640"
    ids = emoji.encode(_rollout([CoordObject(desc, (1, 2, 3, 4))], GEOMETRY_FIRST))
    raw = emoji.token_bytes(ids)
    assert b'\x80"}]}' in raw and b"\xf0\x9f" in raw
    parsed = emoji.parse(ids + [emoji.eos_id], GEOMETRY_FIRST)
    assert [o.desc for o in parsed.objects] == [desc]
    assert parsed.prefix_frame.text == emoji.decode(list(parsed.prefix_ids)) == _rollout(
        [CoordObject(desc, (1, 2, 3, 4))], GEOMETRY_FIRST)[: -len("]}")]
    if stray:  # the tests' bpe tokenizer fuses `"}]}`; a lone 0xC2 byte right before it
        text = _rollout([CoordObject("red", (0, 2, 0, 2))], GEOMETRY_FIRST)
        ids = bpe.encode(text)
        closing = next(i for i, t in enumerate(ids) if bpe.table[t].startswith('"}'))
        c2 = next(i for i, p in enumerate(bpe.table) if p.encode("utf-8", "surrogateescape") == b"\xc2")
        ids.insert(closing, c2)
        parsed = bpe.parse(ids + [bpe.eos_id], GEOMETRY_FIRST)
        assert [o.desc for o in parsed.objects] == ["red\ufffd"]
        assert parsed.prefix_frame.text == bpe.decode(list(parsed.prefix_ids))
    closed = (bpe if stray else emoji).parse(list(parsed.prefix_ids) + (bpe if stray else emoji).encode("]}")
                                             + [(bpe if stray else emoji).eos_id], GEOMETRY_FIRST)
    assert [o.desc for o in closed.objects] == [o.desc for o in parsed.objects]
