"""The HTTP API against a real server: the official `openai` client (chat and completions, streaming
and not) and SGLang's native routes; greedy text over HTTP equals the offline Engine's."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import openai
import pytest
from server_fixture import MODEL, SMALL_LIMITS, RadixServer, process_title

GREEDY = {"temperature": 0}
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def client(server: RadixServer) -> openai.OpenAI:
    return server.openai_client()


def _sse(body: bytes) -> list[dict]:
    events = [line[len(b"data: "):] for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ---------------------------------------------------------------- OpenAI client


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat_then_stream_with_usage(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 0 < full.usage.completion_tokens <= 8 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens > 0  # the radix cache kept the first request's prompt


def test_chat_n_seed_logprobs(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0.8, seed=7, n=2,
                                          logprobs=True, top_logprobs=2)
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.usage.completion_tokens == sum(len(c.logprobs.content) for c in resp.choices)
    for c in resp.choices:
        assert 1 <= len(c.logprobs.content) <= 6
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in c.logprobs.content)
    same = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0.8, seed=7)
    assert same.choices[0].message.content == resp.choices[0].message.content  # copy 0 has the request's seed


def test_completions(client: openai.OpenAI) -> None:
    resp = client.completions.create(model=MODEL, prompt=[PROMPT, "1, 2, 3,"], max_tokens=8, temperature=0,
                                     logprobs=2, stop=["\n"])
    assert len(resp.choices) == 2 and all(c.finish_reason in ("stop", "length") for c in resp.choices)
    assert all("\n" not in c.text for c in resp.choices)
    lp = resp.choices[1].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stop=["\n"],
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == resp.choices[0].text
    assert chunks[-1].usage.prompt_tokens == 5
    # SGLang's examples name the model "default": it is whatever this server serves.
    again = client.completions.create(model="default", prompt=PROMPT, max_tokens=8, temperature=0, stop=["\n"])
    assert again.choices[0].text == resp.choices[0].text and again.model == MODEL


def test_openai_fields_without_effect_here(client: openai.OpenAI) -> None:
    """What the openai client sends for OpenAI-hosted features (storage, tiers, cache keys, predictions) is
    accepted and changes nothing; audio output and web search are a 400 that names the field."""
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    same = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, temperature=0, store=False, metadata={"run": "7"},
        service_tier="auto", prompt_cache_key="user-1", safety_identifier="u-1", modalities=["text"],
        prediction={"type": "content", "content": "Hello"})
    assert same.choices[0].message.content == plain.choices[0].message.content
    for unsupported in ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
                        {"web_search_options": {}}):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, **unsupported)
        assert err.value.body["param"] == next(iter(unsupported)), err.value.body


def test_matched_stop_as_sglang(client: openai.OpenAI) -> None:
    """Each choice says what ended it (SGLang's `matched_stop`): the stop string, the EOS id, or null at length."""
    base = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    assert (base.choices[0].finish_reason, base.choices[0].matched_stop) == ("length", None)
    stop = base.choices[0].text.strip()[:3]
    cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert (cut.choices[0].finish_reason, cut.choices[0].matched_stop) == ("stop", stop)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=200, temperature=0,
                                                 stream=True))
    last = chunks[-1].choices[0]
    assert (last.finish_reason, type(last.matched_stop)) in (("stop", int), ("length", type(None))), last


# ---------------------------------------------------------------- native routes


def test_greedy_http_matches_engine(server: RadixServer, client: openai.OpenAI) -> None:
    from radixserve import Engine

    params = {"max_new_tokens": 12, "temperature": 0}
    raw = server.post("/generate", {"text": "def fibonacci(n):", "sampling_params": params}).json()["text"]
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    with Engine(**_engine_limits(), dtype="float32") as engine:  # as the test server (server_fixture)
        assert raw == engine.generate("def fibonacci(n):", params)["text"]
        assert chat.choices[0].message.content == engine.generate(CHAT, params)["text"]


def _engine_limits() -> dict:
    flags = iter(SMALL_LIMITS)
    return {flag[2:].replace("-", "_"): int(value) for flag, value in zip(flags, flags, strict=True)}


