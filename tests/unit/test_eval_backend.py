"""coordexp.eval's rollout backends without a server: the server backend it builds pushes no weights (the
server loaded the checkpoint itself), and a prompt the server rendered differently fails the eval. The real
server is exercised in tests/integration/test_eval_cli.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from coordexp.config.contract import rollout_contract
from coordexp.config.load import compose, to_train_config
from coordexp.eval import build_backend
from coordexp.models.prompts import TextPromptEncoder
from coordexp.rollout.batch import PromptMismatchError, Rollout, RolloutBatch, generate_rollouts
from coordexp.rollout.hf_backend import HFRolloutBackend
from coordexp.rollout.server_backend import ServerRolloutBackend
from coordexp.trainer.sync_transport import FileTransport
from coordexp.trainer.weight_sync import WeightSync


def test_server_backend_of_the_eval_pushes_no_weights(tmp_path, tiny_tokenizer):
    cfg = to_train_config(compose(["+experiment=smoke/ab_mixed", f"hydra.run.dir={tmp_path}"]))
    contract = rollout_contract(cfg)
    assert (contract.backend, contract.sync_mode) == ("vllm", "full")  # a learner would sync
    backend = build_backend(cfg, contract, None, tiny_tokenizer, SimpleNamespace(image_token_id=None),
                            tmp_path)
    assert isinstance(backend, ServerRolloutBackend) and backend.stop_ids == [2]  # the checkpoint's stop set
    assert backend.stop_words == ("<|im_end|>",)
    assert not hasattr(backend, "weight_sync")  # only the learner's trainer syncs; the eval has none
    sync = WeightSync.from_contract(contract, tmp_path, model_dir=str(tmp_path))
    assert isinstance(sync.transport, FileTransport)  # what a learner would sync with


def test_hf_backend_of_the_eval_is_in_process():
    cfg = to_train_config(compose(["+experiment=smoke/ab_mixed", "rollout=hf"]))
    tok = SimpleNamespace(eos_token_id=2, pad_token_id=0)
    backend = build_backend(cfg, rollout_contract(cfg), object(), tok, TextPromptEncoder(tok), None)
    assert isinstance(backend, HFRolloutBackend)


class Served:
    def __init__(self, prompt_ids):
        self.prompt_ids, self.calls = prompt_ids, []

    def generate(self, prompt_ids, messages, seed, vision=None):
        self.calls.append((len(prompt_ids), seed, vision))
        return RolloutBatch([Rollout(p, [2], 0, False) for p in self.prompt_ids], 0.0, 1, [len(prompt_ids)])


def test_a_prompt_the_server_rendered_differently_fails_the_eval():
    samples = [SimpleNamespace(source=f"val.jsonl:{i}", messages=[]) for i in (1, 2)]
    mine = [SimpleNamespace(ids=[5, 6, 7], vision=None), SimpleNamespace(ids=[5, 6, 8], vision=None)]
    same = Served([[5, 6, 7], [5, 6, 8]])
    assert len(generate_rollouts(same, samples, mine, seed=3).rollouts) == 2
    assert same.calls == [(2, 3, None)]
    with pytest.raises(PromptMismatchError, match=r"sample val.jsonl:2: the rollout's prompt \(4 tokens\) "
                       r"differs from the learner's \(3 tokens, .*\) from token 0 on; .*--template"):
        generate_rollouts(Served([[5, 6, 7], [9, 5, 6, 8]]), samples, mine, seed=3)
    with pytest.raises(PromptMismatchError,
                       match=r"sample val.jsonl:1: .*\(2 tokens\) .*\(3 tokens, .* token 2 on"):
        generate_rollouts(Served([[5, 6], [5, 6, 8]]), samples, mine, seed=3)
