"""Quantized linear weights on the CPU that stay quantized (`--quantization int8` / `gguf`; docs/quantization.md).

A weight is kept as codes with a scale (and for some formats an offset) per block of `block` input columns:
w[n, k] = scale[n, k // block] * code[n, k] + offset[n, k // block]. The forms:
- int8: a float checkpoint quantized at load, per output channel (block = k): code = round(w / scale) in
  [-127, 127], scale = max |w| / 127 of the row, no offset;
- GGUF's own blocks of 32, read from the file as they are: Q8_0 (int8 codes, fp16 scale), Q4_0 (4-bit codes,
  w = d * (q - 8)) and Q4_1 (4-bit codes, w = d * q + m).
cpu_kernels.c's rs_linear_quant reads the codes (4 or 8 bits a weight) in registers. One row of x: unpacked to
bf16, which holds them exactly, so the layer computes x times the dequantized weight up to float32 summation
order. From `cpu_kernels.q8_rows()` rows (CPUs with AVX512-VNNI; input features a multiple of 32): each row of x is
quantized too, per block of 32 to int8 with a scale (as llama.cpp's Q8_1), and the layer computes that
dequantized x times the dequantized weight, the products summed in integers (docs/quantization.md).
The embedding stays as loaded (bf16) for its lookup; the LM head is quantized too (int8, or the GGUF's blocks).
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from radixserve.config import ServerArgs
from radixserve.model_files import GGUF_SOURCE_FILE
from worker_proc import cpu_kernels
from worker_proc.layers import ParallelLMHead, RowParallelLinear, _ColumnLinear
from worker_proc.models.llama import head_dim_of

log = logging.getLogger("radixserve.worker")

_NB = 32  # output columns per block, as NB in cpu_kernels.c
GGUF_BLOCK = 32
# GGUF tensor types kept in blocks: (bytes of a block's header: fp16 scale [, fp16 min]), code bits.
GGUF_TYPES = {"Q8_0": (2, 8), "Q4_0": (2, 4), "Q4_1": (4, 4)}
# llama.cpp's converter permutes the rows of q and k for these architectures (transformers undoes it on load).
_PERMUTED_QK = {"llama"}
_GGUF_ARCHS = {"llama", "qwen2", "qwen3"}


@dataclass
class QuantWeight:
    """w = scale * code + offset per block of `block` columns; codes int8 ([-127, 127]) or uint8 (4 bits, 0-15)."""

    codes: torch.Tensor  # [n, k]
    bits: int
    scale: torch.Tensor  # float32 [n, k // block]
    offset: torch.Tensor | None  # float32 [n, k // block], or none (zero)
    block: int
    kind: str  # int8, or the GGUF type (Q8_0, Q4_0, Q4_1)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [n, k] these codes stand for."""
        n, k = self.codes.shape
        w = self.codes.float().view(n, k // self.block, self.block) * self.scale[:, :, None]
        if self.offset is not None:
            w += self.offset[:, :, None]
        return w.view(n, k)


def quantize_int8(weight: torch.Tensor) -> QuantWeight:
    """Per-output-channel symmetric int8 of a float weight [n, k]."""
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
    return QuantWeight(codes, 8, scale, None, w.shape[1], "int8")


_GGUF_TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 30: "BF16"}
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf(path: str | Path) -> tuple[dict[str, object], dict[str, tuple[str, np.ndarray]]]:
    """A GGUF file's scalar and string metadata, and each tensor as (type name, its raw rows: uint8
    [rows, bytes of a row], memory-mapped). Arrays in the metadata (the tokenizer's) are skipped."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    buf, pos = memoryview(data), 24
    if bytes(buf[:4]) != b"GGUF" or struct.unpack_from("<I", buf, 4)[0] < 2:
        raise ValueError(f"{path} is not a GGUF file of version 2 or later")
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + n
        return bytes(buf[pos - n:pos]).decode()

    def value(kind: int) -> object:
        nonlocal pos
        if kind == 8:
            return string()
        if kind == 9:
            elem, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            for _ in range(count) if elem in (8, 9) else ():
                value(elem)
            if elem not in (8, 9):
                pos += count * struct.calcsize(_SCALARS[elem])
            return None
        (v,) = struct.unpack_from(_SCALARS[kind], buf, pos)
        pos += struct.calcsize(_SCALARS[kind])
        return v

    fields = {}
    for _ in range(n_kv):
        key = string()
        (kind,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        fields[key] = value(kind)
    infos = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, dims, _GGUF_TYPE_NAMES.get(kind, f"type {kind}"), offset))
    align = int(fields.get("general.alignment") or 32)
    start = -(-pos // align) * align
    tensors = {}
    for name, dims, kind, offset in infos:
        rows = int(np.prod(dims[1:]))
        header, bits = GGUF_TYPES.get(kind, (0, 0))
        row_bytes = dims[0] // GGUF_BLOCK * (header + GGUF_BLOCK * bits // 8) if bits else 0
        tensors[name] = (kind, data[start + offset:start + offset + rows * row_bytes].reshape(rows, row_bytes))
    return fields, tensors


def gguf_weight(raw: np.ndarray, type_name: str, heads: int = 0) -> QuantWeight:
    """A GGUF tensor's blocks (`raw`: uint8 [n, bytes of a row], as read_gguf gives them) as codes; with `heads`,
    llama.cpp's permutation of q / k rows undone (as transformers' _reverse_permute_weights does)."""
    header, bits = GGUF_TYPES[type_name]
    assert raw.flags.c_contiguous
    n, k = raw.shape[0], raw.shape[1] // (header + GGUF_BLOCK * bits // 8) * GGUF_BLOCK
    order = torch.arange(n).view(heads, n // heads // 2, 2).transpose(1, 2).reshape(n) if heads else None
    codes = torch.empty((n, k), dtype=torch.int8 if bits == 8 else torch.uint8)
    scale = torch.empty((n, k // GGUF_BLOCK))
    offset = torch.empty_like(scale) if bits == 4 else None
    cpu_kernels.library().rs_gguf_decode(raw.ctypes.data, None if order is None else order.data_ptr(), n, k, header,
                                         bits, codes.data_ptr(), scale.data_ptr(),
                                         0 if offset is None else offset.data_ptr())
    return QuantWeight(codes, bits, scale, offset, GGUF_BLOCK, type_name)


class QuantLinear:
    """A QuantWeight in rs_linear_quant's layout; `packed(x, bias)` is F.linear(x, dequantized weight, bias) for
    bf16 x, up to float32 summation order, rounded to bf16 once. Scales and offsets are kept as fp16 where that
    holds them exactly (GGUF's are fp16 in the file: a Q4_1 weight then takes 5 bits, as in the file), else as
    float32 (int8's per-channel scales)."""

    def __init__(self, qw: QuantWeight) -> None:
        self.lib = cpu_kernels.library()
        n, k = qw.codes.shape
        assert self.lib is not None and k % qw.block == 0 and qw.block % 2 == 0 and k % 2 == 0
        self.n, self.k, self.bits, self.block = n, k, qw.bits, qw.block
        blocks, kb = -(-n // _NB), k // qw.block
        codes, scale = qw.codes.contiguous(), qw.scale.float().contiguous()
        offset = None if qw.offset is None else qw.offset.float().contiguous()
        self.half = all(torch.equal(t.half().float(), t) for t in (scale, offset) if t is not None)
        dtype = torch.float16 if self.half else torch.float32
        self.codes = torch.empty(blocks * k * _NB * qw.bits // 8, dtype=torch.uint8)
        self.scale = torch.empty((blocks, kb, _NB), dtype=dtype)
        self.offset = None if offset is None else torch.empty_like(self.scale)
        self.lib.rs_pack_quant(codes.data_ptr(), n, k, qw.bits, scale.data_ptr(),
                               0 if offset is None else offset.data_ptr(), qw.block, self.half, self.codes.data_ptr(),
                               self.scale.data_ptr(), 0 if self.offset is None else self.offset.data_ptr())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.offset) if t is not None)

    def stack_fields(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int, int, bool]:
        """(weight, scale, offset, bits, block, fp16 scales) as cpu_stack describes a layer to rs_decoder_stack."""
        return self.codes, self.scale, self.offset, self.bits, self.block, self.half

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows, y = cpu_kernels.linear_rows(x, self.k, self.n, bias)
        self.lib.rs_linear_quant(rows.data_ptr(), rows.stride(0), rows.shape[0], self.codes.data_ptr(), self.bits,
                                 self.scale.data_ptr(), 0 if self.offset is None else self.offset.data_ptr(),
                                 self.half, self.n, self.k, self.block, None if bias is None else bias.data_ptr(),
                                 y.data_ptr(), self.n)
        return y.reshape(*x.shape[:-1], self.n)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's linear layers (the LM head too) by module name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (_ColumnLinear, RowParallelLinear, ParallelLMHead))}


def _local(module: nn.Module, shards: list[tuple[object, torch.Tensor]], cols: int) -> torch.Tensor:
    """This rank's [rows, cols] part of a full tensor per shard id, placed by the weight's own loader (the rows
    and, for a row-parallel layer, the columns a tensor-parallel rank keeps: there a tensor of one value per
    block of columns is widened to one per column for the loader)."""
    rows, in_local = module.weight.shape
    widen = in_local // cols if isinstance(module, RowParallelLinear) else 1
    out = torch.empty((rows, cols * widen), dtype=shards[0][1].dtype)
    for shard_id, full in shards:
        wide = full[:, :, None].expand(-1, -1, widen).reshape(full.shape[0], -1) if widen > 1 else full
        module.weight.weight_loader(out, wide, shard_id)
    return out[:, ::widen] if widen > 1 else out


def _assemble(module: nn.Module, parts: list[tuple[object, QuantWeight]]) -> QuantWeight:
    """One layer's QuantWeight from the full tensors of its shards (q, k, v; gate, up; or one)."""
    first = parts[0][1]
    in_local = module.weight.shape[1]
    assert in_local % first.block == 0, "resolve_quantization refuses a --tp-size that splits GGUF's blocks"
    kb = in_local // first.block
    codes = _local(module, [(s, qw.codes) for s, qw in parts], in_local)
    scale = _local(module, [(s, qw.scale) for s, qw in parts], kb)
    offset = None if first.offset is None else _local(module, [(s, qw.offset) for s, qw in parts], kb)
    return QuantWeight(codes, first.bits, scale, offset, first.block, first.kind)


def gguf_file(model_dir: str | Path) -> str:
    """The GGUF file that `model_dir` was converted from (radixserve.model_files)."""
    return json.loads((Path(model_dir) / GGUF_SOURCE_FILE).read_text())["gguf"]


def gguf_layer_weights(model: nn.Module, model_dir: str | Path, hf_config) -> dict[str, QuantWeight]:
    """This rank's QuantWeight of each linear layer (by module name) whose tensors the GGUF file that `model_dir`
    was converted from keeps in blocks (Q8_0, Q4_0, Q4_1), all of one type; layers stored otherwise (F32, F16, or
    a fused q / k / v or gate / up whose tensors differ in type) are left out (they compute in bf16)."""
    import gguf  # the tensor names of each architecture
    from safetensors import safe_open

    fields, tensors = read_gguf(gguf_file(model_dir))
    arch = str(fields["general.architecture"])  # one of _GGUF_ARCHS: resolve_quantization checked it
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                     hf_config.num_hidden_layers)
    modules = linear_layers(model)
    sources: dict[str, list[tuple[object, str]]] = {}  # module -> (shard id, GGUF tensor)
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for hf_name in f.keys():
                target, shard_id = model.param_name(hf_name)
                module = target.removesuffix(".weight")
                if module in modules and hf_name.endswith(".weight") and \
                        not isinstance(modules[module], ParallelLMHead):
                    gguf_name = names.get_name(hf_name.removesuffix(".weight"))
                    if gguf_name is None:
                        raise ValueError(f"--quantization gguf: no GGUF tensor name for {hf_name}")
                    sources.setdefault(module, []).append((shard_id, gguf_name))
    for name, module in modules.items():
        if isinstance(module, ParallelLMHead):  # a tied head reads the embedding's blocks
            sources[name] = [(None, "output" if "output.weight" in tensors else "token_embd")]
    out = {}
    for name, parts in sources.items():
        tensors_of = [tensors[f"{gguf_name}.weight"] for _, gguf_name in parts]
        if tensors_of[0][0] not in GGUF_TYPES or any(kind != tensors_of[0][0] for kind, _ in tensors_of):
            continue
        weights = []
        for (shard_id, gguf_name), (kind, raw) in zip(parts, tensors_of):
            heads = 0
            if arch in _PERMUTED_QK and gguf_name.endswith((".attn_q", ".attn_k")):
                heads = hf_config.num_attention_heads if gguf_name.endswith("q") else hf_config.num_key_value_heads
            weights.append((shard_id, gguf_weight(raw, kind, heads)))
        out[name] = _assemble(modules[name], weights)
    return out



def resolve_quantization(args: ServerArgs, device: torch.device, dtype: torch.dtype, model_dir: str | Path,
                         hf_config) -> str | None:
    """The --quantization a worker runs, decided here alone (docs/quantization.md, "Defaults, and why"). As given,
    where int8 / gguf can run (else a start-up error naming the flag). Without the flag, for a GGUF file: gguf where
    its blocks can be kept exactly as `--quantization gguf` keeps them, on a CPU with AVX512-VNNI (the measured gain
    from 16 rows is the quantized activations') and outside --enable-deterministic-inference (which runs quantized
    layers in blocks of 16 rows, one row too); else none (the file expanded to --dtype). The log says which, and why."""
    if args.quantization is not None:
        problem = _cannot_run(args.quantization, args, device, dtype, model_dir, hf_config)
        if problem:
            raise ValueError(problem)
        return args.quantization
    if args.load_format == "dummy" or not (Path(model_dir) / GGUF_SOURCE_FILE).exists():
        return None
    problem = _cannot_run("gguf", args, device, dtype, model_dir, hf_config)
    if problem is None and args.enable_deterministic_inference:
        problem = "--enable-deterministic-inference runs quantized layers in blocks of 16 rows, one row too"
    if problem is None and not cpu_kernels.q8_rows():
        problem = "this CPU lacks AVX512-VNNI: kept blocks would be slower than bf16 weights from 16 rows"
    if problem is None:
        log.info("the GGUF file's blocks are kept (the default where this CPU's kernels run them: --quantization "
                 "gguf; --quantization none expands the file)")
        return "gguf"
    log.info("the GGUF file is expanded to %s (default here: --quantization none), since %s",
             str(dtype).removeprefix("torch."), problem)
    return "none"


def _cannot_run(quantization: str, args: ServerArgs, device: torch.device, dtype: torch.dtype,
                model_dir: str | Path, hf_config) -> str | None:
    """Why --quantization int8 / gguf cannot run here (a sentence naming the flag), or None."""
    if quantization not in ("int8", "gguf"):
        return None
    flag = f"--quantization {quantization}"
    if device.type != "cpu":
        return f"{flag} runs on the CPU (cpu_kernels); on CUDA GPUs use --quantization fp8"
    if dtype != torch.bfloat16:
        return f"{flag} computes in bfloat16: leave --dtype at auto or bfloat16 (not {dtype})"
    if cpu_kernels.library() is None:
        has = "has" if "avx512_bf16" in cpu_kernels.cpu_flags() else "lacks"
        return f"{flag} needs cpu_kernels: a CPU with AVX512-BF16 (this one {has} it) and a C compiler"
    if quantization == "int8":
        return None
    if args.load_format == "dummy":
        return f"{flag} keeps a GGUF file's blocks: --load-format dummy has no file"
    if not (Path(model_dir) / GGUF_SOURCE_FILE).exists():
        return f"{flag} keeps a GGUF file's blocks, and the model is not a .gguf file"
    arch = str(read_gguf(gguf_file(model_dir))[0]["general.architecture"])
    if arch not in _GGUF_ARCHS:
        return f"{flag}: GGUF architecture {arch!r} is not supported (supported: {sorted(_GGUF_ARCHS)})"
    # A row-parallel layer's (o_proj, down_proj) input columns are split over the ranks.
    for width in (hf_config.num_attention_heads * head_dim_of(hf_config), hf_config.intermediate_size):
        if width // args.tp_size % GGUF_BLOCK:
            return (f"{flag}: a rank's {width // args.tp_size} input columns of a row-parallel layer split GGUF's "
                    f"blocks of {GGUF_BLOCK} (choose another --tp-size)")
    return None


def int8_layer_weights(model: nn.Module) -> dict[str, QuantWeight]:
    """--quantization int8: each linear layer's weight, the LM head's too (a tied one keeps the embedding's
    bf16 rows for the lookup): on a small model the LM head is a large part of the bytes a decode step reads."""
    weights = {}
    for name, module in linear_layers(model).items():
        if module.weight.shape[1] % 2:
            raise ValueError(f"--quantization int8: {name} has an odd number of input features")
        weights[name] = quantize_int8(module.weight)
    return weights


def install_quantized(model: nn.Module, weights: dict[str, QuantWeight]) -> int:
    """Give these linear layers (by module name) their quantized weights as `packed` (see
    layers.pack_cpu_linears) and free their bf16 copies (not a tied LM head's: the embedding reads it).
    Returns the quantized weights' bytes."""
    modules, nbytes = linear_layers(model), 0
    for name, qw in weights.items():
        module = modules[name]
        module.packed = QuantLinear(qw)
        nbytes += module.packed.nbytes
        if not (isinstance(module, ParallelLMHead) and module.tied):
            module.weight.data = module.weight.data.new_empty(0)
    return nbytes


def quantize_cpu_linears(model: nn.Module, quantization: str, model_dir: str | Path,
                         hf_config) -> tuple[str, int, str]:
    """--quantization int8 or gguf on a loaded bf16 model; returns a line for the log, the quantized weights'
    bytes and their kinds (`int8`, `Q4_1+Q8_0`, ...)."""
    weights = int8_layer_weights(model) if quantization == "int8" else \
        gguf_layer_weights(model, model_dir, hf_config)
    nbytes = install_quantized(model, weights)
    kinds = "+".join(sorted({qw.kind for qw in weights.values()})) or "none"
    line = (f"{len(weights)} of {len(linear_layers(model))} linear layers quantized ({quantization}: {kinds}), "
            f"{nbytes / 1e6:.1f} MB")
    rows = cpu_kernels.q8_rows()
    if not rows:
        log.warning("this CPU lacks AVX512-VNNI: the quantized layers keep bf16 activations at every batch size, "
                    "slower than bf16 weights at 16 rows and more (docs/quantization.md)")
        return line, nbytes, kinds
    bf16_only = sum(qw.codes.shape[1] % GGUF_BLOCK != 0 for qw in weights.values())
    line += f"; activations of {rows}+ rows quantized per row to int8 (AVX512-VNNI)"
    if bf16_only:
        line += f", except in {bf16_only} layers whose input features are not a multiple of {GGUF_BLOCK}"
    return line, nbytes, kinds
