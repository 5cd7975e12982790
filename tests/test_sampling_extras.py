"""SGLang's request fields beyond the basics, on a real server: penalties change greedy output the expected way,
logit bias, stop regexes, stream_interval, and the OpenAI extras; and the field catalogue: what SGLang's router
sends is accepted, every field of a feature this server lacks is accepted at its default and named in a 400
otherwise (checked on the request Structs, no server needed)."""

from __future__ import annotations

import json
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import msgspec
import pytest
from server_fixture import RadixServer

from radixserve import wire
from radixserve.config import ServerArgs
from radixserve.errors import ApiError
from radixserve.gateway.native import GenerateRequest, build_requests
from radixserve.gateway.openai_api import ChatCompletionRequest, chat_requests
from radixserve.model_files import resolve_model
from radixserve.sglang_fields import NATIVE, OPENAI, missing
from tokenizer_proc.frontend import UNSTREAMED_REPORT_INTERVAL, TokenizerCore

REPETITIVE = "Repeat after me: the cat, the cat, the cat, the cat, the cat,"
GREEDY = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}


def generate(server: RadixServer, text: str, **sampling) -> dict:
    resp = server.post("/generate", {"text": text, "sampling_params": {**GREEDY, **sampling}})
    assert resp.status_code == 200, resp.text
    return resp.json()


def numbers(text: str) -> list[float]:
    """Every number in a JSON text, in order (logprob entries nest lists of [logprob, id, text])."""
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", text)]


def repeats(ids: list[int]) -> int:
    """Output tokens that are repeats of an earlier output token."""
    return len(ids) - len(set(ids))


def test_penalties_change_greedy_output_in_the_expected_direction(server: RadixServer) -> None:
    varied = "Write three different fruit names: apple, pear,"
    penalties = ({"repetition_penalty": 1.6}, {"frequency_penalty": 1.5}, {"presence_penalty": 1.5})
    # Sent at once, so that they share batches: requests without penalties must not be affected by penalized ones.
    cases = [(REPETITIVE, {}), *((REPETITIVE, p) for p in penalties),
             (varied, {}), (varied, {"frequency_penalty": -1.5})]
    with ThreadPoolExecutor(len(cases)) as pool:
        outs = [o["output_ids"] for o in pool.map(lambda c: generate(server, c[0], **c[1]), cases)]
    base, penalized, (free, rewarded) = outs[0], outs[1:4], outs[4:]
    assert repeats(base) > len(base) // 2  # the model loops without penalties
    for penalty, ids in zip(penalties, penalized):
        assert repeats(ids) < repeats(base), (penalty, repeats(ids), repeats(base))
    # The other direction: a negative frequency penalty rewards what was already said.
    assert Counter(rewarded).most_common(1)[0][1] > Counter(free).most_common(1)[0][1]
    # Alone, the request without penalties gives the same tokens as in the batch with penalized ones.
    assert generate(server, REPETITIVE)["output_ids"] == base


def test_logit_bias(server: RadixServer) -> None:
    base = generate(server, "The capital of France is", max_new_tokens=6)["output_ids"]
    banned = generate(server, "The capital of France is", max_new_tokens=6, logit_bias={str(base[0]): -100})
    assert banned["output_ids"][0] != base[0]
    forced = generate(server, "The capital of France is", max_new_tokens=6, logit_bias={"1000": 100})
    assert forced["output_ids"] == [1000] * 6
    resp = server.post("/generate", {"text": "x", "sampling_params": {"logit_bias": {"999999": 1}}})
    assert resp.status_code == 400 and "token ids must be in" in resp.json()["error"]["message"]


def test_stop_regex(server: RadixServer) -> None:
    prompt = "Count from one: 1, 2, 3,"
    free = generate(server, prompt, max_new_tokens=24)["text"]
    assert " 7," in free
    cut = generate(server, prompt, max_new_tokens=24, stop_regex=r"[6-7],")
    assert cut["text"] == free[:free.index(" 6,") + 1]
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": "[6-7],"}
    kept = generate(server, prompt, max_new_tokens=24, stop_regex=[r"[6-7],"], no_stop_trim=True)
    assert kept["text"] == free[:free.index(" 6,") + 3]


