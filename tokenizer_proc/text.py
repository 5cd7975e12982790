"""The tokenizer side's text handling: load, encode prompts, and turn output ids into text.

`RequestText` is what the tokenizer process and the offline Engine keep per request; the
detokenizer and stop matcher it glues live in `detokenizer.py` and `stops.py`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import TemplateError

from tokenizer_proc.chat_tools import describe_tools, renders_tools, tool_calls_of
from tokenizer_proc.detokenizer import IncrementalDetokenizer
from tokenizer_proc.stops import StopMatcher

if TYPE_CHECKING:
    from radixserve.wire import SamplingParams

__all__ = ["IncrementalDetokenizer", "RequestText", "StopMatcher", "encode_prompt", "eos_token_ids", "load_tokenizer"]

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


# tokenizer_config.json's names of transformers' generic tokenizer.json class (one class in transformers 5).
GENERIC_TOKENIZER_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})
# config.json model types whose generic-declared tokenizer AutoTokenizer replaces with the type's own class
# (transformers' MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS that map to a class of their own; tests/test_text.py
# keeps this equal to transformers').
OWN_TOKENIZER_MODEL_TYPES = frozenset({"hyperclovax_vision_v2", "qwen2", "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text",
                                       "qwen4_exp", "siglip2"})


def load_tokenizer(path: str, skip: bool = False, trust_remote_code: bool = False,
                   chat_template: str | None = None) -> Any | None:
    """The HF (fast) tokenizer of an HF model directory, the class AutoTokenizer picks (one that ships its own code
    only with `trust_remote_code`), with the Jinja template in the file `chat_template` instead of its own; None
    with `skip` (--skip-tokenizer-init).

    AutoTokenizer's module imports torch (through transformers' config classes): seconds of CPU in every
    tokenizer process and in the launcher that spawns them. So a tokenizer.json declared as the generic class,
    where AutoTokenizer also ends up (no custom code, no Mistral tekken.json, not a model type with a class of
    its own), is loaded by that class directly; any other goes through AutoTokenizer.
    """
    if skip:
        return None
    if _generic_tokenizer(Path(path)):
        from transformers import TokenizersBackend

        tokenizer = TokenizersBackend.from_pretrained(path)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if chat_template is not None:
        tokenizer.chat_template = Path(chat_template).read_text()
    return tokenizer


def _generic_tokenizer(model_dir: Path) -> bool:
    declared, config = model_dir / "tokenizer_config.json", model_dir / "config.json"
    if not (declared.is_file() and (model_dir / "tokenizer.json").is_file()) or (model_dir / "tekken.json").exists():
        return False
    tokenizer_config = json.loads(declared.read_text())
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    return (tokenizer_config.get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES and "auto_map" not in tokenizer_config
            and model_type not in OWN_TOKENIZER_MODEL_TYPES)


def eos_token_ids(tokenizer: Any, model_dir: str | None) -> list[int]:
    """EOS ids from generation_config.json, config.json and the tokenizer, in that order, deduplicated."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        file = Path(model_dir, name) if model_dir else None
        if file is not None and file.is_file():
            value = json.loads(file.read_text()).get("eos_token_id")
            ids += value if isinstance(value, list) else [value]
    if tokenizer is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(i for i in ids if isinstance(i, int)))


def encode_prompt(
    tokenizer: Any,
    text: str | None = None,
    input_ids: Sequence[int] | None = None,
    messages: list[dict] | None = None,
    *,
    continue_chat: bool = False,
    chat: ChatOptions | None = None,
) -> list[int]:
    """Token ids of exactly one of: raw `text` (tokenizer defaults, like SGLang's /generate),
    `input_ids` (range-checked by the scheduler, which knows the model's vocabulary), or OpenAI-style chat
    `messages` (chat template with the generation prompt; with `continue_chat`, rendered as the
    next turns of a conversation whose last turn the model generated; `chat`: tools, template variables, or
    continuing the final message). Raises ValueError on bad input."""
    if sum(x is not None for x in (text, input_ids, messages)) != 1:
        raise ValueError("give exactly one of text, input_ids, messages")
    if tokenizer is None and input_ids is None:
        raise ValueError("this server runs without a tokenizer (--skip-tokenizer-init): send input_ids")
    if text is not None:
        ids = tokenizer.encode(text) if text else []
    elif input_ids is not None:
        ids = list(input_ids)
    else:
        ids = _encode_chat(tokenizer, messages, continue_chat, chat or ChatOptions())
    if not ids:
        raise ValueError("empty prompt")
    return ids


