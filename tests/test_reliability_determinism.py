"""Determinism under pressure: greedy output ids are the same one request at a time, all at once, from the radix
cache, with the radix cache off, and with a KV pool so small that requests are retracted and the cache evicted."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from reliability_util import leak_problems, report, size, wait_idle
from server_fixture import RadixServer, http_request

SHARED = "You are a careful assistant. Answer in one short paragraph, plainly and without lists. " * 3
PROMPTS = [SHARED + f"Question {i}: what is {i} times {i + 3}?" for i in range(size(ci=4, long=24))] + [
    f"Once upon a time, in the city number {i}," for i in range(size(ci=4, long=24))]
NEW_TOKENS = size(ci=16, long=48)


def _generate(server: RadixServer, prompt: str) -> tuple[list[int], int]:
    body = {"text": prompt, "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}}
    # All at once, the last of 48 requests waits for the others: minutes on 2 shared cores.
    resp = http_request(server.port, "POST", "/generate", json.dumps(body).encode(), timeout=900)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    return out["output_ids"], out["meta_info"]["cached_tokens"]


def _all_at_once(server: RadixServer) -> list[tuple[list[int], int]]:
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(lambda p: _generate(server, p), PROMPTS))


def _outputs(server: RadixServer, one_at_a_time: bool = False) -> dict:
    """Outputs of `server`: (one at a time,) all at once, and all at once again (from the cache)."""
    runs = {"one at a time": [_generate(server, p) for p in PROMPTS]} if one_at_a_time else {}
    runs["all at once"] = _all_at_once(server)
    runs["again"] = _all_at_once(server)
    info = wait_idle(server)
    assert not leak_problems(info), info
    return {"ids": {name: [ids for ids, _ in outs] for name, outs in runs.items()},
            "cached": sum(c for _, c in runs["again"]), "stats": info["scheduler"]}


def _run(*flags: str) -> dict:
    """The outputs of a server of its own, started with `flags`."""
    server = RadixServer(*flags)
    try:
        return _outputs(server)
    finally:
        code, left = server.stop()
        assert code == 0 and not left, server.log()


def _mismatches(reference: list[list[int]], other: list[list[int]]) -> int:
    return sum(a != b for a, b in zip(reference, other, strict=True))


def test_greedy_tokens_identical_under_pressure(server: RadixServer) -> None:
    default = _outputs(server, one_at_a_time=True)  # the shared server with the test defaults (tests/conftest.py)
    reference = default["ids"]["one at a time"]
    assert all(len(ids) == NEW_TOKENS for ids in reference)
    assert default["cached"] > 0, "the second round was not served from the cache"
    no_radix = _run("--disable-radix-cache")
    assert no_radix["cached"] == 0
    # A pool for ~3 requests, and admission that reserves almost nothing for their output: running requests run
    # out of KV as they decode, the newest are retracted (and re-admitted), and the cache is evicted to make room.
    tiny = _run("--max-total-tokens", "192", "--context-length", "128", "--new-token-ratio", "0.05")
    assert tiny["stats"]["retracted_requests"] > 0, tiny["stats"]
    comparisons, mismatches = 0, {}
    for name, outs in [("default", default), ("radix off", no_radix), ("tiny pool", tiny)]:
        for run, ids in outs["ids"].items():
            comparisons += len(ids)
            mismatches[f"{name}, {run}"] = _mismatches(reference, ids)
    report("determinism", comparisons=comparisons, mismatches=sum(mismatches.values()),
           retracted=tiny["stats"]["retracted_requests"], cached_tokens_second_round=default["cached"])
    assert not any(mismatches.values()), mismatches

