"""ModelRunner: the model, its KV cache and the block-table mirror of one TP rank; runs a StepBatch."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from radixserve.config import ServerArgs
from radixserve.model_files import load_hf_config
from radixserve.wire import NewReq, StepBatch, StepResult, from_i32
from worker_proc import parallel
from worker_proc.attention import ForwardMeta, backend_class, resolve_backend_name
from worker_proc.cuda_graph import DecodeGraphs, capture_sizes
from worker_proc.kv_cache import KVCache
from worker_proc.sampling import SamplingBatch, sample, top_logprobs
from worker_proc.weights import load_model

log = logging.getLogger("radixserve.worker")

PAD_SLOT = 0  # the KV slot that padding rows write; the scheduler never hands it out
STEP_BUF_INTS = 1 << 20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(args: ServerArgs, rank: int) -> torch.device:
    kind = args.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{rank}") if kind == "cuda" else torch.device("cpu")


class SlotParams:
    """Sampling and logprob settings of the request in each req slot (set once at admission)."""

    def __init__(self, max_reqs: int) -> None:
        self.temperature = np.ones(max_reqs, dtype=np.float32)
        self.top_p = np.ones(max_reqs, dtype=np.float32)
        self.top_k = np.full(max_reqs, -1, dtype=np.int64)
        self.min_p = np.zeros(max_reqs, dtype=np.float32)
        self.seed = np.full(max_reqs, -1, dtype=np.int64)
        self.min_new_tokens = np.zeros(max_reqs, dtype=np.int64)
        self.top_logprobs_num = np.zeros(max_reqs, dtype=np.int64)
        self.logprob_start = np.full(max_reqs, -1, dtype=np.int64)
        self.stop_ids: list[np.ndarray] = [np.zeros(0, np.int32)] * max_reqs
        self.prompt_ids: list[np.ndarray | None] = [None] * max_reqs

    def set(self, nr: NewReq) -> None:
        s = nr.req_slot
        self.temperature[s], self.top_p[s], self.top_k[s] = nr.temperature, nr.top_p, nr.top_k
        self.min_p[s], self.seed[s], self.min_new_tokens[s] = nr.min_p, nr.seed, nr.min_new_tokens
        self.stop_ids[s] = from_i32(nr.stop_ids)
        self.top_logprobs_num[s] = nr.logprob.top_logprobs_num if nr.logprob else 0
        self.logprob_start[s] = nr.logprob.logprob_start_len if nr.logprob and nr.prompt_ids else -1
        self.prompt_ids[s] = from_i32(nr.prompt_ids) if nr.prompt_ids else None

    def batch(self, slots: np.ndarray, offsets: np.ndarray) -> SamplingBatch:
        banned = [(row, self.stop_ids[slots[row]]) for row in np.flatnonzero(offsets < self.min_new_tokens[slots])
                  if len(self.stop_ids[slots[row]])]
        return SamplingBatch(self.temperature[slots], self.top_p[slots], self.top_k[slots], self.min_p[slots],
                             self.seed[slots], offsets, banned)


@dataclass
class StepArrays:
    """One step's per-request and per-token host arrays (int32), in batch order (see StepBatch)."""

    req_slots: np.ndarray
    cached: np.ndarray
    extend: np.ndarray
    input_ids: np.ndarray
    out_slots: np.ndarray

    @classmethod
    def of(cls, b: StepBatch) -> StepArrays:
        return cls(from_i32(b.req_slots), from_i32(b.cached_lens), from_i32(b.extend_lens), from_i32(b.input_ids),
                   from_i32(b.out_slots))

    def padded(self, bs: int, pad_row: int) -> StepArrays:
        """A decode batch of `bs` rows: these, then rows of one token at position 0 in req row `pad_row`,
        whose K/V go to PAD_SLOT (and which attend only to it)."""
        n = bs - len(self.req_slots)
        zeros = np.zeros(n, dtype=np.int32)
        return StepArrays(np.concatenate([self.req_slots, np.full(n, pad_row, np.int32)]),
                          np.concatenate([self.cached, zeros]), np.concatenate([self.extend, np.ones(n, np.int32)]),
                          np.concatenate([self.input_ids, zeros]),
                          np.concatenate([self.out_slots, np.full(n, PAD_SLOT, np.int32)]))


