"""Tiny local model factory: tokenizer id identity, coord tokens, chat template, offline reload, caching."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
import torch

from coordexp.coordjson import CoordObject, FieldOrder, bin_to_token, serialize_objects
from coordexp.data.prompt import PromptSpec, build_messages
from coordexp.data.synthetic import generate_records
from coordexp.models.tiny import (
    SPEC_FILE,
    TinyModelSpec,
    ensure_tiny_model,
    read_build_info,
    tiny_model_dir,
)

REPO = Path(__file__).resolve().parents[2]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module", autouse=True)
def _offline():
    old = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="module")
def models(cache_dir) -> dict[str, Path]:
    return {arch: ensure_tiny_model(cache_dir, arch=arch) for arch in ("qwen2", "qwen3")}


def _answer(objects, order="desc_first") -> str:
    return serialize_objects([CoordObject(o["desc"], tuple(o["bbox_2d"])) for o in objects],
                             FieldOrder(order))


def _texts() -> list[str]:
    rec = generate_records(1, 5)[0]
    return [
        "0 1 2 3 4 5 6 7 8 9 10 123 2024 999 1000 x1=12 y2=345",
        "<|coord_0|><|coord_999|> <|coord_12|>,<|coord_345|>]}]}",
        _answer(rec["objects"]),
        _answer(rec["objects"], "geometry_first"),
        '{"objects": [{"desc": "naïve café ÅΩ 日本", '
        '"bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>]}]}',
        "line one\nline two\r\n\ttab  two spaces   and trailing ",
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    ]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_ids_identical_across_tokenizer_frontends(models, arch):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = models[arch]
    raw = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(path)
    if arch == "qwen2":  # the trap: AutoTokenizer rebuilds normalizer + pre-tokenizer for qwen2 folders
        assert type(auto).__name__ == "Qwen2Tokenizer"
    for text in _texts():
        want = raw.encode(text, add_special_tokens=False).ids
        assert fast.encode(text, add_special_tokens=False) == want, text
        assert auto.encode(text, add_special_tokens=False) == want, text
        assert auto(text)["input_ids"] == want, text  # no BOS or other post-processing
    # digits are split one by one (Qwen2 regex), so numbers never fuse
    assert auto.tokenize("2024") == ["2", "0", "2", "4"]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_coord_tokens_single_contiguous_ids_and_survive_skip_special(models, arch):
    from transformers import AutoTokenizer

    path = models[arch]
    tok = AutoTokenizer.from_pretrained(path)
    info = read_build_info(path)
    base = info["coord_token_id_0"]
    for k in (0, 1, 7, 10, 99, 100, 500, 998, 999):
        assert tok.encode(bin_to_token(k), add_special_tokens=False) == [base + k]
    ids = [tok.convert_tokens_to_ids(bin_to_token(k)) for k in range(1000)]
    assert ids == list(range(base, base + 1000))
    assert len(tok) == info["vocab_size"] == base + 1000

    text = _answer([{"desc": "red square", "bbox_2d": [12, 34, 56, 78]}])
    ids = tok.encode(text + "<|im_end|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert "<|coord_56|>" in tok.decode(ids, skip_special_tokens=True)
    # token-by-token decoding concatenates back to the text (span math relies on it)
    assert "".join(tok.decode([i]) for i in tok.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_special_tokens_and_generation_config(models, arch):
    from transformers import AutoTokenizer, GenerationConfig

    path = models[arch]
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tok.encode(t, add_special_tokens=False)) == 1
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>", add_special_tokens=False),
                      skip_special_tokens=True) == "hi"
    gen = GenerationConfig.from_pretrained(path)
    assert gen.eos_token_id == tok.eos_token_id
    assert gen.pad_token_id == tok.pad_token_id


def test_chat_template_is_chatml_and_matches_swift_chatml(models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["qwen2"])
    rec = generate_records(1, 3)[0]
    msgs = build_messages(rec, PromptSpec(system_prompt="Be exact."))
    user = msgs[1]["content"]
    rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    # ms-swift `chatml`: system_prefix + prompt, no default system, no BOS
    assert rendered == (f"<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                        "<|im_start|>assistant\n")
    no_gen = tok.apply_chat_template(build_messages(rec), add_generation_prompt=False, tokenize=False)
    assert no_gen.endswith("<|im_end|>\n") and "assistant" not in no_gen
    # list contents (image scenes) render their text parts
    listed = [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                           {"type": "text", "text": "go"}]}]
    assert tok.apply_chat_template(listed, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>user\ngo<|im_end|>\n<|im_start|>assistant\n"
    )
    # tokenized through the template == tokenized text
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                  return_dict=True)["input_ids"]
    assert list(ids) == tok.encode(rendered, add_special_tokens=False)


def test_structural_pieces_are_fused(models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["qwen2"])
    assert len(tok.tokenize("]}]}")) == 1
    assert len(tok.tokenize('"}]}')) == 1
    assert len(tok.tokenize("]}, ")) <= 2
    info = read_build_info(models["qwen2"])
    assert info["structural_tokens"]["]}]}"] == ["]}]}"]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_model_config_reload_offline_and_generate(models, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models[arch]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == arch
    assert cfg["hidden_size"] == 64 and cfg["num_hidden_layers"] == 2
    assert cfg["num_attention_heads"] == 2 and cfg["num_key_value_heads"] == 1
    assert cfg["tie_word_embeddings"] is True
    assert cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"]) == 32

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    prompt = tok.apply_chat_template(build_messages(generate_records(1, 0)[0]), add_generation_prompt=True,
                                     tokenize=True, return_dict=True, return_tensors="pt")
    out1 = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    out2 = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out1.shape[1] > prompt["input_ids"].shape[1]
    assert torch.equal(out1, out2)
    # one training step runs and moves the weights
    ids = out1[:, :24]
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.isfinite(loss) and not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)


def test_ensure_is_cached_and_records_spec(models, cache_dir):
    path = models["qwen2"]
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(cache_dir, arch="qwen2") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert path == tiny_model_dir(cache_dir, TinyModelSpec(arch="qwen2"))
    assert path.name.startswith("tiny-qwen2-")
    info = read_build_info(path)
    assert info["spec"]["arch"] == "qwen2" and info["spec"]["seed"] == 0
    assert info["name"] == path.name and path.name.endswith(info["digest"][:12])
    assert not [p for p in cache_dir.iterdir() if ".building." in p.name]


def test_build_is_deterministic_and_seed_changes_folder(models, tmp_path):
    other = ensure_tiny_model(tmp_path, arch="qwen2")
    assert other.name == models["qwen2"].name
    for f in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (other / f).read_bytes() == (models["qwen2"] / f).read_bytes(), f
    assert tiny_model_dir(tmp_path, TinyModelSpec(arch="qwen2", seed=1)).name != other.name


def test_incomplete_folder_is_an_error(tmp_path):
    spec = TinyModelSpec(arch="qwen2")
    target = tiny_model_dir(tmp_path, spec)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="not a complete tiny model"):
        ensure_tiny_model(tmp_path, spec=spec)


def test_spec_validation():
    with pytest.raises(ValueError, match="arch"):
        TinyModelSpec(arch="llama")
    with pytest.raises(ValueError, match="head_dim"):
        TinyModelSpec(arch="qwen2", head_dim=16)


def test_concurrent_ensure_from_two_processes_yields_one_folder(tmp_path):
    env = {**os.environ, **OFFLINE_ENV,
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "coordexp.models.tiny", "--out", str(tmp_path), "--arch", "qwen3"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1
    folders = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert [p.name for p in folders] == [Path(paths.pop()).name]
    assert (folders[0] / SPEC_FILE).is_file()
