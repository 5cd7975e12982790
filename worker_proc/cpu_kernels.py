"""bfloat16 linear layers for CPUs with AVX512-BF16, from cpu_kernels.c, built with the system C compiler.

oneDNN's bf16 matrix-vector path reads weights at about half this machine's memory bandwidth; these kernels
read them at about its full rate at batch 1-8 and keep pace with oneDNN on prefill (docs/benchmarks.md). The
library is compiled once per source, compiler and CPU into the radixserve cache (`cc -O3 -march=native
-fopenmp`, under a second) and loaded with ctypes, which drops the GIL during a call. `library()` is None
where the CPU lacks AVX512-BF16 or no compiler works: callers fall back to oneDNN.
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


def _cpu_model_and_flags() -> str:
    """/proc/cpuinfo's first processor's model name and flags ("" where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    lines = text.split("\n\n")[0].splitlines()
    return "\n".join(line for line in lines if line.startswith(("model name", "flags")))


@functools.cache
def library() -> ctypes.CDLL | None:
    cpu = _cpu_model_and_flags()
    if "avx512_bf16" not in cpu.split():
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.warning("no C compiler (cc, gcc or $CC): bf16 linear layers use oneDNN, about half as fast at batch 1")
        return None
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(_FLAGS).encode(), cpu.encode()])).hexdigest()[:16]
    path = cache_root() / "kernels" / f"cpu_kernels-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            subprocess.run([cc, *_FLAGS, "-o", str(tmp), str(_SOURCE)], check=True, capture_output=True, text=True,
                           timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("building %s failed (%s): bf16 linear layers use oneDNN\n%s", _SOURCE.name, exc,
                        getattr(exc, "stderr", "") or "")
            return None
        os.replace(tmp, path)  # atomic: workers starting together may build it twice, never load half a file
    lib = ctypes.CDLL(str(path))
    ptr, size = ctypes.c_void_p, ctypes.c_long
    lib.rs_pack_bf16.argtypes = [ptr, size, size, ptr]
    lib.rs_linear_bf16.argtypes = [ptr, size, size, ptr, size, size, ptr, ptr, size]
    lib.rs_pack_bf16.restype = lib.rs_linear_bf16.restype = None
    return lib


class PackedLinear:
    """A bf16 weight [n, k] in the kernels' block layout; `packed(x, bias)` is F.linear(x, weight, bias)
    up to float32 summation order."""

    def __init__(self, weight: torch.Tensor) -> None:
        lib = library()
        assert lib is not None and weight.dtype == torch.bfloat16 and weight.dim() == 2
        weight = weight.detach().contiguous()
        self.n, self.k = weight.shape
        self.data = torch.empty(-(-self.n // _NB) * -(-self.k // 2) * _NB * 2, dtype=torch.bfloat16)
        lib.rs_pack_bf16(weight.data_ptr(), self.n, self.k, self.data.data_ptr())

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.k)
        if x.stride(1) != 1:
            x = x.contiguous()
        assert x.dtype == torch.bfloat16 and (bias is None or (bias.dtype == torch.bfloat16 and bias.is_contiguous()))
        y = torch.empty((x.shape[0], self.n), dtype=torch.bfloat16)
        library().rs_linear_bf16(x.data_ptr(), x.stride(0), x.shape[0], self.data.data_ptr(), self.n, self.k,
                                 None if bias is None else bias.data_ptr(), y.data_ptr(), self.n)
        return y.reshape(*lead, self.n)
