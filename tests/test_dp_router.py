"""`radixserve serve --dp-size 2`: two replicas behind SGLang's router (sglang-router), as real processes.

Through the router: /generate and /v1/chat/completions answer, cache-aware routing keeps a shared prefix's cache
hits, both replicas serve; the router is supervised like any other child (it dies: the server exits 1)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from server_fixture import MODEL, RadixServer, alive, http_request, process_title

pytest.importorskip("sglang_router")

PREFIXES = [("You are a meticulous assistant for a shipping company. " * 12).strip(),
            ("Summarise the following maintenance log of a wind farm in two lines. " * 10).strip()]
DEATH_S = 10.0


@pytest.fixture(scope="module")
def server():
    srv = RadixServer("--dp-size", "2", "--router-policy", "cache_aware")
    yield srv
    srv.kill()


def replica_ports(server: RadixServer) -> list[int]:
    workers = server.get("/workers").json()["workers"]
    return sorted(int(w["url"].rsplit(":", 1)[1]) for w in workers)


def test_generate_and_chat_through_the_router(server):
    assert len(replica_ports(server)) == 2
    assert [m["id"] for m in server.get("/v1/models").json()["data"]] == [MODEL]  # named from /get_server_info
    params = {"max_new_tokens": 8, "temperature": 0}
    first = server.post("/generate", {"text": "The capital of France is", "sampling_params": params})
    assert first.status_code == 200, first.text
    body = first.json()
    assert len(body["output_ids"]) == 8 and body["text"]
    again = server.post("/generate", {"text": "The capital of France is", "sampling_params": params}).json()
    assert again["output_ids"] == body["output_ids"]
    chat = server.post("/v1/chat/completions", {"model": MODEL, "max_tokens": 8, "temperature": 0,
                                                "messages": [{"role": "user", "content": "Name a colour."}]})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] and chat.json()["model"] == MODEL
    stream = server.post("/v1/chat/completions", {"model": MODEL, "max_tokens": 4, "stream": True,
                                                  "messages": [{"role": "user", "content": "Hi"}]})
    assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]")
    resp = server.post("/v1/responses", {"model": MODEL, "input": "Name a colour.", "max_output_tokens": 8,
                                         "temperature": 0})  # the router forwards OpenAI's Responses API too
    assert resp.status_code == 200, resp.text
    assert resp.json()["output"][0]["content"][0]["text"] == chat.json()["choices"][0]["message"]["content"]


def test_shared_prefixes_keep_their_cache_hits(server):
    """Repeats of a long prefix reach the replica that holds it (cache_aware): every repeat is served mostly
    from the radix cache."""
    for prefix in PREFIXES:
        cached = []
        for i in range(3):
            resp = server.post("/v1/completions", {"model": MODEL, "prompt": f"{prefix} Question {i}:",
                                                   "max_tokens": 2, "temperature": 0})
            assert resp.status_code == 200, resp.text
            usage = resp.json()["usage"]
            cached.append((usage["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens"]))
        assert all(hit > 0.8 * total for hit, total in cached[1:]), cached


def test_router_reads_the_replicas_load(server):
    """The router polls each replica's /get_load (SGLang's shape); a failed poll would read -1."""
    for port in replica_ports(server):
        (load,) = json.loads(http_request(port, "GET", "/get_load").content)
        assert load["dp_rank"] == 0 and load["num_reqs"] >= load["num_waiting_reqs"] >= 0 and load["num_tokens"] >= 0
    loads = server.get("/get_loads").json()["workers"]
    assert len(loads) == 2 and all(w["load"] >= 0 for w in loads), loads


def test_router_death_stops_the_server(server):
    router = [p for p in server.child_pids if alive(p) and b"sglang::router" in process_title(p)]
    assert len(router) == 1, [process_title(p) for p in server.child_pids]
    started = time.monotonic()
    os.kill(router[0], signal.SIGKILL)
    code = server.wait_exit(DEATH_S)
    assert code == 1, f"exit {code} after {time.monotonic() - started:.1f} s\n{server.log()}"
    assert "router" in server.log()
    assert server.leftovers(3.0) == []


@pytest.mark.parametrize("package", ["sglang-router", pytest.param("smg", marks=pytest.mark.long)])
def test_round_robin_uses_both_replicas_and_sigterm_stops_all(package):
    """With either router (`--router-package`: smg is SGLang's model gateway, sglang-router's successor): both
    replicas serve, the router's /get_loads lists each one's load (smg reads their /v1/loads), SIGTERM stops all."""
    pytest.importorskip(package.replace("-", "_"))
    srv = RadixServer("--dp-size", "2", "--router-package", package, "--router-policy", "round_robin",
                      "--shutdown-timeout", "1")
    try:
        for _ in range(2):
            assert srv.post("/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 2}}).status_code == 200
        served = [json.loads(http_request(p, "GET", "/get_server_info").content)["scheduler"]["finished_requests"]
                  for p in replica_ports(srv)]
        assert all(n >= 1 for n in served), served
        deadline = time.monotonic() + 30  # smg polls each worker's load every 10 s
        while True:
            loads = srv.get("/get_loads").json()  # smg: SGLang's load report per worker; sglang-router: a number each
            workers = {w["worker"] for w in loads.get("loads", []) + loads.get("workers", [])}
            if len(workers) == 2 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert len(workers) == 2, loads
        code, left = srv.stop()
        assert (code, left) == (0, []), srv.log()
    finally:
        srv.kill()


def test_bench_router_policies_need_launched_replicas():
    from radixserve.launch.cli import main

    with pytest.raises(SystemExit, match="--router-policies needs"):
        main(["bench", "serve", "--router-policies", "cache_aware", "round_robin", "--dp-size", "2"])