def test_stream_interval(server: RadixServer) -> None:
    body = {"text": "Once upon a time", "stream": True, "sampling_params": {**GREEDY, "max_new_tokens": 16}}
    every = [line for line in server.post("/generate", body).text.splitlines() if line.startswith("data: {")]
    body["sampling_params"]["stream_interval"] = 4
    fours = [json.loads(line[6:]) for line in server.post("/generate", body).text.splitlines()
             if line.startswith("data: {")]
    assert len(every) == 16 and len(fours) == 5  # the first token at once, then every 4 tokens
    assert [len(e["output_ids"]) for e in fours] == [1, 5, 9, 13, 16]
    assert fours[-1]["text"] == json.loads(every[-1][6:])["text"]


def test_outputs_sent_in_parts_keep_every_token_and_logprob(server: RadixServer) -> None:
    """Tokens reach the tokenizer every stream_interval tokens (and a request not streamed, without stop strings,
    in parts of 50): the same ids, text and logprobs as a message per token (the three requests run together)."""
    n = 20  # a request not streamed: its first token, then 19 in its last message
    body = {"text": "Once upon a time", "return_logprob": True, "top_logprobs_num": 2,
            "sampling_params": {**GREEDY, "max_new_tokens": n}}
    streamed = {**body, "stream": True, "sampling_params": {**body["sampling_params"], "stream_interval": 5}}
    per_token = {**body, "sampling_params": {**body["sampling_params"], "stop": ["never in this text"]}}
    with ThreadPoolExecutor(3) as pool:
        whole, stream, each = pool.map(lambda b: server.post("/generate", b).text, (body, streamed, per_token))
    chunks = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")]
    whole = json.loads(whole)
    for other in (chunks[-1], json.loads(each)):
        assert other["output_ids"] == whole["output_ids"] and other["text"] == whole["text"]
        for key in ("output_token_logprobs", "output_top_logprobs"):
            got, want = (json.dumps(out["meta_info"][key]) for out in (other, whole))
            assert len(other["meta_info"][key]) == n and numbers(got) == pytest.approx(numbers(want), abs=1e-4), key
    assert [len(c["output_ids"]) for c in chunks] == [1, *range(6, n, 5), n]


def test_how_often_the_scheduler_reports_a_request() -> None:
    """The tokenizer asks for a request's tokens each step where it matches stop strings, every stream interval
    (the request's, else --stream-interval) for a stream, else in parts of 50."""
    model_dir = resolve_model(None)
    core = TokenizerCore(ServerArgs(stream_interval=3), model_dir)

    def interval(rid: str, stream: bool, **sampling) -> int:
        msg = wire.GenerateText(rid=rid, text="Hi", stream=stream, sampling=wire.SamplingParams(**sampling))
        return core.submit(msg).report_interval

    assert interval("a", True) == 3 and interval("b", True, stream_interval=7) == 7
    assert interval("c", False) == UNSTREAMED_REPORT_INTERVAL == 50
    assert interval("d", True, stop=["x"]) == interval("e", False, stop_regex=["x+"]) == 1


def test_openai_extras(server: RadixServer) -> None:
    chat = {"model": "default", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8,
            "temperature": 0}
    base = server.post("/v1/chat/completions", chat).json()
    extras = {**chat, "repetition_penalty": 1.0, "no_stop_trim": False, "separate_reasoning": True,
              "stream_reasoning": True, "skip_special_tokens": True, "return_hidden_states": False,
              "chat_template_kwargs": {"unused_variable": 1}, "rid": "my-chat-id", "session_id": "s"}
    reply = server.post("/v1/chat/completions", extras).json()
    assert reply["id"] == "my-chat-id" and reply["choices"][0]["message"] == base["choices"][0]["message"]
    # continue_final_message: the assistant's partial message is continued, not answered.
    cont = {**chat, "continue_final_message": True,
            "messages": chat["messages"] + [{"role": "assistant", "content": "Hi! My name"}]}
    assert server.post("/v1/chat/completions", cont).status_code == 200
    completion = {"model": "default", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    plain = server.post("/v1/completions", completion).json()["choices"][0]["text"]
    echoed = server.post("/v1/completions", {**completion, "echo": True}).json()["choices"][0]["text"]
    assert echoed == completion["prompt"] + plain
    stream = server.post("/v1/chat/completions", {**chat, "stream": True, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}}).text
    chunks = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")]
    assert all(c["usage"]["completion_tokens"] >= 1 for c in chunks[1:])


