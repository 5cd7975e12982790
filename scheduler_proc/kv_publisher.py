"""The KV event publisher: a PUB socket for the scheduler's event batches and a ROUTER socket that replays missed
ones from a bounded buffer (the protocol: radixserve/kv_events.py).

The step loop only hands each batch of events to a queue (`publish`, O(1)); a thread of this process owns both
sockets, numbers and encodes the batches, sends them and answers replay requests, so a slow subscriber or a
replay never holds up a step. PUB drops messages past `hwm` for a subscriber that does not keep up; the sequence
numbers show the gap and the replay socket fills it while the batches are still among the last `buffer_steps`.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading

import msgspec
import zmq

from radixserve.kv_events import END_SEQ, KVEvent, KVEventBatch, KVEventsConfig

log = logging.getLogger("radixserve.kv_events")
POLL_MS = 100


class KVEventPublisher:
    def __init__(self, config: KVEventsConfig) -> None:
        self.config = config
        self._queue: queue.SimpleQueue[KVEventBatch | None] = queue.SimpleQueue()
        self._ctx = zmq.Context()
        # Bound here, so a port in use fails the scheduler's start instead of a thread later.
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(config.hwm)
        self._pub.bind(config.rank_endpoint(config.endpoint))
        self._replay = None
        if config.replay_endpoint is not None:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.bind(config.rank_endpoint(config.replay_endpoint))
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()

    def publish(self, ts: float, events: list[KVEvent]) -> None:
        """Queue one batch (the step loop's whole cost)."""
        self._queue.put(KVEventBatch(ts=ts, events=events, data_parallel_rank=self.config.dp_rank))

    def close(self) -> None:
        """Send what is queued, then close the sockets."""
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        encoder = msgspec.msgpack.Encoder()
        topic = self.config.topic.encode()
        buffer: collections.deque[tuple[bytes, bytes]] = collections.deque(maxlen=self.config.buffer_steps)
        seq = 0
        try:
            while True:
                if self._replay is not None and self._replay.poll(0):
                    self._serve_replay(buffer)
                try:
                    batch = self._queue.get(timeout=POLL_MS / 1000 if self._replay is not None else None)
                except queue.Empty:
                    continue
                if batch is None:
                    return
                seq_bytes = seq.to_bytes(8, "big")
                payload = encoder.encode(batch)
                self._pub.send_multipart([topic, seq_bytes, payload])
                buffer.append((seq_bytes, payload))
                seq += 1
        finally:
            self._pub.close(linger=1000)
            if self._replay is not None:
                self._replay.close(linger=0)
            self._ctx.term()

    def _serve_replay(self, buffer: collections.deque[tuple[bytes, bytes]]) -> None:
        """One request `[client, b"", start_seq]`: every buffered batch from start_seq on, then END_SEQ."""
        assert self._replay is not None
        frames = self._replay.recv_multipart()
        if len(frames) != 3 or len(frames[2]) != 8:
            log.warning("ignored a malformed KV event replay request (%d frames)", len(frames))
            return
        client, _, start = frames
        start_seq = int.from_bytes(start, "big")
        for seq_bytes, payload in buffer:
            if int.from_bytes(seq_bytes, "big") >= start_seq:
                self._replay.send_multipart([client, b"", seq_bytes, payload])
        self._replay.send_multipart([client, b"", END_SEQ, b""])
