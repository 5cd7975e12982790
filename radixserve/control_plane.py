"""The control plane of the wire (re-exported by wire.py): calls that read or change the scheduler's state between
steps, their replies, and what the scheduler tells every front end at start-up (`Ready`, `RuntimeInfo`).

A call goes gateway -> tokenizer 0 -> scheduler (or Engine -> scheduler) and is answered by one ControlReply with
the same call_id, routed back by `reply_to` (the tokenizer's index).
"""

from __future__ import annotations

import itertools
from typing import Literal, TypeVar, Union

import msgspec

from radixserve.stats import SchedulerStats, TokenizerStats


class _Call(msgspec.Struct, tag=True, omit_defaults=True, kw_only=True):
    """A control call; its ControlReply carries the same call_id back to tokenizer `reply_to`."""

    call_id: str
    reply_to: int = 0


class FlushCache(_Call):
    pass


class GetServerInfo(_Call):
    """Live counters, read in O(1) (the invariant walk is CheckInvariants)."""


class CheckInvariants(_Call):
    """Walk the whole KV and cache state (O(cache size)): for tests and debugging."""


class OpenSession(_Call):
    capacity_of_str_len: int = 0
    session_id: str | None = None
    idle_timeout: float | None = None  # the HTTP field `timeout`; named apart from the control call's own timeout


class CloseSession(_Call):
    session_id: str


class ShutdownServer(msgspec.Struct, tag=True):
    """Stop the tokenizer that receives it, the scheduler and the workers (no reply)."""


ControlCall = Union[FlushCache, GetServerInfo, CheckInvariants, OpenSession, CloseSession]
Call = TypeVar("Call", bound=msgspec.Struct)


class CallIds:
    """A front end's control calls, each with a call_id unique among its calls (its reply is matched by it)."""

    def __init__(self) -> None:
        self._next = itertools.count()

    def call(self, kind: type[Call], **fields: object) -> Call:
        return kind(call_id=f"{kind.__name__}-{next(self._next)}", **fields)


class RuntimeInfo(msgspec.Struct):
    """Facts the workers resolve once at start-up (context length after every cap, vocabulary, KV size...);
    every other process reads them from here."""

    num_kv_slots: int
    context_length: int
    vocab_size: int
    device: str
    dtype: str
    attention_backend: str
    kv_bytes_per_token: int
    weight_bytes: int
    gpu_memory_used: int = 0
    gpu_memory_free: int = 0
    cascade_attention: bool = False  # the workers honour StepBatch.prefix_groups
    num_host_kv_slots: int = 0  # the host tier's pool (--enable-hierarchical-cache), slot 0 padding; 0: none
    weight_dtype: str = ""  # of the decoder's linear weights: `dtype`, float8_e4m3fn or the CPU's (Q4_1+Q8_0, int8)
    num_params: int = 0  # the model's parameters, quantized layers counted by their float shape (weight_bytes' count)
    kv_cache_dtype: str = ""  # of the KV cache: `dtype`, or float8_e4m3fn (--kv-cache-dtype fp8_e4m3)


class ServerStatus(msgspec.Struct, tag=True):
    """Reply to GetServerInfo and CheckInvariants; `invariants` is "ok", "violated: ..." or "unchecked"."""

    scheduler: SchedulerStats
    runtime: RuntimeInfo
    invariants: str = "unchecked"

    def scheduler_info(self) -> dict:
        """The scheduler's counters and the last invariant check, as /get_server_info's `scheduler`."""
        return msgspec.to_builtins(self.scheduler) | {"invariants": self.invariants}


class SessionOpened(msgspec.Struct, tag=True):
    session_id: str


class ControlReply(msgspec.Struct, tag=True, omit_defaults=True):
    call_id: str
    status: int = 200
    error: str | None = None
    result: ServerStatus | SessionOpened | TokenizerStats | None = None

    @property
    def ok(self) -> bool:
        return self.status < 400


ToolCallFormat = Literal["hermes", "json"]
HERMES: ToolCallFormat = "hermes"  # `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks among free text
JSON: ToolCallFormat = "json"  # an answer that is one JSON object {"name": ..., "parameters": {...}} (or several)


class Ready(msgspec.Struct, tag=True, omit_defaults=True):
    """Scheduler -> every front end once at start-up: the runtime facts, or why the start failed. A tokenizer
    passes it on to the gateway with `tool_call_format`, how this model writes tool calls (decided once, from the
    chat template, by tokenizer_proc/chat_tools.py; the gateway parses the output that way)."""

    runtime: RuntimeInfo | None = None
    error: str | None = None
    tool_call_format: ToolCallFormat | None = None
