"""What a request asks of sampling, shared by every process: SamplingParams (SGLang's `sampling_params`), the
structured-output Grammar, the Penalties a worker applies, and the bounds every request number carries (the one
declaration of each: the gateway's request Structs and the wire use these types). Re-exported by wire.py, whose
messages carry them. Parsing and checking a request's values is sampling_checks.py's.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

INT32_MAX = 2**31 - 1
MAX_N = 64  # copies of one prompt (`n`)
MAX_STOPS = 16  # stop strings, and stop patterns
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # token ids in one logit_bias
MAX_TEMPERATURE = 100.0  # far past where sampling is uniform over any model's logits
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range, [-100, 100]
# Numbers parsed from a request carry both bounds (checked by msgspec as they are decoded, in the gateway and again
# in every process that decodes the message), so every value that reaches a process fits the wire and a float32
# device tensor: a bound rejects NaN and +-inf too. tests/test_openapi.py checks that every number of a request
# schema has both. Ranges are SGLang's, or OpenAI's where SGLang sets none.
Count = Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]
PositiveCount = Annotated[int, msgspec.Meta(ge=1, le=INT32_MAX)]
TokenId = Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]
TopK = Annotated[int, msgspec.Meta(ge=-1, le=INT32_MAX)]  # -1: off
Choices = Annotated[int, msgspec.Meta(ge=1, le=MAX_N)]  # OpenAI's n (SamplingParams.n is checked against MAX_N)
TopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_LOGPROBS)]
LogprobStart = Annotated[int, msgspec.Meta(ge=-1, le=INT32_MAX)]  # -1: SGLang's "from the output on"
Seed = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Priority = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]  # SGLang's range; no priority scheduling here
Temperature = Annotated[float, msgspec.Meta(ge=0, le=MAX_TEMPERATURE)]
OpenAITemperature = Annotated[float, msgspec.Meta(ge=0, le=2)]  # OpenAI's range, on its routes
TopP = Annotated[float, msgspec.Meta(gt=0, le=1)]
MinP = Annotated[float, msgspec.Meta(ge=0, le=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]  # frequency and presence penalties
RepetitionPenalty = Annotated[float, msgspec.Meta(gt=0, le=2)]
LogitBias = Annotated[float, msgspec.Meta(ge=-LOGIT_BIAS_LIMIT, le=LOGIT_BIAS_LIMIT)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=30 * 24 * 3600)]  # a duration a client may set: up to 30 days
Timestamp = Annotated[float, msgspec.Meta(ge=0, le=1e12)]  # seconds since the epoch (SGLang's router's stamps)


class SamplingParams(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """Per-request sampling; field names and defaults follow SGLang's `sampling_params`."""

    max_new_tokens: Count = 128
    min_new_tokens: Count = 0
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = -1
    min_p: MinP = 0.0
    stop: list[str] = []
    stop_token_ids: list[TokenId] = []
    ignore_eos: bool = False
    n: PositiveCount = 1
    seed: Seed | None = None
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    spaces_between_special_tokens: bool = True
    stop_regex: list[str] = []  # the output ends where one matches (cut there unless no_stop_trim)
    stream_interval: PositiveCount | None = None  # stream every N tokens
    frequency_penalty: Penalty = 0.0  # minus this times the token's count in the output
    presence_penalty: Penalty = 0.0  # minus this if the token is in the output
    repetition_penalty: RepetitionPenalty = 1.0  # an output token's logit: divided by it if > 0, else multiplied
    logit_bias: dict[str, LogitBias] = {}  # token id (a JSON key) -> added to its logit
    # Structured output (at most one; xgrammar): the output must match it.
    json_schema: str | None = None  # a JSON schema, or "$$ANY$$" for any JSON value
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None  # xgrammar's structural tag, as JSON
    custom_params: dict[str, Any] | None = None  # for a custom logit processor (none is supported: unused)

    def grammar(self) -> Grammar | None:
        """The structured-output constraint, if any (sampling_checks allows at most one)."""
        for kind in GRAMMAR_KINDS:
            source = getattr(self, kind)
            if source is not None:
                return Grammar(kind, source)
        return None

    @property
    def penalized(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)


GRAMMAR_KINDS = ("json_schema", "regex", "ebnf", "structural_tag")


class Grammar(msgspec.Struct, frozen=True, array_like=True):
    """A structured-output constraint: `kind` is one of GRAMMAR_KINDS, `source` its text (hashable: cache key)."""

    kind: str
    source: str


class Penalties(msgspec.Struct, array_like=True, omit_defaults=True):
    """SGLang's penalties over a request's output tokens, and its logit bias (int32 ids, float32 values)."""

    frequency: float = 0.0
    presence: float = 0.0
    repetition: float = 1.0
    bias_ids: bytes = b""
    bias_values: bytes = b""


class CompileGrammar(msgspec.Struct, array_like=True):
    """Scheduler -> worker 0: start compiling `grammar`; its GrammarDone reports back under `gid`."""

    gid: int
    grammar: Grammar


class GrammarDone(msgspec.Struct, array_like=True, omit_defaults=True):
    """Worker 0 -> scheduler: grammar `gid` compiled (`error` None) or is invalid (xgrammar's message)."""

    gid: int
    error: str | None = None
