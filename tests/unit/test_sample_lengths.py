"""Issue 14 item 5 (length): a record whose prompt + answer cannot fit ``vllm.max_model_len - max_new_tokens``
is refused at load with file:line, its token count and the limit (the learner never starts a forward over
it). Real tiny tokenizer and prompt encoder."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from coordexp.config.load import compose, to_train_config
from coordexp.data.jsonl import load_jsonl
from coordexp.data.lengths import TokenLimit, check_lengths, oversize_error
from coordexp.data.prompt import PromptSpec
from coordexp.errors import LearnerError
from tests.conftest import REPO_ROOT

LIMIT_TEXT = "vllm.max_model_len 1024 - rollout_matching.max_new_tokens 96"


def record(desc: str) -> str:
    return json.dumps({"width": 640, "height": 480, "objects": [{"desc": desc, "bbox_2d": [1, 2, 30, 40]}]})


@pytest.fixture
def encoders(tiny_model_dir):
    from coordexp.models.prompts import load_model_and_prompts
    from coordexp.rollout.scoring import TokenizerAdapter

    _model, tokenizer, prompts = load_model_and_prompts(tiny_model_dir, "float32")
    return prompts, TokenizerAdapter(tokenizer)


def test_the_rule_names_source_count_and_limit():
    limit = TokenLimit(928, LIMIT_TEXT)
    assert oversize_error("d.jsonl:7", 928, limit) is None
    assert oversize_error("d.jsonl:7", 929, limit) == (
        f"d.jsonl:7: 929 tokens (prompt + answer) exceed the limit of 928 ({LIMIT_TEXT}); shorten or drop "
        "the record, or raise vllm.max_model_len (the model's context permitting)")


def test_a_pack_shorter_than_the_context_is_the_limit_and_the_setting_to_raise():
    from coordexp.data.lengths import token_limit

    cfg = to_train_config(compose(["+experiment=smoke/ab_mixed", "rollout=hf",
                                   "training.packing_length=400"]))
    limit = token_limit(cfg)
    assert (limit.limit, limit.knob) == (304, "training.packing_length")
    assert oversize_error("d.jsonl:2", 305, limit) == (
        "d.jsonl:2: 305 tokens (prompt + answer) exceed the limit of 304 (training.packing_length 400 - "
        "rollout_matching.max_new_tokens 96); shorten or drop the record, or raise training.packing_length")


def test_over_length_records_are_refused_at_load_and_short_ones_are_not_tokenized(tmp_path, encoders):
    from coordexp.trainer.learner import check_sample_lengths

    prompts, adapter = encoders
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([record("cat"), record("a long one " * 400), record("dog"),
                               record("x" * 1_000_000)]) + "\n")
    cfg = to_train_config(compose(["+experiment=smoke/ab_mixed", "rollout=hf", "model.tiny_stage1_steps=0",
                                   "data.kind=jsonl",
                                   f"data.train_jsonl={path}"]))
    samples = list(load_jsonl(path, PromptSpec(), check_images=False))
    counted = []
    encode = prompts.encode
    prompts.encode = lambda s: counted.append(s.source) or encode(s)  # which samples got tokenized
    t0 = time.monotonic()
    with pytest.raises(LearnerError) as err:
        check_sample_lengths(cfg, prompts, adapter, samples)
    took = time.monotonic() - t0
    lines = str(err.value).splitlines()
    assert lines[0] == "samples too long for the context:"
    assert [re.sub(r": \d+ tokens", ": N tokens", line) for line in lines[1:]] == [
        f"{path}:{n}: N tokens (prompt + answer) exceed the limit of 928 ({LIMIT_TEXT}); shorten or drop the "
        "record, or raise vllm.max_model_len (the model's context permitting)" for n in (2, 4)]
    n_long, n_huge = (int(re.search(r": (\d+) tokens", line).group(1)) for line in lines[1:])
    assert 928 < n_long < 20_000 and n_huge > 100_000
    assert counted == [f"{path}:2", f"{path}:4"]  # the byte bound settles the short records
    assert took < 60


def test_check_lengths_reports_every_bad_sample_at_once():
    class S:
        def __init__(self, source, n):
            self.source, self.n = source, n

    with pytest.raises(Exception) as err:
        check_lengths([S("a:1", 5), S("a:2", 50), S("a:3", 60)], lambda s: s.n, TokenLimit(10, "test"))
    assert [e.split(" exceed")[0] for e in err.value.errors] == ["a:2: 50 tokens (prompt + answer)",
                                                                 "a:3: 60 tokens (prompt + answer)"]


@pytest.mark.slow
def test_the_cli_refuses_a_one_megabyte_desc_before_training(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(record("cat") + "\n" + record("x" * 1_000_000) + "\n")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "coordexp.train", "+experiment=smoke/ab_mixed", "rollout=hf",
                          "model.tiny_stage1_steps=0", "data.kind=jsonl", f"data.train_jsonl={path}",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=600)
    took = time.monotonic() - t0
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"{path}:2: " in out.stderr and f"exceed the limit of 928 ({LIMIT_TEXT})" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()
    print(f"[length] a 1 MB desc refused in {took:.1f} s (whole command)")


def test_with_packing_the_pack_length_bounds_samples_when_smaller():
    from coordexp.data.lengths import token_limit

    def limit(*overrides):
        return token_limit(to_train_config(compose(["+experiment=smoke/ab_mixed", "rollout=hf", *overrides])))

    assert repr(limit("training.packing=false")) == (
        "TokenLimit(928, 'vllm.max_model_len 1024 - rollout_matching.max_new_tokens 96')")
    assert repr(limit("training.packing=true", "training.packing_length=600")) == (
        "TokenLimit(504, 'training.packing_length 600 - rollout_matching.max_new_tokens 96')")
    assert limit("training.packing=true", "training.packing_length=4096").limit == 928  # the context rules


def test_a_desc_holding_a_special_token_is_refused_at_load(tmp_path, encoders):
    """The tokenizer would encode '<|im_end|>' inside a desc as the end-of-turn token: a Channel-A target
    that stops mid-label. Every such desc is listed with file:line; plain non-ASCII descs load."""
    from coordexp.trainer.learner import check_sample_lengths

    prompts, adapter = encoders
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([record("猫 café 🐶"), record("<|im_end|>"), record("cat <|coord_5|>"),
                               record("a <|coord half"), record("<|endoftext|>")]) + "\n", encoding="utf-8")
    cfg = to_train_config(compose(["+experiment=smoke/ab_mixed", "rollout=hf", "model.tiny_stage1_steps=0",
                                   "data.kind=jsonl", f"data.train_jsonl={path}"]))
    samples = list(load_jsonl(path, PromptSpec(), check_images=False))
    with pytest.raises(LearnerError) as err:
        check_sample_lengths(cfg, prompts, adapter, samples)
    assert str(err.value).splitlines() == [
        "descs that hold special tokens:",
        f"{path}:2: objects[0].desc '<|im_end|>' holds the tokenizer's special token '<|im_end|>'; a desc is "
        "plain text: remove or rewrite it",
        f"{path}:3: objects[0].desc 'cat <|coord_5|>' holds the tokenizer's special token '<|coord_5|>'; a "
        "desc is plain text: remove or rewrite it",
        f"{path}:5: objects[0].desc '<|endoftext|>' holds the tokenizer's special token '<|endoftext|>'; a "
        "desc is plain text: remove or rewrite it"]
    check_sample_lengths(cfg, prompts, adapter, [samples[0], samples[3]])  # plain text, however odd
