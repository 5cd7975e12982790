"""`bench one-batch`: prefill and decode latency of a static batch through the Engine, beside the physical floor.

Prefill is a generate of one token (the whole batch in one step: the prefill budget is raised to fit it);
decode is (time of `output_len` tokens - prefill) / (output_len - 1). The radix cache is off so every run
computes its prompts. The floor of a step is max(bytes read / device bandwidth, FLOPs / matmul rate), from
the copy bandwidth and dense matmul rate measured here on the Engine's device; on a CPU there is none.
A mixture-of-experts model's step reads, of its routed experts, only those its tokens choose: with n tokens
each choosing top_k of E experts at random (as dummy weights route), E * (1 - (1 - top_k / E)^n) per layer
are expected; its FLOPs count top_k experts per token.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from radixserve.bench import report as rep
from radixserve.bench.datasets import tokenizer_and_vocab
from radixserve.config import ServerArgs

if TYPE_CHECKING:
    from radixserve import Engine

COPY_BYTES = 1 << 30
MATMUL_N = 8192
REPEATS = 10


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("one-batch")
    g.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    g.add_argument("--input-len", type=int, nargs="+", default=[256])
    g.add_argument("--output-len", type=int, default=32)
    g.add_argument("--runs", type=int, default=3, help="timed repetitions of each point (the median is kept)")


@dataclass
class ModelShape:
    """What the floor needs: parameter and byte counts, attention width, KV bytes per token (whole model)."""

    layers: int
    attn_width: int  # query heads x head_dim
    vocab_params: int  # one vocab x hidden matrix
    body_params: int  # all but the embedding and the LM head
    elem_bytes: int  # of the embedding and LM head (the model's dtype)
    kv_bytes_per_token: int
    body_elem_bytes: float  # bytes per body weight as stored: 2 for bf16, ~1 for FP8 (with its scales), ~0.6 for Q4_1
    expert_params: int = 0  # the routed experts' parameters, all layers (part of body_params)
    num_experts: int = 0  # routed experts per MoE layer
    top_k: int = 0  # experts each token goes through

    @classmethod
    def of(cls, hf_config: Any, worker_info: dict) -> ModelShape:
        """From the worker's facts: its parameter count and their bytes as stored (quantized forms included; the
        embedding and LM head counted at the model's dtype)."""
        import torch

        elem = getattr(torch, worker_info["dtype"]).itemsize
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        vocab = hf_config.vocab_size * hf_config.hidden_size
        vocab_count = vocab * (1 if getattr(hf_config, "tie_word_embeddings", False) else 2)
        body_params = worker_info["num_params"] - vocab_count
        body_elem = (worker_info["weight_bytes"] - vocab_count * elem) / body_params
        return cls(hf_config.num_hidden_layers, heads * head_dim, vocab, body_params, elem,
                   worker_info["kv_bytes_per_token"], body_elem, *_routed_experts(hf_config))

    def experts_read(self, tokens: float) -> float:
        """Expected distinct experts per MoE layer that `tokens` tokens choose (0 for a dense model)."""
        if not self.num_experts:
            return 0.0
        return self.num_experts * (1 - (1 - self.top_k / self.num_experts) ** tokens)

    def step(self, new_tokens: int, logits_rows: int, attended: float, kv_read: float) -> tuple[float, float]:
        """(bytes, FLOPs) of one forward: `new_tokens` through the body, `logits_rows` through the LM head,
        `attended` (query, key) pairs, `kv_read` cached tokens read, plus the new tokens' KV written."""
        dense = self.body_params - self.expert_params
        per_expert = self.expert_params / self.num_experts if self.num_experts else 0.0
        read = dense + per_expert * self.experts_read(new_tokens)
        weights = read * self.body_elem_bytes + self.vocab_params * self.elem_bytes
        kv = (kv_read + new_tokens) * self.kv_bytes_per_token
        flops = 2 * (dense + per_expert * self.top_k) * new_tokens + 2 * self.vocab_params * logits_rows \
            + 4 * self.layers * self.attn_width * attended
        return weights + kv, flops