def test_generate_batch_stream_and_logprobs(server: RadixServer) -> None:
    body = {"text": [PROMPT, "Hello"], "sampling_params": {"max_new_tokens": 6, **GREEDY}, "return_logprob": True,
            "logprob_start_len": 0, "top_logprobs_num": 2, "return_text_in_logprobs": True}
    out = server.post("/generate", body).json()
    assert isinstance(out, list) and len(out) == 2
    meta = out[0]["meta_info"]
    assert meta["prompt_tokens"] == 5 and meta["completion_tokens"] == 6 == len(out[0]["output_ids"])
    assert meta["finish_reason"] == {"type": "length", "length": 6} and meta["e2e_latency"] > 0
    assert [e[1] for e in meta["output_token_logprobs"]] == out[0]["output_ids"]
    assert len(meta["input_token_logprobs"]) == 5 and meta["input_token_logprobs"][0][0] is None
    assert all(isinstance(e[2], str) for e in meta["output_token_logprobs"])
    stream = server.post("/generate", {"text": PROMPT, "sampling_params": {"max_new_tokens": 6, **GREEDY},
                                       "stream": True})
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = _sse(stream.content)
    assert events[-1]["text"] == out[0]["text"] and events[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(events[i + 1]["text"].startswith(events[i]["text"]) for i in range(len(events) - 1))


def test_streamed_logprobs_add_up_to_the_whole(server: RadixServer) -> None:
    """The tokenizer sends only each step's new tokens; the gateway's merged output equals the unstreamed one."""
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 8, **GREEDY}, "return_logprob": True,
            "logprob_start_len": 0, "top_logprobs_num": 2}
    whole = server.post("/generate", body).json()
    events = _sse(server.post("/generate", {**body, "stream": True}).content)
    assert len(events) > 2
    last = events[-1]
    assert last["text"] == whole["text"] and last["output_ids"] == whole["output_ids"]
    for key in ("output_token_logprobs", "output_top_logprobs", "input_token_logprobs"):
        assert last["meta_info"][key] == whole["meta_info"][key], key
    assert [len(e["meta_info"]["output_token_logprobs"]) for e in events] == [len(e["output_ids"]) for e in events]


def test_generate_stop_string_and_ids(server: RadixServer) -> None:
    base = server.post("/generate", {"text": PROMPT, "sampling_params": {"max_new_tokens": 16, **GREEDY}}).json()
    stop = base["text"].strip()[:3]
    cut = server.post("/generate", {"text": PROMPT, "sampling_params": {"max_new_tokens": 16, "stop": stop,
                                                                        **GREEDY}}).json()
    assert cut["text"] == base["text"][:base["text"].index(stop)]
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    ids = server.post("/generate", {"input_ids": base["output_ids"][:3], "sampling_params": {"max_new_tokens": 0}})
    assert ids.json()["meta_info"]["completion_tokens"] == 0 and ids.json()["text"] == ""


def test_info_routes(server: RadixServer) -> None:
    info = server.get("/get_model_info").json()
    assert info["is_generation"] is True and info["tokenizer_path"]
    sinfo = server.get("/get_server_info").json()
    assert sinfo["max_running_requests"] == 16 and sinfo["scheduler"]["invariants"] == "ok"
    assert server.post("/flush_cache", {}).status_code == 200
    assert server.get("/health").status_code == 200


def test_torch_is_the_workers_alone(server: RadixServer) -> None:
    """The launcher, the tokenizer and the scheduler never load torch (docs/architecture.md): its import is
    seconds of CPU at every start."""
    def loads_torch(pid: int) -> bool:
        return b"libtorch" in Path(f"/proc/{pid}/maps").read_bytes()

    titles = {pid: process_title(pid) for pid in server.child_pids}
    others = [pid for pid, title in titles.items() if b"tokenizer-" in title or b"scheduler" in title]
    workers = [pid for pid, title in titles.items() if b"worker-" in title]
    assert len(others) == 2 and len(workers) == 1 and loads_torch(workers[0])
    assert not [pid for pid in [server.proc.pid, *others] if loads_torch(pid)], titles


def test_sigusr1_writes_each_childs_stacks_to_the_log_and_it_carries_on(server: RadixServer) -> None:
    """`kill -USR1` on a child (procutil.child_init) writes every thread's Python stack to the server's log, for a
    hung or slow process (docs/deploy.md); the server keeps serving."""
    processes = server.get("/get_server_info").json()["processes"]
    for name in ("scheduler", "worker-0"):
        before = server.log().count("Thread 0x")
        os.kill(processes[name], signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while server.log().count("Thread 0x") == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.log().count("Thread 0x") > before, name
    out = server.post("/generate", {"text": "Hello", "sampling_params": {"max_new_tokens": 2}})
    assert out.status_code == 200, out.text
