"""ModelRunner: the model, its KV cache and the block-table mirror of one TP rank; runs a StepBatch."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from radixserve.config import ServerArgs
from radixserve.model_files import load_hf_config
from radixserve.wire import NewReq, StepBatch, StepResult, from_i32
from worker_proc import parallel
from worker_proc.attention import ForwardMeta, backend_class, resolve_backend_name
from worker_proc.kv_cache import KVCache
from worker_proc.sampling import SamplingBatch, sample, top_logprobs
from worker_proc.weights import load_model

log = logging.getLogger("radixserve.worker")

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
        banned = [(row, self.stop_ids[s]) for row, s in enumerate(slots)
                  if offsets[row] < self.min_new_tokens[s] and len(self.stop_ids[s])]
        return SamplingBatch(self.temperature[slots], self.top_p[slots], self.top_k[slots], self.min_p[slots],
                             self.seed[slots], offsets, banned)


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
        self.context_length = args.context_length or hf_config.max_position_embeddings
        m = self.model
        self.kv_bytes_per_token = KVCache.bytes_per_token(m.num_layers, m.num_kv_heads_local, m.head_dim, self.dtype)
        self.num_kv_slots = parallel.tp_min(self._kv_slots_that_fit()) + 1  # + the padding slot 0
        self.kv_cache = KVCache(m.num_layers, self.num_kv_slots, m.num_kv_heads_local, m.head_dim, self.dtype, self.device)
        self.backend_name = resolve_backend_name(args.attention_backend, self.device.type)
        self.attn = backend_class(self.backend_name)(self.kv_cache, m.num_q_heads_local, m.head_dim)
        # Mirror of the scheduler's block table; rows are req slots, kept in sync by every StepBatch.
        self.req_to_token = torch.zeros((args.max_running_requests, self.context_length), dtype=torch.int32,
                                        device=self.device)
        self.slot_params = SlotParams(args.max_running_requests)

    def _dtype(self, hf_config) -> torch.dtype:
        if self.args.dtype != "auto":
            return DTYPES[self.args.dtype]
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def _kv_slots_that_fit(self) -> int:
        if self.args.max_total_tokens:
            return self.args.max_total_tokens
        cap = self.args.max_running_requests * self.context_length
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = total * self.args.mem_fraction_static - (total - free)
        else:
            budget = _mem_available() * 0.25 * self.args.mem_fraction_static
        return max(1, min(cap, int(budget // self.kv_bytes_per_token)))

    @torch.inference_mode()
    def step(self, b: StepBatch) -> StepResult | None:
        t0 = time.perf_counter()
        for nr in b.new_reqs:
            prefix = torch.from_numpy(from_i32(nr.prefix_slots).copy())
            self.req_to_token[nr.req_slot, :len(prefix)] = prefix.to(self.device)
            self.slot_params.set(nr)
        req_slots, cached, extend = from_i32(b.req_slots), from_i32(b.cached_lens), from_i32(b.extend_lens)
        qo_indptr = np.zeros(len(extend) + 1, dtype=np.int32)
        np.cumsum(extend, out=qo_indptr[1:])
        positions = np.repeat(cached - qo_indptr[:-1], extend) + np.arange(qo_indptr[-1])
        dev = self.device
        pos_t = torch.from_numpy(positions).to(dev)
        out_slots = torch.from_numpy(from_i32(b.out_slots).astype(np.int64)).to(dev)
        rows = torch.from_numpy(np.repeat(req_slots, extend).astype(np.int64)).to(dev)
        self.req_to_token[rows, pos_t] = out_slots.to(torch.int32)
        seq_lens = cached + extend
        meta = ForwardMeta(is_decode=b.is_decode, req_slots=torch.from_numpy(req_slots.copy()).to(dev),
                           seq_lens=torch.from_numpy(seq_lens).to(dev), extend_lens=torch.from_numpy(extend.copy()).to(dev),
                           qo_indptr=torch.from_numpy(qo_indptr).to(dev), out_slots=out_slots,
                           req_to_token=self.req_to_token, seq_lens_cpu=seq_lens.tolist(),
                           extend_lens_cpu=extend.tolist())
        self.attn.prepare(meta)
        input_ids = torch.from_numpy(from_i32(b.input_ids).astype(np.int64)).to(dev)
        hidden = self.model.forward(input_ids, pos_t, self.attn)
        last = torch.from_numpy((qo_indptr[1:] - 1).astype(np.int64)).to(dev)
        logits = self.model.compute_logits(hidden[last])
        input_lps = self._input_logprobs(hidden, req_slots, cached, extend, qo_indptr)
        if self.rank != 0:
            return None
        offsets = from_i32(b.sample_offsets)
        next_ids, logprobs = sample(logits, self.slot_params.batch(req_slots, offsets))
        chosen = logprobs.gather(1, next_ids[:, None]).squeeze(1)
        tops = {i: top_logprobs(logprobs[i], int(k)) for i, k in enumerate(self.slot_params.top_logprobs_num[req_slots])
                if k > 0}
        result = StepResult(step=b.step, next_ids=next_ids.to(torch.int32).cpu().numpy().tobytes(),
                            next_logprobs=chosen.float().cpu().numpy().tobytes(), top_logprobs=tops)
        for i, (lps, top) in input_lps.items():
            result.input_logprobs[i] = lps
            if top is not None:
                result.input_top_logprobs[i] = top
        result.forward_ms = (time.perf_counter() - t0) * 1000
        return result

    def _input_logprobs(self, hidden, req_slots, cached, extend, qo_indptr) -> dict[int, tuple[list, list | None]]:
        """Logprobs of prompt tokens computed in this step, for requests that asked for them.

        The logprob of prompt token t comes from the hidden state at position t - 1.
        """
        out = {}
        sp = self.slot_params
        for i, s in enumerate(req_slots):
            prompt = sp.prompt_ids[s]
            if prompt is None:
                continue
            first = max(int(cached[i]) + 1, int(sp.logprob_start[s]), 1)
            last = min(int(cached[i] + extend[i]), len(prompt) - 1)  # inclusive target index
            if first > last:
                out[i] = ([], None)
                continue
            rows = torch.arange(first - 1, last, device=self.device) - int(cached[i]) + int(qo_indptr[i])
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
