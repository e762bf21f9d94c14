"""The /infer/ item shape a coordexp server answers: the wrapper only for a request that asks for it
(``X-Coordexp-Response: wrapped``, what coordexp's client sends), ms-swift's own ``RolloutOutput`` for every
other client, with the flag in ``rollout_infos``. The real-server proof (ms-swift's VLLMClient against a
real coordexp server) is tests/integration/test_swift_rollout_server.py."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from swift.infer_engine.protocol import (
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatMessage,
    RolloutOutput,
    UsageInfo,
)

from coordexp.protocol import FLAG_INFO_KEY, FLAG_KEY, RESPONSE_KEY, WRAPPER_HEADER, WRAPPER_VALUE
from coordexp.rollout.server import responses
from coordexp.rollout.server_client import parse_infer_response


def _output(flag: int) -> RolloutOutput:
    choice = ChatCompletionResponseChoice(index=0, message=ChatMessage(role="assistant", content="ab"),
                                          finish_reason="stop", token_ids=[5, 6, 2])
    chat = ChatCompletionResponse(model="tiny", choices=[choice], usage=UsageInfo(2, 3, 5),
                                  prompt_token_ids=[1, 2])
    return RolloutOutput(response=chat, rollout_infos={FLAG_INFO_KEY: flag})


@pytest.fixture
def client():
    """A real FastAPI app with the plugin's middleware; the endpoint answers as the patched infer does."""
    app = FastAPI()

    @app.post("/infer/")
    async def infer():
        outputs = [_output(1), _output(0)]
        if responses.wants_wrapper():
            return [responses.wrap_output(o) for o in outputs]
        return [responses.plain_output(o) for o in outputs]

    app.add_middleware(responses.WrapperHeaderMiddleware)
    with TestClient(app) as c:
        yield c


def test_a_client_that_does_not_ask_gets_ms_swifts_shape_with_the_flag_in_rollout_infos(client):
    body = client.post("/infer/", json={}).json()
    assert all(set(item) >= {"response", "rollout_infos"} and RESPONSE_KEY not in item for item in body)
    parsed = [RolloutOutput.model_validate(item) for item in body]  # what ms-swift's VLLMClient does
    assert [p.rollout_infos[FLAG_INFO_KEY] for p in parsed] == [1, 0]
    assert parsed[0].response.choices[0].message.content == "ab"


@pytest.mark.parametrize("value", [WRAPPER_VALUE, "Wrapped", " wrapped "])
def test_coordexps_header_asks_for_the_wrapper(client, value):
    body = client.post("/infer/", json={}, headers={WRAPPER_HEADER: value}).json()
    assert [set(item) for item in body] == [{"response", RESPONSE_KEY}] * 2
    assert [item[RESPONSE_KEY] for item in body] == [{FLAG_KEY: 1}, {FLAG_KEY: 0}]
    assert all(FLAG_INFO_KEY not in item["response"]["rollout_infos"] for item in body)
    results = parse_infer_response(body, 2, require_flag=True)
    assert [r.repeat_terminate_triggered for r in results] == [1, 0]
    assert results[0].token_ids == [5, 6, 2] and results[0].prompt_token_ids == [1, 2]


def test_another_header_value_or_no_header_is_plain(client):
    body = client.post("/infer/", json={}, headers={WRAPPER_HEADER: "plain"}).json()
    assert all(RESPONSE_KEY not in item for item in body)
    # the context variable does not leak from one request to the next
    client.post("/infer/", json={}, headers={WRAPPER_HEADER: WRAPPER_VALUE})
    assert all(RESPONSE_KEY not in item for item in client.post("/infer/", json={}).json())


def test_a_worker_without_the_plugin_is_an_error_in_both_shapes():
    bare = RolloutOutput(response=_output(0).response)
    for shape in (responses.plain_output, responses.wrap_output):
        with pytest.raises(RuntimeError, match=f"without the '{FLAG_INFO_KEY}' flag"):
            shape(bare)


def test_asks_for_wrapper_reads_raw_asgi_headers():
    assert responses.asks_for_wrapper([(b"x-coordexp-response", b"wrapped")])
    assert not responses.asks_for_wrapper([(b"x-other", b"wrapped")])
    assert not responses.asks_for_wrapper(None)
