"""KV events (radixserve/kv_events.py, scheduler_proc/kv_blocks.py, scheduler_proc/kv_publisher.py).

The radix tree's own block set against the set a subscriber rebuilds from the events alone, after random
inserts, matches (splits), locks, evictions and flushes; the wire bytes against vLLM's Struct layout; and a real
server with the host tier (write_through: blocks in both tiers) publishing over ZeroMQ: the subscriber's set equals
the server's block count after random requests with evictions, moves between the tiers and a flush, and after a
subscriber restart the replay socket fills the gap with no sequence number missing. The server check runs on 120
requests in make test and on 10,000 (the issue's size) as a `long` check.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec
import numpy as np
import pytest
import zmq
from server_fixture import RadixServer, free_port

from radixserve.kv_events import (
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVEventsConfig,
    block_hash,
)
from radixserve.wire import from_i32
from scheduler_proc.host_tier import HostTier
from scheduler_proc.kv_blocks import BlockEvents
from scheduler_proc.kv_slots import KVSlotAllocator
from scheduler_proc.radix_cache import RadixCache

DECODER = msgspec.msgpack.Decoder(KVEventBatch)
PUB_PORT, REPLAY_PORT = free_port(), free_port()
BLOCK = 4
CONFIG = msgspec.json.encode({"publisher": "zmq", "endpoint": f"tcp://*:{PUB_PORT}", "topic": "kv",
                              "replay_endpoint": f"tcp://*:{REPLAY_PORT}", "buffer_steps": 100_000,
                              "block_size": BLOCK}).decode()
POOL = 320  # KV tokens: a few dozen requests overflow it, and the host tier's 640
pytestmark = pytest.mark.server_flags("--kv-events-config", CONFIG, "--max-total-tokens", str(POOL),
                                      "--context-length", "128", "--enable-hierarchical-cache", "--hicache-ratio", "2",
                                      "--hicache-write-policy", "write_through")


class Subscriber:
    """What a router keeps: the set of block hashes, rebuilt from the events alone."""

    def __init__(self) -> None:
        self.blocks: set[int] = set()

    def apply(self, events: list) -> None:
        for e in events:
            match e:
                case BlockStored():
                    assert len(e.token_ids) == len(e.block_hashes) * e.block_size
                    assert not self.blocks & set(e.block_hashes), "a block stored twice"
                    assert e.parent_block_hash is None or e.parent_block_hash in self.blocks, "an unknown parent"
                    self.blocks |= set(e.block_hashes)
                case BlockRemoved():
                    assert set(e.block_hashes) <= self.blocks, "a block removed that was not stored"
                    self.blocks -= set(e.block_hashes)
                case AllBlocksCleared():
                    self.blocks.clear()


def nodes(cache: RadixCache) -> list:
    out, stack = [], [cache.root]
    while stack:
        out.append(stack.pop())
        stack.extend(out[-1].children.values())
    return out


def tree_blocks(cache: RadixCache) -> set[int]:
    return {h for node in nodes(cache) for h in node.blocks}


def take_events_and_check(cache: RadixCache, sub: Subscriber, check_tree: bool) -> None:
    """Feed the step's events to the subscriber; its block set must equal the tree's, and with `check_tree`
    the tree's own invariants hold (every node's hashes recomputed from its path)."""
    sub.apply(cache.events.take()[1])
    if check_tree:
        cache.check_invariants()
    assert sub.blocks == tree_blocks(cache) and len(sub.blocks) == cache.events.num_blocks


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_subscriber_rebuilds_the_trees_block_set(block_size: int) -> None:
    rng = random.Random(block_size)
    alloc = KVSlotAllocator(400)
    cache = RadixCache(alloc, BlockEvents(block_size))
    sub = Subscriber()
    locked = []
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 40))] for _ in range(8)]
    for step in range(1500):
        tokens = rng.choice(prefixes)[:rng.randrange(1, 41)] + [rng.randrange(50) for _ in range(rng.randrange(30))]
        op = rng.random()
        if op < 0.6:
            need = len(tokens)
            if alloc.num_free < need:
                cache.evict(need - alloc.num_free)
            slots = alloc.alloc(need)
            if slots is not None:
                already = cache.insert(tokens, slots)
                alloc.free(slots[:already])
        elif op < 0.8:
            node = cache.match_prefix(tokens).node  # splits where the match ends
            if rng.random() < 0.5:
                cache.lock(node)
                locked.append(node)
        elif op < 0.95 and locked:
            cache.unlock(locked.pop(rng.randrange(len(locked))))
        elif op < 0.97 and not locked:
            cache.reset()
        else:
            cache.evict(rng.randrange(1, 60))
        take_events_and_check(cache, sub, check_tree=step % 50 == 0)


@pytest.mark.parametrize("policy", ["write_back", "write_through", "write_through_selective"])
def test_host_tier_keeps_kv_and_events_exact(policy: str) -> None:
    """The device pool (80 slots) spills into a host pool (150): random inserts, matches (hits), locks, evictions,
    aborts (a match unlocked with nothing inserted) and flushes, with the workers' copies simulated in order on KV
    contents that name each token's position, so a match that reaches the host tier must read back exactly what was
    computed, under each write policy (a node in both tiers reports its blocks once, as GPU). The subscriber's set
    and both slot partitions stay exact throughout, and host hits happen."""
    rng = random.Random(1)
    alloc, host = KVSlotAllocator(81), HostTier(151, policy)
    cache = RadixCache(alloc, BlockEvents(4), host)
    device_kv, host_kv = np.zeros(81, dtype=np.int64), np.zeros(151, dtype=np.int64)
    sub, locked, in_both = Subscriber(), [], 0  # in_both: steps after which a node is in both tiers

    def content(tokens: list[int]) -> np.ndarray:  # each position's KV: a function of the prefix up to it
        return np.cumsum(np.asarray(tokens, dtype=np.int64) * 7919 + 1) % 1_000_003

    def run_moves() -> None:  # the workers' copies, in order; each load done with them
        for move in host.take_moves():
            src, dst = from_i32(move.src), from_i32(move.dst)
            if move.to_host:
                host_kv[dst] = device_kv[src]
            else:
                device_kv[dst] = host_kv[src]
                cache.finish_loads([move.load])

    prefixes = [[rng.randrange(30) for _ in range(rng.randrange(5, 30))] for _ in range(10)]
    for step in range(2000):
        tokens = rng.choice(prefixes)[:rng.randrange(1, 31)] + [rng.randrange(30) for _ in range(rng.randrange(8))]
        op = rng.random()
        if op < 0.45:
            match = cache.match_prefix(tokens)
            run_moves()
            assert (device_kv[match.slots] == content(tokens)[:len(match.slots)]).all(), "a cached KV is wrong"
            cache.lock(match.node)
            cache.hit(match.node)
            n = len(tokens) - len(match.slots)
            if alloc.num_free < n:
                cache.evict(n - alloc.num_free)
            slots = alloc.alloc(n)
            run_moves()
            if slots is not None:  # the "forward" computes the rest, then the request's KV goes into the tree
                device_kv[slots] = content(tokens)[len(match.slots):]
                full = np.concatenate([match.slots, slots])
                already = cache.insert(tokens, full)
                alloc.free(full[len(match.slots):already])
            cache.unlock(match.node)
        elif op < 0.55:  # KV computed without a match (a request admitted before the prefix was cached)
            if alloc.num_free < len(tokens):
                cache.evict(len(tokens) - alloc.num_free)
            slots = alloc.alloc(len(tokens))
            run_moves()
            if slots is not None:
                device_kv[slots] = content(tokens)
                alloc.free(slots[:cache.insert(tokens, slots)])
        elif op < 0.7:
            locked.append(cache.match_prefix(tokens).node)
            run_moves()
            cache.lock(locked[-1])
        elif op < 0.95 and locked:
            cache.unlock(locked.pop(rng.randrange(len(locked))))
        elif op < 0.96 and not locked:
            cache.reset()
        else:
            cache.evict(rng.randrange(1, 40))
            run_moves()
        take_events_and_check(cache, sub, check_tree=step % 20 == 0)
        in_both += any(n.value is not None and n.host_value is not None for n in nodes(cache)[1:])
    assert host.loaded_tokens > 100 and host.stored_tokens > 100
    assert host.evicted_tokens > 0 or policy == "write_through_selective"  # it copies less: the host pool holds it
    assert (in_both > 0) == (policy != "write_back")  # write-through nodes keep a host copy while on the device


def test_blocks_follow_prefixes_and_hash_as_chains() -> None:
    alloc = KVSlotAllocator(64)
    cache = RadixCache(alloc, BlockEvents(4))
    cache.insert(list(range(10)), alloc.alloc(10))
    (stored,) = cache.events.take()[1]
    h0 = block_hash(None, np.arange(4))
    assert stored == BlockStored([h0, block_hash(h0, np.arange(4, 8))], None, list(range(8)), 4, None, "GPU", None)
    cache.insert([*range(6), 99, 98, 97], np.asarray(alloc.alloc(9)))  # shares block 0 and two tokens of block 1
    (stored,) = cache.events.take()[1]
    assert stored.parent_block_hash == h0 and stored.token_ids == [4, 5, 99, 98]
    assert cache.evict(100) == 10 + 3  # every leaf goes: the blocks ending in them, then the shared one
    removed = cache.events.take()[1]
    assert sorted(h for e in removed for h in e.block_hashes) == sorted([h0, *stored.block_hashes,
                                                                         block_hash(h0, np.arange(4, 8))])
    assert cache.events.num_blocks == 0


def test_wire_layout_is_vllms() -> None:
    """vLLM's current layout: the batch an array, each event a map tagged by class name under "type", every field
    without a default present (vLLM's typed decoder requires them)."""
    batch = KVEventBatch(ts=1.5, events=[BlockStored([7], None, [1, 2], 2, None, "GPU", None),
                                         BlockRemoved([7], "GPU"), AllBlocksCleared()], data_parallel_rank=3)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(batch)) == [
        1.5, [{"type": "BlockStored", "block_hashes": [7], "parent_block_hash": None, "token_ids": [1, 2],
               "block_size": 2, "lora_id": None, "medium": "GPU", "lora_name": None},
              {"type": "BlockRemoved", "block_hashes": [7], "medium": "GPU"}, {"type": "AllBlocksCleared"}], 3]
    config = KVEventsConfig.parse('{"publisher": "zmq", "endpoint": "tcp://*:5557", "replay_endpoint": '
                                  '"tcp://*:5558", "topic": "kv", "buffer_steps": 5, "hwm": 10}')
    ranked = KVEventsConfig.parse(config.for_rank(2))
    assert ranked.rank_endpoint(ranked.endpoint) == "tcp://*:5559" and ranked.dp_rank == 2
    assert ranked.rank_endpoint(ranked.replay_endpoint) == "tcp://*:5560"
    with pytest.raises(msgspec.ValidationError):
        KVEventsConfig.parse('{"publisher": "zmq", "endpont": "tcp://*:5557"}')


