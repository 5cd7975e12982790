"""OpenAI's Responses API (`/v1/responses`) against a real server with the official `openai` client: the same
greedy text as the chat route, the client's stream helper accepts the event stream and rebuilds the same
Response, function tools round trip, and what is not supported is a 400 naming the field."""

from __future__ import annotations

import json

import pytest
from server_fixture import MODEL, RadixServer

QUESTION = "Name three colors."
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def test_text_equals_the_chat_route(server: RadixServer) -> None:
    client = server.openai_client()
    chat = client.chat.completions.create(model=MODEL, messages=[
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}],
        max_tokens=12, temperature=0)
    resp = client.responses.create(model=MODEL, instructions="Answer briefly.", input=QUESTION,
                                   max_output_tokens=12, temperature=0)
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.model == MODEL
    assert resp.output_text == chat.choices[0].message.content
    [item] = resp.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    assert resp.usage.output_tokens == chat.usage.completion_tokens
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    if chat.choices[0].finish_reason == "length":
        assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    else:
        assert resp.status == "completed" and resp.incomplete_details is None
    # Message items with text parts are the same conversation as the string.
    items = client.responses.create(model=MODEL, instructions="Answer briefly.", input=[
        {"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}], max_output_tokens=12, temperature=0)
    assert items.output_text == resp.output_text


def test_stream_rebuilds_the_same_response(server: RadixServer) -> None:
    client = server.openai_client()
    whole = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=16, temperature=0)
    with client.responses.stream(model=MODEL, input=QUESTION, max_output_tokens=16, temperature=0) as stream:
        events = list(stream)
    final = events[-1].response  # the helper's get_final_response() takes response.completed only, as OpenAI's
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == ("response.completed" if whole.status == "completed" else "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens and final.status == whole.status


def test_function_tools_round_trip(server: RadixServer) -> None:
    client = server.openai_client()
    question = "What is the weather in Paris?"
    resp = client.responses.create(model=MODEL, input=question, tools=[WEATHER], tool_choice="required",
                                   max_output_tokens=60, temperature=0)
    calls = [o for o in resp.output if o.type == "function_call"]
    assert calls and all(c.name == "get_weather" and c.call_id.startswith("call_") for c in calls)
    assert isinstance(json.loads(calls[0].arguments)["city"], str)
    with client.responses.stream(model=MODEL, input=question, tools=[WEATHER], tool_choice="required",
                                 max_output_tokens=60, temperature=0) as stream:
        done = [e.arguments for e in stream if e.type == "response.function_call_arguments.done"]
        final = stream.get_final_response()
    assert done == [c.arguments for c in calls] == [o.arguments for o in final.output if o.type == "function_call"]
    # The call and its output go back as input items; the answer is text again.
    followup = [{"role": "user", "content": question},
                {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
                 "arguments": calls[0].arguments},
                {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temperature_c": 21}'}]
    answer = client.responses.create(model=MODEL, input=followup, tools=[WEATHER], tool_choice="none",
                                     max_output_tokens=20, temperature=0)
    assert answer.output_text and all(o.type == "message" for o in answer.output)
    chat = client.chat.completions.create(model=MODEL, messages=[
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [{"id": calls[0].call_id, "type": "function", "function": {
            "name": "get_weather", "arguments": calls[0].arguments}}]},
        {"role": "tool", "tool_call_id": calls[0].call_id, "content": '{"temperature_c": 21}'}],
        tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}],
        tool_choice="none", max_tokens=20, temperature=0)
    assert answer.output_text == chat.choices[0].message.content
    assert answer.usage.input_tokens == chat.usage.prompt_tokens


def test_abort_by_response_id(server: RadixServer) -> None:
    """The response id is the request's rid: /abort_request ends the stream as incomplete, reason "abort"."""
    client = server.openai_client()
    with client.responses.stream(model=MODEL, input="Write a long story about a dragon.", max_output_tokens=2000,
                                 temperature=0) as stream:
        events = []
        for event in stream:
            if not events:
                assert server.post("/abort_request", {"rid": event.response.id}).json() == {"aborted": 1}
            events.append(event)
    final = events[-1].response
    assert events[-1].type == "response.incomplete" and final.status == "incomplete"
    assert final.incomplete_details.reason == "abort" and final.usage.output_tokens < 2000


@pytest.mark.parametrize(("extra", "param"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"input": []}, "input"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"instructons": "typo"}, None),
    ({"model": "gpt-5"}, "model"),
])
def test_what_is_not_supported_is_a_4xx(server: RadixServer, extra: dict, param: str | None) -> None:
    resp = server.post("/v1/responses", {"model": MODEL, "input": "hi", **extra})
    assert resp.status_code in (400, 404), resp.text
    error = resp.json()["error"]
    assert error["message"] and (param is None or error["param"] == param), error
    info = server.get("/get_server_info").json()["scheduler"]
    assert info["num_running_reqs"] == 0 and info["invariants"] == "ok"
