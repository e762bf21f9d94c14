"""coordexp.models.add_coord_tokens on tiny VL checkpoints built without coordinate tokens (tied and untied
output head)."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_fixture import strip_coord_tokens

from coordexp.coordjson import CoordVocab
from coordexp.models.add_coord_tokens import RECORD_FILE, coord_rows, main, missing_coord_tokens
from coordexp.models.tiny import ensure_tiny_model


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    return ensure_tiny_model(tmp_path_factory.mktemp("tiny"), arch="qwen2_vl")


def test_coord_rows_are_the_mean_plus_a_smooth_ordered_term():
    gen = torch.Generator().manual_seed(3)
    existing = torch.randn(500, 64, generator=gen) * 0.5 + 2.0
    rows = coord_rows(existing, range(1000))
    assert rows.shape == (1000, 64)
    assert ((rows - existing.mean(0)).abs() <= 0.25 * existing.std(0) + 1e-6).all()
    near = (rows[1:] - rows[:-1]).norm(dim=1)
    far = (rows[500:] - rows[:500]).norm(dim=1)
    assert near.max() < far.min() / 5  # neighbouring bins start close, distant bins apart
    assert torch.equal(coord_rows(existing, [7, 8]), rows[7:9])  # row k depends on k only


@pytest.mark.parametrize("untie", [False, True])
def test_adds_tokens_keeps_old_ids_and_rows_and_is_idempotent(tiny_vl, tmp_path, capsys, untie):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from coordexp.models.prompts import load_model_and_prompts
    from coordexp.trainer.learner import coord_vocab_adapter

    bare, _ = strip_coord_tokens(tiny_vl, tmp_path / "bare", untie=untie)
    old_tok = AutoTokenizer.from_pretrained(bare)
    assert len(missing_coord_tokens(old_tok)) == 1000
    old_model = AutoModelForImageTextToText.from_pretrained(bare)
    old_emb = old_model.get_input_embeddings().weight.detach().clone()
    old_head = old_model.get_output_embeddings().weight.detach().clone()

    assert main(["--src", str(bare), "--dst", str(tmp_path / "with")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"added 1000 coordinate tokens (ids 424..1423) to {tmp_path / 'with'}; embedding "
                          f"rows 424 -> 1424 ({'untied' if untie else 'tied'} head)")
    new_tok = AutoTokenizer.from_pretrained(tmp_path / "with")
    assert missing_coord_tokens(new_tok) == []
    old_vocab = old_tok.get_vocab()
    assert {t: new_tok.get_vocab()[t] for t in old_vocab} == old_vocab  # old ids unchanged
    text = 'x <|coord_0|><|coord_999|> {"bbox_2d"'
    assert new_tok.encode(text, add_special_tokens=False)[2:4] == [424, 1423]
    assert new_tok.decode([424, 425], skip_special_tokens=True) == "<|coord_0|><|coord_1|>"

    model, tokenizer, prompts = load_model_and_prompts(tmp_path / "with", "float32")
    emb = model.get_input_embeddings().weight.detach()
    assert emb.shape == (1424, 64) and torch.equal(emb[:424], old_emb)  # old rows untouched
    assert torch.allclose(emb[424:], coord_rows(old_emb, range(1000)), atol=1e-6)
    head = model.get_output_embeddings().weight.detach()
    assert head.shape == (1424, 64)
    if untie:
        assert head.data_ptr() != emb.data_ptr() and torch.equal(head[:424], old_head)
        assert torch.allclose(head[424:], coord_rows(old_head, range(1000), seed=1001), atol=1e-6)
    else:
        assert torch.equal(head, emb)
    vocab = CoordVocab.from_vocab(tokenizer.get_vocab())
    assert vocab.token_ids == tuple(range(424, 1424))
    coord_vocab_adapter(tokenizer, tmp_path / "with")  # the learner's vocabulary check passes
    assert prompts.image_token_id == 422  # the vision tokens kept their (moved) ids
    config = json.loads((tmp_path / "with" / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 1424 and config["image_token_id"] == 422
    for name in ("preprocessor_config.json", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "with" / name).is_file(), name
    assert (tmp_path / "with" / "preprocessor_config.json").read_text() == \
        (bare / "preprocessor_config.json").read_text()
    record = json.loads((tmp_path / "with" / RECORD_FILE).read_text())
    assert record["added"] == 1000 and record["contiguous"] and record["init"]["rows_used"] == 424

    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "with").iterdir()}
    assert main(["--src", str(tmp_path / "with"), "--dst", str(tmp_path / "again")]) == 0
    assert "already has all 1000 coordinate tokens as single tokens: nothing to do" in capsys.readouterr().out
    assert not (tmp_path / "again").exists()
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "with").iterdir()} == before


def test_user_errors_exit_2(tiny_vl, tmp_path, capsys):
    bare, _ = strip_coord_tokens(tiny_vl, tmp_path / "bare")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [(["--src", str(tmp_path), "--dst", str(tmp_path / "o")],
              "not a checkpoint folder (no config.json)"),
             (["--src", str(bare), "--dst", str(bare)], "is --src: write to a new folder"),
             (["--src", str(bare), "--dst", str(tmp_path / "full")],
              "exists and is not empty: pass a new folder")]
    for args, expected in cases:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err
