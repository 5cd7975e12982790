"""Bad requests get a 4xx in OpenAI's error shape, never a 500 or a hang; the server stays healthy.
The server runs with --api-key: every route but the health ones needs it."""

from __future__ import annotations

import pytest
from server_fixture import MODEL, RadixServer, http_request

KEY = "sk-test-key"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": MODEL, "prompt": "hi"}
GOOD = {"text": "Hello", "sampling_params": {"max_new_tokens": 2, "temperature": 0}}


pytestmark = pytest.mark.server_flags(api_key=KEY)


BAD_REQUESTS = [  # (name, path, body, status, param or None)
    ("malformed json", "/generate", b'{"text": ', 400, None),
    ("not an object", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("text of wrong type", "/generate", {"text": 5}, 400, "text"),
    ("neither text nor ids", "/generate", {"sampling_params": {}}, 400, "text"),
    ("empty text", "/generate", {"text": ""}, 400, None),
    ("empty batch", "/generate", {"text": []}, 400, "text"),
    ("negative temperature", "/generate", {"text": "hi", "sampling_params": {"temperature": -1}}, 400,
     "sampling_params.temperature"),
    ("temperature past float32", "/generate", {"text": "hi", "sampling_params": {"temperature": 1e39}}, 400,
     "sampling_params.temperature"),
    ("temperature infinite", "/generate", b'{"text": "hi", "sampling_params": {"temperature": 1e999}}', 400,
     "sampling_params"),  # past float64: the JSON decoder stops at the object, before its field
    ("logit bias past its range", "/generate", {"text": "hi", "sampling_params": {"logit_bias": {"5": 1e39}}}, 400,
     "sampling_params.logit_bias"),
    ("chat logit bias past its range", "/v1/chat/completions", {**CHAT, "logit_bias": {"5": 101}}, 400,
     "logit_bias"),
    ("repetition penalty NaN", "/v1/completions", b'{"model": "%s", "prompt": "a", "repetition_penalty": NaN}'
     % MODEL.encode(), 400, None),
    ("session timeout of a century", "/open_session", {"timeout": 3.2e9}, 400, "timeout"),
    ("top_p above 1", "/generate", {"text": "hi", "sampling_params": {"top_p": 1.5}}, 400, "sampling_params.top_p"),
    ("top_k zero", "/generate", {"text": "hi", "sampling_params": {"top_k": 0}}, 400, "sampling_params.top_k"),
    ("unknown sampling param", "/generate", {"text": "hi", "sampling_params": {"bogus": 1}}, 400, "sampling_params"),
    ("max_new_tokens as string", "/generate", {"text": "hi", "sampling_params": {"max_new_tokens": "8"}}, 400,
     "sampling_params.max_new_tokens"),
    ("token id out of vocab", "/generate", {"input_ids": [1, 10_000_000]}, 400, None),
    ("stop token id out of vocab", "/generate", {"text": "hi", "sampling_params": {"stop_token_ids": [10**9]}}, 400,
     None),
    ("prompt + max_new_tokens over context", "/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 4096}},
     400, None),
    ("unknown model", "/v1/chat/completions", {**CHAT, "model": "gpt-4"}, 404, "model"),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, 400, None),
    ("empty messages", "/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, None),
    ("temperature above 2", "/v1/chat/completions", {**CHAT, "temperature": 3}, 400, "temperature"),
    ("negative max_tokens", "/v1/completions", {**COMPLETION, "max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens over context", "/v1/completions", {**COMPLETION, "max_tokens": 100_000}, 400, None),
    ("stream over context", "/v1/chat/completions", {**CHAT, "stream": True, "max_tokens": 100_000}, 400, None),
    ("n zero", "/v1/completions", {**COMPLETION, "n": 0}, 400, "n"),
    ("seed beyond int64", "/v1/completions", {**COMPLETION, "seed": 2**70}, 400, "seed"),
    ("top_logprobs without logprobs", "/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("penalty out of range", "/v1/chat/completions", {**CHAT, "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ("unsupported feature", "/generate", {"text": "x", "lora_path": "adapter"}, 400, "lora_path"),
    ("two grammars", "/generate", {"text": "x", "sampling_params": {"regex": "a", "ebnf": "root ::= \"a\""}}, 400,
     "sampling_params.ebnf"),
    ("typo in an extra", "/v1/chat/completions", {**CHAT, "no_stop_trimm": True}, 400, None),
    ("unknown field", "/v1/chat/completions", {**CHAT, "tempreature": 0}, 400, None),
    ("mixed prompt list", "/v1/completions", {**COMPLETION, "prompt": ["a", 1]}, 400, "prompt"),
    ("unknown route", "/v2/nothing", {}, 404, None),
    ("body too large", "/generate", b'{"text": "' + b"a" * (5 << 20) + b'"}', 413, None),
]


@pytest.mark.parametrize(("name", "path", "body", "status", "param"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request(server: RadixServer, name: str, path: str, body: object, status: int, param: str | None) -> None:
    resp = server.post(path, body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


def test_still_healthy_after_bad_requests(server: RadixServer) -> None:
    resp = server.post("/generate", GOOD)
    assert resp.status_code == 200 and resp.json()["meta_info"]["completion_tokens"] == 2
    info = server.get("/get_server_info").json()["scheduler"]
    assert info["num_running_reqs"] == 0 and info["invariants"] == "ok"


@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {KEY}", f"Bearer {KEY}x"])
def test_api_key_required(server: RadixServer, auth: str | None) -> None:
    headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
    for method, path in [("POST", "/generate"), ("GET", "/v1/models"), ("GET", "/get_server_info")]:
        resp = http_request(server.port, method, path, b'{"text": "hi"}' if method == "POST" else None, headers)
        assert resp.status_code == 401, (path, resp.text)
        assert resp.json()["error"]["code"] == "invalid_api_key"


def test_health_routes_need_no_key(server: RadixServer) -> None:
    assert http_request(server.port, "GET", "/health").status_code == 200
    assert http_request(server.port, "GET", "/health_generate").status_code == 200
    assert server.get("/v1/models").status_code == 200
