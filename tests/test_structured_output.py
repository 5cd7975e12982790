"""Structured output (xgrammar) and tool calling on a real server with the default model.

The server's KV cache is small and its prefill chunks short, so the 50 concurrent constrained generations run
through chunked prefill, the radix cache and retraction (checked in /get_server_info's counters). It runs the qwen3
reasoning parser too, which leaves an answer that opens no <think> block as it is; a regex makes one that does.
"""

from __future__ import annotations

import http.client
import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from openai import OpenAI
from server_fixture import RadixServer, http_request

FLAGS = ["--max-total-tokens", "600", "--chunked-prefill-size", "64", "--max-running-requests", "24",
         "--new-token-ratio", "0.05", "--constrained-json-max-whitespace-cnt", "2", "--reasoning-parser", "qwen3"]

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                      "sunny": {"type": "boolean"}}, "required": ["city", "sunny"]},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"answer": {"type": "string", "pattern": "^(yes|no)$"},
                                      "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["answer"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                               "maxItems": 3}}, "required": ["tags"]},
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"]}}}]


pytestmark = pytest.mark.server_flags(*FLAGS)


def generate(server: RadixServer, text: str, **sampling) -> dict:
    body = json.dumps({"text": text, "sampling_params": {"max_new_tokens": 64, **sampling}}).encode()
    # A long timeout: 50 requests at once share two CPU cores.
    resp = http_request(server.port, "POST", "/generate", body, {"Content-Type": "application/json"}, timeout=600)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_fifty_json_schema_generations_parse_and_validate(server: RadixServer) -> None:
    prompt = "Here is a short JSON document about a person, a city or a list, as asked: "

    def one(i: int) -> tuple[dict, dict]:
        schema = SCHEMAS[i % len(SCHEMAS)]
        tail = f"This is request {i} of fifty, number {i * 7919 % 1000}, written in {1950 + i}. " * 2
        out = generate(server, prompt + tail, json_schema=json.dumps(schema), temperature=0.9, seed=i,
                       max_new_tokens=80)
        return schema, out

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    for schema, out in results:
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        jsonschema.validate(json.loads(out["text"]), schema)
    counters = server.get("/get_server_info").json()["scheduler"]
    assert counters["retracted_requests"] > 0 and counters["cached_tokens"] > 0
    assert counters["invariants"] == "ok"


def test_regex_ebnf_and_the_stream_match(server: RadixServer) -> None:
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    out = generate(server, "Call me at", regex=phone, temperature=0)
    assert __import__("re").fullmatch(phone, out["text"]), out["text"]
    ebnf = 'root ::= "The answer is " ("yes" | "no") "."'
    assert generate(server, "Is the sky blue?", ebnf=ebnf, temperature=0)["text"] in (
        "The answer is yes.", "The answer is no.")
    body = {"text": "A JSON list of three small numbers:", "stream": True,
            "sampling_params": {"max_new_tokens": 40, "temperature": 0, "json_schema": json.dumps(SCHEMAS[2])}}
    resp = server.post("/generate", body)
    events = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["text"] == generate(server, body["text"], **body["sampling_params"])["text"]
    jsonschema.validate(json.loads(events[-1]["text"]), SCHEMAS[2])


@pytest.mark.parametrize(("sampling", "words"), [
    ({"regex": "(ab"}, "parenthesis"),
    ({"json_schema": '{"type": "object", "properties": {"a": {"type": "nonsense"}}}'}, "invalid grammar"),
    ({"json_schema": "{not json"}, "not valid JSON"),
    ({"ebnf": "root ::= undefined_rule"}, "undefined_rule"),
])
def test_an_invalid_grammar_is_a_400(server: RadixServer, sampling: dict, words: str) -> None:
    for stream in (False, True):
        resp = server.post("/generate", {"text": "x", "stream": stream, "sampling_params": sampling})
        assert resp.status_code == 400, resp.text
        assert words in resp.json()["error"]["message"]


