"""/metrics: every counter checked exactly against what a known mix of requests was told, on a real server with
two tokenizer processes (their counts add up) behind an API key; the counts behind it in the scheduler and the
histogram buckets against prometheus_client's own."""

from __future__ import annotations

import http.client
import json
import logging
import time
import zlib

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_fixture import MODEL, RadixServer, http_request

from radixserve import wire
from radixserve.config import ServerArgs
from radixserve.model_files import resolve_model
from radixserve.stats import Histogram
from scheduler_proc.scheduler import Scheduler
from tokenizer_proc.frontend import TokenizerCore

KEY = "metrics-test-key"
LABELS = {"model_name": MODEL}
GREEDY = {"temperature": 0, "ignore_eos": True}
SGLANG_GAUGES = {"sglang:token_usage", "sglang:num_running_reqs", "sglang:num_queue_reqs"}  # what smg reads


pytestmark = pytest.mark.server_flags("--tokenizer-worker-num", "2", api_key=KEY)


def scrape(server: RadixServer) -> dict[str, float]:
    """Every sample, by name (+ `le` for a bucket), checked to carry the model_name label."""
    resp = server.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(resp.text):
        assert family.name.startswith("radixserve:") or family.name in SGLANG_GAUGES, family.name
        for s in family.samples:
            assert {k: v for k, v in s.labels.items() if k != "le"} == LABELS
            samples[s.name + (f"{{le={s.labels['le']}}}" if "le" in s.labels else "")] = s.value
    return samples


def rid_for(tokenizer: int, name: str) -> str:
    """A request id that the gateway routes to tokenizer `tokenizer` of two (crc32(rid) % 2)."""
    return next(rid for i in range(100) if zlib.crc32((rid := f"{name}-{i}").encode()) % 2 == tokenizer)


