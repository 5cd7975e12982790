"""`bench serve`: a running server over HTTP (SGLang-native `/generate` with input_ids, or the OpenAI
routes with text), streamed, at Poisson request rates and / or fixed concurrencies (each a sweep).

TTFT and ITL come from the SSE stream; token counts and cached_tokens from the server's final
meta_info (native) or `usage` (OpenAI, with stream_options.include_usage). The radix cache is flushed
(`POST /flush_cache`, where the server has it) before each point, so each starts cold.
`--launch-server` starts `python -m radixserve serve` itself, and again for each `--baseline` (without the radix
cache, speculative decoding or the host tier) unless `--baseline-url` names the baseline server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, get_args

import numpy as np

from radixserve.bench import report as rep
from radixserve.bench.datasets import Conversation, DatasetArgs, Turn, load_dataset, num_requests, tokenizer_and_vocab
from radixserve.bench.metrics import RequestResult, first_error
from radixserve.bench.server_process import ServerProcess
from radixserve.client.errors import StreamError
from radixserve.client.http import sse_events
from radixserve.config import RouterPolicy, ServerArgs

START_TIMEOUT_S = 900.0
STOP_TIMEOUT_S = 20.0
WARMUP_OUTPUT_LEN = 4
WEIGHT_DTYPES = {"bf16": {"dtype": "bfloat16", "quantization": "none"}, "gguf": {"quantization": "gguf"},
                 "int8": {"quantization": "int8"}, "fp8": {"quantization": "fp8"}}


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("serve")
    g.add_argument("--base-url", default="http://127.0.0.1:30000", help="the server (ignored with --launch-server)")
    g.add_argument("--backend", choices=("native", "openai", "openai-chat"), default="native",
                   help="native: POST /generate with input_ids; openai: /v1/completions; openai-chat: "
                        "/v1/chat/completions (both with text)")
    g.add_argument("--model", help="the OpenAI `model` (default: the first of GET /v1/models)")
    g.add_argument("--request-rate", type=float, nargs="+", default=[math.inf],
                   help="conversations per second, Poisson arrivals (inf: all at once); several: a sweep")
    g.add_argument("--max-concurrency", type=int, nargs="+", default=[None],
                   help="requests in flight at most (default: no limit); several: a sweep")
    g.add_argument("--launch-server", action="store_true",
                   help="start `radixserve serve` with the server flags given here, on a free port")
    g.add_argument("--baseline", choices=("no-radix", "no-spec", "no-hicache"), action="append", default=[],
                   help="no-radix: the same points against a server without the radix cache; no-spec: without "
                        "speculative decoding; no-hicache: without the host tier (--enable-hierarchical-cache)")
    g.add_argument("--baseline-url", help="the no-radix server (default with --launch-server: launch one)")
    g.add_argument("--router-policies", nargs="+", choices=get_args(RouterPolicy), default=[],
                   help="with --launch-server --dp-size N: one server per SGLang router policy, the runs side by "
                        "side (use a text backend: the router matches prefixes on text)")
    g.add_argument("--weight-dtypes", nargs="+", choices=tuple(WEIGHT_DTYPES), default=[],
                   help="with --launch-server: one server per weight format, the runs side by side: bf16 (a GGUF "
                        "file expanded: --dtype bfloat16 --quantization none), or --quantization gguf / int8 / fp8")


def run(ns: argparse.Namespace) -> int:
    args = ServerArgs.from_cli_args(ns)
    if ns.baseline and not (ns.launch_server or ns.baseline_url):
        raise SystemExit("--baseline needs --launch-server or --baseline-url")
    if ns.router_policies and not (ns.launch_server and args.dp_size > 1):
        raise SystemExit("--router-policies needs --launch-server and --dp-size > 1")
    if ns.weight_dtypes and not ns.launch_server:
        raise SystemExit("--weight-dtypes needs --launch-server")
    tokenizer, vocab_size = tokenizer_and_vocab(args)
    if ns.backend != "native" and tokenizer is None:
        raise SystemExit(f"--backend {ns.backend} sends text: it needs a tokenizer (not --skip-tokenizer-init)")
    convs = load_dataset(DatasetArgs.from_cli_args(ns), tokenizer, vocab_size)
    report = rep.new_report("serve", ns)
    targets = [(ns.label, None if ns.launch_server else ns.base_url, args, [])]
    if ns.router_policies:
        targets = [(policy, None, args, ["--router-policy", policy]) for policy in ns.router_policies]
    if ns.weight_dtypes:
        targets = [(w, None, args.replace(**WEIGHT_DTYPES[w]), []) for w in ns.weight_dtypes]
    baselines = {"no-radix": (args, ["--disable-radix-cache"]),
                 "no-spec": (args.replace(speculative_algorithm=None), []),
                 "no-hicache": (args.replace(enable_hierarchical_cache=False), [])}
    targets += [(name, ns.baseline_url, *baselines[name]) for name in ns.baseline]
    for label, url, server_args, extra in targets:
        with contextlib.nullcontext(url) if url else _server(server_args, extra) as base_url:
            report["runs"] += asyncio.run(_bench(base_url.rstrip("/"), label, convs, ns))
    rep.print_runs(report)
    rep.finish(report, ns)
    return int(any(r["metrics"]["failed"] for r in report["runs"]))


# ---------------------------------------------------------------- API flavours

@dataclass
class _Stream:
    """What one streamed response has delivered so far."""

    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    spec_verify_ct: int = 0


class _Native:
    """POST /generate with input_ids; each event carries the cumulative output and meta_info."""

    path = "/generate"

    def body(self, history: list[int], turn: Turn, model: str | None) -> tuple[dict, list[int]]:
        prompt = history + turn.input_ids
        return {"input_ids": prompt, "stream": True, "sampling_params": {
            "max_new_tokens": turn.output_len, "ignore_eos": True, "temperature": 0.0}}, prompt

    def on_event(self, ev: dict, st: _Stream) -> int:
        meta = ev.get("meta_info") or {}
        ids = ev.get("output_ids") or []
        n = meta.get("completion_tokens", st.output_tokens + len(ids))
        st.output_ids = ids if len(ids) == n else st.output_ids + ids  # cumulative, or incremental output_ids
        new, st.output_tokens = n - st.output_tokens, n
        st.prompt_tokens = meta.get("prompt_tokens", st.prompt_tokens)
        st.cached_tokens = meta.get("cached_tokens", st.cached_tokens)
        st.spec_verify_ct = meta.get("spec_verify_ct", st.spec_verify_ct)
        return new

    def next_history(self, prompt: list[int], st: _Stream) -> list[int]:
        return prompt + st.output_ids


class _OpenAI:
    """POST /v1/completions with a text prompt; one content chunk counts as one token until `usage` says."""

    path = "/v1/completions"

    def body(self, history: str, turn: Turn, model: str | None) -> tuple[dict, Any]:
        prompt = history + (turn.text or "")
        return self._common(model, turn) | {"prompt": prompt}, prompt

    @staticmethod
    def _common(model: str | None, turn: Turn) -> dict:
        return {"model": model, "max_tokens": turn.output_len, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}

    def on_event(self, ev: dict, st: _Stream) -> int:
        usage = ev.get("usage")
        if usage:
            st.prompt_tokens, st.output_tokens = usage["prompt_tokens"], usage["completion_tokens"]
            st.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        text = "".join(self._content(c) or "" for c in ev.get("choices") or [])
        st.text += text
        if text and not usage:
            st.output_tokens += 1
        return int(bool(text))

    @staticmethod
    def _content(choice: dict) -> str | None:
        return choice.get("text")

    def next_history(self, prompt: Any, st: _Stream) -> Any:
        return prompt + st.text


class _OpenAIChat(_OpenAI):
    """POST /v1/chat/completions: each turn is a user message; the history holds the assistant's answers."""

    path = "/v1/chat/completions"

    def body(self, history: list[dict], turn: Turn, model: str | None) -> tuple[dict, Any]:
        messages = history + [{"role": "user", "content": turn.text or ""}]
        return self._common(model, turn) | {"messages": messages}, messages

    @staticmethod
    def _content(choice: dict) -> str | None:
        return (choice.get("delta") or {}).get("content")

    def next_history(self, prompt: Any, st: _Stream) -> Any:
        return prompt + [{"role": "assistant", "content": st.text}]