def _routed_experts(hf_config: Any) -> tuple[int, int, int]:
    """(routed experts' parameters over all layers, experts per MoE layer, top_k) of Qwen2/3-MoE and Mixtral
    configs (gate, up and down per expert; every layer is MoE but Qwen's `mlp_only_layers` and those off its
    `decoder_sparse_step`); (0, 0, 0) for a dense model."""
    experts = getattr(hf_config, "num_experts", None) or getattr(hf_config, "num_local_experts", None) or 0
    if not experts:
        return 0, 0, 0
    inter = getattr(hf_config, "moe_intermediate_size", None) or hf_config.intermediate_size
    step, dense_only = getattr(hf_config, "decoder_sparse_step", 1) or 1, getattr(hf_config, "mlp_only_layers", [])
    layers = sum(1 for i in range(hf_config.num_hidden_layers) if i not in (dense_only or []) and (i + 1) % step == 0)
    return layers * experts * 3 * hf_config.hidden_size * inter, experts, hf_config.num_experts_per_tok


def run(ns: argparse.Namespace) -> int:
    biggest = max(ns.batch_size) * max(ns.input_len)
    args = ServerArgs.from_cli_args(ns)
    args = args.replace(disable_radix_cache=True, chunked_prefill_size=max(args.chunked_prefill_size, biggest),
                        max_prefill_tokens=max(args.max_prefill_tokens, biggest),
                        max_running_requests=max(args.max_running_requests, max(ns.batch_size)))
    _, vocab_size = tokenizer_and_vocab(args)
    report = rep.new_report("one-batch", ns)
    from radixserve import Engine
    from radixserve.model_files import load_hf_config

    with Engine(**dataclasses.asdict(args)) as engine:
        info = report["engine"] = msgspec.to_builtins(engine.runtime)
        shape = ModelShape.of(load_hf_config(engine.model_dir), info)
        device = measure_device(info["device"], info["dtype"]) if info["device"].startswith("cuda") else None
        report["device"] = device or {"note": "CPU: no physical floor is given"}
        rates = (device["copy_GBps"] * 1e9 * args.tp_size, device["matmul_TFLOPs"] * 1e12 * args.tp_size) \
            if device else None  # the TP ranks' together
        points = list(itertools.product(ns.batch_size, ns.input_len))
        _check_points_fit(points, ns.output_len, engine.runtime.num_kv_slots - 1)
        _time(engine, [[1] * 16], 4)  # warm-up
        progress = rep.progress(len(points), "one-batch", unit="point")
        for i, (bs, input_len) in enumerate(points):
            prompts = np.random.default_rng(i).integers(0, vocab_size, (bs, input_len)).tolist()
            prefill = statistics.median(_time(engine, prompts, 1) for _ in range(ns.runs))
            total = statistics.median(_time(engine, prompts, ns.output_len) for _ in range(ns.runs))
            report["runs"].append({**_point(ns.label, shape, rates, bs, input_len, ns.output_len, prefill, total),
                                   "dtypes": rep.dtypes(info)})
            progress.update()
        progress.close()
    _print(report)
    rep.finish(report, ns)
    return 0


def _check_points_fit(points: list[tuple[int, int]], output_len: int, kv_slots: int) -> None:
    """A static batch must fit in the KV pool whole: a batch that does not is prefilled in parts or retracted
    midway, and its step times are no longer those of one batch of that size."""
    over = [f"{bs} x ({input_len} + {output_len})" for bs, input_len in points
            if bs * (input_len + output_len) > kv_slots]
    if over:
        raise SystemExit(f"one-batch: {', '.join(over)} tokens do not fit the KV pool's {kv_slots} slots; "
                         "raise --mem-fraction-static or lower --batch-size / --input-len")


def _time(engine: Engine, prompts: list[list[int]], output_len: int) -> float:
    params = {"max_new_tokens": output_len, "ignore_eos": True, "temperature": 0.0}
    t0 = time.perf_counter()
    engine.generate(input_ids=prompts, sampling_params=params)
    return time.perf_counter() - t0


