"""The host tier (--enable-hierarchical-cache) on a real server with a small device pool: a prompt pushed out to
the host pool comes back with the very KV it had (the same greedy tokens as a device hit), the statistics count
each tier, and random aborts leave no device or host slot behind (the scheduler's invariant walk partitions both
pools). Scheduler-level random traffic with the tier: tests/test_overlap.py; the tree and the copies' order:
tests/test_kv_events.py."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
import torch
from server_fixture import RadixServer

from radixserve.wire import KVMove, i32
from worker_proc.kv_cache import KVCache

POOL = 256
pytestmark = pytest.mark.server_flags("--enable-hierarchical-cache", "--hicache-ratio", "4",
                                      "--max-total-tokens", str(POOL), "--context-length", "128")
GREEDY = {"temperature": 0, "ignore_eos": True}


def generate(server: RadixServer, ids: list[int], max_new: int = 8, rid: str | None = None) -> dict:
    resp = server.post("/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": max_new, **GREEDY},
                                     **({"rid": rid} if rid else {})})
    assert resp.status_code == 200, resp.text
    return resp.json()


def scheduler_info(server: RadixServer) -> dict:
    info = server.get("/get_server_info").json()["scheduler"]
    assert info["invariants"] == "ok", info["invariants"]
    return info


def test_a_prompt_back_from_the_host_tier_has_its_kv(server: RadixServer) -> None:
    prompt = list(range(2000, 2100))
    generate(server, prompt)
    device_hit = generate(server, prompt)
    assert device_hit["meta_info"]["cached_tokens_details"] == {"device": 99, "host": 0}
    for k in range(4):  # 4 × 100 tokens through a 256-token pool: the prompt's KV leaves the device
        generate(server, [3000 + 100 * k + i for i in range(100)])
    info = scheduler_info(server)
    assert info["max_host_tokens"] == 4 * POOL and info["kv_host_cached_tokens"] >= 99
    assert info["host_stored_tokens"] > 0
    host_hit = generate(server, prompt)
    assert host_hit["meta_info"]["cached_tokens_details"]["host"] > 0
    assert host_hit["meta_info"]["cached_tokens"] == 99
    assert host_hit["output_ids"] == device_hit["output_ids"]  # the same KV, copied out and back
    after = scheduler_info(server)
    assert after["host_loaded_tokens"] >= host_hit["meta_info"]["cached_tokens_details"]["host"]
    assert after["cached_tokens_host"] == after["host_loaded_tokens"] - info["host_loaded_tokens"] + \
        info["cached_tokens_host"]
    metrics = server.get("/metrics").text
    assert "radixserve:cache_hit_tokens_host_total" in metrics and "radixserve:cached_tokens_host" in metrics


@pytest.mark.parametrize("num_requests", [40, pytest.param(1000, marks=[pytest.mark.long, pytest.mark.timeout(3600)])])
def test_random_aborts_leak_no_device_or_host_slot(server: RadixServer, num_requests: int) -> None:
    """About 60% of the requests are aborted at a random moment (queued, prefilling, decoding): once idle, every
    device slot is free or cached and the invariant walk finds both pools partitioned (0 leaked pages)."""
    rng = random.Random(num_requests)
    shared = [rng.randrange(1000, 1100) for _ in range(60)]
    failures: list[str] = []

    def one(i: int) -> None:
        ids = shared[:rng.randrange(0, 60)] + [rng.randrange(1000, 1100) for _ in range(rng.randrange(1, 40))]
        rid = f"abort-{num_requests}-{i}"
        if rng.random() < 0.6:
            timer = threading.Timer(rng.random() * 0.3, lambda: server.post("/abort_request", {"rid": rid}))
            timer.start()
        try:
            resp = server.post("/generate", {"rid": rid, "input_ids": ids,
                                             "sampling_params": {"max_new_tokens": rng.randrange(1, 16), **GREEDY}})
        except TimeoutError:  # a loaded machine: the client gives up (and the server aborts it as a disconnect)
            return
        if resp.status_code != 200:
            failures.append(resp.text)

    for start in range(0, num_requests, 40):  # 40 clients at a time
        threads = [threading.Thread(target=one, args=(i,)) for i in range(start, min(start + 40, num_requests))]
        for t in threads:
            t.start()
            time.sleep(0.01)
        for t in threads:
            t.join()
    assert not failures, failures
    deadline = time.monotonic() + 120  # what clients gave up on finishes or is aborted
    while (info := scheduler_info(server))["num_running_reqs"] + info["num_waiting_reqs"] and \
            time.monotonic() < deadline:
        time.sleep(1)
    # idle: the walk found every device and host slot free or in one node
    assert info["num_running_reqs"] == 0 and info["kv_free_tokens"] + info["kv_evictable_tokens"] == POOL
    assert info["aborted_requests"] > 0 and info["host_stored_tokens"] > 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_kv_moves_copy_every_layer_both_ways_in_order(device: str) -> None:
    """The workers' copies (worker_proc/kv_cache.py): a move out and back lands each layer's K and V rows where the
    scheduler said, and moves apply in order (the second reads slots the first one wrote)."""
    cache = KVCache(3, 20, 2, 8, torch.bfloat16, device, num_host_slots=30)
    for layer in (*cache.k, *cache.v):
        layer.copy_(torch.randn(layer.shape))
    before = [layer.clone() for layer in (*cache.k, *cache.v)]
    cache.move([KVMove(to_host=True, src=i32(np.array([3, 5, 7])), dst=i32(np.array([10, 2, 29]))),
                KVMove(to_host=False, src=i32(np.array([29, 10])), dst=i32(np.array([1, 11])))])
    for layer, host, old in zip((*cache.k, *cache.v), (*cache.host_k, *cache.host_v), before, strict=True):
        assert torch.equal(host[[10, 2, 29]], old[[3, 5, 7]].cpu())
        assert torch.equal(layer[[1, 11]], old[[7, 3]]) and torch.equal(layer[[3, 5, 7]], old[[3, 5, 7]])
