"""ServerArgs: the one typed configuration object, with SGLang's flag names."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

SchedulePolicy = Literal["lpm", "fcfs"]
LoadFormat = Literal["auto", "safetensors", "gguf", "dummy"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
AttentionBackendName = Literal["auto", "torch", "flashinfer"]
GrammarBackend = Literal["xgrammar", "none"]
RouterPolicy = Literal["cache_aware", "round_robin", "power_of_two", "random"]


@dataclass
class ServerArgs:
    """Every knob of a radixserve server or engine; `--flag-name` is the field name with dashes."""

    model_path: str | None = field(default=None, metadata={
        "help": "HF directory, a .gguf file, or None for the embedded SmolLM2-135M-Instruct"})
    tokenizer_path: str | None = field(default=None, metadata={"help": "defaults to the model path"})
    download_dir: str | None = field(default=None, metadata={
        "help": "Hugging Face cache directory for model ids (default: $HF_HUB_CACHE)"})
    skip_tokenizer_init: bool = field(default=False, metadata={
        "help": "no tokenizer: requests give input_ids, outputs carry ids only"})
    served_model_name: str | None = field(default=None, metadata={"help": "name reported by /v1/models"})
    load_format: LoadFormat = "auto"
    dtype: Dtype = "auto"
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto"})
    tp_size: int = field(default=1, metadata={"help": "tensor-parallel ranks over all nodes"})
    ep_size: int = field(default=1, metadata={
        "help": "expert-parallel ranks: MoE experts go whole to --ep-size groups of the --tp-size ranks (divides it; "
                "1: every rank holds a slice of every expert)"})
    nnodes: int = field(default=1, metadata={"help": "nodes that share the --tp-size ranks (docs/deploy.md)"})
    node_rank: int = field(default=0, metadata={
        "help": "this node's index; node 0 serves HTTP, the others run workers only"})
    dist_init_addr: str | None = field(default=None, metadata={
        "help": "HOST:PORT of node 0 where the nodes meet (with --nnodes > 1): PORT torch.distributed, PORT+1 the "
                "nodes' heartbeat link, PORT+2+r rank r's step batches"})
    base_gpu_id: int = field(default=0, metadata={"help": "first CUDA device of this server's ranks on a node"})
    dp_size: int = field(default=1, metadata={"help": "data-parallel replicas behind SGLang's router on --port"})
    router_policy: RouterPolicy = field(default="cache_aware", metadata={
        "help": "the router's policy (with --dp-size > 1)"})
    router_dp_worker_base_port: int | None = field(default=None, metadata={
        "help": "replica i listens on this port + i (default: free ports), on 127.0.0.1"})
    host: str = "127.0.0.1"
    port: int = 30000
    mem_fraction_static: float = field(default=0.85, metadata={
        "help": "fraction of device memory for weights + KV cache"})
    max_total_tokens: int | None = field(default=None, metadata={
        "help": "KV pool size in tokens (overrides mem-fraction-static)"})
    context_length: int | None = field(default=None, metadata={
        "help": "max prompt + output tokens; defaults to the model's"})
    max_running_requests: int = 256
    max_queued_requests: int = 4096
    chunked_prefill_size: int = 2048
    max_prefill_tokens: int = 16384
    schedule_policy: SchedulePolicy = "lpm"
    disable_radix_cache: bool = False
    new_token_ratio: float = field(default=0.5, metadata={
        "help": "fraction of max_new_tokens reserved in KV at admission"})
    attention_backend: AttentionBackendName = "auto"
    cuda_graph_max_bs: int = 256
    disable_cuda_graph: bool = False
    disable_custom_all_reduce: bool = field(default=False, metadata={
        "help": "all-reduce through NCCL only (default: small ones, as in decode, through symmetric memory when "
                "the --tp-size ranks share one host)"})
    disable_overlap_schedule: bool = field(default=False, metadata={
        "help": "build each step only after the previous one's tokens are back (no overlap of scheduling and compute)"})
    disable_cascade_attention: bool = field(default=False, metadata={
        "help": "decode without a separate attention pass over prefixes that requests share (FlashInfer)"})
    grammar_backend: GrammarBackend = field(default="xgrammar", metadata={
        "help": "structured output (json_schema, regex, ebnf, response_format, enforced tool calls); none: a 400"})
    constrained_json_disable_any_whitespace: bool = field(default=False, metadata={
        "help": "JSON schemas allow no whitespace between tokens (compact JSON; small models may else run on)"})
    constrained_json_max_whitespace_cnt: int | None = field(default=None, metadata={
        "help": "JSON schemas allow at most this many whitespace characters in a row"})
    random_seed: int = 0
    api_key: str | None = field(default=None, metadata={
        "help": "require 'Authorization: Bearer KEY' (default: $RADIXSERVE_API_KEY)"})
    log_level: str = "info"
    tokenizer_worker_num: int = 1
    max_request_bytes: int = 4 * 1024 * 1024
    request_body_timeout: float = field(default=60.0, metadata={
        "help": "seconds a request's body may take to arrive (a 408 after that: a slow client holds no connection)"})
    session_kv_budget: int = field(default=65536, metadata={
        "help": "KV tokens that open sessions may pin in the cache"})
    max_sessions: int = 1024
    watchdog_timeout: float = field(default=300.0, metadata={
        "help": "seconds a forward step may take before the server is declared hung"})
    enable_invariant_checks: bool = field(default=False, metadata={
        "help": "check the scheduler's KV invariants whenever it goes idle (debug; O(cache size))"})
    shutdown_timeout: float = field(default=30.0, metadata={
        "help": "on SIGTERM, seconds that requests in flight may take to finish before they are aborted "
                "(a second SIGTERM, or SIGINT, stops at once)"})
    disable_metrics: bool = field(default=False, metadata={"help": "no Prometheus /metrics route"})
    metrics_public: bool = field(default=False, metadata={"help": "serve /metrics without --api-key's token"})

    def __post_init__(self) -> None:
        if self.tp_size < 1:
            raise ValueError("tp_size must be >= 1")
        if self.ep_size < 1 or self.tp_size % self.ep_size:
            raise ValueError(f"ep_size ({self.ep_size}) must be >= 1 and divide tp_size ({self.tp_size})")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes or self.tp_size % self.nnodes:
            raise ValueError("nnodes must be >= 1 and divide tp_size, and 0 <= node_rank < nnodes")
        if self.nnodes > 1 and not _is_host_port(self.dist_init_addr):
            raise ValueError("--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address)")
        if self.dp_size < 1 or (self.dp_size > 1 and self.nnodes > 1):
            raise ValueError("dp_size must be >= 1, and --dp-size > 1 runs on one node (README: the router over "
                             "several multi-node servers)")
        if not 0.0 < self.mem_fraction_static <= 1.0:
            raise ValueError("mem_fraction_static must be in (0, 1]")
        if self.chunked_prefill_size < 1 or self.max_running_requests < 1:
            raise ValueError("chunked_prefill_size and max_running_requests must be >= 1")
        if self.schedule_policy not in get_args(SchedulePolicy):
            raise ValueError(f"schedule_policy must be one of {get_args(SchedulePolicy)}")
        if not self.shutdown_timeout >= 0:
            raise ValueError("shutdown_timeout must be >= 0")
        if not self.request_body_timeout > 0:
            raise ValueError("request_body_timeout must be > 0")

    def replace(self, **changes: Any) -> ServerArgs:
        return dataclasses.replace(self, **changes)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """Add one `--flag-name` per field, typed from the annotation."""
        hints = {f.name: f for f in dataclasses.fields(ServerArgs)}
        for name, f in hints.items():
            flag = "--" + name.replace("_", "-")
            kind = _annotation(f.type)
            help_text = f.metadata.get("help", "")
            if kind is bool:
                parser.add_argument(flag, action="store_true", default=f.default, help=help_text)
            elif get_origin(kind) is Literal:
                parser.add_argument(flag, choices=get_args(kind), default=f.default, help=help_text)
            else:
                parser.add_argument(flag, type=kind, default=f.default, help=help_text)

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> ServerArgs:
        values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}
        # A key from the environment stays out of `ps` output.
        values["api_key"] = values["api_key"] or os.environ.get("RADIXSERVE_API_KEY") or None
        return cls(**values)


def _annotation(type_str: Any) -> Any:
    """Resolve a field's string annotation to a concrete type for argparse."""
    resolved = eval(type_str, globals()) if isinstance(type_str, str) else type_str  # noqa: S307 (our own annotations)
    args = [a for a in get_args(resolved) if a is not type(None)]
    if get_origin(resolved) is Literal:
        return resolved
    if args and len(args) == 1 and get_origin(resolved) is not Literal:
        return args[0]
    return resolved


def _is_host_port(addr: str | None) -> bool:
    host, _, port = (addr or "").rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65535 - 64
