"""The gateway's cost per streamed token does not grow with the stream (deltas end to end)."""

from __future__ import annotations

import asyncio

import msgspec

from radixserve import wire
from radixserve.gateway import tokenizer_client
from radixserve.gateway.native import NativeFormat
from radixserve.gateway.openai_format import ChatFormat, StreamOptions
from radixserve.gateway.tokenizer_client import Generation

N_TOKENS = 4000
PIECE = "ab"


def _delta(k: int, logprobs: bool) -> wire.TextDelta:
    last = k == N_TOKENS - 1
    return wire.TextDelta(rid="r", text=PIECE, output_ids=[k], prompt_tokens=5, cached_tokens=0,
                          completion_tokens=k + 1,
                          finish=wire.FinishReason("length", length=N_TOKENS) if last else None,
                          output_logprobs=[(-0.5, k, PIECE)] if logprobs else None,
                          output_top_logprobs=[None] if logprobs else None)


class CountingSpy:
    """Counts the characters of text that the gateway's merging and accumulating touch."""

    def __init__(self, monkeypatch) -> None:
        self.chars = 0
        real_merge, real_add = tokenizer_client.merge, tokenizer_client.Output.add

        def merge(deltas):
            self.chars += sum(len(d.text) for d in deltas)
            return real_merge(deltas)

        def add(out, delta):
            self.chars += len(delta.text)
            return real_add(out, delta)

        monkeypatch.setattr(tokenizer_client, "merge", merge)
        monkeypatch.setattr(tokenizer_client.Output, "add", add)


async def _stream(fmt, logprobs: bool, slow_every: int = 1) -> tuple[list[int], str]:
    """Feed N_TOKENS one-token deltas; the consumer reads every `slow_every` deltas. Returns each
    event batch's encoded size and the streamed text."""
    req = wire.GenerateText(rid="r", text="hi", stream=True,
                            logprob=wire.LogprobRequest() if logprobs else None)
    gen = Generation([req], stream=True)
    updates = gen.updates()
    sizes, text = [], []
    for k in range(N_TOKENS):
        gen.update(0, _delta(k, logprobs))
        if (k + 1) % slow_every == 0 or k == N_TOKENS - 1:
            events = fmt.events(gen, await anext(updates))
            sizes.append(len(msgspec.json.encode(events)))
            text += [c.delta.content or "" for e in events for c in e.choices]
    assert await anext(updates, None) is None
    return sizes, "".join(text)


def test_openai_stream_touches_each_token_once(monkeypatch) -> None:
    spy = CountingSpy(monkeypatch)
    fmt = ChatFormat("r", "m", 1, 1, StreamOptions(include_usage=True))
    sizes, text = asyncio.run(_stream(fmt, logprobs=True))
    assert text == PIECE * N_TOKENS
    assert spy.chars <= len(PIECE) * N_TOKENS  # each delta merged at most once, never the text so far
    assert max(sizes) < 400  # an event holds its own token, not the stream so far


def test_slow_consumer_gets_merged_deltas_linearly(monkeypatch) -> None:
    spy = CountingSpy(monkeypatch)
    fmt = ChatFormat("r", "m", 1, 1, None)
    sizes, text = asyncio.run(_stream(fmt, logprobs=False, slow_every=7))
    assert text == PIECE * N_TOKENS
    assert spy.chars <= 2 * len(PIECE) * N_TOKENS  # merge() counts its deltas, and again as it adds them
    assert max(sizes) < 600


def test_native_stream_keeps_the_whole_output_once(monkeypatch) -> None:
    """SGLang's native stream repeats the output so far in each event; the accumulation itself stays O(n)."""
    spy = CountingSpy(monkeypatch)
    req = wire.GenerateText(rid="r", text="hi", stream=True)
    gen = Generation([req], stream=True)
    fmt = NativeFormat(single=True, num_choices=1)

    async def run() -> dict:
        updates = gen.updates()
        event = None
        for k in range(N_TOKENS):
            gen.update(0, _delta(k, False))
            event = fmt.events(gen, await anext(updates))[0]
        return event

    last = asyncio.run(run())
    assert last["text"] == PIECE * N_TOKENS and last["output_ids"] == list(range(N_TOKENS))
    assert spy.chars <= 2 * len(PIECE) * N_TOKENS  # merged once, accumulated once
