"""Batch-invariant kernels for --enable-deterministic-inference: a row's result has the same bits whatever the
other rows of the batch are, and whether its context came from the radix cache, a chunked or a cold prefill.

Floating-point sums depend on their order, and library kernels pick their order by shape: on the CPU, torch's
float32 F.linear (MKL) runs one row through a matrix-vector kernel and several rows through blocked GEMMs that
sum K differently (measured: row 0 of x[:1] differs from row 0 of x[:m] for every m >= 2 tried, and m = 2..3
from m >= 4); the reference attention runs decode as one padded SDPA and extends as one SDPA per request. On CUDA
cuBLAS picks tiles and split-K by shape and FlashInfer its tiles and KV splits. Here each op fixes its order:
- `linear`: cpu_kernels' bf16 kernel as it is (each output element sums K in one order in every row tile); other
  CPU linears in blocks of ROWS rows (one GEMM shape, so one blocking; a row's bits do not depend on its position
  in the block: checked for every position). On CUDA, cuBLAS with split-K off (its workspace pinned, reduced-
  precision reductions off), where a check at start finds every row of the model's weight shapes the same at
  CHECK_ROWS batch sizes (`choose_cuda_linear`; vLLM's batch-invariant mode relies on this on Hopper: with one
  float32 accumulator per output element walking K in order, the tile shape cuBLAS picks by batch size does not
  change a row's sum); else one persistent Triton matmul with no split-K (`matmul`), whose batches of up to
  SMALL_M rows may take launch shapes of their own where a check at start finds them giving every row the bits
  of the default shape (`choose_small_tiles`: the fastest such shape per weight).
- `attention` (CPU; on CUDA worker_proc/attention/invariant_backend.py): every query row (prefill, extend or
  decode alike) over its context in fixed splits of SPLIT tokens, each split's scores and weighted values as
  element-wise products summed along a contiguous axis (an order fixed by the axis' length), the splits merged by
  their maxima in split order.
- RMSNorm, rotary and the fused element-wise ops are already per row (cpu_kernels, worker_proc.fused: one program
  per row; F.rms_norm reduces each row alone), and torch's element-wise exp gives the same bits at any offset
  and length (checked), so they run as they are.
Nothing here runs unless `enable()` was called (ModelRunner does, with the flag); without it every caller takes
its usual path.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ENABLED = False
CUBLAS = False  # CUDA linears through cuBLAS without split-K (`choose_cuda_linear`), else `matmul`
ROWS = 16  # the row block of CPU linears
SPLIT = 64  # KV tokens per attention split (CPU)
CUBLAS_NO_SPLIT_K = {"CUBLAS_WORKSPACE_CONFIG": ":16:8", "CUBLASLT_WORKSPACE_SIZE": "1"}
CHECK_ROWS = (1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 255, 256, 257, 512)


def enable(device: torch.device) -> None:
    """The mode on, before this process' first matmul: on CUDA cuBLAS then creates its handles with the workspace
    that leaves it no split-K (each variable is read once, when cuBLAS first runs)."""
    global ENABLED
    ENABLED = True
    if device.type == "cuda":
        os.environ.update(CUBLAS_NO_SPLIT_K)
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False


def rows_invariant(fn, weight: torch.Tensor) -> bool:
    """Whether fn(x[:m], weight) has the bits of the first m rows of fn(x, weight) for every m of CHECK_ROWS."""
    x = torch.randn(max(CHECK_ROWS), weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight)
    full = fn(x, weight)
    return all(torch.equal(fn(x[:m], weight), full[:m]) for m in CHECK_ROWS)


def cublas_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def choose_cuda_linear(weights: list[torch.Tensor]) -> str:
    """Linears through cuBLAS (split-K off by `enable`) if it gives every row of each weight shape and dtype the
    same bits at every CHECK_ROWS batch size, else through `matmul` with `choose_small_tiles`; says which (for the
    log)."""
    global CUBLAS
    distinct = {(tuple(w.shape), w.dtype): w for w in weights}
    CUBLAS = all(rows_invariant(cublas_linear, w) for w in distinct.values())
    if CUBLAS:
        return "cuBLAS without split-K"
    t0 = time.perf_counter()
    chosen = choose_small_tiles(weights, _gpu_seconds)
    return (f"the persistent Triton matmul (cuBLAS rows varied with the batch); up to {SMALL_M} rows: "
            + ", ".join(f"{n}x{k} {tiles}" for (n, k), tiles in chosen.items())
            + f" (chosen in {time.perf_counter() - t0:.1f} s)")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed) -> torch.Tensor:
    """F.linear(x, weight, bias) with an order of summation that does not depend on x's other rows."""
    from worker_proc import cpu_kernels

    if isinstance(packed, cpu_kernels.PackedLinear):
        return packed(x, bias)  # per output element one fixed order in every row tile
    lead, k = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, k)
    if x.is_cuda:
        y = cublas_linear(x, weight) if CUBLAS else matmul(x, weight.t())
        if bias is not None:
            y += bias
        return y.reshape(*lead, -1)
    rows = x.shape[0]
    pad = -rows % ROWS
    if pad:
        x = torch.cat([x, x.new_zeros(pad, k)])
    blocks = [packed(b, bias) if packed is not None else F.linear(b, weight, bias) for b in x.split(ROWS)]
    return torch.cat(blocks)[:rows].reshape(*lead, -1)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, req_to_token: torch.Tensor,
              req_slots: torch.Tensor, lens: torch.Tensor, scale: float, row_chunk: int = 64) -> torch.Tensor:
    """q [T, Hq, D]: row t attends to the KV at req_to_token[req_slots[t], :lens[t]] in caches [slots, Hkv, D];
    -> [T, Hq, D] in q's dtype, computed in float32 split by split (see the module docstring). Rows are
    independent, so they go `row_chunk` at a time to bound the gathered KV."""
    rows, hq, dim = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    out = torch.empty_like(q)
    offsets = torch.arange(SPLIT, device=q.device)
    for r0 in range(0, rows, row_chunk):
        qc = q[r0:r0 + row_chunk].float().reshape(-1, hkv, group, dim)
        lc, sc = lens[r0:r0 + row_chunk].long(), req_slots[r0:r0 + row_chunk].long()
        n = qc.shape[0]
        top = torch.full((n, hkv, group), -torch.inf, device=q.device)
        total = torch.zeros((n, hkv, group), device=q.device)
        acc = torch.zeros((n, hkv, group, dim), device=q.device)
        for j in range(-(-int(lc.max()) // SPLIT)):
            live = torch.nonzero(lc > j * SPLIT).flatten()
            pos = j * SPLIT + offsets
            valid = pos[None, :] < lc[live, None]  # [A, SPLIT]
            slots = req_to_token[sc[live, None], pos.clamp(max=req_to_token.shape[1] - 1)[None, :]].long()
            slots = torch.where(valid, slots, 0)
            # Products as element-wise multiplies and sums over the innermost, contiguous axis: torch sums such an
            # axis in an order fixed by its length. (torch.bmm is not batch-invariant: a [3, 64] @ [64, 33] batch
            # element came out differently in a batch of 16 than in one of 2.)
            keys = k_cache[slots].float().transpose(1, 2)  # [A, Hkv, SPLIT, D]
            vals = v_cache[slots].float().permute(0, 2, 3, 1).contiguous()  # [A, Hkv, D, SPLIT]
            scores = (qc[live][:, :, :, None, :] * keys[:, :, None]).sum(-1) * scale  # [A, Hkv, G, SPLIT]
            scores = scores.masked_fill(~valid[:, None, None, :], -torch.inf)
            split_top = scores.amax(dim=-1)  # exact: a maximum has no order
            probs = torch.exp(scores - split_top[..., None])
            weighted = (probs[:, :, :, None, :] * vals[:, :, None]).sum(-1)  # [A, Hkv, G, D]
            split_total = probs.sum(-1)
            new_top = torch.maximum(top[live], split_top)
            old, now = torch.exp(top[live] - new_top), torch.exp(split_top - new_top)
            acc[live] = acc[live] * old[..., None] + weighted * now[..., None]
            total[live] = total[live] * old + split_total * now
            top[live] = new_top
        out[r0:r0 + row_chunk] = (acc / total[..., None]).reshape(n, hq, dim).to(q.dtype)
    return out


# ---- CUDA: one persistent Triton matmul (imported lazily, on the first call) ----

@dataclass(frozen=True)
class Tiles:
    """The matmul's launch shape: rows and K per step of an output tile, software-pipeline stages, warps, and the
    tile's width (0: chosen per weight, `_block_n`)."""
    block_m: int = 128
    block_k: int = 64
    stages: int = 3
    warps: int = 4
    block_n: int = 0


TILES = Tiles()  # every batch's launch shape, and the order of summation the others must reproduce
SMALL_M = 64  # batches of up to this many rows (decode) may take a launch shape of their own: PLANS
# Candidates for them: deeper K steps and narrower tiles keep more of the weight in flight on more SMs when
# one row's arithmetic is nothing; tensor-core shapes that walk K in the same order as TILES may sum alike.
SMALL_CANDIDATES = (Tiles(64, 128, 4, 4), Tiles(64, 256, 3, 4), Tiles(64, 128, 4, 4, 16), Tiles(64, 256, 4, 4, 16),
                    Tiles(16, 256, 4, 4))
PLANS: dict[tuple[int, int], Tiles] = {}  # (n, k) of a weight -> its launch shape up to SMALL_M rows
BLOCK_N_CHOICES = (128, 64, 32)  # the output tile's width, chosen per weight (see `_block_n`)
GROUP_M = 8


@functools.cache
def _matmul_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def persistent_matmul(a_ptr, b_ptr, c_ptr, m, n, k, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
                          stride_cn, NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # Each program walks output tiles start, start + NUM_PROGRAMS, ...; a tile sums all of K, BLOCK_K at a
        # time from k = 0 up, in one accumulator: its order depends on k alone, never on m or the tile's place.
        tiles_m, tiles_n = tl.cdiv(m, BLOCK_M), tl.cdiv(n, BLOCK_N)
        per_group = GROUP_M * tiles_n
        for tile in range(tl.program_id(0), tiles_m * tiles_n, NUM_PROGRAMS):
            group = tile // per_group
            first_m = group * GROUP_M
            size_m = tl.minimum(tiles_m - first_m, GROUP_M)
            pid_m = first_m + (tile % per_group) % size_m
            pid_n = (tile % per_group) // size_m
            rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am  # int64: offsets may pass 2**31 elements
            b_cols = b_ptr + rn.to(tl.int64)[None, :] * stride_bn
            rk = tl.arange(0, BLOCK_K)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, k, BLOCK_K):
                cols = k0 + rk
                a = tl.load(a_rows + cols[None, :] * stride_ak,
                            mask=(rm[:, None] < m) & (cols[None, :] < k), other=0.0)
                b = tl.load(b_cols + cols.to(tl.int64)[:, None] * stride_bk,
                            mask=(cols[:, None] < k) & (rn[None, :] < n), other=0.0)
                acc = tl.dot(a, b, acc)
            out = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :] * stride_cn
            tl.store(out, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < m) & (rn[None, :] < n))

    return persistent_matmul