@dataclass(frozen=True)
class ChatOptions:
    """What a chat request adds to its messages (wire.GenerateText's chat fields)."""

    tools: list[dict] | None = None
    template_kwargs: dict | None = None
    continue_final_message: bool = False


def _encode_chat(tokenizer: Any, messages: Any, continue_chat: bool, chat: ChatOptions) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; send text or input_ids")
    normalized = [_normalize_message(m) for m in messages]
    kwargs = dict(chat.template_kwargs or {})
    if renders_tools(tokenizer):
        kwargs["tools"] = chat.tools
    elif chat.tools or any(m.get("tool_calls") or m["role"] == "tool" for m in normalized):
        normalized = describe_tools(normalized, chat.tools)
    if chat.continue_final_message and (continue_chat or normalized[-1]["role"] != "assistant"):
        raise ValueError("continue_final_message needs a last message from the assistant (and no session)")
    try:
        if continue_chat:
            prompt = _continuation(tokenizer, normalized, kwargs)
        elif chat.continue_final_message:
            prompt = tokenizer.apply_chat_template(normalized, tokenize=False, continue_final_message=True, **kwargs)
        else:
            prompt = tokenizer.apply_chat_template(normalized, tokenize=False, add_generation_prompt=True, **kwargs)
    except TemplateError as e:
        raise ValueError(f"chat template: {e}") from e
    # The template writes its own special tokens (BOS): do not add them a second time.
    return tokenizer.encode(prompt, add_special_tokens=False)


_PROBE = "\u2063radixserve-probe\u2063"


_PROBE_HISTORY = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                  {"role": "assistant", "content": _PROBE}]


def _continuation(tokenizer: Any, messages: list[dict], kwargs: dict) -> str:
    """Template text of `messages` following an assistant turn that ended with the EOS token.

    Renders a probe conversation with and without the new messages and keeps the difference,
    plus what the template writes after an assistant's content (minus the EOS the model emitted).
    """
    before = tokenizer.apply_chat_template(_PROBE_HISTORY, tokenize=False, **kwargs)
    full = tokenizer.apply_chat_template(_PROBE_HISTORY + messages, tokenize=False, add_generation_prompt=True,
                                         **kwargs)
    if not full.startswith(before) or _PROBE not in before:
        raise ValueError("this chat template cannot continue a conversation turn by turn; send the full messages")
    glue, _ = _after_assistant(tokenizer, before)
    return glue + full[len(before):]


def _after_assistant(tokenizer: Any, rendered: str) -> tuple[str, str]:
    """What the template writes after the probe assistant's content in `rendered`: (the rest, the EOS text
    it starts with, which the model emits itself, or "")."""
    glue = rendered[rendered.rindex(_PROBE) + len(_PROBE):]
    eos = tokenizer.eos_token or ""
    return (glue[len(eos):], eos) if eos and glue.startswith(eos) else (glue, "")


def turn_end_ids(tokenizer: Any) -> list[int]:
    """Ids of the EOS text that a chat continuation leaves out after the previous assistant turn (see
    wire.GenerateTokens.turn_end_ids); [] if the template writes none there."""
    _, eos = _after_assistant(tokenizer, tokenizer.apply_chat_template(_PROBE_HISTORY, tokenize=False))
    return tokenizer.encode(eos, add_special_tokens=False) if eos else []


def _normalize_message(message: Any) -> dict:
    """A message with string content (text parts are joined with newlines); an assistant's tool calls with
    their arguments as objects, its content "" when it has only those."""
    if not isinstance(message, dict):
        raise ValueError("each message must be an object with role and content")
    role, content = message.get("role"), message.get("content")
    if role not in CHAT_ROLES:
        raise ValueError(f"bad message role {role!r}; expected one of {sorted(CHAT_ROLES)}")
    calls = tool_calls_of(message) if role == "assistant" else None
    if calls is not None:
        message = {**message, "tool_calls": calls}
        content = "" if content is None else content
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
        content = "\n".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ValueError(f"message content must be a string or a list of text parts, not {type(content).__name__}")
    return {**message, "content": content}


