"""Loading FP8 weights: `--quantization fp8` over a bf16 / float checkpoint (quantized at load, per output
channel), or a pre-quantized checkpoint, detected from config.json's `quantization_config`:

  HF's FP8 layout (`quant_method: fp8`, Qwen3-*-FP8): e4m3 `weight` and `weight_scale_inv` [ceil(n / bn),
    ceil(k / bk)] per `weight_block_size` [bn, bk] block (W = weight * scale_inv);
  compressed-tensors (`quant_method: compressed-tensors`, format `float-quantized`, RedHatAI's -FP8 and
    -FP8-dynamic): e4m3 `weight` and `weight_scale` per channel [n, 1] or per tensor [1]; `input_scale`
    (static activation scales) is skipped: activations are quantized per token on the fly, finer than one
    scale per tensor. Per-layer KV scales (`self_attn.k_scale` / `v_scale`, or `k_proj` / `v_proj.output_scale`)
    are kept for an FP8 KV cache (model.kv_scales).

Every column- and row-parallel linear gets FP8 weights (worker_proc.fp8); the embedding, the LM head, norms
and MoE experts stay in the model's dtype. A checkpoint's scales are stored per row of this rank's shard
([rows, k groups]), cut the way its weight is cut, so each TP shard's scales travel with it. On CUDA the
weights end up with one scale per output channel: block scales are turned into that at load (dequantized,
then requantized per row; logged), which lets one GEMM path (_scaled_mm's rowwise scales) serve both layouts.
A bf16 checkpoint's row-parallel weights take each row's amax over all ranks, so their scales are tp 1's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from worker_proc import batch_invariant, fp8
from worker_proc.layers import RowParallelLinear, _ColumnLinear, divide
from worker_proc.parallel import tp_max_, tp_rank, tp_size

log = logging.getLogger("radixserve.worker")

_KV_SCALE_SUFFIXES = {".self_attn.k_scale": 0, ".self_attn.v_scale": 1,
                      ".self_attn.k_proj.output_scale": 0, ".self_attn.v_proj.output_scale": 1}


@dataclass(frozen=True)
class Fp8Scheme:
    """How a checkpoint's FP8 weights are laid out; `scale_name` None: a float checkpoint quantized at load."""

    scale_name: str | None = None  # "weight_scale_inv" (HF) or "weight_scale" (compressed-tensors)
    block: tuple[int, int] | None = None  # HF: [rows, columns] of a scale's block
    per_tensor: bool = False  # compressed-tensors' "tensor" strategy
    ignore: tuple[str, ...] = ()  # modules kept in the model's dtype (names or their last part)

    @property
    def prequantized(self) -> bool:
        return self.scale_name is not None


