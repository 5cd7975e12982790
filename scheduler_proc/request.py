"""A request as the scheduler tracks it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from radixserve.wire import FinishReason, Grammar, LogprobRequest, Penalties, ReqOut, SamplingParams, SpecCounts
from scheduler_proc.radix_node import TreeNode

PENDING = -1  # an output token sampled by a step in flight (the StepBatch input id that stands for it)


class Stage(enum.Enum):
    """Where a request is (scheduler_proc/lifecycle.py)."""

    HELD = "held"  # waiting for its grammar to compile (grammar_gate.py)
    WAITING = "waiting"
    PREFILL = "prefill"  # admitted; some prompt tokens still lack KV (chunked prefill)
    DECODE = "decode"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Req:
    """Token state of one request; compared and hashed by identity (queues key on the object).

    fill_ids = prompt + output. Invariant while it holds a req slot: KV is valid for
    fill_ids[:cached_len], whose slots are req_to_token[req_slot, :cached_len]; of those,
    the first `prefix_len` belong to the radix tree (locked through `prefix_node`) and the
    rest are owned by this request. `cached_tokens` is what the cache saved it (reported).

    Overlap scheduling: a step counts as done when it is sent (cached_len advances then; the device
    runs steps in order, so any later step reads that KV after it is written). A token sampled by a step
    still in flight is PENDING in output_ids until its result arrives: `pending` of them, always last
    (at most two: one from the step in flight, one from the step being sent), never in fill_ids[:cached_len]
    when a message is handled between steps.
    """

    rid: str
    prompt_ids: np.ndarray
    sampling: SamplingParams
    reply_to: int
    stop_ids: frozenset[int]
    arrival: int
    logprob: LogprobRequest | None = None
    output_ids: list[int] = field(default_factory=list)
    stage: Stage = Stage.WAITING
    req_slot: int = -1
    cached_len: int = 0
    prefix_len: int = 0
    prefix_node: TreeNode | None = None
    cached_tokens: int = 0
    cached_tokens_host: int = 0  # of those, moved back from the host tier
    finish: FinishReason | None = None
    input_logprobs: list[float | None] = field(default_factory=list)
    input_top_logprobs: list = field(default_factory=list)
    seed: int = 0
    session_id: str | None = None
    grammar: Grammar | None = None  # structured output (grammar_gate.py holds it until compiled)
    penalties: Penalties | None = None  # for the workers, once per admission (NewReq)
    pending: int = 0  # trailing PENDING entries of output_ids
    queued_at: float = 0.0  # time.monotonic() when it arrived (queue_time_seconds)
    # Speculative decoding (speculative.py): a verify step of it in flight (its pending entries are drafts and
    # one PENDING token), its tokens for n-gram drafting, its counts (reported on its last message).
    verifying: bool = False
    history: object = None  # speculative.TokenHistory, made at its first draft
    draft_cap: int = 1 << 30  # the most drafts it proposes next (Speculator.settle adapts it where drafts cost)
    spec: SpecCounts | None = None
    # What its front end was sent (outputs.py `report`): every `report_interval` output tokens, and the first and
    # the last message at once. `reported`: output tokens sent (-1: no message yet); `unsent`: the outputs since.
    report_interval: int = 1
    reported: int = -1
    unsent: ReqOut | None = None

    @property
    def fill_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def fill_ids(self) -> np.ndarray:
        if not self.output_ids:
            return self.prompt_ids
        return np.concatenate([self.prompt_ids, np.asarray(self.output_ids, dtype=np.int32)])

    def token_slice(self, start: int, end: int) -> np.ndarray:
        """fill_ids()[start:end] without building the whole sequence."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        tail = np.asarray(self.output_ids[max(start - n, 0):end - n], dtype=np.int32)
        return tail if start >= n else np.concatenate([self.prompt_ids[start:], tail])

    @property
    def num_outputs(self) -> int:
        """Output tokens known so far (the ones sent to the client)."""
        return len(self.output_ids) - self.pending

    def drop_pending(self) -> None:
        """Forget tokens still in flight (the request ended before they arrived)."""
        if self.pending:
            del self.output_ids[-self.pending:]
            self.pending = 0

    @property
    def remaining_new_tokens(self) -> int:
        return self.sampling.max_new_tokens - len(self.output_ids)

    @property
    def wants_input_logprobs(self) -> bool:
        return self.logprob is not None and 0 <= self.logprob.logprob_start_len < len(self.prompt_ids)
