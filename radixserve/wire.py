"""The wire: every inter-process message is a msgspec Struct defined here; nothing is pickled.

Channels (each a tagged union, decoded by one Decoder per socket):
  gateway   -> tokenizer : TokenizerIn  (GenerateText, Abort, control)
  tokenizer -> gateway   : TokenizerOut (TextChunk / TextBatch, ControlReply)
  tokenizer -> scheduler : SchedulerIn  (GenerateTokens, Abort, control)
  scheduler -> tokenizer : SchedulerOut (TokenBatch, ControlReply)
  scheduler -> workers   : WorkerIn     (StepBatch, Shutdown)
  worker 0  -> scheduler : WorkerOut    (WorkerReady, StepResult, WorkerError)

Hot messages (StepBatch, StepResult) carry int32/float32 arrays as raw bytes and are
`array_like`. A StepBatch never carries a request's whole context: workers mirror the block
table, so a step carries only the new tokens, their KV slots and, once per admitted request,
the KV slots of its cached prefix (see scheduler_proc/scheduler.py and worker_proc/worker.py).
"""

from __future__ import annotations

from typing import Union

import msgspec
import numpy as np

# ---------------------------------------------------------------- shared vocabulary


class SamplingParams(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """Per-request sampling; field names and defaults follow SGLang's `sampling_params`."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    n: int = 1
    seed: int | None = None
    skip_special_tokens: bool = True
    no_stop_trim: bool = False


class SessionParams(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """SGLang-compatible `session_params` of a request."""

    id: str
    rid: str | None = None
    offset: int | None = None
    replace: bool = False
    drop_previous_output: bool = False


class FinishReason(msgspec.Struct, omit_defaults=True):
    """`type` is stop | length | abort; `matched` is the stop token id or string; `length` the cap."""

    type: str
    matched: int | str | None = None
    length: int | None = None
    message: str | None = None
    status_code: int | None = None  # for an abort that rejects the request: the HTTP status to answer

    def to_json(self) -> dict:
        return msgspec.to_builtins(self)


class LogprobRequest(msgspec.Struct, omit_defaults=True, array_like=True):
    """What logprobs a request wants back."""

    logprob_start_len: int = -1
    top_logprobs_num: int = 0


# ---------------------------------------------------------------- gateway <-> tokenizer


class GenerateText(msgspec.Struct, tag=True, omit_defaults=True):
    """One generation as the gateway sees it: text (or ids / chat messages) plus parameters."""

    rid: str
    text: str | None = None
    input_ids: list[int] | None = None
    messages: list[dict] | None = None
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    stream: bool = False
    logprob: LogprobRequest | None = None
    return_text_in_logprobs: bool = False
    session: SessionParams | None = None
    fill_context: bool = False
    """max_new_tokens was not given (OpenAI's default): generate up to the context length."""


class Abort(msgspec.Struct, tag=True, omit_defaults=True):
    """Abort `rid`; `finish` (set by the detokenizer on a stop string) ends it as finished instead."""

    rid: str
    finish: FinishReason | None = None


class Control(msgspec.Struct, tag=True, omit_defaults=True):
    """A request-reply call on the control plane: flush_cache, server_info, open_session, close_session."""

    call_id: str
    op: str
    args: dict = {}
    reply_to: int = 0


class ControlReply(msgspec.Struct, tag=True, omit_defaults=True):
    call_id: str
    ok: bool
    result: dict = {}
    error: str | None = None
    status: int = 200


class TextChunk(msgspec.Struct, tag=True, omit_defaults=True):
    """Tokenizer -> gateway: what one request output since its previous chunk (so a long stream costs
    each step only its new tokens). `text` and `output_ids` are appended; in `meta` the counts and
    finish_reason are current, the output logprob lists hold only the new entries, and the input
    logprob lists are whole. The gateway merges chunks into the request's output so far (`merge`)."""

    rid: str
    text: str
    output_ids: list[int]
    meta: dict
    finished: bool = False

    def merge(self, new: TextChunk) -> None:
        """Append the next chunk of the same request to this one (its output so far)."""
        self.text += new.text
        self.output_ids += new.output_ids
        for key, value in new.meta.items():
            if key in APPENDED_META and key in self.meta:
                self.meta[key] = self.meta[key] + value
            else:
                self.meta[key] = value
        self.finished = new.finished


APPENDED_META = ("output_token_logprobs", "output_top_logprobs")


class TextBatch(msgspec.Struct, tag=True):
    """Tokenizer -> gateway: the TextChunks made from one drain of scheduler output, in one message."""

    chunks: list[TextChunk]


# ---------------------------------------------------------------- tokenizer <-> scheduler


class GenerateTokens(msgspec.Struct, tag=True, omit_defaults=True):
    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    reply_to: int = 0
    logprob: LogprobRequest | None = None
    session: SessionParams | None = None
    eos_token_ids: list[int] = []
    # A chat continuation: the ids that close the previous assistant turn, which the chat template renders
    # after its content; the scheduler puts them in when that turn's output does not end with them (it
    # stopped on max_new_tokens or a stop string instead of EOS).
    turn_end_ids: list[int] = []


class ReqOut(msgspec.Struct, omit_defaults=True, array_like=True):
    """New tokens of one request in one step. `finish` is set on its last message."""

    rid: str
    new_ids: list[int]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish: FinishReason | None = None
    output_logprobs: list[float] | None = None
    output_top_logprobs: list[list[tuple[int, float]]] | None = None
    input_logprobs: list[float | None] | None = None
    input_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    input_ids: list[int] | None = None


class TokenBatch(msgspec.Struct, tag=True):
    outs: list[ReqOut]


# ---------------------------------------------------------------- scheduler <-> workers


class NewReq(msgspec.Struct, array_like=True, omit_defaults=True):
    """Sent once when a request is admitted into a req slot: its cached prefix and sampling."""

    req_slot: int
    prefix_slots: bytes
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    min_new_tokens: int = 0
    stop_ids: bytes = b""
    logprob: LogprobRequest | None = None
    prompt_ids: bytes | None = None


class StepBatch(msgspec.Struct, tag=True, array_like=True):
    """One forward step. Arrays are int32 bytes; per-request arrays are in batch order.

    Request i computes tokens input_ids[off_i : off_i + extend_lens[i]] at positions
    cached_lens[i] .. cached_lens[i] + extend_lens[i] - 1, whose K/V go to out_slots (same
    offsets). `sample_offsets[i]` is the output-token index of the token it samples (seeding).
    `prefix_groups` (decode only, may be empty): int32 (size, shared_len) pairs covering the batch in order,
    each group's requests sharing the KV of their first shared_len tokens (scheduler_proc/prefix_groups.py).
    """

    step: int
    is_decode: bool
    req_slots: bytes
    input_ids: bytes
    cached_lens: bytes
    extend_lens: bytes
    out_slots: bytes
    sample_offsets: bytes
    new_reqs: list[NewReq]
    prefix_groups: bytes = b""


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


class WorkerReady(msgspec.Struct, tag=True, array_like=True):
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


class StepResult(msgspec.Struct, tag=True, array_like=True, omit_defaults=True):
    """Sampled token (int32) and its logprob (float32) per request, in batch order."""

    step: int
    next_ids: bytes
    next_logprobs: bytes
    top_logprobs: dict[int, list[tuple[int, float]]] = {}
    input_logprobs: dict[int, list[float | None]] = {}
    input_top_logprobs: dict[int, list[list[tuple[int, float]] | None]] = {}
    forward_ms: float = 0.0


class WorkerError(msgspec.Struct, tag=True, array_like=True):
    rank: int
    message: str


TokenizerIn = Union[GenerateText, Abort, Control]
TokenizerOut = Union[TextChunk, TextBatch, ControlReply]
SchedulerIn = Union[GenerateTokens, Abort, Control]
SchedulerOut = Union[TokenBatch, ControlReply]
WorkerIn = Union[StepBatch, Shutdown]
WorkerOut = Union[WorkerReady, StepResult, WorkerError]

encoder = msgspec.msgpack.Encoder()


def decoder(channel: object) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(channel)


def i32(values: list[int] | np.ndarray) -> bytes:
    return np.asarray(values, dtype=np.int32).tobytes()


def from_i32(buf: bytes) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.int32)
