"""Learner-side /infer/ client against fake HTTP servers (fault injection only; the real server is proven in
tests/integration/test_swift_rollout_server.py)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from coordexp.rollout.server_client import (
    DecodeParams,
    InferRequest,
    MalformedResponseError,
    RolloutClient,
    RolloutServerError,
    build_infer_payload,
    parse_infer_response,
    split_weighted,
)


def rollout_item(i: int, flag: int | None = 0, finish: str = "stop", wrapped: bool = True) -> dict:
    chat = {
        "model": "m",
        "object": "chat.completion",
        "prompt_token_ids": [1, 2, 3],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"text{i}"},
                "finish_reason": finish,
                "token_ids": [10 + i, 11, 2],
            }
        ],
    }
    ro = {"response": chat, "messages": None, "rollout_infos": {}}
    if not wrapped:
        return ro
    return {"response": ro, "coordexp": {"repeat_terminate_triggered": flag}}


class FakeServer:
    """A tiny HTTP server: ``infer(body) -> (status, json_or_text)`` decides each /infer/ answer."""

    def __init__(
        self, world_size: int = 1, infer: Callable[[dict], Any] | None = None, delay_s: float = 0.0
    ):
        self.world_size = world_size
        self.infer_fn = infer or (
            lambda body: (200, [rollout_item(i) for i in range(len(body["infer_requests"]))])
        )
        self.delay_s = delay_s
        self.bodies: list[dict] = []
        self.calls = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, status, payload):
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/health/":
                    self._send(200, {"status": "ok"})
                elif self.path == "/get_world_size/":
                    self._send(200, {"world_size": fake.world_size})
                else:
                    self._send(404, {"detail": "nope"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.calls += 1
                fake.bodies.append(body)
                if fake.delay_s:
                    time.sleep(fake.delay_s)
                status, payload = fake.infer_fn(body)
                self._send(status, payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers():
    made: list[FakeServer] = []

    def make(**kw) -> FakeServer:
        s = FakeServer(**kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def reqs(n: int) -> list[InferRequest]:
    return [InferRequest(messages=[{"role": "user", "content": f"q{i}"}]) for i in range(n)]


PARAMS = DecodeParams(max_tokens=8, temperature=0.0, seed=100)


def _walk_keys(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _walk_keys(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk_keys(v)


def test_payload_never_carries_logits_processors(servers):
    s = servers()
    client = RolloutClient([s.url], decode_batch_size=4, repeat_terminate_enabled=True)
    xreq = InferRequest(
        messages=[{"role": "user", "content": "p"}],
        vllm_xargs={"coordexp_repeat_terminate": {"enabled": False}},
    )
    client.infer(reqs(3) + [xreq], PARAMS)
    assert s.bodies
    for body in s.bodies:
        assert "logits_processors" not in set(_walk_keys(body))
        assert "logits_processor" not in json.dumps(body)
        rc = body["request_config"]
        assert rc["return_details"] is True and rc["n"] == 1 and rc["stop"] == ["<|im_end|>"]
        assert rc["max_tokens"] == 8 and rc["temperature"] == 0.0 and rc["seed"] == 100
    assert s.bodies[0]["infer_requests"][3]["data_dict"] == {
        "vllm_xargs": {"coordexp_repeat_terminate": {"enabled": False}}
    }
    assert "data_dict" not in s.bodies[0]["infer_requests"][0]


def test_flags_come_from_the_coordexp_field_not_finish_reason(servers):
    # item 0: finish "stop" but flag 0; item 1: finish "length" but flag 1 -> flags [0, 1]
    s = servers(
        infer=lambda b: (
            200,
            [rollout_item(0, flag=0, finish="stop"), rollout_item(1, flag=1, finish="length")],
        )
    )
    client = RolloutClient([s.url], decode_batch_size=8, repeat_terminate_enabled=True)
    res = client.infer(reqs(2), PARAMS)
    assert [r.repeat_terminate_triggered for r in res] == [0, 1]
    assert [r.repeat_terminate_triggered for r in res].count(1) == 1
    assert res[0].prompt_token_ids == [1, 2, 3] and res[1].token_ids == [11, 11, 2] and res[0].text == "text0"


def test_missing_flag_fails_fast_when_enabled_and_is_fine_when_disabled(servers):
    s = servers(
        infer=lambda b: (200, [rollout_item(i, wrapped=False) for i in range(len(b["infer_requests"]))])
    )
    with pytest.raises(MalformedResponseError, match="coordexp.repeat_terminate_triggered"):
        RolloutClient([s.url], decode_batch_size=8, repeat_terminate_enabled=True).infer(reqs(2), PARAMS)
    res = RolloutClient([s.url], decode_batch_size=8, repeat_terminate_enabled=False).infer(reqs(2), PARAMS)
    assert [r.repeat_terminate_triggered for r in res] == [None, None]
    assert [r.repeat_terminate_triggered for r in res].count(1) == 0


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"not": "a list"}, "must be a JSON list"),
        ([rollout_item(0)], "must have 2 items"),
        (
            [
                rollout_item(0),
                {"response": {"response": {"choices": []}}, "coordexp": {"repeat_terminate_triggered": 0}},
            ],
            "choices",
        ),
        (
            [rollout_item(0), {"response": {}, "coordexp": {"repeat_terminate_triggered": 2}}],
            "must be 0 or 1",
        ),
        ([rollout_item(0), {"response": {}, "coordexp": {}}], "repeat_terminate_triggered"),
    ],
)
def test_malformed_responses_raise_clear_errors(servers, body, needle):
    s = servers(infer=lambda b: (200, body))
    client = RolloutClient([s.url], decode_batch_size=8, repeat_terminate_enabled=True)
    with pytest.raises(MalformedResponseError, match=needle):
        client.infer(reqs(2), PARAMS)
    assert s.calls == 1  # malformed bodies are not retried


def test_malformed_fields_inside_a_choice():
    item = rollout_item(0)
    item["response"]["response"]["choices"][0]["token_ids"] = None
    with pytest.raises(MalformedResponseError, match=r"token_ids.*return_details"):
        parse_infer_response([item], 1, True)
    item = rollout_item(0)
    item["response"]["response"]["prompt_token_ids"] = []
    with pytest.raises(MalformedResponseError, match="prompt_token_ids"):
        parse_infer_response([item], 1, True)
    with pytest.raises(RolloutServerError, match="error"):
        parse_infer_response([{"object": "error", "message": "boom"}], 1, True)


def test_one_retry_then_success(servers):
    state = {"n": 0}

    def flaky(body):
        state["n"] += 1
        if state["n"] == 1:
            return 503, {"detail": "warming up"}
        return 200, [rollout_item(i) for i in range(len(body["infer_requests"]))]

    s = servers(infer=flaky)
    res = RolloutClient([s.url], decode_batch_size=8, repeat_terminate_enabled=True).infer(reqs(2), PARAMS)
    assert len(res) == 2 and s.calls == 2


def test_two_failures_give_a_clear_error(servers):
    s = servers(infer=lambda b: (500, {"detail": "engine died"}))
    with pytest.raises(RolloutServerError, match=r"failed twice \(one retry\).*HTTP 500.*engine died"):
        RolloutClient([s.url], decode_batch_size=8, repeat_terminate_enabled=True).infer(reqs(1), PARAMS)
    assert s.calls == 2


def test_timeout_is_per_call_and_retried_once(servers):
    s = servers(delay_s=1.5)
    client = RolloutClient([s.url], decode_batch_size=8, repeat_terminate_enabled=True, infer_timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(RolloutServerError, match="timed out after 0.5 s"):
        client.infer(reqs(1), PARAMS)
    assert time.monotonic() - t0 < 5
    assert s.calls == 2


def test_client_error_is_not_retried(servers):
    s = servers(infer=lambda b: (422, {"detail": "bad field"}))
    with pytest.raises(RolloutServerError, match="HTTP 422.*bad field"):
        RolloutClient([s.url], decode_batch_size=8, repeat_terminate_enabled=True).infer(reqs(1), PARAMS)
    assert s.calls == 1


def test_unreachable_server():
    client = RolloutClient(
        ["http://127.0.0.1:9"],
        decode_batch_size=2,
        repeat_terminate_enabled=True,
        world_sizes=[1],
        infer_timeout_s=2,
    )
    with pytest.raises(RolloutServerError, match=r"127.0.0.1:9/infer/.*failed twice"):
        client.infer(reqs(1), PARAMS)


def test_split_weighted():
    assert split_weighted(10, [1, 3]) == [(0, 3), (3, 10)]  # 2.5 / 7.5: the tie goes to the first server
    assert split_weighted(9, [1, 2]) == [(0, 3), (3, 9)]
    assert split_weighted(3, [1, 1, 1, 1]) == [(0, 1), (1, 2), (2, 3), (3, 3)]
    assert split_weighted(0, [2]) == [(0, 0)]
    with pytest.raises(ValueError):
        split_weighted(3, [0])


def test_chunks_weighted_by_world_size_and_micro_batched(servers):
    a = servers(world_size=1)
    b = servers(world_size=3)
    client = RolloutClient([a.url, b.url], decode_batch_size=2, repeat_terminate_enabled=True)
    n = 17
    res = client.infer(reqs(n), DecodeParams(max_tokens=4, seed=1000))
    assert len(res) == n
    sizes_a = [len(x["infer_requests"]) for x in a.bodies]
    sizes_b = [len(x["infer_requests"]) for x in b.bodies]
    assert sum(sizes_a) + sum(sizes_b) == n
    assert abs(sum(sizes_a) - n / 4) <= 1 and abs(sum(sizes_b) - 3 * n / 4) <= 1  # weighted 1:3
    assert max(sizes_a) <= 2 * 1 and max(sizes_b) <= 2 * 3  # decode_batch_size per world unit
    # order preserved: results map back to the requests they answer
    got = [x["messages"][0]["content"] for body in a.bodies + b.bodies for x in body["infer_requests"]]
    assert sorted(got) == sorted(f"q{i}" for i in range(n))
    assert [r.base_url for r in res] == [a.url] * sum(sizes_a) + [b.url] * sum(sizes_b)
    # per-call seed = seed + index of the chunk's first request (swift adds the in-batch index)
    starts = [0] + [sum(sizes_a[: i + 1]) for i in range(len(sizes_a) - 1)]
    assert [x["request_config"]["seed"] for x in a.bodies] == [1000 + s for s in starts]


def test_world_sizes_come_from_the_servers(servers):
    a = servers(world_size=2)
    assert RolloutClient([a.url], decode_batch_size=3, repeat_terminate_enabled=False).plan(13) == [
        (a.url, 0, 6),
        (a.url, 6, 12),
        (a.url, 12, 13),
    ]


def test_build_payload_shape():
    p = build_infer_payload(reqs(1), DecodeParams(max_tokens=3, top_k=-1, seed=None), None)
    assert set(p) == {"infer_requests", "request_config"}
    assert p["request_config"]["seed"] is None and p["request_config"]["top_k"] == -1