APIS = {"native": (_Native, list), "openai": (_OpenAI, str), "openai-chat": (_OpenAIChat, list)}


# ---------------------------------------------------------------- the load

async def _bench(base_url: str, label: str, convs: list[Conversation], ns: argparse.Namespace) -> list[dict]:
    """Every (rate, concurrency) point against one server, the cache flushed before each."""
    import aiohttp

    api_cls, empty = APIS[ns.backend]
    api = api_cls()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else None
    async with aiohttp.ClientSession(base_url, timeout=timeout, headers=headers, read_bufsize=1 << 22,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        model = ns.model or (await _first_model(session) if ns.backend != "native" else None)
        first = convs[0][0]
        _, warm = await _request(session, api, empty(), dataclasses.replace(first, output_len=WARMUP_OUTPUT_LEN), model)
        if warm.error:
            raise SystemExit(f"{label}: the warm-up request to {base_url} failed: {warm.error}")
        runtime = None  # the workers' RuntimeInfo (dtypes), where the server is a radixserve
        with contextlib.suppress(aiohttp.ClientError, ValueError):
            async with session.get("/get_server_info") as resp:
                runtime = (await resp.json()).get("worker")
        runs = []
        for rate in ns.request_rate:
            for concurrency in ns.max_concurrency:
                with contextlib.suppress(aiohttp.ClientError):
                    await (await session.post("/flush_cache")).release()
                desc = f"{label} rate={rate} concurrency={concurrency}"
                busiest: dict[str, Any] = {}
                poll = asyncio.create_task(_poll_router_loads(session, busiest)) if ns.router_policies else None
                results, duration = await _run_point(session, api, empty, model, convs, rate, concurrency,
                                                     ns.seed, desc)
                if poll is not None:
                    poll.cancel()
                if first_error(results):
                    print(f"{desc}: {sum(r.error is not None for r in results)} failed, e.g. {first_error(results)}",
                          file=sys.stderr)
                runs.append(rep.record(label, results, duration, runtime, max_concurrency=concurrency,
                                       request_rate=None if math.isinf(rate) else rate))
                if busiest:
                    runs[-1]["router_loads"] = busiest["loads"]
    return runs


async def _poll_router_loads(session: Any, busiest: dict[str, Any]) -> None:
    """Poll the router's GET /get_loads (each worker's load, as the router last read it) every second until
    cancelled; `busiest["loads"]` keeps the answer whose loads add up highest."""
    while True:
        await asyncio.sleep(1.0)
        with contextlib.suppress(OSError, asyncio.TimeoutError, ValueError):
            async with session.get("/get_loads") as resp:
                loads = await resp.json(content_type=None) if resp.status == 200 else None
            total = _router_load_total(loads) if isinstance(loads, dict) else -1
            if total >= busiest.get("total", 0):
                busiest.update(loads=loads, total=total)


def _router_load_total(loads: dict[str, Any]) -> int:
    """Requests in flight over the workers of a /get_loads answer: smg's (SGLang's load report per worker and dp
    rank, `loads`) or sglang-router's (`workers`, a number each)."""
    return sum(int(w.get("num_total_reqs", 0)) for w in loads.get("loads", [])) + \
        sum(int(w.get("load", 0)) for w in loads.get("workers", []))


async def _first_model(session: Any) -> str:
    async with session.get("/v1/models") as resp:
        return (await resp.json())["data"][0]["id"]


async def _run_point(session: Any, api: Any, empty: type, model: str | None, convs: list[Conversation], rate: float,
                     concurrency: int | None, seed: int, desc: str) -> tuple[list[RequestResult], float]:
    """Conversations start at Poisson arrival times; their turns run one after another."""
    gate = asyncio.Semaphore(concurrency) if concurrency else contextlib.nullcontext()
    gaps = np.zeros(len(convs)) if math.isinf(rate) else np.random.default_rng(seed).exponential(1 / rate, len(convs))
    starts = np.cumsum(gaps) - gaps[0]
    progress = rep.progress(num_requests(convs), desc)
    results: list[RequestResult] = []

    async def conversation(conv: Conversation, start: float) -> None:
        await asyncio.sleep(start)
        history = empty()
        for index, turn in enumerate(conv):
            async with gate:
                history, result = await _request(session, api, history, turn, model)
            result.turn = index
            results.append(result)
            progress.update()
            if result.error:
                return

    t0 = time.perf_counter()
    await asyncio.gather(*(conversation(c, s) for c, s in zip(convs, starts, strict=True)))
    duration = time.perf_counter() - t0
    progress.close()
    return results, duration


async def _request(session: Any, api: Any, history: Any, turn: Turn, model: str | None) -> tuple[Any, RequestResult]:
    """One streamed request; returns the conversation with this turn and its answer, and the result."""
    body, prompt = api.body(history, turn, model)
    st, result = _Stream(), RequestResult(prompt_tokens=0)
    t0 = last = time.perf_counter()
    try:
        async with session.post(api.path, json=body) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return history, result
            async for event in sse_events(resp):
                new = api.on_event(event, st)
                if new > 0:
                    now = time.perf_counter()
                    if result.ttft is None:
                        result.ttft = now - t0
                    else:
                        result.itl += [(now - last) / new] * new
                    last = now
    except StreamError as e:
        result.error = str(e)[:300]
        return history, result
    except (OSError, asyncio.TimeoutError, ValueError) as e:  # aiohttp.ClientError is an OSError
        result.error = f"{type(e).__name__}: {e}"
        return history, result
    result.latency = time.perf_counter() - t0
    result.prompt_tokens, result.output_tokens, result.cached_tokens = st.prompt_tokens, st.output_tokens, \
        st.cached_tokens
    result.spec_verify_ct = st.spec_verify_ct
    return api.next_history(prompt, st), result


# ---------------------------------------------------------------- --launch-server

def server_flags(args: ServerArgs) -> list[str]:
    """`radixserve serve` flags for the fields of `args` that differ from the defaults (but host and port)."""
    default, flags = ServerArgs(), []
    for f in dataclasses.fields(ServerArgs):
        value = getattr(args, f.name)
        if f.name in ("host", "port") or value == getattr(default, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


@contextlib.contextmanager
def _server(args: ServerArgs, extra: list[str]) -> Iterator[str]:
    """`python -m radixserve serve` on a free port until the block ends; yields its base URL. Its log is
    removed when it stops cleanly."""
    server = ServerProcess([*server_flags(args), *extra], log_name="radixserve-bench")
    print("launching:", " ".join(server.cmd[1:]), file=sys.stderr)
    try:
        server.wait_ready(START_TIMEOUT_S)
        yield server.url
    finally:
        code = server.terminate(STOP_TIMEOUT_S)
    if code == 0:
        server.log_path.unlink()