def scheme_of(hf_config: Any, quantization: str | None) -> Fp8Scheme | None:
    """The FP8 scheme of this model and --quantization, None where the weights are not FP8 (int8 and GGUF blocks
    are the CPU's). A quantization_config this server does not read stops the start, naming it."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return Fp8Scheme() if quantization == "fp8" else None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    if method == "fp8":
        block = qc.get("weight_block_size")
        if not block or len(block) != 2:
            raise ValueError(f"config.json quantization_config: quant_method 'fp8' without a weight_block_size "
                             f"({block!r}) is not supported (block-wise scales, as in Qwen3-*-FP8, are)")
        scheme = Fp8Scheme("weight_scale_inv", (int(block[0]), int(block[1])),
                           ignore=tuple(qc.get("modules_to_not_convert") or ()))
    elif method == "compressed-tensors":
        scheme = _compressed_tensors(qc)
    else:
        raise ValueError(f"config.json quantization_config: quant_method {method!r} is not supported "
                         "(fp8 and compressed-tensors FP8 are)")
    if quantization not in (None, "fp8"):
        raise ValueError(f"--quantization {quantization}: this checkpoint is FP8 ({method}); leave the flag out "
                         "or pass --quantization fp8")
    return scheme


def _compressed_tensors(qc: dict) -> Fp8Scheme:
    fmt = qc.get("format")
    groups = list((qc.get("config_groups") or {}).values())
    weights = [g.get("weights") or {} for g in groups]
    strategies = {w.get("strategy") for w in weights}
    if fmt != "float-quantized" or not weights or strategies - {"channel", "tensor"} or len(strategies) != 1 or \
            any(w.get("type") != "float" or w.get("num_bits") != 8 for w in weights):
        raise ValueError(f"config.json quantization_config: compressed-tensors format {fmt!r} with weights "
                         f"{weights} is not supported (float-quantized 8-bit weights per channel or per tensor are)")
    return Fp8Scheme("weight_scale", per_tensor=strategies == {"tensor"}, ignore=tuple(qc.get("ignore") or ()))


class Fp8Loading:
    """The FP8 steps of load_model: `prepare` (before a pre-quantized checkpoint's tensors are read), `weights`
    (the checkpoint's tensors as our parameters take them), `finish` (after loading)."""

    def __init__(self, scheme: Fp8Scheme, device: torch.device, what: str) -> None:
        if device.type == "cpu" and scheme.prequantized:
            log.warning("%s on the CPU: the FP8 weights are dequantized in every matmul (slow; for checks)", what)
        else:
            fp8.check_gpu(device, what)
        if batch_invariant.ENABLED:
            raise ValueError(f"{what}: --enable-deterministic-inference covers no FP8 weights yet")
        self.scheme, self.device = scheme, device
        self.kv_scales: dict[int, list[float]] = {}

    @classmethod
    def of(cls, hf_config: Any, quantization: str | None, load_format: str,
           device: torch.device) -> Fp8Loading | None:
        scheme = scheme_of(hf_config, quantization)
        if scheme is None:
            return None
        what = "--quantization fp8" if not scheme.prequantized else "an FP8 checkpoint"
        if load_format == "dummy":  # random weights: made in the model's dtype on the device, then quantized
            scheme = Fp8Scheme(ignore=scheme.ignore)
        return cls(scheme, device, what)

    def linears(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for name, module in model.named_modules():
            if isinstance(module, (_ColumnLinear, RowParallelLinear)) and not any(
                    name == ig or name.endswith("." + ig) for ig in self.scheme.ignore):
                yield name, module

    def prepare(self, model: nn.Module) -> None:
        """Give every FP8 linear an e4m3 weight and a scale parameter named as the checkpoint names it."""
        if not self.scheme.prequantized:
            return
        for _, module in self.linears(model):
            w = module.weight
            module.weight = _param(w.data.new_empty(w.shape, dtype=fp8.FP8), w.weight_loader, w.shards)
            setattr(module, self.scheme.scale_name, self._scale_param(module))

    def _scale_param(self, module: nn.Module) -> nn.Parameter:
        n, k = module.weight.shape
        block = self.scheme.block
        if block is None:
            groups = 1
            full = (lambda rows, cols: (1,)) if self.scheme.per_tensor else (lambda rows, cols: (rows, 1))
        else:
            groups = -(-k // block[1])
            full = lambda rows, cols: (-(-rows // block[0]), -(-cols // block[1]))  # noqa: E731
            if tp_size() > 1 and isinstance(module, RowParallelLinear):
                divide(k, block[1], f"with tensor parallelism, the input features per rank of a block-scaled weight "
                                    f"(blocks of {block[1]})")
        shards = {sid: full(*shape) for sid, shape in module.weight.shards.items()}
        data = torch.empty((n, groups), dtype=torch.float32, device=module.weight.device)
        return _param(data, lambda p, t, sid=None: self._load_scale(module, p, t, sid), shards)

    def _load_scale(self, module: nn.Module, param: nn.Parameter, full: torch.Tensor, shard_id: Any) -> None:
        """A checkpoint scale, expanded to one entry per row of the full weight, then cut as the weight is."""
        rows, cols = module.weight.shards[shard_id]
        block = self.scheme.block
        full = full.float().reshape(-1, full.shape[-1] if full.dim() else 1)
        if block is not None:
            full = full.repeat_interleave(block[0], dim=0)[:rows]
        else:
            full = full.expand(rows, 1)
        if isinstance(module, RowParallelLinear):
            groups = param.shape[1]
            start = tp_rank() * module.in_local // block[1] if block is not None and tp_size() > 1 else 0
            param.data.copy_(full.narrow(1, start, groups))
        else:
            module._load(param, full, shard_id)

    def weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors without its activation and KV scales (KV scales kept: kv_scales)."""
        for name, tensor in tensors:
            if name.endswith(".input_scale"):
                continue
            kv = next((i for suffix, i in _KV_SCALE_SUFFIXES.items() if name.endswith(suffix)), None)
            if kv is not None:
                layer = int(name.split(".layers.")[1].split(".")[0])
                self.kv_scales.setdefault(layer, [1.0, 1.0])[kv] = float(tensor.float().reshape(-1)[0])
                continue
            if name.endswith(".weight_scale") and tensor.dim() == 0:  # older compressed-tensors: a scalar
                tensor = tensor.reshape(1)
            yield name, tensor

    @torch.no_grad()
    def finish(self, model: nn.Module) -> None:
        """Plug an fp8.Fp8Linear into every FP8 linear: a pre-quantized one as loaded (on CUDA its scales
        brought to one per row), a float one quantized per output channel now."""
        requantized = 0
        for _, module in self.linears(model):
            w = module.weight
            if self.scheme.prequantized:
                scale = getattr(module, self.scheme.scale_name)
                group = self.scheme.block[1] if self.scheme.block else w.shape[1]
                if w.is_cuda and scale.shape[1] > 1:
                    q, s = fp8.quantize_rows(fp8.dequantize(w.data, scale.data, group))
                    w.data, scale.data, group = q, s, w.shape[1]
                    requantized += 1
            else:
                amax = w.data.abs().amax(dim=1).float()
                if isinstance(module, RowParallelLinear):
                    tp_max_(amax)  # the row's amax over its whole input: tp 1's scale on every rank
                q, s = fp8.quantize_rows(w.data, amax)
                w.data = q
                module.weight_scale = scale = nn.Parameter(s, requires_grad=False)
                group = w.shape[1]
            if w.is_cuda and (w.shape[0] % 16 or w.shape[1] % 16):
                raise ValueError(f"FP8 weights on CUDA need dimensions that are multiples of 16 (_scaled_mm), "
                                 f"not {tuple(w.shape)}")
            module.packed = fp8.Fp8Linear(w.data, scale.data, group)
        if requantized:
            log.warning("FP8 checkpoint: %d block-scaled weights requantized to per-channel scales at load (the "
                        "GEMMs here take one scale per output channel)", requantized)
        model.kv_scales = self.kv_scales
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _param(data: torch.Tensor, loader: Any, shards: dict) -> nn.Parameter:
    param = nn.Parameter(data, requires_grad=False)
    param.weight_loader, param.shards = loader, shards
    return param
