"""ServerArgs: the one typed configuration object, with SGLang's flag names.

Each field declares its type, its bounds or choices and its help once, in its annotation (msgspec.Meta). That
declaration builds the command line (`add_cli_args`: a value out of bounds or choices is argparse's usage error
naming the flag, before anything loads) and checks every ServerArgs however it is made (`__post_init__`: by
keyword, as the Engine makes it, from the command line, or decoded from the JSON each child process gets).
`msgspec.json.schema(ServerArgs)` describes it all.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgspec
from msgspec import Meta

from radixserve.kv_events import KVEventsConfig

SchedulePolicy = Literal["lpm", "fcfs"]
LoadFormat = Literal["auto", "safetensors", "gguf", "dummy"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
Quantization = Literal["none", "fp8", "int8", "gguf"]
AttentionBackendName = Literal["auto", "torch", "flashinfer"]
GrammarBackend = Literal["xgrammar", "none"]
WritePolicy = Literal["write_through", "write_through_selective", "write_back"]
RouterPolicy = Literal["cache_aware", "round_robin", "power_of_two", "random"]
RouterPackage = Literal["sglang-router", "smg"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
SpeculativeAlgorithm = Literal["NGRAM", "STANDALONE", "EAGLE3", "REPLAY"]
KVCacheDtype = Literal["auto", "fp8_e4m3"]
RequestLogLevel = Annotated[int, Meta(ge=0, le=3)]
ToolCallParserName = Literal["qwen", "qwen25", "llama3"]  # tokenizer_proc/chat_tools.py
ReasoningParserName = Literal["qwen3", "qwen3-thinking", "deepseek-r1"]  # radixserve/gateway/reasoning.py

# The bounds, named for what they mean.
Port = Annotated[int, Meta(ge=1, le=65535)]
Count = Annotated[int, Meta(ge=1)]  # a size or number of things: at least one
Index = Annotated[int, Meta(ge=0)]  # an index, a seed, or a limit where 0 allows none
Fraction = Annotated[float, Meta(gt=0, le=1)]
Ratio = Annotated[float, Meta(ge=0, le=1)]
Seconds = Annotated[float, Meta(gt=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]
GraceSeconds = Annotated[float, Meta(ge=0)]  # 0: no grace at all


def doc(text: str) -> Meta:
    """A field's help: its flag's line in --help, and its description in msgspec.json.schema(ServerArgs)."""
    return Meta(description=text)


DEFAULT_NUM_DRAFT_TOKENS = 8  # --speculative-num-draft-tokens, unless --speculative-num-steps sets it


class FlagError(ValueError):
    """A value or a combination of values that ServerArgs does not take; the message names the flags."""


@dataclass
class ServerArgs:
    """Every knob of a radixserve server or engine; `--flag-name` is the field name with dashes."""

    model_path: Annotated[str | None, doc(
        "HF directory, a .gguf file, a model id, or none for the embedded SmolLM2-135M-Instruct")] = None
    revision: Annotated[str | None, doc(
        "with a Hugging Face model id: the branch, tag or commit to serve (default: main)")] = None
    tokenizer_path: Annotated[str | None, doc("defaults to the model path")] = None
    chat_template: Annotated[str | None, doc(
        "a Jinja chat template file (Hugging Face's format) used instead of the tokenizer's own (SGLang's flag; its "
        "built-in template names are not read)")] = None
    reasoning_parser: Annotated[ReasoningParserName | None, doc(
        "chat answers of a reasoning model carry the text between <think> and </think> as reasoning_content "
        "(SGLang's parsers: qwen3, the output may open the block; qwen3-thinking and deepseek-r1, the prompt "
        "opened it); a request's separate_reasoning: false keeps it in the content")] = None
    tool_call_parser: Annotated[ToolCallParserName | None, doc(
        "how the model writes tool calls (SGLang's parsers): qwen / qwen25, <tool_call> blocks of JSON among text; "
        "llama3, one JSON answer (after <|python_tag|> or not). Default: read from the chat template")] = None
    trust_remote_code: Annotated[bool, doc(
        "load a tokenizer that ships its own Python code (Hugging Face's trust_remote_code; model code is always "
        "radixserve's)")] = False
    download_dir: Annotated[str | None, doc(
        "Hugging Face cache directory for model ids (default: $HF_HUB_CACHE)")] = None
    skip_tokenizer_init: Annotated[bool, doc(
        "no tokenizer: requests give input_ids, outputs carry ids only")] = False
    served_model_name: Annotated[str | None, doc("name reported by /v1/models")] = None
    load_format: Annotated[LoadFormat, doc(
        "weights: by the files found (auto), or random ones from config.json (dummy)")] = "auto"
    dtype: Annotated[Dtype, doc("compute dtype (auto: bfloat16 where the device has it natively)")] = "auto"
    device: Annotated[Device, doc("where the workers compute (auto: cuda if there is a GPU)")] = "auto"
    quantization: Annotated[Quantization | None, doc(
        "quantized linear layers: fp8 (CUDA GPUs with FP8 tensor cores: e4m3, per-channel scales), int8 (CPU: a "
        "float checkpoint quantized at load, per output channel), gguf (CPU: a GGUF file's Q8_0 / Q4_0 / Q4_1 "
        "blocks kept as they are), none (no quantized layers: a GGUF file expanded to --dtype). Default: gguf for "
        "a GGUF file where the CPU's kernels run it, outside --enable-deterministic-inference, else none (the log "
        "says which and why); an FP8 checkpoint's quantization_config is read without it "
        "(docs/quantization.md)")] = None
    kv_cache_dtype: Annotated[KVCacheDtype, doc(
        "KV cache dtype: auto (the model's) or fp8_e4m3 (half the bytes per token; the checkpoint's per-layer "
        "k/v scales, else 1.0)")] = "auto"
    tp_size: Annotated[Count, doc("tensor-parallel ranks over all nodes")] = 1
    ep_size: Annotated[Count, doc(
        "expert parallelism: MoE experts are placed whole on this many groups of the TP ranks (it divides the TP "
        "size; 1: every rank holds a slice of every expert)")] = 1
    nnodes: Annotated[Count, doc("nodes that share the --tp-size ranks (docs/deploy.md)")] = 1
    node_rank: Annotated[Index, doc("this node's index; node 0 serves HTTP, the others run workers only")] = 0
    dist_init_addr: Annotated[str | None, doc(
        "HOST:PORT of node 0 where the nodes meet (with --nnodes > 1): PORT torch.distributed, PORT+1 the "
        "nodes' heartbeat link, PORT+2+r rank r's step batches")] = None
    base_gpu_id: Annotated[Index, doc("first CUDA device of this server's ranks on a node")] = 0
    dp_size: Annotated[Count, doc("data-parallel replicas behind SGLang's router on --port")] = 1
    router_policy: Annotated[RouterPolicy, doc("the router's policy (with --dp-size > 1)")] = "cache_aware"
    router_package: Annotated[RouterPackage, doc(
        "the router in front of --dp-size replicas: SGLang's router (PyPI sglang-router) or its successor, the "
        "model gateway (PyPI smg)")] = "sglang-router"
    router_balance_abs_threshold: Annotated[Index | None, doc(
        "with --dp-size: the router's load-imbalance threshold (its --balance-abs-threshold; default: the "
        "router's): past it, cache_aware sends a request to the least loaded replica instead of the one holding "
        "its prefix")] = None
    router_dp_worker_base_port: Annotated[Port | None, doc(
        "replica i listens on this port + i (default: free ports), on 127.0.0.1")] = None
    host: Annotated[str, doc("the address HTTP listens on")] = "127.0.0.1"
    port: Annotated[Port, doc("the HTTP port")] = 30000
    mem_fraction_static: Annotated[Fraction, doc("fraction of device memory for weights + KV cache")] = 0.85
    max_total_tokens: Annotated[Count | None, doc("KV pool size in tokens (overrides mem-fraction-static)")] = None
    context_length: Annotated[Count | None, doc("max prompt + output tokens; defaults to the model's")] = None
    max_running_requests: Annotated[Count, doc("requests decoding at once")] = 256
    max_queued_requests: Annotated[Count, doc("requests waiting at most; past that a 503")] = 4096
    chunked_prefill_size: Annotated[Count, doc("prompt tokens computed per step at most (longer: in chunks)")] = 2048
    max_prefill_tokens: Annotated[Count, doc("prompt tokens of one prefill step at most")] = 16384
    schedule_policy: Annotated[SchedulePolicy, doc(
        "waiting order: longest cached prefix first (lpm) or arrival (fcfs)")] = "lpm"
    disable_radix_cache: Annotated[bool, doc("no prefix caching: every prompt is computed in full")] = False
    new_token_ratio: Annotated[Ratio, doc("fraction of max_new_tokens reserved in KV at admission")] = 0.5
    attention_backend: Annotated[AttentionBackendName, doc(
        "auto: flashinfer on CUDA, torch elsewhere")] = "auto"
    cuda_graph_max_bs: Annotated[Count, doc("largest decode batch run through a CUDA graph")] = 256
    disable_cuda_graph: Annotated[bool, doc("decode without CUDA graphs")] = False
    disable_custom_all_reduce: Annotated[bool, doc(
        "all-reduce through NCCL only (default: small ones, as in decode, through symmetric memory when the "
        "--tp-size ranks share one host)")] = False
    disable_overlap_schedule: Annotated[bool, doc(
        "build each step only after the previous one's tokens are back (no overlap of scheduling and compute)")] = False
    disable_cascade_attention: Annotated[bool, doc(
        "decode without a separate attention pass over prefixes that requests share (FlashInfer)")] = False
    enable_deterministic_inference: Annotated[bool, doc(
        "batch-invariant kernels: a request's tokens do not depend on the batch, the radix cache or prefill chunks "
        "(docs/gpu.md; needs --tp-size 1)")] = False
    grammar_backend: Annotated[GrammarBackend, doc(
        "structured output (json_schema, regex, ebnf, response_format, enforced tool calls); none: a 400")] = "xgrammar"
    constrained_json_disable_any_whitespace: Annotated[bool, doc(
        "JSON schemas allow no whitespace between tokens (compact JSON; small models may else run on)")] = False
    constrained_json_max_whitespace_cnt: Annotated[Index | None, doc(
        "JSON schemas allow at most this many whitespace characters in a row")] = None
    random_seed: Annotated[Index, doc("seed of sampling without a per-request seed, and of dummy weights")] = 0
    api_key: Annotated[str | None, doc("require 'Authorization: Bearer KEY' (default: $RADIXSERVE_API_KEY)")] = None
    log_level: Annotated[LogLevel, doc("of every process")] = "info"
    log_requests: Annotated[bool, doc(
        "log a line as each request arrives and as it ends (its tokenizer's log, radixserve.requests)")] = False
    log_requests_level: Annotated[RequestLogLevel, doc(
        "with --log-requests: 0 ids, sizes, finish and time; 1 also the sampling parameters; 2 also the prompt and "
        "output text, each cut to 2,048 characters; 3 the whole texts (SGLang's levels)")] = 2
    tokenizer_worker_num: Annotated[Count, doc("tokenizer processes")] = 1
    max_request_bytes: Annotated[Count, doc("largest request body (a 413 past it)")] = 4 * 1024 * 1024
    stream_interval: Annotated[Count, doc(
        "output tokens per chunk of a stream, unless its request's sampling_params.stream_interval says (larger: "
        "fewer messages per token, coarser streams)")] = 1
    request_body_timeout: Annotated[Seconds, doc(
        "seconds a request's body may take to arrive (a 408 after that: a slow client holds no connection)")] = 60.0
    session_kv_budget: Annotated[Index, doc("KV tokens that open sessions may pin in the cache")] = 65536
    max_sessions: Annotated[Index, doc("open sessions at most (a 429 past it)")] = 1024
    watchdog_timeout: Annotated[Seconds, doc(
        "seconds a forward step may take before the server is declared hung")] = 300.0
    enable_invariant_checks: Annotated[bool, doc(
        "check the scheduler's KV invariants whenever it goes idle (debug; O(cache size))")] = False
    shutdown_timeout: Annotated[GraceSeconds, doc(
        "on SIGTERM, seconds that requests in flight may take to finish before they are aborted (a second "
        "SIGTERM, or SIGINT, stops at once)")] = 30.0
    disable_metrics: Annotated[bool, doc("no Prometheus /metrics route")] = False
    enable_metrics: Annotated[bool, doc(
        "SGLang's switch for /metrics, which is served unless --disable-metrics: accepted, so that SGLang command "
        "lines run unchanged")] = False
    speculative_algorithm: Annotated[SpeculativeAlgorithm | None, doc(
        "speculative decoding: NGRAM drafts from the request's own prompt and output (no draft model); "
        "STANDALONE from a small draft model of the same vocabulary, EAGLE3 from an EAGLE-3 draft head (both named "
        "by the draft model path); REPLAY (benchmarks only) replays recorded outputs (the replay path); each decode "
        "step verifies the drafts in one forward, exactly (docs/architecture.md)")] = None
    speculative_draft_model_path: Annotated[str | None, doc(
        "STANDALONE: the draft model (a directory of the same kinds --model-path takes; same vocabulary); "
        "EAGLE3: the draft head's directory (config.json and safetensors in the public EAGLE-3 layout)")] = None
    speculative_draft_load_format: Annotated[LoadFormat | None, doc(
        "STANDALONE / EAGLE3: how the draft's weights load (default: --load-format)")] = None
    speculative_replay_path: Annotated[str | None, doc(
        "REPLAY (benchmarks only): a JSON list of token-id lists, each a prompt followed by the output that a "
        "first run gave it; a request whose prompt starts one drafts what followed (a draft that is always right "
        "for greedy requests)")] = None
    speculative_num_draft_tokens: Annotated[Count, doc(
        "tokens a verify step computes per request: the last one and up to this many - 1 drafted after it "
        "(with --speculative-num-steps: that + 1)")] = DEFAULT_NUM_DRAFT_TOKENS
    speculative_num_steps: Annotated[Count | None, doc(
        "SGLang's name for the depth of a chain of drafts: with it a verify step computes the last token and this "
        "many drafts (--speculative-num-draft-tokens is this + 1, as SGLang sets it for --speculative-eagle-topk 1)"
        )] = None
    speculative_eagle_topk: Annotated[Count, doc(
        "drafts branching from each draft (SGLang's name): 1, a chain (tree drafts are not built)")] = 1
    speculative_ngram_min_match_window_size: Annotated[Count, doc(
        "NGRAM: the shortest suffix of the request's tokens that must match earlier tokens to draft")] = 1
    speculative_ngram_max_match_window_size: Annotated[Count, doc(
        "NGRAM: the longest suffix matched (the longest match wins, the most recent among equals)")] = 12
    speculative_batch_size_threshold: Annotated[Index, doc(
        "above this many decoding requests a step is plain decode, which the drafter does not compute (speculation "
        "pays at small batches)")] = 8
    metrics_public: Annotated[bool, doc("serve /metrics without --api-key's token")] = False
    enable_hierarchical_cache: Annotated[bool, doc(
        "keep KV evicted from the device pool in a pool in host memory and move it back when a prompt reaches it "
        "(docs/kv_cache.md)")] = False
    hicache_ratio: Annotated[PositiveFloat, doc(
        "the host pool's size in device pools (when no size in GB is given)")] = 2.0
    hicache_size: Annotated[Index, doc("the host pool's size in GB per rank (0: by the ratio)")] = 0
    hicache_write_policy: Annotated[WritePolicy, doc(
        "when KV is copied to the host pool: write_through, as it is cached; write_through_selective, once two "
        "requests used it; write_back, as it leaves the device pool (docs/kv_cache.md)")] = "write_through"
    kv_events_config: Annotated[str | None, doc(
        "publish KV cache events over ZeroMQ for routers: vLLM's / SGLang's JSON, e.g. '{\"publisher\": \"zmq\", "
        "\"endpoint\": \"tcp://*:5557\", \"replay_endpoint\": \"tcp://*:5558\", \"topic\": \"\", "
        "\"buffer_steps\": 10000, \"hwm\": 100000, \"block_size\": 16}' (docs/kv_cache.md)")] = None

    def __post_init__(self) -> None:
        """Every field against its declaration, then the flags that depend on each other."""
        for name, hint in _field_types().items():
            value = getattr(self, name)
            try:
                msgspec.convert(value, hint)
            except msgspec.ValidationError as e:
                raise FlagError(f"{_flag(name)} {value!r}: {e}") from None
        if self.tp_size % self.nnodes or self.node_rank >= self.nnodes:
            raise FlagError("--nnodes must divide --tp-size, and --node-rank must be below --nnodes")
        if self.tp_size % self.ep_size:
            raise FlagError("--ep-size must divide --tp-size (SGLang's rule: experts split over ep groups of ranks)")
        if self.nnodes > 1 and not _is_host_port(self.dist_init_addr):
            raise FlagError("--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address)")
        if self.enable_deterministic_inference and self.tp_size > 1:
            raise FlagError("--enable-deterministic-inference needs --tp-size 1 (the all-reduce's order is not fixed)")
        if self.quantization == "fp8" and self.device == "cpu":
            raise FlagError("--quantization fp8 runs on CUDA GPUs with FP8 tensor cores; the CPU's are int8 and gguf")
        if self.quantization == "fp8" and self.enable_deterministic_inference:
            raise FlagError("--quantization fp8: --enable-deterministic-inference covers no FP8 weights yet")
        if self.quantization in ("int8", "gguf") and self.device == "cuda":
            raise FlagError(f"--quantization {self.quantization} runs on the CPU; on CUDA GPUs use fp8")
        if self.dp_size > 1 and self.nnodes > 1:
            raise FlagError("--dp-size > 1 runs on one node (README: the router over several multi-node servers)")
        if self.speculative_eagle_topk != 1:
            raise FlagError(f"--speculative-eagle-topk {self.speculative_eagle_topk}: only 1 is supported (a chain "
                            "of drafts; tree drafts are not built)")
        if self.speculative_num_steps is not None:
            chain = self.speculative_num_steps + 1
            if self.speculative_num_draft_tokens not in (chain, DEFAULT_NUM_DRAFT_TOKENS):
                raise FlagError(f"--speculative-num-draft-tokens {self.speculative_num_draft_tokens} with "
                                f"--speculative-num-steps {self.speculative_num_steps}: a chain of that many drafts "
                                f"verifies {chain} tokens (give one of the two, or {chain})")
            self.speculative_num_draft_tokens = chain
        if self.speculative_algorithm is not None and self.speculative_num_draft_tokens < 2:
            raise FlagError("--speculative-num-draft-tokens must be at least 2 (the last token and one draft)")
        if (self.speculative_algorithm in ("STANDALONE", "EAGLE3")) != (self.speculative_draft_model_path is not None):
            raise FlagError("--speculative-draft-model-path goes with --speculative-algorithm STANDALONE or EAGLE3 "
                            "(and they need one)")
        if (self.speculative_algorithm == "REPLAY") != (self.speculative_replay_path is not None):
            raise FlagError("--speculative-replay-path goes with --speculative-algorithm REPLAY (and it needs one)")
        if self.speculative_ngram_min_match_window_size > self.speculative_ngram_max_match_window_size:
            raise FlagError("--speculative-ngram-min-match-window-size must not exceed "
                            "--speculative-ngram-max-match-window-size")
        if self.router_dp_worker_base_port is not None and self.router_dp_worker_base_port + self.dp_size > 65536:
            raise FlagError("--router-dp-worker-base-port + --dp-size - 1 must be a port (<= 65535)")
        if self.enable_hierarchical_cache and self.disable_radix_cache:
            raise FlagError("--enable-hierarchical-cache needs the radix cache (not --disable-radix-cache)")
        if self.enable_metrics and self.disable_metrics:
            raise FlagError("--enable-metrics and --disable-metrics: give one")
        if self.chat_template is not None:
            _check_chat_template(self.chat_template)
        if self.kv_events_config is not None:
            try:
                KVEventsConfig.parse(self.kv_events_config)
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                raise FlagError(f"--kv-events-config: {e}") from None

    def replace(self, **changes: Any) -> ServerArgs:
        return dataclasses.replace(self, **changes)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """One `--flag-name` per field, with the field's help, choices and checks."""
        for f in dataclasses.fields(ServerArgs):
            hint = _field_types()[f.name]
            kind = _value_type(hint)
            common = {"default": f.default, "help": " ".join(m.description for m in _metas(hint) if m.description)}
            if kind is bool:
                parser.add_argument(_flag(f.name), action="store_true", **common)
            elif get_origin(kind) is Literal:
                parser.add_argument(_flag(f.name), choices=get_args(kind), **common)
            else:
                parser.add_argument(_flag(f.name), type=_cli_parser(hint), **common)

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> ServerArgs:
        """FlagError for flags that do not go together (each value alone was checked by the parser)."""
        values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}
        # A key from the environment stays out of `ps` output.
        values["api_key"] = values["api_key"] or os.environ.get("RADIXSERVE_API_KEY") or None
        return cls(**values)


