"""The wire: every inter-process message is a msgspec Struct, defined here (the control plane's in
control_plane.py, the launchers' link in node_link.py: both re-exported); nothing is pickled.

Channels (each a tagged union, decoded by one Decoder per socket):
  gateway   -> tokenizer : TokenizerIn  (GenerateText, Abort, a control call, GetTokenizerStats)
  tokenizer -> gateway   : TokenizerOut (TextBatch, Rejected, ControlReply, Ready)
  tokenizer -> scheduler : SchedulerIn  (GenerateTokens, Abort, a control call)
  scheduler -> tokenizer : SchedulerOut (TokenBatch, Rejected, ControlReply, Ready)
  scheduler -> workers   : WorkerIn     (StepBatch, Shutdown)
  worker 0  -> scheduler : WorkerOut    (WorkerReady, StepResult, WorkerError)
  launcher <-> launcher : NodeLink     (NodeHello, NodeHeartbeat, NodeStop), over TCP between nodes

Output flows as deltas end to end: a ReqOut carries a step's new ids, a TextDelta the new text; only a
front end that must answer with the whole output (a non-streamed response) accumulates it.

Hot messages (StepBatch, StepResult) carry int32/float32 arrays as raw bytes and are
`array_like`. A StepBatch never carries a request's whole context: workers mirror the block
table, so a step carries only the new tokens, their KV slots and, once per admitted request,
the KV slots of its cached prefix (see scheduler_proc/ and worker_proc/model_runner.py).
"""

from __future__ import annotations

from typing import Union

import msgspec
import numpy as np

from radixserve.control_plane import (  # noqa: F401 (re-exported: the control plane's messages)
    HERMES,
    JSON,
    Call,
    CallIds,
    CheckInvariants,
    CloseSession,
    ControlCall,
    ControlReply,
    FlushCache,
    GetServerInfo,
    OpenSession,
    Ready,
    RuntimeInfo,
    ServerStatus,
    SessionOpened,
    ShutdownServer,
    ToolCallFormat,
)
from radixserve.node_link import NodeHeartbeat, NodeHello, NodeLink, NodeStop  # noqa: F401 (its own channel)
from radixserve.sampling_params import (  # noqa: F401 (re-exported: the wire's vocabulary)
    INT32_MAX,
    CompileGrammar,
    Count,
    Grammar,
    GrammarDone,
    LogitBias,
    MinP,
    Penalties,
    Penalty,
    PositiveCount,
    RepetitionPenalty,
    SamplingParams,
    Seconds,
    Seed,
    TokenId,
)
from radixserve.stats import GetTokenizerStats, SchedulerStats, TokenizerStats  # noqa: F401 (re-exported)

# ---------------------------------------------------------------- shared vocabulary

# Request vocabulary (number bounds, SamplingParams, grammars, penalties) lives in sampling_params.py.