@functools.cache
def _programs(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


@functools.cache
def _block_n(n: int, programs: int) -> int:
    """The widest output tile that still gives each of the GPU's SMs a tile of a one-row batch (else the
    narrowest): a decode step is bound by reading the weight, and without split-K only as many SMs read it as
    there are tiles. It depends on the weight's n and the GPU alone, never on m, so a row's order of summation
    is the same at every batch size."""
    return next((b for b in BLOCK_N_CHOICES if -(-n // b) >= programs), BLOCK_N_CHOICES[-1])


def matmul(a: torch.Tensor, b: torch.Tensor, tiles: Tiles | None = None) -> torch.Tensor:
    """a [m, k] @ b [k, n] -> [m, n] in a's dtype, float32 accumulation; every output element of a row sums k in
    the same order whatever m is (no split-K; TILES, or up to SMALL_M rows the weight's PLANS entry, which was
    checked to sum alike). `tiles`: a launch shape to use instead (scripts/bench_linear.py --deterministic)."""
    m, k = a.shape
    n = b.shape[1]
    c = torch.empty((m, n), dtype=a.dtype, device=a.device)
    if m == 0:
        return c
    if tiles is None:
        tiles = PLANS.get((n, k), TILES) if m <= SMALL_M else TILES
    block_n = tiles.block_n or _block_n(n, _programs(a.device))
    programs = min(-(-m // tiles.block_m) * -(-n // block_n), _programs(a.device))
    _matmul_kernel()[(programs,)](a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0),
                                  c.stride(1), NUM_PROGRAMS=programs, BLOCK_M=tiles.block_m, BLOCK_N=block_n,
                                  BLOCK_K=tiles.block_k, GROUP_M=GROUP_M, num_stages=tiles.stages,
                                  num_warps=tiles.warps)
    return c


def choose_small_tiles(weights: list[torch.Tensor], seconds) -> dict[tuple[int, int], Tiles]:
    """For each weight shape, the fastest launch shape for batches of up to SMALL_M rows among TILES and those
    SMALL_CANDIDATES that give every row at every CHECK_ROWS batch size the bits TILES gives it (a candidate
    that sums in another order, or that does not fit the GPU's shared memory, is never used); sets PLANS.
    `seconds(calls)`: the time of a list of calls (the weights of one shape, at 1 and at SMALL_M rows)."""
    from triton.runtime.errors import OutOfResources

    by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
    for w in weights:
        by_shape.setdefault(tuple(w.shape), []).append(w)
    for (n, k), ws in by_shape.items():
        xs = [torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(ws[0]) for m in (1, SMALL_M)]
        calls = [lambda x=x, w=w: matmul(x, w.t()) for x in xs for w in ws]
        PLANS.pop((n, k), None)
        best, best_s = TILES, seconds(calls)
        for tiles in SMALL_CANDIDATES:
            PLANS[n, k] = tiles
            try:
                if rows_invariant(lambda x, w: matmul(x, w.t()), ws[0]) and (s := seconds(calls)) < best_s:
                    best, best_s = tiles, s
            except OutOfResources:
                pass
        PLANS[n, k] = best
    return {shape: PLANS[shape] for shape in by_shape}


def _gpu_seconds(calls) -> float:
    """GPU time of `calls` (after one untimed round, which compiles): queued behind a sleep on the device, so
    their launches from Python overlap it and the events time the kernels alone."""
    for call in calls:
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(50_000_000)
    start.record()
    for call in calls:
        call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3