def test_openai_response_format(server: RadixServer) -> None:
    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    messages = [{"role": "user", "content": 'Give a JSON object with the keys "name" and "age" of a person.'}]
    reply = client.chat.completions.create(model="default", messages=messages, max_tokens=100, temperature=0,
                                           response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    schema = SCHEMAS[0]
    reply = client.chat.completions.create(
        model="default", messages=messages, max_tokens=60, temperature=1.0, n=3, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    assert len(reply.choices) == 3
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_chunked_cached_prompt_session_and_abort(server: RadixServer) -> None:
    long_prompt = "Facts about cities and people. " * 30 + "Now the JSON:"  # several 64-token prefill chunks
    first = generate(server, long_prompt, json_schema=json.dumps(SCHEMAS[1]), temperature=0)
    again = generate(server, long_prompt, json_schema=json.dumps(SCHEMAS[1]), temperature=0)
    assert again["meta_info"]["cached_tokens"] > 64 and again["text"] == first["text"]
    jsonschema.validate(json.loads(first["text"]), SCHEMAS[1])
    # A session's next turn, constrained.
    sid = server.post("/open_session", {}).json()
    turn = server.post("/generate", {"text": "My name is Ada.", "session_params": {"id": sid},
                                     "sampling_params": {"max_new_tokens": 8, "temperature": 0}}).json()
    follow = server.post("/generate", {"text": " As JSON:",
                                       "session_params": {"id": sid, "rid": turn["meta_info"]["id"]},
                                       "sampling_params": {"max_new_tokens": 64, "temperature": 0,
                                                           "json_schema": json.dumps(SCHEMAS[0])}}).json()
    jsonschema.validate(json.loads(follow["text"]), SCHEMAS[0])
    server.post("/close_session", {"session_id": sid})
    # A constrained stream whose client goes away: the server carries on.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/generate", json.dumps({"text": "x", "stream": True, "sampling_params": {
        "max_new_tokens": 200, "ignore_eos": True, "regex": "(ab )+"}}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.close()
    assert generate(server, "Call me at", regex=r"\d{4}", temperature=0)["text"].isdigit()


def test_tool_calls_round_trip_with_the_openai_client(server: RadixServer) -> None:
    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(model="default", messages=messages, tools=TOOLS, tool_choice=named,
                                           max_tokens=60, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    # Streamed: the client's stream helper accumulates the deltas into the same message.
    with client.chat.completions.stream(model="default", messages=messages, tools=TOOLS, tool_choice="required",
                                        max_tokens=60, temperature=0) as stream:
        chunks = [event for event in stream if event.type == "chunk"]
        final = stream.get_final_completion()
    streamed = final.choices[0]
    assert streamed.finish_reason == "tool_calls" and streamed.message.tool_calls
    assert all(c.function.name == "get_weather" for c in streamed.message.tool_calls)
    deltas = [d for c in chunks for ch in c.chunk.choices for d in ch.delta.tool_calls or []]
    assert [d.index for d in deltas] == list(range(len(streamed.message.tool_calls)))
    # The tool's result goes back as a "tool" message; the answer is text again.
    followup = messages + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                             "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21})}]
    reply = client.chat.completions.create(model="default", messages=followup, tools=TOOLS, tool_choice="none",
                                           max_tokens=20, temperature=0)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].message.content
    assert reply.usage.prompt_tokens > 0


def test_reasoning_apart_from_the_answer(server: RadixServer) -> None:
    """--reasoning-parser qwen3: the text of a <think> block is the message's reasoning_content, streamed or not,
    and stays in the content for a request with separate_reasoning false."""
    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    ask = {"model": "default", "messages": [{"role": "user", "content": "Is the sky blue? Think first."}],
           "max_tokens": 40, "temperature": 0}
    think = {"regex": "<think>\n[a-z]{1,9}( [a-z]{1,9}){0,3}\n</think>\n\n(yes|no)"}
    message = client.chat.completions.create(**ask, extra_body=think).choices[0].message
    reasoning, content = message.reasoning_content, message.content
    assert reasoning and reasoning.replace(" ", "").isalpha() and content in ("yes", "no"), message
    with client.chat.completions.stream(**ask, extra_body=think) as stream:
        chunks = [event.chunk for event in stream if event.type == "chunk"]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == content
    whole = client.chat.completions.create(**ask, extra_body={**think, "separate_reasoning": False}).choices[0]
    assert whole.message.content == f"<think>\n{reasoning}\n</think>\n\n{content}"
    plain = client.chat.completions.create(**{**ask, "max_tokens": 8}).choices[0].message  # no block: as it is
    assert not getattr(plain, "reasoning_content", None) and plain.content


def test_tool_choice_errors(server: RadixServer) -> None:
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    for extra, param in [({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
                         ({"tool_choice": "required", "regex": "a"}, "tool_choice"),
                         ({"tools": None, "tool_choice": "required"}, "tool_choice")]:
        resp = server.post("/v1/chat/completions", {**body, **extra})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
