"""bfloat16 kernels for CPUs with AVX512-BF16 (cpu_kernels.c), built with the system C compiler.

- linear layers: oneDNN's bf16 matrix-vector path reads weights at about half the memory bandwidth; these
  read them at about its full rate at batch 1-8 and keep pace with oneDNN on prefill (docs/benchmarks.md);
- the residual add + RMSNorm, and SiLU(gate) * up, each in one pass (torch runs them as several operators);
- rotary of q and k with the KV store in one pass (as worker_proc.fused.rotary_store does on CUDA);
- attention straight from the paged KV cache (no gather of each request's KV per layer).
The library is compiled once per source, compiler and CPU into the radixserve cache (`cc -O3 -march=native
-fopenmp`, under a second) and loaded with ctypes, which drops the GIL during a call. `library()` is None
where the CPU lacks AVX512-BF16 or no compiler works: callers then run their torch code.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch

from radixserve.model_files import cache_root

log = logging.getLogger("radixserve.worker")

_SOURCE = Path(__file__).with_suffix(".c")
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
_NB = 32  # output columns per block, as NB in cpu_kernels.c


@functools.cache
def cpu_description() -> str:
    """/proc/cpuinfo's model name and flags lines of the first processor ("" where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    lines = text.split("\n\n")[0].splitlines()
    return "\n".join(line for line in lines if line.startswith(("model name", "flags")))


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (avx512_bf16, amx_bf16, ...)."""
    flags = next((line for line in cpu_description().splitlines() if line.startswith("flags")), "")
    return set(flags.partition(":")[2].split())


@functools.cache
def library() -> ctypes.CDLL | None:
    return build(_SOURCE) if "avx512_bf16" in cpu_flags() else None


def build(source_path: Path) -> ctypes.CDLL | None:
    """The library compiled from `source_path` (cpu_kernels.c, or another version of it: benchmarks compare
    builds), or None where no compiler works."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.warning("no C compiler (cc, gcc or $CC): the bf16 CPU path runs oneDNN and torch, about half as fast")
        return None
    source = source_path.read_bytes()
    inputs = [source, cc.encode(), " ".join(_FLAGS).encode(), cpu_description().encode()]
    key = hashlib.sha256(b"\0".join(inputs)).hexdigest()[:16]
    path = cache_root() / "kernels" / f"cpu_kernels-{key}.so"
    if not path.exists():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)  # an unwritable cache falls back like a failed build
            subprocess.run([cc, *_FLAGS, "-o", str(tmp), str(source_path), "-lm"], check=True, capture_output=True,
                           text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("building %s failed (%s): the bf16 CPU path runs oneDNN and torch instead\n%s",
                        source_path.name, exc, getattr(exc, "stderr", "") or "")
            return None
        os.replace(tmp, path)  # atomic: workers starting together may build it twice, never load half a file
    lib = ctypes.CDLL(str(path))
    ptr, size, f32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
    signatures = {
        "rs_pack_bf16": [ptr, size, size, ptr],
        "rs_linear_bf16": [ptr, size, size, ptr, size, size, ptr, ptr, size],
        "rs_add_rmsnorm_bf16": [ptr, size, ptr, size, ptr, size, size, f32, ptr, ptr],
        "rs_silu_and_mul_bf16": [ptr, size, size, size, ptr],
        "rs_argmax_f32": [ptr, size, size, size, ptr],
        "rs_rotary_store_bf16": [ptr, size, size, ptr, size, size, ptr, ptr, size, ptr, size, size, size, size, ptr,
                                 ptr, ptr],
        "rs_paged_attention_bf16": [ptr, ptr, ptr, ptr, size, ptr, ptr, size, size, size, size, f32, ptr],
        "rs_linear_quant": [ptr, size, size, ptr, size, ptr, ptr, size, size, size, size, ptr, ptr, size],
        "rs_gguf_decode": [ptr, ptr, size, size, size, size, ptr, ptr, ptr],
        "rs_pack_quant": [ptr, size, size, size, ptr, ptr, size, size, ptr, ptr, ptr],
        "rs_decoder_stack": [ptr, size, ptr, size, size, size, size, size, f32, f32, ptr, ptr, size, ptr, ptr, size,
                             ptr, ptr, ptr, ptr],
    }
    for name, argtypes in signatures.items():
        if hasattr(lib, name):  # another version (a benchmark's comparison) may lack a newer kernel
            getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, None
    lib.rs_decoder_stack.restype = size  # 0, or -1: no scratch memory
    lib.rs_q8_rows.argtypes, lib.rs_q8_rows.restype = [], size
    return lib


def q8_rows() -> int:
    """The least rows of x from which the quantized linear kernels quantize x per row to int8 (VPDPBUSD); 0 where
    they never do (built without AVX512-VNNI, or no library)."""
    lib = library()
    return lib.rs_q8_rows() if lib is not None else 0


class PackedLinear:
    """A bf16 weight [n, k] in the kernels' block layout; `packed(x, bias)` is F.linear(x, weight, bias)
    up to float32 summation order."""

    def __init__(self, weight: torch.Tensor) -> None:
        lib = self.lib = library()
        assert lib is not None and weight.dtype == torch.bfloat16 and weight.dim() == 2
        weight = weight.detach().contiguous()
        self.n, self.k = weight.shape
        self.data = torch.empty(-(-self.n // _NB) * -(-self.k // 2) * _NB * 2, dtype=torch.bfloat16)
        lib.rs_pack_bf16(weight.data_ptr(), self.n, self.k, self.data.data_ptr())

    def stack_fields(self) -> tuple[torch.Tensor, None, None, int, int, bool]:
        """(weight, scale, offset, bits, block, fp16 scales) as cpu_stack describes a layer to rs_decoder_stack."""
        return self.data, None, None, 16, 0, False

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows, y = linear_rows(x, self.k, self.n, bias)
        self.lib.rs_linear_bf16(rows.data_ptr(), rows.stride(0), rows.shape[0], self.data.data_ptr(), self.n, self.k,
                                None if bias is None else bias.data_ptr(), y.data_ptr(), self.n)
        return y.reshape(*x.shape[:-1], self.n)


def linear_rows(x: torch.Tensor, k: int, n: int, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear kernel's operands: x [..., k] bf16 as rows [T, k] with unit column stride, and its bf16 output
    [T, n] (bias, if any: bf16, contiguous)."""
    rows = x.reshape(-1, k)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    assert rows.dtype == torch.bfloat16 and (bias is None or (bias.dtype == torch.bfloat16 and bias.is_contiguous()))
    return rows, torch.empty((rows.shape[0], n), dtype=torch.bfloat16)


def add_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rmsnorm(h) * weight, h) for h = x [+ residual], x [T, n] bf16, rounded where HF's RMSNorm rounds."""
    rows, n = x.shape
    assert x.dtype == weight.dtype == torch.bfloat16 and weight.is_contiguous() and weight.shape == (n,)
    if x.stride(1) != 1:
        x = x.contiguous()
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    out = torch.empty((rows, n), dtype=torch.bfloat16)
    res_out = torch.empty_like(out) if residual is not None else None
    library().rs_add_rmsnorm_bf16(x.data_ptr(), x.stride(0), 0 if residual is None else residual.data_ptr(),
                                  0 if residual is None else residual.stride(0), weight.data_ptr(), rows, n, eps,
                                  out.data_ptr(), 0 if res_out is None else res_out.data_ptr())
    return out, res_out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2n] bf16 (gate | up) -> silu(gate) * up [T, n], rounded where torch's bf16 ops round."""
    assert x.dtype == torch.bfloat16 and x.dim() == 2
    if x.stride(1) != 1:
        x = x.contiguous()
    rows, n = x.shape[0], x.shape[1] // 2
    out = torch.empty((rows, n), dtype=torch.bfloat16)
    library().rs_silu_and_mul_bf16(x.data_ptr(), x.stride(0), rows, n, out.data_ptr())
    return out


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) of float32 rows x [B, V] (its ties and NaNs) as int64 [B]; torch's single-threaded
    reduction reads a vocabulary-wide row several times slower."""
    assert x.dtype == torch.float32 and x.dim() == 2 and x.stride(1) == 1
    out = torch.empty(x.shape[0], dtype=torch.int64)
    library().rs_argmax_f32(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], out.data_ptr())
    return out


def rotary_store(qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, q_heads: int) -> torch.Tensor:
    """fused.rotary_store on the CPU: rotate qk [T, q_heads + kv heads, D] with cos/sin [T, 1, D/2], return the
    rotated q [T, q_heads, D], write the rotated k and v [T, kv heads, D] at k_cache[slots] / v_cache[slots]
    (int64 slots, caches [slots, kv heads, D]); bf16, each element rounded once."""
    tokens, heads, dim = qk.shape
    assert qk.dtype == v.dtype == cos.dtype == sin.dtype == k_cache.dtype == v_cache.dtype == torch.bfloat16
    assert qk.stride(2) == v.stride(2) == cos.stride(-1) == 1 and sin.stride(0) == cos.stride(0) and dim % 2 == 0
    assert slots.dtype == torch.int64 and slots.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert v.shape == (tokens, heads - q_heads, dim) and sin.shape == cos.shape and cos.shape[0] == tokens
    q = torch.empty((tokens, q_heads, dim), dtype=torch.bfloat16)
    library().rs_rotary_store_bf16(qk.data_ptr(), qk.stride(0), qk.stride(1), v.data_ptr(), v.stride(0), v.stride(1),
                                   cos.data_ptr(), sin.data_ptr(), cos.stride(0), slots.data_ptr(), tokens, q_heads,
                                   heads - q_heads, dim, q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr())
    return q


def attention_fits(dtype: torch.dtype, num_q_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether paged_attention runs this cache: built, bf16, head size a multiple of 16 up to 256, at most 16
    query heads per kv head."""
    return (library() is not None and dtype == torch.bfloat16 and head_dim % 16 == 0 and head_dim <= 256
            and num_q_heads % num_kv_heads == 0 and num_q_heads // num_kv_heads <= 16)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, req_to_token: torch.Tensor,
                    req_slots: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, Hq, D]: row t attends to the KV at req_to_token[req_slots[t], :lens[t]] (int32 tensors), read in
    place from the paged caches [slots, Hkv, D]; -> [T, Hq, D] bf16."""
    q = q.contiguous()
    rows, hq, dim = q.shape
    assert q.dtype == k_cache.dtype == v_cache.dtype == torch.bfloat16 and k_cache.is_contiguous()
    assert req_to_token.dtype == req_slots.dtype == lens.dtype == torch.int32 and req_to_token.stride(1) == 1
    assert req_slots.shape == lens.shape == (rows,)
    req_slots, lens = req_slots.contiguous(), lens.contiguous()
    out = torch.empty_like(q)
    library().rs_paged_attention_bf16(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), req_to_token.data_ptr(),
                                      req_to_token.stride(0), req_slots.data_ptr(), lens.data_ptr(), rows, hq,
                                      k_cache.shape[1], dim, scale, out.data_ptr())
    return out
