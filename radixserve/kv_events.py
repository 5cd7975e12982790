"""KV cache events: what routers (NVIDIA Dynamo's KV router, llm-d, SGLang's model gateway) read to know which
prefixes a server holds, in the layout of vLLM's `vllm/distributed/kv_events.py` (SGLang publishes the same).

`--kv-events-config` takes vLLM's / SGLang's JSON: `{"publisher": "zmq", "endpoint": "tcp://*:5557",
"replay_endpoint": "tcp://*:5558", "topic": "", "buffer_steps": 10000, "hwm": 100000}`, plus `block_size` (the
tokens per reported block; the radix cache itself has pages of one token). Each message on the PUB socket is
multipart `[topic, seq, payload]`: seq an 8-byte big-endian counter from 0, payload a msgpack `KVEventBatch`: an
array `[ts, events, data_parallel_rank]` whose events are maps tagged `"type": <class name>`, as msgspec encodes
vLLM's current Structs (vLLM before its map layout sent each event as an array too; routers read both). A
subscriber that missed messages sends `start_seq` (8 bytes, big-endian) to the ROUTER replay socket from a REQ or
DEALER socket (with an empty delimiter frame) and gets `[seq, payload]` for every buffered batch from it on, then
`[END_SEQ, b""]`.

Blocks: block k of a cached sequence is its tokens [k*block_size, (k+1)*block_size); its hash chains its parent's
with its tokens (`block_hash`), so equal prefixes hash equally on every server. A block is stored once all its
tokens are cached and removed when any of them leaves the cache; a flush sends AllBlocksCleared. `medium` is "GPU"
for the device pool (on the CPU backend too: the first tier) and "CPU" for the host tier.

Data parallelism: replica r of `--dp-size` publishes on the endpoints' port + r (`for_rank`), and its batches carry
`data_parallel_rank = r`.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

import msgspec
import numpy as np

END_SEQ = (-1).to_bytes(8, "big", signed=True)  # the replay socket's last frame: no more buffered batches
DEVICE_MEDIUM = "GPU"
HOST_MEDIUM = "CPU"


class KVEventsConfig(msgspec.Struct, forbid_unknown_fields=True):
    """`--kv-events-config`: vLLM's / SGLang's fields, `block_size`, and `dp_rank` (set by the --dp-size launcher
    for each replica; the endpoints' ports are offset by it)."""

    publisher: Literal["zmq", "null"] = "zmq"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    topic: str = ""
    buffer_steps: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    hwm: Annotated[int, msgspec.Meta(ge=0)] = 100_000
    max_queue_size: Annotated[int, msgspec.Meta(ge=1)] = 100_000  # vLLM's; accepted (batches are sent as made)
    enable_kv_cache_events: bool = True  # vLLM's switch; false publishes nothing
    block_size: Annotated[int, msgspec.Meta(ge=1)] = 16
    dp_rank: Annotated[int, msgspec.Meta(ge=0)] = 0

    @classmethod
    def parse(cls, text: str) -> KVEventsConfig:
        """The flag's JSON; msgspec.ValidationError or DecodeError naming what is wrong."""
        return msgspec.json.decode(text, type=cls)

    @property
    def enabled(self) -> bool:
        return self.publisher == "zmq" and self.enable_kv_cache_events

    def for_rank(self, dp_rank: int) -> str:
        """This configuration for data-parallel replica `dp_rank`, as the flag's JSON."""
        return msgspec.json.encode(msgspec.structs.replace(self, dp_rank=dp_rank)).decode()

    def rank_endpoint(self, endpoint: str | None) -> str | None:
        """`endpoint` with its TCP port offset by this rank (vLLM's convention; `_dp<r>` appended to inproc)."""
        if endpoint is None or self.dp_rank == 0:
            return endpoint
        if endpoint.startswith("inproc://") or endpoint.startswith("ipc://"):
            return f"{endpoint}_dp{self.dp_rank}"
        base, _, port = endpoint.rpartition(":")
        return f"{base}:{int(port) + self.dp_rank}"


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """A change of the cached block set: a msgpack map, its class name under "type" (vLLM's current layout)."""


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None  # vLLM's fields without a default: always on the wire, so its typed decoder takes them
    medium: str | None
    lora_name: str | None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(EventBatch):
    events: list[KVEvent]


def block_hash(parent: int | None, tokens: np.ndarray) -> int:
    """A block's 64-bit hash (unsigned): its parent block's hash (none for the first block) chained with its
    token ids, so it names the whole prefix up to the block's end."""
    h = hashlib.blake2b(digest_size=8)
    h.update((parent or 0).to_bytes(8, "little"))
    h.update(np.ascontiguousarray(tokens, dtype="<i4").tobytes())
    return int.from_bytes(h.digest(), "little")