# ------------------------------------------------------------------------------------ a real server


class Follower(Subscriber):
    """A subscriber over ZeroMQ that applies batches strictly in sequence order: a gap seen on the PUB socket (or
    a restart) is filled from the replay socket first. `applied` lists every sequence number applied."""

    def __init__(self, ctx: zmq.Context) -> None:
        super().__init__()
        self.ctx = ctx
        self.applied: list[int] = []
        self.connect()

    @property
    def next_seq(self) -> int:
        return self.applied[-1] + 1 if self.applied else 0

    def connect(self) -> None:
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"kv")
        self.sub.connect(f"tcp://127.0.0.1:{PUB_PORT}")

    def close(self) -> None:
        self.sub.close(linger=0)

    def _apply(self, seq: int, payload: bytes) -> None:
        if seq < self.next_seq:
            return  # replayed already
        assert seq == self.next_seq, f"batch {seq} applied after {self.next_seq - 1}"
        batch = DECODER.decode(payload)
        assert batch.data_parallel_rank == 0
        self.apply(batch.events)
        self.applied.append(seq)

    def replay(self) -> int:
        """Ask for every buffered batch from next_seq on (a DEALER: many replies to one request); returns how
        many came."""
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{REPLAY_PORT}")
        try:
            dealer.send_multipart([b"", self.next_seq.to_bytes(8, "big")])
            n = 0
            while True:
                assert dealer.poll(10_000), "the replay socket did not answer"
                empty, seq_bytes, payload = dealer.recv_multipart()
                if seq_bytes == END_SEQ:
                    return n
                self._apply(int.from_bytes(seq_bytes, "big"), payload)
                n += 1
        finally:
            dealer.close(linger=0)

    def drain(self, quiet_s: float = 0.5) -> None:
        """Apply live batches until none comes for quiet_s, filling any gap from the replay socket."""
        while self.sub.poll(int(quiet_s * 1000)):
            topic, seq_bytes, payload = self.sub.recv_multipart()
            assert topic == b"kv"
            seq = int.from_bytes(seq_bytes, "big")
            if seq > self.next_seq:
                self.replay()
            self._apply(seq, payload)


