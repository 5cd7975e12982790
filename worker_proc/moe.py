"""Mixture-of-experts layers: the router, one layer's experts stored stacked, and how they are split over ranks.

A layer's experts are two stacked parameters: w13 [E_local, 2 * I_local, H] (gate rows, then up rows) and
w2 [E_local, H, I_local]. Over the tensor-parallel group of tp ranks with `ep` = parallel.ep_size() (which
divides tp), rank r holds the whole experts [g * E / ep, (g + 1) * E / ep) of group g = r // (tp / ep), and of
each of them the intermediate slice (r % (tp / ep)) of I / (tp / ep). ep 1 is tensor-parallel experts (every
rank a slice of every expert); ep == tp is expert parallelism (every rank whole experts). Either way each rank
computes its part for every token and the all-reduce after down sums the parts, as after a dense MLP's down.

Two ways to run the experts, the same maths:
  CPU (and torch on CUDA): `grouped_experts`: (token, expert) pairs sorted by expert, one matmul per expert that
  has tokens.
  CUDA: `worker_proc.fused_moe`'s Triton kernels: for decode-sized batches one GEMV kernel per (token, expert)
  pair for gate_up with SiLU-and-mul and one for down with the routing weight and the sum (worker_proc.moe_pairs);
  for larger ones pairs aligned into per-expert blocks, one grouped GEMM for gate_up, SiLU-and-mul, one grouped
  GEMM for down with the routing weight; static shapes (CUDA graphs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker_proc import fused
from worker_proc.layers import ShardId, SiluAndMul, linear, load_replicated, make_param
from worker_proc.parallel import ep_size, tp_all_reduce, tp_rank, tp_size


@dataclass(frozen=True)
class Routing:
    """The config's routing: top_k of num_experts by softmax probability, renormalised to sum 1 or not; the
    weights keep float32 (Mixtral, HF) or are rounded to the activations' dtype first (Qwen MoE, HF)."""

    num_experts: int
    top_k: int
    renormalize: bool
    round_weights: bool