def _point(label: str, shape: ModelShape, rates: tuple[float, float] | None, bs: int, input_len: int, output_len: int,
           prefill_s: float, total_s: float) -> dict[str, Any]:
    decode_s = (total_s - prefill_s) / max(1, output_len - 1)
    context = input_len + output_len / 2  # mean context of the decode steps
    prefill_cost = shape.step(bs * input_len, bs, bs * input_len * (input_len + 1) / 2, 0)
    decode_cost = shape.step(bs, bs, bs * context, bs * context)
    out: dict[str, Any] = {"label": label, "batch_size": bs, "input_len": input_len, "output_len": output_len,
                           "prefill_ms": prefill_s * 1e3, "decode_ms": decode_s * 1e3,
                           "prefill_tok_s": bs * input_len / prefill_s, "decode_tok_s": bs / decode_s,
                           "decode_experts_read": shape.experts_read(bs) if shape.num_experts else None}
    for phase, (nbytes, flops) in (("prefill", prefill_cost), ("decode", decode_cost)):
        out[f"{phase}_bytes"], out[f"{phase}_flops"] = nbytes, flops
        out[f"{phase}_floor_ms"] = None
        if rates is not None:
            memory_ms, compute_ms = nbytes / rates[0] * 1e3, flops / rates[1] * 1e3
            out[f"{phase}_floor_ms"] = max(memory_ms, compute_ms)
            out[f"{phase}_floor_bound"] = "memory" if memory_ms >= compute_ms else "compute"
    return out


def measure_device(device: str, dtype: str) -> dict[str, Any]:
    """Copy bandwidth (bytes read + written per second) and dense matmul rate in the model's dtype."""
    import torch

    dev = torch.device(device)
    copy_s, matmul_s = _copy_and_matmul_seconds(dev, getattr(torch, dtype))
    torch.cuda.empty_cache()
    return {"name": torch.cuda.get_device_name(dev), "copy_GBps": 2 * COPY_BYTES / copy_s / 1e9,
            "matmul_TFLOPs": 2 * MATMUL_N**3 / matmul_s / 1e12, "matmul_dtype": dtype}


def _copy_and_matmul_seconds(dev: Any, dtype: Any) -> tuple[float, float]:
    import torch

    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    a = torch.randn(MATMUL_N, MATMUL_N, dtype=dtype, device=dev)
    b = torch.randn_like(a)

    def seconds(fn: Any) -> float:
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(REPEATS):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / REPEATS

    return seconds(lambda: dst.copy_(src)), seconds(lambda: a @ b)


def _print(report: dict[str, Any]) -> None:
    header = ["batch", "in", "out", "prefill ms", "floor", "x floor", "decode ms/step", "floor", "x floor",
              "prefill tok/s", "decode tok/s"]
    rows = []
    for r in report["runs"]:
        ratio = {p: r[f"{p}_ms"] / r[f"{p}_floor_ms"] if r[f"{p}_floor_ms"] else None for p in ("prefill", "decode")}
        rows.append([r["batch_size"], r["input_len"], r["output_len"], r["prefill_ms"], r["prefill_floor_ms"],
                     ratio["prefill"], r["decode_ms"], r["decode_floor_ms"], ratio["decode"], r["prefill_tok_s"],
                     r["decode_tok_s"]])
    print(rep.table(header, rows))
    print(f"{report['main_label']}: {rep.dtypes(report['engine'])}")
    moe = [r for r in report["runs"] if r.get("decode_experts_read") is not None]
    if moe:
        print("MoE floors count the routed experts a step reads; expected per layer at decode: " + ", ".join(
            f"batch {r['batch_size']}: {r['decode_experts_read']:.1f}" for r in moe))
    device = report["device"]
    print(device.get("note") or f"floor = max(bytes / {device['copy_GBps']:.0f} GB/s, FLOPs / "
                                f"{device['matmul_TFLOPs']:.0f} TFLOP/s) measured on {device['name']}")