def random_traffic(server: RadixServer, rng: random.Random, n: int) -> None:
    prefixes = [[rng.randrange(1000, 1100) for _ in range(rng.randrange(8, 60))] for _ in range(10)]
    bodies = [{"input_ids": rng.choice(prefixes)[:rng.randrange(1, 60)]
               + [rng.randrange(1000, 1100) for _ in range(rng.randrange(1, 16))],
               "sampling_params": {"max_new_tokens": rng.randrange(1, 3), "temperature": 0}} for _ in range(n)]
    with ThreadPoolExecutor(8) as pool:
        for resp in pool.map(lambda body: server.post("/generate", body), bodies):
            assert resp.status_code == 200, resp.text


def server_blocks(server: RadixServer) -> int:
    info = server.get("/get_server_info").json()["scheduler"]
    assert info["invariants"] == "ok", info["invariants"]  # the tree's hashes recomputed from its paths too
    return info["kv_event_blocks"]


def caught_up(follower: Follower, server: RadixServer) -> int:
    """The follower's set once it has every batch of an idle server; returns the server's block count."""
    deadline = time.monotonic() + 30
    while True:
        expected = server_blocks(server)
        follower.drain()
        if len(follower.blocks) == expected or time.monotonic() > deadline:
            assert len(follower.blocks) == expected, f"subscriber {len(follower.blocks)} != server {expected}"
            return expected
        follower.replay()