@dataclass
class DeviceStep:
    meta: ForwardMeta
    input_ids: torch.Tensor
    positions: torch.Tensor
    last: torch.Tensor  # row of each request's last new token


class ModelRunner:
    def __init__(self, args: ServerArgs, rank: int, model_dir: str) -> None:
        self.args, self.rank = args, rank
        self.device = resolve_device(args, rank)
        hf_config = load_hf_config(model_dir)
        self.dtype = self._dtype(hf_config)
        t0 = time.monotonic()
        self.model = load_model(model_dir, hf_config, args.load_format, self.dtype, self.device, seed=args.random_seed)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        log.info("rank %d loaded %s (%.2f GB, %s) in %.1f s", rank, hf_config.architectures, self.weight_bytes / 1e9,
                 self.dtype, time.monotonic() - t0)
        # Positions past the model's rotary table have no embedding: never serve beyond it.
        self.context_length = min(args.context_length or hf_config.max_position_embeddings,
                                  hf_config.max_position_embeddings)
        if args.context_length and args.context_length > self.context_length:
            log.warning("--context-length %d exceeds the model's %d positions: using %d", args.context_length,
                        self.context_length, self.context_length)
        # Mistral attends within a sliding window, which the attention backends do not apply: up to the
        # window the results are exact, so the context stops there.
        window = getattr(hf_config, "sliding_window", None) if hf_config.model_type == "mistral" else None
        if window and window < self.context_length:
            log.warning("the model's sliding window (%d tokens) is not implemented: context length %d, not %d",
                        window, window, self.context_length)
            self.context_length = window
        m = self.model
        self.kv_bytes_per_token = KVCache.bytes_per_token(m.num_layers, m.num_kv_heads_local, m.head_dim, self.dtype)
        self.num_kv_slots = parallel.tp_min(self._kv_slots_that_fit()) + 1  # + the padding slot 0
        self.kv_cache = KVCache(m.num_layers, self.num_kv_slots, m.num_kv_heads_local, m.head_dim, self.dtype, self.device)
        log.info("rank %d KV cache: %d tokens, %.2f GB (%d bytes per token on this rank)", rank, self.num_kv_slots - 1,
                 self.num_kv_slots * self.kv_bytes_per_token / 1e9, self.kv_bytes_per_token)
        self.backend_name = resolve_backend_name(args.attention_backend, self.device.type)
        self.attn = backend_class(self.backend_name)(self.kv_cache, m.num_q_heads_local, m.head_dim)
        # Mirror of the scheduler's block table; rows are req slots, kept in sync by every StepBatch.
        # The extra last row is the padding rows' (graph-padded decode batches); the scheduler never uses it.
        self.pad_row = args.max_running_requests
        self.req_to_token = torch.zeros((args.max_running_requests + 1, self.context_length), dtype=torch.int32,
                                        device=self.device)
        # Each step's int32 inputs arrive in one host-to-device copy into this buffer (at fixed addresses,
        # which captured graphs read); a step too large for it gets a fresh tensor.
        self._step_buf = torch.zeros(STEP_BUF_INTS, dtype=torch.int32, device=self.device)
        self.slot_params = SlotParams(args.max_running_requests)
        # The scheduler sends prefix groups only with the radix cache on; a backend without cascade ignores them.
        self.use_cascade = self.attn.supports_cascade and not (args.disable_cascade_attention or
                                                                args.disable_radix_cache)
        self.graphs = self._capture_graphs()

    def _dtype(self, hf_config) -> torch.dtype:
        if self.args.dtype != "auto":
            return DTYPES[self.args.dtype]
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def _kv_slots_that_fit(self) -> int:
        if self.args.max_total_tokens:
            return self.args.max_total_tokens
        cap = self.args.max_running_requests * self.context_length
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # loading's temporaries are not "used"
            free, total = torch.cuda.mem_get_info(self.device)
            budget = total * self.args.mem_fraction_static - (total - free)
        else:
            budget = _mem_available() * 0.25 * self.args.mem_fraction_static
        return max(1, min(cap, int(budget // self.kv_bytes_per_token)))

    def _capture_graphs(self) -> DecodeGraphs | None:
        if self.device.type != "cuda" or self.args.disable_cuda_graph or not self.attn.supports_cuda_graph:
            return None
        sizes = capture_sizes(min(self.args.cuda_graph_max_bs, self.args.max_running_requests))
        if not sizes:
            return None
        t0 = time.monotonic()
        self.attn.init_graphs(sizes[-1], sizes[-1] * self.context_length)
        graphs = DecodeGraphs()
        empty = StepArrays(*(np.zeros(0, np.int32) for _ in range(5)))
        with torch.inference_mode():
            for bs in reversed(sizes):
                for cascade in (False, True) if self.use_cascade else (False,):
                    groups = np.zeros((0, 2), np.int32) if cascade else None
                    d = self._to_device(empty.padded(bs, self.pad_row), is_decode=True, prefix_groups=groups)
                    self.attn.prepare_graph(d.meta)
                    graphs.capture(bs, lambda d=d: self.model.compute_logits(
                        self.model.forward(d.input_ids, d.positions, self.attn)), cascade=cascade)
        log.info("rank %d captured decode CUDA graphs for batch sizes %s in %.1f s", self.rank, sizes,
                 time.monotonic() - t0)
        return graphs

    def _upload(self, host: np.ndarray) -> torch.Tensor:
        """One host-to-device copy of an int32 array (stream-ordered after the previous step's kernels)."""
        src = torch.from_numpy(host)
        if len(host) > len(self._step_buf):
            return src.to(self.device)
        dst = self._step_buf[:len(host)]
        dst.copy_(src, non_blocking=True)  # pageable source: staged before copy_ returns
        return dst

    def _to_device(self, a: StepArrays, is_decode: bool, prefix_groups: np.ndarray | None = None) -> DeviceStep:
        """Upload a step, record its new tokens' KV slots in req_to_token, and describe it for attention."""
        num_tokens, bs = len(a.input_ids), len(a.req_slots)
        qo_indptr = np.zeros(bs + 1, dtype=np.int32)
        np.cumsum(a.extend, out=qo_indptr[1:])
        positions = np.repeat(a.cached - qo_indptr[:-1], a.extend) + np.arange(num_tokens, dtype=np.int32)
        seq_lens = a.cached + a.extend
        host = np.concatenate([a.input_ids, positions, a.out_slots, np.repeat(a.req_slots, a.extend), a.req_slots,
                               seq_lens, a.extend, qo_indptr, qo_indptr[1:] - 1]).astype(np.int32, copy=False)
        ids, pos, out, rows, slots, lens, ext, qo, last = torch.split(
            self._upload(host), [num_tokens] * 4 + [bs] * 3 + [bs + 1, bs])
        self.req_to_token[rows, pos] = out
        meta = ForwardMeta(is_decode=is_decode, req_slots=slots, seq_lens=lens, extend_lens=ext, qo_indptr=qo,
                           out_slots=out, req_to_token=self.req_to_token, seq_lens_cpu=seq_lens.tolist(),
                           extend_lens_cpu=a.extend.tolist(), prefix_groups=prefix_groups)
        return DeviceStep(meta, ids, pos, last)

    def forward(self, a: StepArrays, is_decode: bool,
                prefix_groups: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """float32 logits of each request's last new token [B, V], and the hidden states of all new tokens
        (None when a decode graph ran). `prefix_groups`: decode with cascade attention (see ForwardMeta)."""
        bs = len(a.req_slots)
        cascade = prefix_groups is not None
        graph_bs = self.graphs.padded_size(bs) if is_decode and self.graphs is not None else None
        if graph_bs is not None and self.graphs.has(graph_bs, cascade):
            d = self._to_device(a.padded(graph_bs, self.pad_row), is_decode=True, prefix_groups=prefix_groups)
            self.attn.prepare_graph(d.meta)
            return self.graphs.replay(graph_bs, cascade)[:bs], None
        d = self._to_device(a, is_decode, prefix_groups)
        self.attn.prepare(d.meta)
        hidden = self.model.forward(d.input_ids, d.positions, self.attn)
        return self.model.compute_logits(hidden[d.last]), hidden

    @torch.inference_mode()
    def step(self, b: StepBatch) -> StepResult | None:
        t0 = time.perf_counter()
        for nr in b.new_reqs:
            prefix = torch.from_numpy(from_i32(nr.prefix_slots).copy())
            self.req_to_token[nr.req_slot, :len(prefix)] = prefix.to(self.device)
            self.slot_params.set(nr)
        a = StepArrays.of(b)
        groups = from_i32(b.prefix_groups).reshape(-1, 2) if b.prefix_groups and self.use_cascade else None
        logits, hidden = self.forward(a, b.is_decode, groups)
        # Decode steps compute no prompt tokens, so they have no input logprobs.
        input_lps = {} if hidden is None or b.is_decode else self._input_logprobs(hidden, a)
        if self.rank != 0:
            return None
        offsets = from_i32(b.sample_offsets)
        next_ids, logprobs = sample(logits, self.slot_params.batch(a.req_slots, offsets))
        chosen = logprobs.gather(1, next_ids[:, None]).squeeze(1)
        top_k = self.slot_params.top_logprobs_num[a.req_slots]
        tops = {int(i): top_logprobs(logprobs[i], int(top_k[i])) for i in np.flatnonzero(top_k)}
        # One copy to the host: token ids (< 2**24) are exact in float32.
        host = torch.stack((next_ids.float(), chosen.float())).cpu().numpy()
        result = StepResult(step=b.step, next_ids=host[0].astype(np.int32).tobytes(), next_logprobs=host[1].tobytes(),
                            top_logprobs=tops)
        for i, (lps, top) in input_lps.items():
            result.input_logprobs[i] = lps
            if top is not None:
                result.input_top_logprobs[i] = top
        result.forward_ms = (time.perf_counter() - t0) * 1000
        return result

    def _input_logprobs(self, hidden: torch.Tensor, a: StepArrays) -> dict[int, tuple[list, list | None]]:
        """Logprobs of prompt tokens computed in this step, for requests that asked for them.

        The logprob of prompt token t comes from the hidden state at position t - 1.
        """
        out = {}
        sp = self.slot_params
        starts = np.cumsum(a.extend) - a.extend  # first row of each request in `hidden`
        for i, s in enumerate(a.req_slots):
            prompt = sp.prompt_ids[s]
            if prompt is None:
                continue
            cached, extend = int(a.cached[i]), int(a.extend[i])
            first = max(cached + 1, int(sp.logprob_start[s]), 1)
            last = min(cached + extend, len(prompt) - 1)  # inclusive target index
            if first > last:
                out[i] = ([], None)
                continue
            rows = torch.arange(first - 1, last, device=self.device) - cached + int(starts[i])
            lps = torch.log_softmax(self.model.compute_logits(hidden[rows]), dim=-1)
            targets = torch.from_numpy(prompt[first:last + 1].astype(np.int64)).to(self.device)
            values = lps.gather(1, targets[:, None]).squeeze(1).tolist()
            k = int(sp.top_logprobs_num[s])
            top = [top_logprobs(lps[j], k) for j in range(len(values))] if k > 0 else None
            out[i] = (values, top)
        return out


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30
