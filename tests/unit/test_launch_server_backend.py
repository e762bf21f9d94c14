"""ServerRolloutBackend (the RolloutBackend over the rollout server), with a stub client: what a Rollout
holds, when repeat_terminate_active is 1 and error wrapping; and the Stage-2 trainer's rollouts: weight sync
before the requests (the learner owns the sync), errors that name the optimizer step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from coordexp.config.contract import rollout_contract
from coordexp.config.load import compose, to_train_config
from coordexp.errors import LearnerError
from coordexp.rollout.probe import ProbeError
from coordexp.rollout.server_backend import ServerBackendError, ServerRolloutBackend
from coordexp.rollout.server_client import MalformedResponseError, RolloutResult
from coordexp.trainer.stage2_trainer import Stage2ABTrainer
from coordexp.trainer.sync_transport import WeightSyncError

EOS = 2


@pytest.fixture(scope="module")
def cfg():
    return to_train_config(
        compose(
            [
                "+experiment=smoke/ab_mixed",
                "rollout=vllm_server",
                "rollout_matching.max_new_tokens=4",
                "rollout_matching.decode_batch_size=2",
            ]
        )
    )


class StubClient:
    base_urls = ("http://a:1",)

    def __init__(self, results=None, error=None):
        self.results, self.error, self.calls = results or [], error, []

    def plan(self, n):
        return [("http://a:1", s, min(n, s + 2)) for s in range(0, n, 2)]

    def infer(self, reqs, params):
        self.calls.append(("infer", len(reqs), params))
        if self.error:
            raise self.error
        return self.results[: len(reqs)]


class StubSync:
    def __init__(self, log, error=None):
        self.log, self.error, self.server_step = log, error, None

    def needed(self, step):
        return self.server_step != step

    def maybe_sync(self, getter, step):
        self.log.append(("sync", step))
        if self.error:
            raise self.error
        self.server_step = step


def make(cfg, client, enabled=True):
    contract = rollout_contract(cfg)
    if not enabled:
        contract = type(contract)(
            **{**contract.__dict__, "repeat_terminate": type(contract.repeat_terminate)(enabled=False)}
        )
    return ServerRolloutBackend(contract, stop_ids=[EOS], client=client)


class Buffer:
    def __init__(self):
        self.maxes = {}

    def add_max(self, key, value):
        self.maxes[key] = max(self.maxes.get(key, value), value)


def trainer_with(backend, sync, step):
    """A Stage-2 trainer's state as ``Stage2ABTrainer.rollouts`` / ``sync_rollout_weights`` read it."""
    fake = SimpleNamespace(state=SimpleNamespace(global_step=step), metric_buffer=Buffer(), weight_sync=sync,
                           accelerator=SimpleNamespace(unwrap_model=lambda m: m), model=object(),
                           rollout_backend=backend)
    fake.sync_rollout_weights = lambda: Stage2ABTrainer.sync_rollout_weights(fake)
    fake.rollouts = lambda samples, prompts, seed: Stage2ABTrainer.rollouts(fake, samples, prompts, seed)
    return fake


def encoded(ids):
    return SimpleNamespace(ids=ids, vision=None)


def sample(content="x"):
    return SimpleNamespace(messages=[{"role": "user", "content": content}], source="s.jsonl:1")


def result(tokens, finish, flag, prompt=(5, 6)):
    return RolloutResult(
        prompt_token_ids=list(prompt),
        token_ids=list(tokens),
        text="",
        finish_reason=finish,
        repeat_terminate_triggered=flag,
    )


@pytest.fixture
def probe_ok(monkeypatch):
    calls = []
    monkeypatch.setattr(
        "coordexp.rollout.server_backend.run_probe",
        lambda url, **kw: calls.append((url, kw)) or SimpleNamespace(attempts=1),
    )
    return calls


def test_rollouts_carry_server_prompt_ids_flags_and_budget(cfg, probe_ok):
    client = StubClient(
        [
            result([9, EOS], "stop", 1, prompt=(1, 2, 3)),
            result([9, 9, 9, 9], "length", 0),
            result([3, EOS, 4], "stop", None),
        ]
    )
    log = []
    trainer = trainer_with(make(cfg, client), StubSync(log), step=7)
    batch = trainer.rollouts([sample()] * 3, [encoded([1, 2, 3]), encoded([5, 6]), encoded([5, 6])], 11)
    r0, r1, r2 = batch.rollouts
    assert (
        r0.prompt_ids == [1, 2, 3]
        and r0.token_ids == [9, EOS]
        and r0.triggered == 1
        and not r0.hit_max_new_tokens
    )
    assert r1.token_ids == [9, 9, 9, 9] and r1.hit_max_new_tokens and r1.triggered == 0
    assert r2.token_ids == [3, EOS] and r2.triggered == 0  # cut at the first stop token; no field -> 0
    assert batch.repeat_terminate_active == 1 and batch.decode_batch_sizes == [2, 1]
    ((_, n, params),) = client.calls
    assert n == 3 and params.seed == 11 and params.max_tokens == 4 and params.temperature == 0.0
    assert log == [("sync", 7)] and [u for u, _ in probe_ok] == ["http://a:1"]
    assert "time/weight_sync_s" in trainer.metric_buffer.maxes
    trainer.rollouts([sample("y")], [encoded([1, 2, 3])], 12)
    assert len(probe_ok) == 1 and log == [("sync", 7)]  # probe once per process; no re-sync at the same step


def test_active_is_zero_when_the_feature_is_off_and_probe_is_skipped(cfg, probe_ok):
    backend = make(cfg, StubClient([result([EOS], "stop", None)]), enabled=False)
    assert backend.generate([[1]], [[{"role": "user", "content": "x"}]], 0).repeat_terminate_active == 0
    assert probe_ok == []


def test_probe_failure_is_a_learner_error(cfg, monkeypatch):
    def bad(url, **kw):
        raise ProbeError("the logits processor is not active: flag 0")

    monkeypatch.setattr("coordexp.rollout.server_backend.run_probe", bad)
    backend = make(cfg, StubClient([result([EOS], "stop", 0)]))
    with pytest.raises(ServerBackendError, match="not proven active on http://a:1: .*not active") as e:
        backend.generate([[1]], [[{"role": "user", "content": "x"}]], 0)
    assert isinstance(e.value, LearnerError)


def test_server_and_sync_errors_name_the_step(cfg, probe_ok):
    error = MalformedResponseError("malformed /infer/ response: body must be a list")
    backend = make(cfg, StubClient(error=error))
    with pytest.raises(ServerBackendError, match=r"^rollout server failure: malformed /infer/"):
        backend.generate([[1]], [[{"role": "user", "content": "x"}]], 0)
    with pytest.raises(ServerBackendError,
                       match=r"rollout server failure: malformed /infer/.* \(optimizer step 3\)$"):
        trainer_with(backend, StubSync([]), step=3).rollouts([sample()], [encoded([1])], 0)
    trainer = trainer_with(make(cfg, StubClient([])),
                           StubSync([], WeightSyncError("weight sync: POST x timed out")), step=5)
    with pytest.raises(ServerBackendError, match=r"timed out \(optimizer step 5\)") as e:
        trainer.rollouts([sample()], [encoded([1])], 0)
    assert isinstance(e.value, LearnerError)


def test_empty_shard_still_joins_the_sync(cfg, probe_ok):
    log = []
    batch = trainer_with(make(cfg, StubClient([])), StubSync(log), step=2).rollouts([], [], 0)
    assert batch.rollouts == [] and log == [("sync", 2)]
