"""What a request asks of sampling, shared by every process: SamplingParams (SGLang's `sampling_params`), the
structured-output Grammar, the Penalties a worker applies, and the bounds every request integer carries.
Re-exported by wire.py, whose messages carry them.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

INT32_MAX = 2**31 - 1
# Integers parsed from a request carry bounds (checked by msgspec as they are decoded), so every value that
# reaches a process fits the wire; tests/test_openapi.py checks that every integer of a request schema has both.
Count = Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]
TokenId = Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class SamplingParams(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """Per-request sampling; field names and defaults follow SGLang's `sampling_params`."""

    max_new_tokens: Count = 128
    min_new_tokens: Count = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=-1, le=INT32_MAX)] = -1
    min_p: float = 0.0
    stop: list[str] = []
    stop_token_ids: list[TokenId] = []
    ignore_eos: bool = False
    n: Annotated[int, msgspec.Meta(ge=1, le=INT32_MAX)] = 1
    seed: Seed | None = None
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    spaces_between_special_tokens: bool = True
    stop_regex: list[str] = []  # the output ends where one matches (cut there unless no_stop_trim)
    stream_interval: Annotated[int, msgspec.Meta(ge=1, le=INT32_MAX)] | None = None  # stream every N tokens
    frequency_penalty: float = 0.0  # in [-2, 2]: minus this times the token's count in the output
    presence_penalty: float = 0.0  # in [-2, 2]: minus this if the token is in the output
    repetition_penalty: float = 1.0  # in (0, 2]: a token in the output has its logit divided (> 0) or multiplied by it
    logit_bias: dict[str, float] = {}  # token id (a JSON key) -> added to its logit
    # Structured output (at most one; xgrammar): the output must match it.
    json_schema: str | None = None  # a JSON schema, or "$$ANY$$" for any JSON value
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None  # xgrammar's structural tag, as JSON
    custom_params: dict[str, object] | None = None  # for a custom logit processor (none is supported: unused)

    def grammar(self) -> Grammar | None:
        """The structured-output constraint, if any (validation.check_sampling allows at most one)."""
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