@pytest.mark.parametrize("num_requests", [120, pytest.param(10_000, marks=pytest.mark.long)])
def test_a_subscriber_rebuilds_the_servers_blocks_and_replay_fills_a_restart(server: RadixServer,
                                                                             num_requests: int) -> None:
    rng = random.Random(num_requests)
    ctx = zmq.Context()
    follower = Follower(ctx)
    try:
        time.sleep(0.5)  # the subscription reaches the server; what was sent before comes by replay
        follower.replay()
        random_traffic(server, rng, num_requests // 2)
        blocks = caught_up(follower, server)
        info = server.get("/get_server_info").json()["scheduler"]
        assert blocks > 10 and info["evicted_tokens"] > 0, (blocks, info)  # the pool (POOL tokens) overflowed
        assert info["host_stored_tokens"] > 0 and info["host_loaded_tokens"] > 0, info  # both ways between tiers

        assert server.post("/flush_cache", {}).status_code == 200
        assert caught_up(follower, server) == 0 and not follower.blocks

        follower.close()  # the subscriber restarts: what is published meanwhile it must get by replay
        random_traffic(server, rng, num_requests // 2)
        missed_from = follower.next_seq
        follower.connect()
        time.sleep(0.5)
        assert follower.replay() > 0
        assert caught_up(follower, server) > 10
        assert follower.next_seq > missed_from
        assert follower.applied == list(range(follower.next_seq)), "a sequence number is missing"
    finally:
        follower.close()
        ctx.destroy(linger=0)