class SessionParams(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """SGLang-compatible `session_params` of a request."""

    id: str
    rid: str | None = None
    offset: Count | None = None  # keep this many tokens of the parent turn
    replace: bool = False
    drop_previous_output: bool = False


class FinishReason(msgspec.Struct, omit_defaults=True):
    """`type` is stop | length | abort; `matched` is the stop token id or string; `length` the cap."""

    type: str
    matched: int | str | None = None
    length: int | None = None
    message: str | None = None


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
    tools: list[dict] | None = None  # chat: the tools the chat template renders (OpenAI's JSON shape)
    chat_template_kwargs: dict[str, object] | None = None  # chat: extra variables for the chat template
    continue_final_message: bool = False  # chat: continue the last (assistant) message instead of a new turn
    logprob: LogprobRequest | None = None
    return_text_in_logprobs: bool = False
    session: SessionParams | None = None
    fill_context: bool = False
    """max_new_tokens was not given (OpenAI's default): generate up to the context length."""
    log_metrics: bool = True  # counted in stats.TokenizerStats (SGLang's name; the gateway's health checks are not)


class Abort(msgspec.Struct, tag=True, omit_defaults=True):
    """Abort `rid`; a `finish` ends it as that: a stop string the tokenizer matched, or an abort with a message."""

    rid: str
    finish: FinishReason | None = None


class Rejected(msgspec.Struct, tag=True):
    """A request that will not run (bad input, a full queue, a session conflict): the HTTP status to answer."""

    rid: str
    status: int
    message: str


LogprobEntry = tuple[float | None, int, str | None]  # (logprob, token id, token text), as SGLang's meta_info


class SpecCounts(msgspec.Struct, array_like=True):
    """A request's speculative decoding so far, in SGLang's meta_info names (verify steps, drafts, accepted)."""
    spec_verify_ct: int = 0
    spec_draft_token_num: int = 0
    spec_accept_token_num: int = 0


class TextDelta(msgspec.Struct, omit_defaults=True, array_like=True):
    """Tokenizer -> gateway: what one request output since its previous delta. `text`, `output_ids` and the
    output logprob lists hold only the new part; the counts and `finish` are current; the input logprob
    lists come whole, once, in the first delta."""

    rid: str
    text: str
    output_ids: list[int]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish: FinishReason | None = None
    output_logprobs: list[LogprobEntry] | None = None
    output_top_logprobs: list[list[LogprobEntry] | None] | None = None
    input_logprobs: list[LogprobEntry] | None = None
    input_top_logprobs: list[list[LogprobEntry] | None] | None = None
    spec: SpecCounts | None = None  # on the last delta, of a request that speculated
    cached_tokens_host: int = 0  # of cached_tokens, those found in the host tier


class TextBatch(msgspec.Struct, tag=True):
    """Tokenizer -> gateway: the deltas made from one drain of scheduler output, in one message."""

    deltas: list[TextDelta]


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
    # Output tokens between the messages the front end needs (scheduler_proc/outputs.py `report`): 1, each step
    # (stop strings are matched there); a stream's interval; more for a request only read at its end.
    report_interval: PositiveCount = 1


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
    spec: SpecCounts | None = None  # on the last message of a request that speculated
    cached_tokens_host: int = 0  # of cached_tokens, those found in the host tier


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
    penalties: Penalties | None = None  # None: the request uses none (and costs nothing for them)
    grammar: Grammar | None = None
    output_ids: bytes = b""  # int32: a re-admitted request's output so far (penalties, grammar rebuilt from it)


class KVMove(msgspec.Struct, array_like=True):
    """A copy between the device KV pool and the host tier's (--enable-hierarchical-cache): KV slots `src` (int32)
    to `dst` (int32), of the device pool if not `to_host`, else the host pool's (scheduler_proc/host_tier.py).
    A load (not `to_host`) has its id `load` (> 0): it lands while later forwards run, and the first step that
    reads its slots names it in StepBatch.load_waits (worker_proc/kv_host.py)."""

    to_host: bool
    src: bytes
    dst: bytes
    load: int = 0


class StepBatch(msgspec.Struct, tag=True, array_like=True):
    """One forward step. Arrays are int32 bytes; per-request arrays are in batch order.

    Request i computes tokens input_ids[off_i : off_i + extend_lens[i]] at positions
    cached_lens[i] .. cached_lens[i] + extend_lens[i] - 1, whose K/V go to out_slots (same
    offsets). `sample_offsets[i]` is the output-token index of the token it samples (seeding), or -1 when
    the step's sample of request i is thrown away (a chunk of a longer prompt, or max_new_tokens 0): per-request
    state that follows the output (penalty counts, grammar matchers) advances only on rows >= 0.
    A step with no requests only carries `grammars` and the host tier's copies (and is answered when a compile
    finishes and its loads are done).
    `draft_lens` (a verify step; else empty): int32 d_i per request, the drafts after its last token (extend_lens[i]
    = 1 + d_i), each position sampled (output index sample_offsets[i] + j) and accepted exactly (speculative.py).
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
    grammars: list[CompileGrammar] = []  # compile these (off the step path): requests wait for them
    draft_lens: bytes = b""
    kv_moves: list[KVMove] = []  # copies between the KV pools, started in order before this step's forward
    load_waits: bytes = b""  # int32 ids of loads (KVMove.load) this step's forward waits for: it may read their slots


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


class WorkerReady(msgspec.Struct, tag=True, array_like=True):
    runtime: RuntimeInfo


class StepResult(msgspec.Struct, tag=True, array_like=True, omit_defaults=True):
    """Sampled token (int32) and its logprob (float32) per request, in batch order; a verify step's request has
    a_i + 1 of them (`accept_lens`: int32 a_i, drafts accepted), and top_logprobs are keyed by that flat index."""

    step: int
    next_ids: bytes
    next_logprobs: bytes
    top_logprobs: dict[int, list[tuple[int, float]]] = {}
    input_logprobs: dict[int, list[float | None]] = {}
    input_top_logprobs: dict[int, list[list[tuple[int, float]] | None]] = {}
    forward_ms: float = 0.0
    grammars_done: list[GrammarDone] = []  # compiles that finished since the previous result
    admit_errors: list[tuple[int, str]] = []  # (req slot, why) of this step's new requests that cannot run
    accept_lens: bytes = b""
    loads_done: bytes = b""  # int32 ids of loads (KVMove.load) whose copy rank 0 found done (a step of no requests
    # waits for them); an id may be reported again until a step's load_waits names it


class WorkerError(msgspec.Struct, tag=True, array_like=True):
    rank: int
    message: str


TokenizerIn = Union[GenerateText, Abort, ControlCall, GetTokenizerStats, ShutdownServer]
TokenizerOut = Union[TextBatch, Rejected, ControlReply, Ready]
SchedulerIn = Union[GenerateTokens, Abort, ControlCall, ShutdownServer]
SchedulerOut = Union[TokenBatch, Rejected, ControlReply, Ready]
WorkerIn = Union[StepBatch, Shutdown]
WorkerOut = Union[WorkerReady, StepResult, WorkerError]

encoder = msgspec.msgpack.Encoder()


def decoder(channel: object) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(channel)


def i32(values: list[int] | np.ndarray) -> bytes:
    return np.asarray(values, dtype=np.int32).tobytes()


def from_i32(buf: bytes) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.int32)
