"""ModelRunner: the model, its KV cache and the block-table mirror of one TP rank; runs a StepBatch."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from radixserve.config import ServerArgs
from radixserve.model_files import load_hf_config
from radixserve.wire import NewReq, RuntimeInfo, StepBatch, from_i32
from worker_proc import batch_invariant, parallel
from worker_proc.attention import ForwardMeta, backend_class, resolve_backend_name
from worker_proc.cpu_quant import linear_layers, quantize_cpu_linears, resolve_quantization
from worker_proc.cuda_graph import DecodeGraphs, capture_graphs
from worker_proc.draft_graphs import DraftLoop
from worker_proc.draft_model import make_draft
from worker_proc.grammar import GrammarBackend, SlotGrammars
from worker_proc.kv_cache import KVCache, host_slots_wanted, kv_dtype_of
from worker_proc.layers import pack_cpu_linears
from worker_proc.penalties import SlotPenalties
from worker_proc.runtime_facts import (
    kv_slots_that_fit,
    resolve_device,
    resolve_dtype,
    serving_context_length,
    step_activation_bytes,
)
from worker_proc.sampling import SampleRows, SlotParams, make_sampler, prompt_logprobs
from worker_proc.speculative import Verifier, launch_verify
from worker_proc.step_io import HostStaging, PendingStep, ResultCopier, StepArrays
from worker_proc.weights import load_model

log = logging.getLogger("radixserve.worker")

STEP_BUF_INTS = 1 << 20
STAGING_INTS = 4 * STEP_BUF_INTS  # the pinned upload ring: a few steps' uploads of the largest size


@dataclass
class DeviceStep:
    meta: ForwardMeta
    input_ids: torch.Tensor
    positions: torch.Tensor
    last: torch.Tensor  # row of each request's last new token
    req_slots: torch.Tensor  # [B] int32, the batch's req slots (padding rows included)


class ModelRunner:
    def __init__(self, args: ServerArgs, rank: int, model_dir: str) -> None:
        self.args, self.rank = args, rank
        self.device = resolve_device(args, rank)
        hf_config = load_hf_config(model_dir)
        if args.enable_deterministic_inference:
            batch_invariant.enable(self.device)
        self.dtype = resolve_dtype(args.dtype, self.device)
        # From here on args.quantization is what this worker runs (without the flag: gguf or none for a GGUF file).
        self.args = args = args.replace(quantization=resolve_quantization(args, self.device, self.dtype, model_dir,
                                                                          hf_config))
        self.model, self.weight_bytes = self._load_model(model_dir, hf_config)
        if args.enable_deterministic_inference and self.device.type == "cuda":
            weights = [m.weight for m in linear_layers(self.model).values()
                       if m.weight.dtype in (torch.bfloat16, torch.float16, torch.float32)]
            log.info("rank %d deterministic linears: %s", rank, batch_invariant.choose_cuda_linear(weights))
        self._choose_all_reduce()
        self.context_length = serving_context_length(args.context_length, hf_config)
        # Everything else that lives on the device is allocated before the KV pool is sized, so that
        # --mem-fraction-static's budget counts it.
        self.staging = HostStaging(self.device, STAGING_INTS)
        self._allocate_step_state()
        self._allocate_sampling_state(model_dir)
        m = self.model
        # STANDALONE's draft model, EAGLE3's head (draft_model.py): a KV pool with an entry per slot of the target's.
        self.draft = make_draft(args, self.dtype, self.device, m)
        self.kv_dtype = kv_dtype_of(args.kv_cache_dtype, self.dtype)
        self.kv_bytes_per_token = KVCache.bytes_per_token(m.num_layers, m.num_kv_heads_local, m.head_dim,
                                                          self.kv_dtype)
        step_bytes = step_activation_bytes(args, hf_config, self.dtype.itemsize)
        slot_bytes = self.kv_bytes_per_token + (self.draft.kv_bytes_per_token if self.draft is not None else 0)
        fit = kv_slots_that_fit(args, self.device, self.context_length, slot_bytes, step_bytes)
        self.num_kv_slots = parallel.tp_min(fit) + 1  # + the padding slot 0
        host = parallel.tp_min(host_slots_wanted(args, self.num_kv_slots, self.kv_bytes_per_token))
        self.kv_cache = KVCache(m.num_layers, self.num_kv_slots, m.num_kv_heads_local, m.head_dim, self.kv_dtype,
                                self.device, host, getattr(m, "kv_scales", None), self.dtype)
        log.info("rank %d KV cache: %d tokens, %.2f GB, %s (%d bytes per token on this rank)", rank,
                 self.num_kv_slots - 1, self.num_kv_slots * self.kv_bytes_per_token / 1e9, _name(self.kv_dtype),
                 self.kv_bytes_per_token)
        self.backend_name = resolve_backend_name(args, self.device.type)
        self.attn = backend_class(self.backend_name)(self.kv_cache, m.num_q_heads_local, m.head_dim,
                                                         m.attention_layers)
        if self.draft is not None:
            self.draft.allocate(self.num_kv_slots, self.backend_name, self.staging)
        # The scheduler sends prefix groups only with the radix cache on; a backend without cascade ignores them.
        self.use_cascade = self.attn.supports_cascade and not (args.disable_cascade_attention or
                                                                args.disable_radix_cache or
                                                                args.enable_deterministic_inference)
        self.draft_loop: DraftLoop | None = None  # the drafter's draft loop beside the verify graphs
        self.draft_graphs: DecodeGraphs | None = None
        self.graphs = capture_graphs(self)

    def runtime_info(self) -> RuntimeInfo:
        """What the workers resolved, as every other process reads it (sizes of all TP ranks together)."""
        gpu_used = gpu_free = 0
        if self.device.type == "cuda":
            gpu_free, total = torch.cuda.mem_get_info(self.device)
            gpu_used = total - gpu_free
        tp = self.args.tp_size
        return RuntimeInfo(num_kv_slots=self.num_kv_slots, context_length=self.context_length,
                           vocab_size=self.model.vocab_size, device=str(self.device),
                           dtype=_name(self.dtype), attention_backend=self.backend_name,
                           kv_bytes_per_token=self.kv_bytes_per_token * tp, weight_bytes=self.weight_bytes * tp,
                           gpu_memory_used=gpu_used, gpu_memory_free=gpu_free, cascade_attention=self.use_cascade,
                           num_host_kv_slots=self.kv_cache.num_host_slots, weight_dtype=self.weight_dtype,
                           num_params=self.num_params * tp,
                           kv_cache_dtype=_name(self.kv_dtype))

    def _load_model(self, model_dir: str, hf_config) -> tuple[torch.nn.Module, int]:
        """This rank's part of the model, and its weights' bytes."""
        t0 = time.monotonic()
        model = load_model(model_dir, hf_config, self.args.load_format, self.dtype, self.device,
                           seed=self.args.random_seed, quantization=self.args.quantization)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.num_params = sum(p.numel() for p in model.parameters())  # before quantize_cpu_linears replaces weights
        # The dtype of the decoder's linear weights (FP8 or the CPU's quantized forms where quantized).
        fp8 = any(p.dtype == torch.float8_e4m3fn for p in model.parameters())
        self.weight_dtype = _name(torch.float8_e4m3fn if fp8 else self.dtype)
        if self.args.quantization in ("int8", "gguf"):
            line, quantized_bytes, self.weight_dtype = quantize_cpu_linears(model, self.args.quantization, model_dir,
                                                                            hf_config)
            weight_bytes = quantized_bytes + sum(p.numel() * p.element_size() for p in model.parameters())
            log.info("rank %d: %s", self.rank, line)
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            log.info("rank %d: %d linear weights in %s packed layout", self.rank, *pack_cpu_linears(model))
        log.info("rank %d loaded %s (%.2f GB, %s, linear weights %s) in %.1f s", self.rank, hf_config.architectures,
                 weight_bytes / 1e9, self.dtype, self.weight_dtype, time.monotonic() - t0)
        return model, weight_bytes

    def _choose_all_reduce(self) -> None:
        """Small all-reduces through symmetric memory where the ranks of one host can map each other's."""
        args = self.args
        if args.disable_custom_all_reduce or args.nnodes != 1:
            return
        devices = [resolve_device(args, r).index for r in range(args.tp_size)]
        if parallel.enable_p2p_all_reduce(self.dtype, devices):
            log.info("rank %d: small all-reduces through symmetric memory", self.rank)

    def _allocate_step_state(self) -> None:
        """The block-table mirror and the buffers every step goes through."""
        args = self.args
        # Mirror of the scheduler's block table; rows are req slots, kept in sync by every StepBatch.
        # The extra last row is the padding rows' (graph-padded decode batches); the scheduler never uses it.
        self.pad_row = args.max_running_requests
        self.req_to_token = torch.zeros((args.max_running_requests + 1, self.context_length), dtype=torch.int32,
                                        device=self.device)
        # Each step's int32 inputs arrive in one host-to-device copy into this buffer (at fixed addresses,
        # which captured graphs read); a step too large for it gets a fresh tensor.
        self._step_buf = torch.zeros(STEP_BUF_INTS, dtype=torch.int32, device=self.device)
        self.copier = ResultCopier(self.device)
        # The token each req slot sampled last: a StepBatch input id < 0 stands for it (overlap scheduling sends
        # step N+1 before step N's tokens reach the scheduler). Written after every sampling, on every rank.
        self.last_sampled = torch.zeros(args.max_running_requests + 1, dtype=torch.int32, device=self.device)
        self._planned: torch.cuda.Event | None = None  # after the last step's attention plan (see launch)

    def _allocate_sampling_state(self, model_dir: str) -> None:
        """Each req slot's sampling parameters; rank 0, which samples, alone keeps each slot's penalties and
        grammar matcher (created for none: free)."""
        args, vocab = self.args, self.model.vocab_size
        self.slot_params = SlotParams(args.max_running_requests, self.device,
                                      args.random_seed if args.enable_deterministic_inference else -1)
        self.sampler = make_sampler(self.slot_params, self.device, args.random_seed)
        self.verifier = Verifier(self.sampler, self.staging)  # speculative decoding's verify steps
        self.penalties = SlotPenalties(args.max_running_requests, vocab, self.staging) if self.rank == 0 else None
        self.grammars = None
        if self.rank == 0 and args.grammar_backend != "none":
            backend = GrammarBackend(args.tokenizer_path or model_dir, vocab,
                                     not args.constrained_json_disable_any_whitespace,
                                     args.constrained_json_max_whitespace_cnt, args.trust_remote_code)
            self.grammars = SlotGrammars(backend, self.device)

    def _graph_forward(self, d: DeviceStep) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a graph captures: the logits of every row, and EAGLE3's captured target states (the tensor, in the
        graphs' pool, that each replay rewrites; None without EAGLE3)."""
        logits = self.model.compute_logits(self.model.forward(d.input_ids, d.positions, self.attn))
        return logits, getattr(self.model.model, "aux", None)

    def _upload(self, host: np.ndarray) -> torch.Tensor:
        """One host-to-device copy of an int32 array into the step buffer (stream-ordered after the previous
        step's kernels, which may still read it)."""
        return self.staging.upload(host, self._step_buf if len(host) <= len(self._step_buf) else None)

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
        if (a.input_ids < 0).any():  # tokens of the step still in flight when this one was built
            ids.copy_(torch.where(ids < 0, self.last_sampled[rows], ids))
        self.req_to_token[rows, pos] = out
        meta = ForwardMeta(is_decode=is_decode, req_slots=slots, seq_lens=lens, extend_lens=ext, qo_indptr=qo,
                           out_slots=out, req_to_token=self.req_to_token, seq_lens_cpu=seq_lens.tolist(),
                           extend_lens_cpu=a.extend.tolist(), prefix_groups=prefix_groups, upload=self.staging.upload)
        return DeviceStep(meta, ids, pos, last, slots)

    def forward(self, a: StepArrays, is_decode: bool, prefix_groups: np.ndarray | None = None,
                every_token: bool = False,
                drafts: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """float32 logits of each request's last new token [B, V] (`every_token`: of every new token), the hidden
        states of all new tokens (None when a decode graph ran), and the batch's req slots on the device.
        `prefix_groups`: decode with cascade attention (see ForwardMeta). Without a graph, `step_input_ids` keeps
        the step's input ids on the device (placeholders replaced). With a draft model, `drafts` (a verify step's
        draft counts) are drafted into the input ids first; every other step's tokens go through it too, but those of
        decode steps above the speculative threshold (`_draft_follow`)."""
        bs = len(a.req_slots)
        cascade = prefix_groups is not None
        graph_bs = self.graphs.padded_size(bs) if is_decode and self.graphs is not None else None
        if graph_bs is not None and self.graphs.has(graph_bs, cascade):
            d, logits = self.replay_graph(a, graph_bs, slice(bs), prefix_groups=prefix_groups)
            self._draft_follow(a, d, is_decode)
            return logits, None, d.req_slots[:bs]
        d = self._to_device(a, is_decode, prefix_groups)
        self.step_input_ids = d.input_ids
        if self.draft is not None and drafts is not None:
            self.draft.propose(a, drafts, d.input_ids, self.req_to_token)
        self.attn.prepare(d.meta)
        self._mark_planned()
        hidden = self.model.forward(d.input_ids, d.positions, self.attn)
        if drafts is None:
            self._draft_follow(a, d, is_decode)
        return self.model.compute_logits(hidden if every_token else hidden[d.last]), hidden, d.req_slots

    def _draft_follow(self, a: StepArrays, d: DeviceStep, is_decode: bool) -> None:
        """The drafter's part of a prefill chunk or plain decode step: it computes the step's tokens, except in a
        decode step of more requests than --speculative-batch-size-threshold, which drafts nothing (drafter.py)."""
        if self.draft is None:
            return
        if is_decode and len(a.req_slots) > self.args.speculative_batch_size_threshold:
            self.draft.pass_over(a, d)
        else:
            self.draft.follow(a, d)

    def replay_graph(self, a: StepArrays, graph_bs: int, rows: slice | torch.Tensor, width: int = 1,
                     prefix_groups: np.ndarray | None = None,
                     fill: Callable[[DeviceStep], None] | None = None) -> tuple[DeviceStep, torch.Tensor]:
        """Step `a` through the captured graph of `graph_bs` requests of `width` tokens each (1: decode; more: a
        verify step, verify_graphs.py): pad and upload it, `fill` the uploaded step (a verify step's drafts into its
        input ids), plan attention outside the graph, replay. Returns the uploaded step and the float32 logits of
        the real rows `rows`; EAGLE3's captured target states of those rows go to its head."""
        d = self._to_device(a.padded(graph_bs, self.pad_row, width), is_decode=width == 1, prefix_groups=prefix_groups)
        if fill is not None:
            fill(d)
        self.attn.prepare_graph(d.meta)
        self._mark_planned()
        logits, aux = self.graphs.replay(graph_bs, prefix_groups is not None, width)
        if aux is not None:
            self.model.model.aux = aux[rows]
        return d, logits[rows]

    def _mark_planned(self) -> None:
        """FlashInfer's plan copies its host buffers to the device asynchronously; the next step may rewrite
        them only once that copy ran (`launch` waits for this event first)."""
        if self.device.type == "cuda":
            self._planned = torch.cuda.Event()
            self._planned.record()

    @torch.inference_mode()
    def launch(self, b: StepBatch) -> PendingStep | None:
        """Run a step up to its sampled tokens without waiting for the device; rank 0 returns the pending result
        (its tokens reach the host on a copy stream; it reports the host tier's loads found done). Every rank records
        the sampled tokens in `last_sampled`, where the next step's placeholder input ids find them."""
        t0 = time.perf_counter()
        self.kv_cache.move(b.kv_moves, from_i32(b.load_waits))
        pending = self._launch(b, t0)
        if pending is not None and self.kv_cache.host is not None:
            pending.loads = self.kv_cache.host.loads_in_flight()
        return pending

    def _launch(self, b: StepBatch, t0: float) -> PendingStep | None:
        if self.grammars is not None and b.grammars:
            self.grammars.backend.start(b.grammars)
        if not b.req_slots:  # a step of no requests: it only waits for grammars to compile
            return self._grammars_only(b, t0)
        if self._planned is not None:
            self._planned.synchronize()  # the previous step's plan copy ran: its host buffers may be rewritten
        admit_errors = self._admit(b) if b.new_reqs else []
        a = StepArrays.of(b)
        if b.draft_lens:
            return launch_verify(self, b, a, t0, admit_errors)
        groups = from_i32(b.prefix_groups).reshape(-1, 2) if b.prefix_groups and self.use_cascade else None
        logits, hidden, slots = self.forward(a, b.is_decode, groups)
        # Decode steps compute no prompt tokens, so they have no input logprobs.
        input_lps = {} if hidden is None or b.is_decode else prompt_logprobs(self.model, self.slot_params, hidden, a)
        next_ids = logprobs = None
        if self.rank == 0:
            offsets = from_i32(b.sample_offsets)
            kept = offsets >= 0  # rows whose sample becomes output (not a prefill chunk's)
            self._process_logits(logits, a.req_slots, slots, offsets, kept)
            next_ids, logprobs = self.sampler.sample(logits, SampleRows(a.req_slots, slots, offsets))
            self._follow_output(a.req_slots, slots, next_ids, kept)
        next_ids = parallel.tp_broadcast(next_ids, (len(a.req_slots),), torch.int64, self.device)
        self.last_sampled[slots.long()] = next_ids.to(torch.int32)
        if self.rank != 0:
            return None
        chosen = logprobs.gather(1, next_ids[:, None]).squeeze(1) if logprobs is not None else None
        top_k = self.slot_params.top_logprobs_num[a.req_slots]
        tops = {int(i): logprobs[i].topk(int(top_k[i])) for i in np.flatnonzero(top_k)} if logprobs is not None else {}
        ids_host, lps_host, done = self.copier.start(next_ids, chosen)
        grammars_done = self.grammars.backend.done() if self.grammars is not None else []
        return PendingStep(b.step, t0, ids_host, lps_host, done, tops, input_lps, grammars_done, admit_errors)

    def _process_logits(self, logits: torch.Tensor, slots: np.ndarray, d_slots: torch.Tensor, offsets: np.ndarray,
                        kept: np.ndarray, prior: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Rank 0, before sampling, in place: penalties and logit bias (`prior`: tokens counted as output before
        a row, SlotPenalties.apply), min_new_tokens' ban on stop ids (not for grammar rows, whose grammar decides
        where they end), then each grammar row's token mask."""
        self.penalties.apply(logits, slots, d_slots, prior)
        banned_rows, banned_ids = self.slot_params.banned(slots, offsets)
        if len(banned_rows) and self.grammars is not None:
            free = ~self.grammars.constrained(slots)[banned_rows]
            banned_rows, banned_ids = banned_rows[free], banned_ids[free]
        if len(banned_rows):
            banned = self.staging.upload(np.concatenate([banned_rows, banned_ids])).long()
            logits[banned[:len(banned_rows)], banned[len(banned_rows):]] = float("-inf")
        if self.grammars is not None:
            self.grammars.mask(logits, slots, kept)

    def _follow_output(self, slots: np.ndarray, d_slots: torch.Tensor, next_ids: torch.Tensor,
                       kept: np.ndarray) -> None:
        """Rank 0, after sampling: the kept tokens join their slots' penalty counts and grammar matchers."""
        self.penalties.record(slots, d_slots, next_ids, kept)
        if self.grammars is not None:
            self.grammars.record(slots, next_ids, kept)

    def _grammars_only(self, b: StepBatch, t0: float) -> PendingStep | None:
        """Answer a step of no requests once a compile is done (or after a short wait); other ranks do nothing."""
        if self.rank != 0:
            return None
        done = self.grammars.backend.done(wait=True) if self.grammars is not None else []
        empty = torch.zeros(0, dtype=torch.int32)
        return PendingStep(b.step, t0, empty, None, None, grammars_done=done, wait_loads=True)

    def _admit(self, b: StepBatch) -> list[tuple[int, str]]:
        """Requests entering their req slots: cached-prefix rows of the block table in one upload, and their
        sampling parameters. Returns (req slot, why) of the requests whose parameters cannot be applied."""
        if self.draft is not None:
            self.draft.admit(np.array([nr.req_slot for nr in b.new_reqs], dtype=np.int64))
        prefixes = [from_i32(nr.prefix_slots) for nr in b.new_reqs]
        lengths = np.array([len(p) for p in prefixes], dtype=np.int32)
        if lengths.sum():
            rows = np.repeat(np.array([nr.req_slot for nr in b.new_reqs], dtype=np.int32), lengths)
            cols = np.arange(lengths.sum(), dtype=np.int32) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            r, c, v = self.staging.upload(np.concatenate([rows, cols, *prefixes])).long().split(int(lengths.sum()))
            self.req_to_token[r, c] = v.to(torch.int32)
        errors = []
        for nr in b.new_reqs:
            try:
                self._admit_params(nr)
            except Exception as e:
                # One request's values never stop the worker: its slot takes neutral values, its row runs this
                # step like any other, and the scheduler ends it with this error (every rank fails alike).
                log.warning("request in req slot %d: %s", nr.req_slot, e)
                errors.append((nr.req_slot, f"{e}"))
                self._admit_params(NewReq(nr.req_slot, b"", temperature=0.0, top_p=1.0, top_k=-1, min_p=0.0, seed=-1))
        return errors

    def _admit_params(self, nr: NewReq) -> None:
        self.slot_params.set(nr)
        if self.penalties is not None:
            self.penalties.set(nr.req_slot, nr.penalties, nr.output_ids)
        if self.grammars is not None:
            self.grammars.set(nr.req_slot, nr.grammar, from_i32(nr.stop_ids), nr.output_ids)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