# ---------------------------------------------------------------- the field catalogue (no server)

# What SGLang's router (sglang-router 0.3.2) sent in front of radixserve, captured on the wire.
ROUTER_GENERATE = {"text": "hello", "model": None, "sampling_params": {"max_new_tokens": 4},
                   "return_text_in_logprobs": False, "stream": False, "log_metrics": True,
                   "return_hidden_states": False, "background": False, "no_logs": False, "return_bytes": False,
                   "return_entropy": False}
ROUTER_CHAT = {"messages": [{"role": "user", "content": "hi"}], "model": "m", "logprobs": False,
               "max_completion_tokens": 4, "stream": False, "no_stop_trim": False, "ignore_eos": False,
               "continue_final_message": False, "skip_special_tokens": True, "separate_reasoning": True,
               "stream_reasoning": True, "return_hidden_states": False}


# OpenAI's own chat fields for what a self-hosted server does anyway or need not do (the openai client sends
# them when its caller sets them): accepted, with no effect on the request.
OPENAI_NO_EFFECT = {"store": True, "metadata": {"run": "7"}, "service_tier": "flex", "prompt_cache_key": "user-1",
                    "prompt_cache_retention": "24h", "prompt_cache_options": {"ttl": "30m"},
                    "safety_identifier": "u-1", "verbosity": "low", "modalities": ["text"],
                    "prediction": {"type": "content", "content": "Hello"}}


def test_openais_no_effect_fields_are_accepted_and_change_nothing() -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    plain, _ = chat_requests(msgspec.convert(chat, ChatCompletionRequest), "hermes")
    reqs, _ = chat_requests(msgspec.convert({**chat, **OPENAI_NO_EFFECT}, ChatCompletionRequest), "hermes")
    assert [msgspec.structs.replace(r, rid="") for r in reqs] == [msgspec.structs.replace(r, rid="") for r in plain]
    with pytest.raises(msgspec.ValidationError):  # a typo is still one
        msgspec.convert({**chat, "stroe": True}, ChatCompletionRequest)


def test_what_sglangs_router_sends_is_accepted() -> None:
    single, [req] = build_requests(msgspec.convert(ROUTER_GENERATE, GenerateRequest))
    assert single and req.text == "hello" and req.sampling.max_new_tokens == 4
    reqs, parsers = chat_requests(msgspec.convert(ROUTER_CHAT, ChatCompletionRequest), "hermes")
    assert len(reqs) == 1 and parsers is None


@pytest.mark.parametrize(("kind", "request_type", "base", "build"), [
    (NATIVE, GenerateRequest, {"text": "x"}, build_requests),
    (OPENAI, ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}]},
     lambda req: chat_requests(req, "hermes")),
])
def test_missing_features_are_accepted_at_their_default_and_named_otherwise(kind, request_type, base, build) -> None:
    fields = missing(kind)
    assert len(fields) > 20
    build(msgspec.convert({**base, **{f.name: f.default for f in fields}}, request_type))  # all at their default
    build(msgspec.convert({**base, **{f.name: None for f in fields}}, request_type))  # or null
    for f in fields:
        for value in (True, 7, "something"):  # the first value the field's type takes
            try:
                req = msgspec.convert({**base, f.name: value}, request_type)
            except msgspec.ValidationError:
                continue
            with pytest.raises(ApiError) as err:
                build(req)
            assert err.value.status == 400 and err.value.param == f.name
            break
        else:
            pytest.fail(f"no value other than the default decodes for {f.name}")
