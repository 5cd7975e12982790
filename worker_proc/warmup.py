"""Warm-up before the worker reports ready: dummy steps through every path a request can reach, so that every
lazily built kernel (FlashInfer's JIT attention and sampling modules, Triton kernels, xgrammar's bitmask kernel,
cuBLAS and oneDNN's first-call set-up) is built before the first request, not on its step path.

Steps (the same on every TP rank, whose collectives they meet): one prefill of `n` requests (one without a
cached prefix and with input logprobs, the rest extending a shared cached prefix), then a decode step at each
batch size of `decode_sizes` (on CUDA every size a decode can run at), with cascade attention too where it is
on. The rows cycle through the sampling kinds: greedy with input and output logprobs; top-k / top-p unseeded;
min-p unseeded; seeded with every filter; penalties, logit bias and min_new_tokens' ban. Rank 0 applies a
grammar bitmask on CUDA when a grammar backend is on (on the CPU xgrammar's kernel is prebuilt and its import
alone takes seconds).

Invariant: warm-up leaves no state a request can see. The KV slots it writes are free slots (a request reads
only slots it or its cached prefix wrote); its req slots are reset as an admission of a request with default
parameters resets them; the block-table rows and last sampled tokens it wrote are zeroed; the sampler's
generator is restored, so unseeded sampling is what it would be without warm-up.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from radixserve.wire import LogprobRequest, NewReq, Penalties, StepBatch, i32

if TYPE_CHECKING:
    from worker_proc.model_runner import ModelRunner

log = logging.getLogger("radixserve.worker")

KINDS = ("greedy + logprobs", "top-k/top-p", "min-p", "seeded", "penalties + bias + min_new_tokens")
PREFIX_SLOT = 1  # the shared cached prefix's KV slot (slot 0 is the padding rows')


def _new_req(slot: int, kind: int, prefix: np.ndarray, prompt: np.ndarray) -> NewReq:
    """A request of sampling kind `kind` (an index into KINDS) in req slot `slot`."""
    base = NewReq(req_slot=slot, prefix_slots=prefix.tobytes(), temperature=1.0, top_p=1.0, top_k=-1, min_p=0.0,
                  seed=-1)
    if kind == 0:
        base.temperature = 0.0
        base.logprob = LogprobRequest(logprob_start_len=0, top_logprobs_num=2)
        base.prompt_ids = prompt.tobytes()
    elif kind == 1:
        base.temperature, base.top_k, base.top_p = 0.7, 8, 0.9
    elif kind == 2:
        base.min_p = 0.1
    elif kind == 3:
        base.seed, base.top_k, base.top_p, base.min_p = 1, 8, 0.9, 0.05
    else:
        base.penalties = Penalties(frequency=0.1, presence=0.1, repetition=1.1, bias_ids=i32([0]),
                                   bias_values=np.array([1.0], np.float32).tobytes())
        base.min_new_tokens, base.stop_ids = 2, i32([0])
    return base


def decode_sizes(graph_sizes: list[int], max_running: int, n: int, cuda: bool) -> list[int]:
    """Batch sizes to decode at, none above `n` (the requests warm-up can hold, n >= 1): one row of each sampling
    kind (as many as fit); on CUDA also every graph size, an eager size beyond the largest graph (where a decode
    batch can be larger), and 1 and 2 rows (an all-greedy batch; greedy and top-k/top-p: FlashInfer's other
    sampling kernel). The CPU builds nothing per batch size or per sampling branch."""
    limit = min(n, max_running)
    sizes = {min(len(KINDS), limit)}
    if cuda:
        sizes |= set(graph_sizes) | {1, 2}
        if graph_sizes and max_running > graph_sizes[-1]:
            sizes.add(graph_sizes[-1] + 1)
    return sorted(s for s in sizes if s <= limit)


def warm_up(runner: ModelRunner) -> None:
    """Run the warm-up steps through `runner` and log what they covered."""
    t0 = time.monotonic()
    max_running = runner.args.max_running_requests
    graph_sizes = runner.graphs.sizes if runner.graphs is not None else []
    # KV slots: request 0's two prompt tokens (the first is the others' cached prefix), one more prompt token for
    # each other request, one decode slot each: 2n + 1, from PREFIX_SLOT on. Positions 0..2 of each request.
    cuda = runner.device.type == "cuda"
    n = min(max(decode_sizes(graph_sizes, max_running, max_running, cuda)),
            (runner.num_kv_slots - PREFIX_SLOT - 1) // 2)
    if n < 1 or runner.context_length < 3:
        log.warning("rank %d: no warm-up (a KV pool of %d slots, context length %d): the first requests build "
                    "their kernels", runner.rank, runner.num_kv_slots - 1, runner.context_length)
        return
    sizes = decode_sizes(graph_sizes, max_running, n, cuda)
    generator_state = runner.sampler.generator.get_state()
    step = _Steps(runner)
    prompt = np.array([1, 2], np.int32)
    prefix = np.array([PREFIX_SLOT], np.int32)
    new = [_new_req(0, 0, np.zeros(0, np.int32), prompt)]
    new += [_new_req(r, r % len(KINDS), prefix, prompt) for r in range(1, n)]
    prefill_slots = np.arange(PREFIX_SLOT, PREFIX_SLOT + n + 1, dtype=np.int32)
    decode_slots = np.arange(PREFIX_SLOT + n + 1, PREFIX_SLOT + 2 * n + 1, dtype=np.int32)
    step.run(False, np.arange(n), [0] + [1] * (n - 1), [2] + [1] * (n - 1),
             np.concatenate([prompt, np.full(n - 1, 3, np.int32)]), prefill_slots, [0] * n, new)
    cascades = (False, True) if runner.use_cascade else (False,)
    for bs in sizes:
        for cascade in cascades:
            groups = i32([bs, 1]) if cascade else b""  # every row shares the prefix slot at position 0
            step.run(True, np.arange(bs), [2] * bs, [1] * bs, np.full(bs, -1, np.int32), decode_slots[:bs], [1] * bs,
                     groups=groups)
    grammar = "not warmed (no grammar backend, or the CPU)"
    if runner.grammars is not None and cuda:
        try:
            runner.grammars.warm_up(torch.zeros(n, runner.model.vocab_size, device=runner.device))
            grammar = "applied"
        except ImportError as e:  # as without warm-up: grammar requests fail at their compile, others run
            grammar = f"not warmed ({e})"
    _release(runner, n)
    runner.sampler.generator.set_state(generator_state)
    if cuda:
        torch.cuda.synchronize(runner.device)
    log.info("rank %d warmed up in %.2f s: prefill of %d requests, decode at batch sizes %s (CUDA graphs at %s; "
             "cascade attention %s), sampling rows %s, grammar bitmask %s", runner.rank, time.monotonic() - t0, n,
             sizes, graph_sizes or "none", "too" if runner.use_cascade else "off", ", ".join(KINDS),
             grammar)


class _Steps:
    """StepBatches of the warm-up, launched and (on rank 0) waited for, one at a time."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.step = 0

    def run(self, is_decode: bool, req_slots: np.ndarray, cached: list[int], extend: list[int], input_ids: np.ndarray,
            out_slots: np.ndarray, offsets: list[int], new_reqs: list[NewReq] = (), groups: bytes = b"") -> None:
        self.step += 1
        b = StepBatch(step=self.step, is_decode=is_decode, req_slots=i32(req_slots), input_ids=i32(input_ids),
                      cached_lens=i32(cached), extend_lens=i32(extend), out_slots=i32(out_slots),
                      sample_offsets=i32(offsets), new_reqs=list(new_reqs), prefix_groups=groups)
        pending = self.runner.launch(b)
        if pending is not None and (errors := pending.result().admit_errors):
            raise RuntimeError(f"warm-up: the worker refused its own requests: {errors}")


def _release(runner: ModelRunner, n: int) -> None:
    """Req slots 0..n-1 back as they were before warm-up (see the invariant above)."""
    for slot in range(n):
        runner._admit_params(NewReq(req_slot=slot, prefix_slots=b"", temperature=1.0, top_p=1.0, top_k=-1, min_p=0.0,
                                    seed=-1))
    runner.req_to_token[:n].zero_()
    runner.last_sampled[:n].zero_()
