"""The host tier (--enable-hierarchical-cache) on a real server with a small device pool: a prompt pushed out to
the host pool comes back with the very KV it had (the same greedy tokens as a device hit), the statistics count
each tier, and random aborts leave no device or host slot behind (the scheduler's invariant walk partitions both
pools). The real ModelRunner and Scheduler in this process (the loop of scheduler_proc/main.py, overlapped, without
its sockets) give the same greedy tokens under each write policy as without the tier, with evictions and host hits.
Scheduler-level random traffic with the tier: tests/test_overlap.py; the tree and the copies' order:
tests/test_kv_events.py."""

from __future__ import annotations

import random
import threading
import time
from collections import deque

import numpy as np
import pytest
import torch
from server_fixture import RadixServer
from transformers import AutoModelForCausalLM, LlamaConfig

from radixserve import wire
from radixserve.config import ServerArgs
from radixserve.wire import KVMove, i32
from scheduler_proc.request import Stage
from scheduler_proc.scheduler import Scheduler
from worker_proc.kv_cache import KVCache
from worker_proc.kv_host import MIN_RUN, copy_rows
from worker_proc.model_runner import ModelRunner

POOL = 256
pytestmark = pytest.mark.server_flags("--enable-hierarchical-cache", "--hicache-ratio", "4",
                                      "--hicache-write-policy", "write_through", "--max-total-tokens", str(POOL),
                                      "--context-length", "128")
GREEDY = {"temperature": 0, "ignore_eos": True}
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the side streams of worker_proc/kv_host.py)")])


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
    deadline = time.monotonic() + 120  # what clients gave up on finishes or is aborted (and a load in flight lands)
    while ((info := scheduler_info(server))["num_running_reqs"] + info["num_waiting_reqs"] or
           info["kv_free_tokens"] + info["kv_evictable_tokens"] < POOL) and time.monotonic() < deadline:
        time.sleep(1)
    # idle: the walk found every device and host slot free or in one node
    assert info["num_running_reqs"] == 0 and info["kv_free_tokens"] + info["kv_evictable_tokens"] == POOL
    assert info["aborted_requests"] > 0 and info["host_stored_tokens"] > 0


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_kv_moves_copy_every_layer_both_ways_in_order(device: str) -> None:
    """The workers' copies (worker_proc/kv_host.py): a move out and back lands each layer's K and V rows where the
    scheduler said, moves apply in order (the second reads host slots the first one wrote), a store is not disturbed
    by a forward that overwrites its device slots right after (the scheduler hands them out at once), and a load,
    in flight until a step waits for it (the compute stream does not wait before), is in place for the compute
    stream's read after that wait. On CUDA the pools are large enough for the copies to take a while, so a missing
    wait shows."""
    slots = 20 if device == "cpu" else 200_000
    cache = KVCache(3, slots, 2, 64, torch.bfloat16, device, num_host_slots=slots + 10)
    for layer in (*cache.k, *cache.v):
        layer.copy_(torch.randn(layer.shape))
    before = [layer.clone() for layer in (*cache.k, *cache.v)]
    out = np.arange(1, slots - 1, 3) if device == "cuda" else np.array([3, 5, 7])  # device slots stored
    host_dst = out[::-1] + 9  # stored to these host slots, in reverse
    back = np.array([int(host_dst[-1]), int(host_dst[0])])  # loaded back from the host: what out[-1], out[0] held
    cache.move([KVMove(to_host=True, src=i32(out), dst=i32(host_dst)),
                KVMove(to_host=False, src=i32(back), dst=i32(np.array([1, slots - 1])), load=7)])
    assert [load for load, _ in cache.host.loads_in_flight()] == [7]
    cache.move([], [7])  # the step that first reads them waits for the load
    assert not cache.host.loads_in_flight()
    loaded = [layer[[1, slots - 1]].clone() for layer in (*cache.k, *cache.v)]  # the compute stream's next read
    for layer in (*cache.k, *cache.v):  # a forward reuses the stored slots at once
        layer.index_fill_(0, torch.from_numpy(out).to(layer.device), 0.0)
    cache.host.finish_stores()
    for host, old, got in zip((*cache.host.k, *cache.host.v), before, loaded, strict=True):
        assert torch.equal(host[torch.from_numpy(host_dst.copy())], old[torch.from_numpy(out).to(old.device)].cpu())
        assert torch.equal(got, old[[int(out[-1]), int(out[0])]])