def stream(server: RadixServer, path: str, body: dict, on_first=None) -> list[dict]:
    """A streamed request's events (up to [DONE]); `on_first()` runs once the first event is in."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **server.headers})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        events = []
        while (line := resp.readline()) != b"data: [DONE]\n":
            assert line, f"the stream ended without [DONE]: {events}"
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
                if len(events) == 1 and on_first is not None:
                    on_first()
        return events
    finally:
        conn.close()


def test_metrics_count_a_known_mix_exactly(server: RadixServer) -> None:
    assert server.get("/health_generate").status_code == 200  # not counted: the gateway's own probe
    before, info_before = scrape(server), server.get("/get_server_info").json()["scheduler"]
    metas: list[dict] = []  # the token counts that every request which ran was given
    client_seconds = 0.0  # each request's time as its client saw it, once per request (n=2 counts twice)

    def native(rid: str, ids: list[int], max_new: int, n: int = 1) -> list[dict]:
        nonlocal client_seconds
        started = time.perf_counter()
        resp = server.post("/generate", {"rid": rid, "input_ids": ids,
                                         "sampling_params": {"max_new_tokens": max_new, "n": n, **GREEDY}})
        client_seconds += n * (time.perf_counter() - started)
        assert resp.status_code == 200, resp.text
        out = resp.json()
        return [item["meta_info"] for item in (out if isinstance(out, list) else [out])]

    def streamed(path: str, body: dict, on_first=None) -> list[dict]:
        nonlocal client_seconds
        started = time.perf_counter()
        events = stream(server, path, body, on_first)
        client_seconds += time.perf_counter() - started
        return events

    prompt = list(range(100, 120))
    metas += native(rid_for(0, "plain"), prompt, 5)
    metas += native(rid_for(1, "cached"), prompt + [7], 5)  # all of `prompt` is in the cache now
    assert metas[-1]["cached_tokens"] == len(prompt)
    metas += native(rid_for(0, "prompt-only"), list(range(300, 310)), 0)
    pair = native(rid_for(1, "pair"), list(range(400, 410)), 4, n=2)
    assert len(pair) == 2
    metas += pair
    events = streamed("/generate", {"rid": rid_for(1, "streamed"), "input_ids": list(range(500, 516)),
                                    "sampling_params": {"max_new_tokens": 7, **GREEDY}, "stream": True})
    metas.append(events[-1]["meta_info"])
    chat = streamed("/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "Count to three."}], "max_tokens": 6,
        "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    usage = chat[-1]["usage"]
    metas.append({"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
                  "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]})
    abort_rid = rid_for(0, "aborted")
    events = streamed("/generate", {"rid": abort_rid, "input_ids": list(range(600, 610)),
                                    "sampling_params": {"max_new_tokens": 1500, **GREEDY}, "stream": True},
                      on_first=lambda: server.post("/abort_request", {"rid": abort_rid}))
    metas.append(events[-1]["meta_info"])
    assert metas[-1]["finish_reason"]["type"] == "abort" and metas[-1]["completion_tokens"] < 1500
    rejected = server.post("/generate", {"input_ids": [5] * 2100, "sampling_params": {"max_new_tokens": 1}})
    assert rejected.status_code == 400  # longer than the context: it never runs, so it is not counted

    after, info = scrape(server), server.get("/get_server_info").json()["scheduler"]
    delta = {name: after[name] - before.get(name, 0.0) for name in after}
    completions = [m["completion_tokens"] for m in metas]
    assert delta["radixserve:num_requests_total"] == len(metas) == 8
    assert delta["radixserve:num_aborted_requests_total"] == 1
    assert delta["radixserve:prompt_tokens_total"] == sum(m["prompt_tokens"] for m in metas)
    assert delta["radixserve:generation_tokens_total"] == sum(completions)
    assert delta["radixserve:cached_tokens_total"] == sum(m["cached_tokens"] for m in metas) >= len(prompt)
    # One first token per request that output any, one gap per token after it, one latency per request.
    assert delta["radixserve:time_to_first_token_seconds_count"] == sum(c > 0 for c in completions) == 7
    assert delta["radixserve:inter_token_latency_seconds_count"] == sum(c - 1 for c in completions if c > 0)
    assert delta["radixserve:e2e_request_latency_seconds_count"] == 8
    assert 0 < delta["radixserve:time_to_first_token_seconds_sum"] < delta["radixserve:e2e_request_latency_seconds_sum"]
    assert delta["radixserve:e2e_request_latency_seconds_sum"] < client_seconds  # measured inside the clients' time
    # The scheduler's own: every request that ran was admitted once; the rest are its live counters.
    assert delta["radixserve:queue_time_seconds_count"] == 8
    assert after["radixserve:num_retracted_requests_total"] == info["retracted_requests"]
    assert after["radixserve:evicted_tokens_total"] == info["evicted_tokens"] == info_before["evicted_tokens"]
    assert after["radixserve:cache_hit_rate"] == pytest.approx(info["cached_tokens"] / info["prompt_tokens"])
    # The cache's monotonic counters (per request and per token) and what each tier holds and gave.
    assert delta["radixserve:cache_queries_total"] == 8
    assert delta["radixserve:cache_hits_total"] == sum(m["cached_tokens"] > 0 for m in metas) >= 1
    assert delta["radixserve:cache_query_tokens_total"] == sum(m["prompt_tokens"] for m in metas)
    assert delta["radixserve:cache_hit_tokens_device_total"] == sum(m["cached_tokens"] for m in metas)
    assert after["radixserve:cached_tokens_device"] == info["kv_cached_tokens"] > 0
    assert metas[1]["cached_tokens_details"] == {"device": len(prompt), "host": 0}
    assert after["radixserve:max_total_num_tokens"] == info["max_total_num_tokens"] == 4096
    idle = ("num_running_reqs", "num_queue_reqs", "num_used_tokens", "token_usage", "num_open_sessions",
            "session_pinned_tokens")
    assert all(after[f"radixserve:{name}"] == 0 for name in idle)
    for name in ("time_to_first_token", "inter_token_latency", "e2e_request_latency", "queue_time"):
        buckets = [v for k, v in after.items() if k.startswith(f"radixserve:{name}_seconds_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == after[f"radixserve:{name}_seconds_count"]


def test_metrics_gauges_follow_running_requests_and_sessions(server: RadixServer) -> None:
    session = server.post("/open_session", {"capacity_of_str_len": 1000}).json()
    turn = server.post("/generate", {"input_ids": list(range(700, 730)), "session_params": {"id": session},
                                     "sampling_params": {"max_new_tokens": 3, **GREEDY}})
    assert turn.status_code == 200, turn.text
    seen = {}

    def look() -> None:
        seen.update(scrape(server))

    stream(server, "/generate", {"input_ids": list(range(800, 810)), "stream": True,
                                 "sampling_params": {"max_new_tokens": 64, **GREEDY}}, on_first=look)
    info = server.get("/get_server_info").json()["scheduler"]
    assert seen["radixserve:num_running_reqs"] == 1 and seen["radixserve:num_used_tokens"] > 10
    assert seen["radixserve:token_usage"] == pytest.approx(seen["radixserve:num_used_tokens"] / 4096)
    for name in SGLANG_GAUGES:  # SGLang's names for smg's load poll, the same values
        assert seen[name] == seen[name.replace("sglang:", "radixserve:")]
    assert seen["sglang:num_running_reqs"] == 1 and seen["sglang:num_queue_reqs"] == 0
    assert seen["radixserve:num_open_sessions"] == 1 == info["num_sessions"]
    assert seen["radixserve:session_pinned_tokens"] == info["session_pinned_tokens"] == 30 + 3 - 1
    assert server.post("/close_session", {"session_id": session}).status_code == 200
    assert scrape(server)["radixserve:num_open_sessions"] == 0


def test_load_report_answers_as_sglangs(server: RadixServer) -> None:
    """/v1/loads and /loads (smg polls them for each worker's load): SGLang's shape, live numbers while a request
    runs, the used tokens those of /get_load; ?dp_rank filters."""
    seen: dict[str, dict] = {}

    def look() -> None:
        for path in ("/v1/loads", "/loads"):
            seen[path] = server.get(path).json()
        seen["/get_load"] = server.get("/get_load").json()[0]

    stream(server, "/generate", {"input_ids": list(range(900, 940)), "stream": True,
                                 "sampling_params": {"max_new_tokens": 64, **GREEDY}}, on_first=look)
    for path in ("/v1/loads", "/loads"):
        body = seen[path]
        assert set(body) == {"timestamp", "version", "dp_rank_count", "loads", "aggregate"}
        assert body["dp_rank_count"] == 1
        (load,) = body["loads"]
        assert load["dp_rank"] == 0 and load["num_running_reqs"] == 1 and load["num_waiting_reqs"] == 0
        assert load["num_total_reqs"] == 1 and load["max_total_num_tokens"] == 4096
        assert load["max_running_requests"] == 16
        assert 40 < load["num_used_tokens"] <= seen["/get_load"]["num_tokens"]  # read after, the request still growing
        assert load["token_usage"] == pytest.approx(load["num_used_tokens"] / 4096)
        assert body["aggregate"]["total_used_tokens"] == load["num_used_tokens"]
        assert body["aggregate"]["total_reqs"] == 1
    idle = server.get("/v1/loads?dp_rank=0").json()
    assert idle["loads"][0]["num_running_reqs"] == 0 and idle["loads"][0]["num_used_tokens"] == 0
    assert server.get("/v1/loads?dp_rank=1").json()["loads"] == []
    assert server.get("/v1/loads?dp_rank=x").status_code == 400
    assert http_request(server.port, "GET", "/v1/loads").status_code == 401  # behind the API key, as every route


def test_metrics_need_the_api_key(server: RadixServer) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        resp = http_request(server.port, "GET", "/metrics", headers=headers)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"


# ------------------------------------------------------------------------------------ the counts behind it


def test_histogram_buckets_match_prometheus_clients() -> None:
    bounds = (0.0, 0.1, 0.5, 1.0, 2.5)
    ours = Histogram.empty(bounds)
    registry = prometheus_client.CollectorRegistry()
    theirs = prometheus_client.Histogram("h", "", buckets=bounds, registry=registry)
    for value in (0.0, 0.05, 0.1, 0.1000001, 0.5, 0.7, 1.0, 2.5, 2.6, 100.0):
        ours.observe(value)
        theirs.observe(value)
    ours.observe(0.3, n=3)
    for _ in range(3):
        theirs.observe(0.3)
    cumulative, total = 0, 0
    for b, n in zip([*bounds, float("inf")], ours.counts, strict=True):
        cumulative += n
        le = prometheus_client.utils.floatToGoString(b)
        assert registry.get_sample_value("h_bucket", {"le": le}) == cumulative, le
        total += n
    assert registry.get_sample_value("h_sum") == pytest.approx(ours.sum)
    merged = ours + ours
    assert merged.counts == [2 * n for n in ours.counts] and merged.sum == 2 * ours.sum


def _request(rid: str, ids: list[int], max_new: int) -> wire.GenerateTokens:
    return wire.GenerateTokens(rid=rid, input_ids=ids, sampling=wire.SamplingParams(max_new_tokens=max_new,
                                                                                     ignore_eos=True))


def _run(s: Scheduler) -> None:
    while (batch := s.schedule().batch) is not None:
        n = len(wire.from_i32(batch.req_slots))
        s.process_result(wire.StepResult(step=batch.step, next_ids=wire.i32([7] * n),
                                         next_logprobs=bytes(4 * n)))


def test_scheduler_counts_evictions_and_queue_time() -> None:
    s = Scheduler(ServerArgs(max_running_requests=4), num_kv_slots=41, context_length=64)
    inserted = 0  # KV tokens that finished requests handed to the radix cache: prompt + output - 1 each
    for i in range(6):  # distinct prompts: nothing shared, so the cache keeps each until it is evicted
        s.add_request(_request(f"r{i}", list(range(100 * i + 1, 100 * i + 11)), max_new=5))
        _run(s)
        inserted += 10 + 5 - 1
        s.check_invariants()
    assert s.counters.evicted_tokens == inserted - s.cache.total_size > 0
    assert s.info().evicted_tokens == s.counters.evicted_tokens

    s.add_request(_request("waits", [3, 4, 5], max_new=2))
    time.sleep(0.15)  # queued this long before the next schedule() admits it
    _run(s)
    queue = s.info().queue_time
    assert sum(queue.counts) == 7 and queue.counts[queue.bounds.index(0.2)] == 1  # in (0.1, 0.2]
    assert 0.15 <= queue.sum < 0.2 + 6 * 0.1


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_log_requests_says_more_at_each_level(level: int, caplog: pytest.LogCaptureFixture) -> None:
    """--log-requests: a line as a request arrives and one as it ends, in the tokenizer that owns it; the sampling
    parameters from level 1, the texts from level 2 (cut to MAX_TEXT_CHARS below level 3); health checks unlogged."""
    model_dir = resolve_model(None)
    core = TokenizerCore(ServerArgs(log_requests=True, log_requests_level=level), model_dir)
    prompt = "Tell me a story. " * 200  # longer than MAX_TEXT_CHARS
    with caplog.at_level(logging.INFO, logger="radixserve.requests"):
        sent = core.submit(wire.GenerateText(rid="r1", text=prompt, sampling=wire.SamplingParams(temperature=0.5)))
        core.submit(wire.GenerateText(rid="probe", text="hi", log_metrics=False))
        ids = core.tokenizer.encode(" Once upon a time")
        core.feed(wire.ReqOut(rid="r1", new_ids=ids, prompt_tokens=len(sent.input_ids), cached_tokens=3,
                              completion_tokens=len(ids), finish=wire.FinishReason(type="length", length=len(ids))))
    arrived, ended = [r.getMessage() for r in caplog.records]
    assert arrived.startswith(f"request r1 arrived: {len(sent.input_ids)} prompt tokens, stream False")
    assert ended.startswith("request r1 ended in ") and '"type":"length"' in ended
    assert f"{len(sent.input_ids)} prompt tokens (3 cached), {len(ids)} output tokens" in ended
    assert ('"temperature":0.5' in arrived) == (level >= 1)
    assert ("Tell me a story." in arrived and '" Once upon a time"' in ended) == (level >= 2)
    assert ("(cut)" in arrived) == (level == 2) and (json.dumps(prompt) in arrived) == (level == 3)