@functools.cache
def _field_types() -> dict[str, Any]:
    """Each field's declared type, its Meta included (the annotations are strings until resolved here)."""
    return typing.get_type_hints(ServerArgs, include_extras=True)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _metas(hint: Any) -> list[Meta]:
    return [m for m in get_args(hint)[1:] if isinstance(m, Meta)] if get_origin(hint) is Annotated else []


def _value_type(hint: Any) -> Any:
    """The type a flag's value has: without Meta, and without None (the default of an optional flag)."""
    if get_origin(hint) is Annotated:
        return _value_type(get_args(hint)[0])
    if get_origin(hint) in (Union, types.UnionType):  # `X | None`
        (inner,) = [a for a in get_args(hint) if a is not type(None)]
        return _value_type(inner)
    return hint


def _cli_parser(hint: Any) -> Any:
    """argparse's `type` for a flag: the text converted and checked against the field's declaration."""
    def parse(text: str) -> Any:
        try:
            return msgspec.convert(text, hint, strict=False)  # strict=False: numbers from their text
        except msgspec.ValidationError as e:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: {e}") from None

    return parse


def _check_chat_template(path: str) -> None:
    """FlagError unless `path` is a readable file that transformers compiles as a chat template (its environment:
    loop controls, the `generation` tag; a plain jinja2 parse refuses templates that work)."""
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(Path(path).read_text())
    except OSError as e:
        raise FlagError(f"--chat-template {path}: {e.strerror} (a Jinja template file; SGLang's built-in template "
                        "names are not read)") from None
    except (jinja2.TemplateSyntaxError, UnicodeDecodeError) as e:
        raise FlagError(f"--chat-template {path}: not a Jinja template: {e}") from None


def _is_host_port(addr: str | None) -> bool:
    host, _, port = (addr or "").rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65535 - 64