def route(logits: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (float32 weights [T, top_k], expert ids [T, top_k]) as HF computes them."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, routing.top_k, dim=-1)
    if routing.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if routing.round_weights:
        weights = weights.to(logits.dtype).float()
    return weights, ids


def grouped_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                    local_ids: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{local_ids[t, k]}(x[t]) for x [T, H] with this rank's stacked experts; ids
    outside [0, E_local) (experts of other ranks) contribute nothing. Pairs are sorted by expert, and each expert
    with tokens runs one gate_up and one down matmul over its rows; the weighted sum is taken in float32."""
    num_local, top_k = w13.shape[0], local_ids.shape[1]
    flat = local_ids.flatten()
    flat = torch.where((flat >= 0) & (flat < num_local), flat, num_local)  # num_local: not this rank's
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_local + 1).tolist()
    kept = order[: len(order) - counts[num_local]]
    rows = kept // top_k
    xs = x[rows]
    ys = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts[:num_local]):
        if n:
            ys[start:start + n] = F.linear(act(F.linear(xs[start:start + n], w13[e])), w2[e])
            start += n
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, rows, ys.float() * weights.flatten()[kept, None])
    return out.to(x.dtype)


class FusedExperts(nn.Module):
    """One layer's experts (see the module docstring for the split). Checkpoint tensors load by shard id:
    w13's (expert, 0) gate and (expert, 1) up, each [I, H]; w2's expert [H, I]; a rank keeps its part of the
    experts it holds and skips the others (every expert's shards still count as loaded)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        tp, ep = tp_size(), ep_size()
        moe_tp = tp // ep
        if num_experts % ep or intermediate % moe_tp:
            raise ValueError(f"{num_experts} experts of intermediate size {intermediate} do not split over "
                             f"--ep-size {ep} x {moe_tp} tensor-parallel ranks per expert")
        self.num_experts, self.num_local, self.inter_local = num_experts, num_experts // ep, intermediate // moe_tp
        self.first_expert = (tp_rank() // moe_tp) * self.num_local
        self.inter_start = (tp_rank() % moe_tp) * self.inter_local
        gate_up: dict[ShardId, tuple[int, ...]] = {(e, i): (intermediate, hidden)
                                                   for e in range(num_experts) for i in (0, 1)}
        self.w13 = make_param((self.num_local, 2 * self.inter_local, hidden), dtype, device, self._load_w13, gate_up)
        self.w2 = make_param((self.num_local, hidden, self.inter_local), dtype, device, self._load_w2,
                             {e: (hidden, intermediate) for e in range(num_experts)})
        self.act = SiluAndMul()

    def _load_w13(self, param: nn.Parameter, full: torch.Tensor, shard_id: ShardId = None) -> None:
        expert, half = shard_id
        local = expert - self.first_expert
        if 0 <= local < self.num_local:
            n = self.inter_local
            param.data[local].narrow(0, half * n, n).copy_(full.narrow(0, self.inter_start, n))

    def _load_w2(self, param: nn.Parameter, full: torch.Tensor, shard_id: ShardId = None) -> None:
        local = shard_id - self.first_expert
        if 0 <= local < self.num_local:
            param.data[local].copy_(full.narrow(1, self.inter_start, self.inter_local))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """This rank's part of the experts' weighted sum (the caller all-reduces it)."""
        local_ids = ids - self.first_expert if self.first_expert else ids
        if x.is_cuda and fused.ENABLED:
            from worker_proc import fused_moe

            return fused_moe.fused_experts(x, self.w13, self.w2, weights, local_ids, self.num_experts)
        return grouped_experts(x, self.w13, self.w2, weights, local_ids, self.act)


class SparseMoeBlock(nn.Module):
    """Router (`gate`, replicated; `route`, on CUDA in one kernel: worker_proc.moe_router) -> experts -> all-reduce;
    with `shared` a dense MLP every token also goes through, scaled by sigmoid(shared_expert_gate(x)) (Qwen2-MoE).
    `shared` returns its rank's partial sum (a LlamaMLP with reduce=False): the gate is the same on every rank, so
    gated partial sums meet in the experts' one all-reduce. The gates' projections go through layers.linear (the
    decode GEMV; batch-invariant under --enable-deterministic-inference)."""

    def __init__(self, hidden: int, intermediate: int, routing: Routing, shared: nn.Module | None,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.routing = routing
        e = routing.num_experts
        self.gate = _Replicated(make_param((e, hidden), dtype, device, load_replicated, {None: (e, hidden)}))
        self.experts = FusedExperts(e, hidden, intermediate, dtype, device)
        self.shared_expert = shared
        self.shared_expert_gate = _Replicated(make_param((1, hidden), dtype, device, load_replicated,
                                                         {None: (1, hidden)})) if shared is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = linear(x, self.gate.weight, None, None)
        if logits.is_cuda and fused.ENABLED:
            from worker_proc import moe_router

            r = self.routing
            weights, ids = moe_router.route(logits, r.top_k, r.renormalize, r.round_weights)
        else:
            weights, ids = route(logits, self.routing)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            gate = linear(x, self.shared_expert_gate.weight, None, None)
            out = out + torch.sigmoid(gate) * self.shared_expert(x)
        return tp_all_reduce(out)


class _Replicated(nn.Module):
    """A weight every rank holds whole (module naming only: `gate.weight`)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight


_EXPERT_TENSOR = re.compile(r"\.experts\.(\d+)\.(\w+)\.weight$")


def expert_param_name(hf_name: str, gate: str, up: str, down: str) -> tuple[str, ShardId] | None:
    """(our parameter, shard id) of one expert's checkpoint tensor, named `...experts.{i}.{gate|up|down}.weight`
    (Qwen MoE: gate_proj / up_proj / down_proj; Mixtral: w1 / w3 / w2); None for any other tensor."""
    match = _EXPERT_TENSOR.search(hf_name)
    if match is None or match.group(2) not in (gate, up, down):
        return None
    expert, part, stem = int(match.group(1)), match.group(2), hf_name[: match.start()]
    if part == down:
        return f"{stem}.experts.w2", expert
    return f"{stem}.experts.w13", (expert, 0 if part == gate else 1)


def reject_sliding_window(config: Any) -> None:
    """These MoE models attend over the whole context: a config that asks for a window fails at start."""
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window or "sliding_attention" in (getattr(config, "layer_types", None) or []):
        raise NotImplementedError(f"{config.model_type}: sliding_window={window!r} / layer_types with "
                                  "sliding_attention is not supported (full attention is)")