class RequestText:
    """One request's output text: ids -> detokenizer -> stop matcher -> text deltas.

    Per message from the scheduler: `delta, matched = rt.feed(new_ids, stop_token=...)`; on
    its last one also `rt.finish()`. A matched stop string ends the text; ids that arrive
    after it (before the scheduler learns of it) are not recorded in `output_ids`.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int] | None = None,
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
        no_stop_trim: bool = False,
        stop_regex: Sequence[str] = (),
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens, spaces_between_special_tokens)
        self._stops = StopMatcher(stop, no_stop_trim, stop_regex)
        self._no_stop_trim = no_stop_trim
        self._pieces: list[str] = []  # the deltas returned so far
        self.retracted = 0  # characters of earlier deltas that the last call took back (a stop regex's cut)
        self.output_ids: list[int] = []

    @classmethod
    def for_sampling(cls, tokenizer: Any, prompt_ids: Sequence[int] | None, sampling: SamplingParams) -> RequestText:
        return cls(tokenizer, prompt_ids, sampling.stop, sampling.skip_special_tokens, sampling.no_stop_trim,
                   sampling.stop_regex, sampling.spaces_between_special_tokens)

    @property
    def text(self) -> str:
        """All text so far (joined on each call: front ends use the deltas)."""
        return "".join(self._pieces)

    @property
    def matched(self) -> str | None:
        """The stop string that ended the text, if one did."""
        return self._stops.matched

    def feed(self, new_ids: Sequence[int], stop_token: bool = False) -> tuple[str, str | None]:
        """Add output ids; return the new visible text and the stop string matched now, if any.

        `stop_token`: the last id is the EOS / stop token that finished the request; as in
        SGLang its text is dropped unless `no_stop_trim` (it stays in `output_ids`).
        """
        self.retracted = 0
        if self.matched is not None:
            return "", None
        self.output_ids += new_ids
        text_ids = new_ids[:-1] if stop_token and not self._no_stop_trim else new_ids
        return self._emit(self._detok.feed(text_ids))

    def finish(self) -> tuple[str, str | None]:
        """Release held-back text at the end of the request (it may still complete a stop string)."""
        self.retracted = 0
        if self.matched is not None:
            return "", None
        delta, matched = self._emit(self._detok.flush())
        if matched is None:
            tail = self._stops.flush()
            self._pieces.append(tail)
            delta += tail
        return delta, matched

    def _emit(self, decoded: str) -> tuple[str, str | None]:
        delta, matched = self._stops.feed(decoded)
        self.retracted, self._stops.retracted = self._stops.retracted, 0
        if self.retracted:
            self._pieces = [_drop_tail("".join(self._pieces), self.retracted)]
        self._pieces.append(delta)
        return delta, matched


def _drop_tail(text: str, n: int) -> str:
    return text[:len(text) - n] if n else text


class IdsOnly:
    """RequestText's stand-in without a tokenizer (`--skip-tokenizer-init`): ids in, ids out, no text."""

    text = ""
    matched = None
    retracted = 0

    def __init__(self) -> None:
        self.output_ids: list[int] = []

    def feed(self, new_ids: Sequence[int], stop_token: bool = False) -> tuple[str, str | None]:
        self.output_ids += new_ids
        return "", None

    def finish(self) -> tuple[str, str | None]:
        return "", None


def request_text(tokenizer: Any | None, prompt_ids: Sequence[int], sampling: SamplingParams) -> RequestText | IdsOnly:
    """The output-text tracker of one request; without a tokenizer, stop strings cannot be honoured."""
    if tokenizer is None:
        if sampling.stop or sampling.stop_regex:
            raise ValueError("stop strings need a tokenizer (the server runs with --skip-tokenizer-init)")
        return IdsOnly()
    return RequestText.for_sampling(tokenizer, prompt_ids, sampling)