def test_copy_rows_copies_runs_and_scattered_rows_alike() -> None:
    """The CPU's copy between the pools (kv_host.copy_rows): runs of consecutive slots long enough to go as slices,
    runs one row short of that, runs consecutive on one side only, and scattered rows all land where an indexed
    assignment puts them, in every layer, and nothing else is written."""
    rng = np.random.default_rng(0)
    src = np.concatenate([np.arange(100, 100 + MIN_RUN), np.arange(300, 300 + MIN_RUN - 1),  # a run, one short of one
                          np.arange(500, 500 + 2 * MIN_RUN), rng.choice(np.arange(600, 1000), 20, replace=False),
                          np.arange(40, 40 + 3 * MIN_RUN)])
    dst = np.concatenate([np.arange(10, 10 + 2 * MIN_RUN - 1),  # consecutive across the first two source runs
                          np.arange(2 * MIN_RUN, 0, -1)[:2 * MIN_RUN] + 900,  # counts down: not a run
                          rng.choice(np.arange(1000, 1500), 20, replace=False), np.arange(1600, 1600 + 3 * MIN_RUN)])
    assert len(src) == len(dst) == len(np.unique(dst))
    layers_a = [torch.randn(1000, 2, 4) for _ in range(3)]
    layers_b = [torch.randn(1700, 2, 4) for _ in range(3)]
    want = [b.clone() for b in layers_b]
    for a, b in zip(layers_a, want, strict=True):
        b[torch.from_numpy(dst)] = a[torch.from_numpy(src)]
    copy_rows(layers_a, torch.from_numpy(src), layers_b, torch.from_numpy(dst))
    for got, expected in zip(layers_b, want, strict=True):
        assert torch.equal(got, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (a load stream)")
def test_a_load_runs_beside_the_compute_stream() -> None:
    """A large load (about 300 MB from pinned memory: milliseconds) is still in flight once the compute stream has
    drained, so that stream did not wait for it; after `wait` (the step that first reads the slots) the compute
    stream reads the loaded rows."""
    slots = 200_000
    cache = KVCache(3, slots, 2, 64, torch.bfloat16, "cuda", num_host_slots=slots)
    for layer in (*cache.host.k, *cache.host.v):
        layer.copy_(torch.randn(layer.shape))
    src = np.arange(1, slots)
    dst = src[::-1].copy()
    cache.move([KVMove(to_host=False, src=i32(src), dst=i32(dst), load=3)])
    torch.cuda.current_stream().synchronize()
    ((load, done),) = cache.host.loads_in_flight()
    assert load == 3 and not done.query(), "the compute stream waited for the load"
    cache.move([], [3])
    d_dst = torch.from_numpy(dst).cuda()
    for layer, host in zip((*cache.k, *cache.v), (*cache.host.k, *cache.host.v), strict=True):
        assert torch.equal(layer[d_dst].cpu(), host[torch.from_numpy(src)])


@pytest.fixture(scope="module", params=["cpu", CUDA])
def tiny_runner(request: pytest.FixtureRequest, tmp_path_factory) -> ModelRunner:
    """A random 2-layer Llama's ModelRunner with a 192-token device pool and a host pool 4 times that; on CUDA in
    float32 with the torch attention backend, so that batching changes no greedy token."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    args = ServerArgs(model_path=str(path), dtype="float32", max_total_tokens=192, max_running_requests=4,
                      grammar_backend="none", skip_tokenizer_init=True, enable_hierarchical_cache=True,
                      hicache_ratio=4, device=request.param, attention_backend="torch", disable_cuda_graph=True)
    return ModelRunner(args, 0, str(path))


class Loop:
    """The loop of scheduler_proc/main.py over the runner, overlapped, without its sockets: the batches sent, the
    output ids by rid, and which requests each step gave a token."""

    def __init__(self, s: Scheduler, runner: ModelRunner) -> None:
        self.s, self.runner = s, runner
        self.pending: deque = deque()
        self.batches: list[wire.StepBatch] = []
        self.outputs: dict[str, list[int]] = {}
        self.emitted: dict[int, set[str]] = {}  # step -> rids

    def submit(self, rid: str, ids: list[int], max_new: int) -> None:
        self.s.add_request(wire.GenerateTokens(rid=rid, input_ids=ids, sampling=wire.SamplingParams(
            max_new_tokens=max_new, temperature=0.0, ignore_eos=True)))

    def step(self) -> wire.StepBatch | None:
        batch = self.s.schedule().batch
        if batch is not None:
            self.batches.append(batch)
            self.pending.append(self.runner.launch(batch))
        if len(self.pending) > (1 if batch is not None else 0):
            result = self.pending.popleft().result()
            for _, out in self.s.process_result(result).outs:
                self.outputs[out.rid] = self.outputs.get(out.rid, []) + list(out.new_ids)
                if len(out.new_ids):
                    self.emitted.setdefault(result.step, set()).add(out.rid)
        return batch

    def run(self) -> None:
        """Until the scheduler is idle."""
        while self.step() is not None or self.pending or self.s.has_work:
            pass


def conversations(runner: ModelRunner, policy: str | None) -> tuple[dict[str, list[int]], Scheduler]:
    """Two turns of 6 conversations (a shared 16-token system prompt, ~40 tokens each turn; the first turn of
    half of them asked twice, so write_through_selective copies it) through the runner, overlapped as
    scheduler_proc/main.py runs it, with the host tier under `policy` (None: without it); the output ids by rid.
    The second turns' prefixes were pushed out of the 192-token device pool by the others."""
    args = ServerArgs(dtype="float32", max_running_requests=4, chunked_prefill_size=64,
                      enable_hierarchical_cache=policy is not None, hicache_write_policy=policy or "write_back")
    s = Scheduler(args, runner.num_kv_slots, runner.context_length, 128,
                  num_host_kv_slots=runner.kv_cache.num_host_slots if policy else 0)
    rng = random.Random(5)
    system = [rng.randrange(3, 128) for _ in range(16)]
    turns = {f"c{i}": system + [rng.randrange(3, 128) for _ in range(rng.randrange(16, 30))] for i in range(6)}
    loop = Loop(s, runner)
    for turn in (1, 2):
        for i, (rid, ids) in enumerate(turns.items()):
            for again in ("", "+")[:1 + (turn == 1 and i % 2)]:
                loop.submit(f"{rid}.{turn}{again}", ids, 8)
        loop.run()
        turns = {rid: ids + loop.outputs[f"{rid}.1"] + [rng.randrange(3, 128) for _ in range(6)]
                 for rid, ids in turns.items()}
    s.check_invariants()
    return loop.outputs, s


def test_each_write_policy_gives_the_tokens_of_no_tier(tiny_runner: ModelRunner) -> None:
    """The KV copied to the host (as it is cached, once reused, or as it is evicted) and back is the KV computed:
    the same greedy tokens as without the tier, which recomputes. Every slot of both pools is free after a flush."""
    reference, plain = conversations(tiny_runner, None)
    assert plain.counters.evicted_tokens > 0 and plain.counters.cached_tokens > 0
    for policy in ("write_back", "write_through", "write_through_selective"):
        outputs, s = conversations(tiny_runner, policy)
        assert outputs == reference, policy
        host = s.cache.host
        assert host.loaded_tokens > 0 and s.counters.cached_tokens_host > 0, policy  # host hits
        assert s.counters.cached_tokens > plain.counters.cached_tokens, policy
        assert s.flush_cache() and s.allocator.num_free == s.allocator.capacity
        assert host.allocator.num_free == host.allocator.capacity and host.size == 0


def host_hit_beside_a_decode(runner: ModelRunner) -> tuple[Loop, list[int], wire.StepBatch]:
    """A 48-token prompt computed ("first"), pushed to the host tier by 3 others, then asked again ("again") while
    "long" decodes: the loop after the step that carries its load (returned)."""
    args = ServerArgs(dtype="float32", max_running_requests=4, chunked_prefill_size=64, enable_hierarchical_cache=True)
    s = Scheduler(args, runner.num_kv_slots, runner.context_length, 128,
                  num_host_kv_slots=runner.kv_cache.num_host_slots)
    loop, rng = Loop(s, runner), random.Random(7)
    prompt = [rng.randrange(3, 128) for _ in range(48)]
    loop.submit("first", prompt, 6)
    loop.run()
    for i in range(3):  # 3 x 62 tokens beside its 53 in a 192-token pool: its KV goes to the host
        loop.submit(f"fill{i}", [rng.randrange(3, 128) for _ in range(60)], 2)
    loop.run()
    loop.submit("long", [rng.randrange(3, 128) for _ in range(20)], 40)
    while len(loop.outputs.get("long", [])) < 2:
        loop.step()
    loop.submit("again", prompt, 6)
    for _ in range(10):
        batch = loop.step()
        if any(not m.to_host for m in batch.kv_moves):
            return loop, prompt, batch
    raise AssertionError("no load of the prompt's KV")


def test_a_load_rides_beside_the_running_batch(tiny_runner: ModelRunner) -> None:
    """A request whose prefix is in the host tier waits for its own pages only: the step that carries its load runs
    the decoding request, which gets a token from it, without the loading one; the steps until the load is done run
    without waiting for it; the step that admits it is the one step whose forward waits for the load. Its tokens are
    those computed from scratch."""
    loop, prompt, carrier = host_hit_beside_a_decode(tiny_runner)
    s, (load,) = loop.s, [m for m in carrier.kv_moves if not m.to_host]
    again = s.lifecycle.reqs["again"]
    assert again.stage == Stage.WAITING and again.req_slot < 0  # not in the step that carries its load
    assert s.lifecycle.reqs["long"].req_slot in i32_list(carrier.req_slots)
    loop.run()
    assert "long" in loop.emitted[carrier.step]  # the running request's token came from that step
    waiting = [b for b in loop.batches if load.load in i32_list(b.load_waits)]
    admitting = [b for b in loop.batches if any(set(i32_list(nr.prefix_slots)) >= set(i32_list(load.dst))
                                                for nr in b.new_reqs)]
    assert len(waiting) == 1 and admitting[0] is waiting[0] and waiting[0].step > carrier.step
    assert loop.outputs["again"] == loop.outputs["first"]
    assert s.counters.cached_tokens_host == len(prompt) - 1  # its whole match came back from the host tier
    s.check_invariants()


def test_an_abort_while_loading_leaks_nothing(tiny_runner: ModelRunner) -> None:
    """The request is aborted while its load is in flight: its pages stay cached, locked by the load until it is
    done, and then both pools are whole again (the invariant walk, a flush)."""
    loop, _, _ = host_hit_beside_a_decode(tiny_runner)
    loop.s.abort("again")
    loop.run()
    s = loop.s
    assert "again" not in loop.outputs and not s.cache.loads_in_flight
    s.check_invariants()
    assert s.flush_cache() and s.allocator.num_free == s.allocator.capacity
    assert s.cache.host.allocator.num_free == s.cache.host.allocator.capacity


def i32_list(buf: bytes) -> list[int]:
    return wire.from_i32(buf).tolist()


class CopyInFlight:
    """A store's copy that is done only once waited for (a CUDA event's query / synchronize)."""

    def __init__(self, waited: list[int], n: int) -> None:
        self.waited, self.n, self.finished = waited, n, False

    def query(self) -> bool:
        return self.finished

    def synchronize(self) -> None:
        self.finished = True
        self.waited.append(self.n)


def test_a_load_waits_only_for_the_stores_it_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The order of worker_proc/kv_host.py's stores with copies still in flight, on the CPU: a load lands the stores
    up to the last one that wrote a host slot it reads (the older ones too, so the last store to a slot wins) and
    leaves later ones in flight; what it loads is what was stored last."""
    cache = KVCache(2, 10, 1, 4, torch.float32, "cpu", num_host_slots=10)
    waited: list[int] = []
    stores = iter(range(100))

    def store_in_flight(pools: tuple[torch.Tensor, ...], src: torch.Tensor, dst: torch.Tensor, plan: None) -> None:
        """CUDA's store (HostPool._store): the rows gathered now, landing once their copy is done."""
        rows = torch.stack([layer.index_select(0, src) for layer in pools])
        cache.host._stores.append((CopyInFlight(waited, next(stores)), rows, dst, dst))  # all rows staged

    monkeypatch.setattr(cache.host, "_store", store_in_flight)
    for layer in (*cache.k, *cache.v):
        layer.copy_(torch.arange(10, dtype=torch.float32)[:, None, None].expand(layer.shape))
    moves = [KVMove(to_host=True, src=i32(np.array([1, 2])), dst=i32(np.array([5, 6]))),  # store 0
             KVMove(to_host=True, src=i32(np.array([3])), dst=i32(np.array([5]))),  # store 1: slot 5 again
             KVMove(to_host=True, src=i32(np.array([4])), dst=i32(np.array([7]))),  # store 2: not read below
             KVMove(to_host=False, src=i32(np.array([5, 6])), dst=i32(np.array([8, 9])), load=1)]
    cache.move(moves)
    assert cache.host.loads_in_flight() == [(1, None)]  # on the CPU a load is done as it returns
    assert waited == [0, 1]  # store 2 is still in flight
    assert [int(x) for x in cache.k[0][[8, 9], 0, 0]] == [3, 2]  # slot 5 holds store 1's row
    cache.host.finish_stores()
    assert waited == [0, 1, 2] and int(cache.host.v[1][7, 0, 0]) == 4
