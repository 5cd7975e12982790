"""Overlap scheduling hides the host's work on step N+1 behind step N only if launching a step never waits for the
device: a decode step with penalized and logit-biased rows, cascade groups and a store to the host tier, through
its CUDA graph, launched under torch.cuda.set_sync_debug_mode("error"), where every call that synchronizes with the
device (a pageable copy among them) raises. Runs only where CUDA is available."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_gpu import VOCAB, runner_for, save_tiny

from radixserve.sampling_params import Penalties
from radixserve.wire import KVMove, NewReq, StepBatch, i32

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHARED = 32  # prompt tokens that requests 1 and 2 share (a radix hit: the same KV slots)


def test_a_decode_step_launches_without_waiting_for_the_device(tmp_path) -> None:
    save_tiny("llama", str(tmp_path), seed=5)
    runner = runner_for(str(tmp_path), enable_hierarchical_cache=True)
    assert runner.use_cascade and runner.graphs is not None and runner.kv_cache.host is not None
    free = list(range(1, runner.num_kv_slots))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, VOCAB, 48).tolist() for _ in range(3)]
    prompts[2][:SHARED] = prompts[1][:SHARED]
    biased = Penalties(frequency=0.5, presence=0.2, repetition=1.1, bias_ids=i32([5, 7]),
                       bias_values=np.array([1.0, -2.0], np.float32).tobytes())
    kv: dict[int, list[int]] = {}
    last: dict[int, int] = {}
    step = 0

    def launch(b: StepBatch) -> list[int]:
        with torch.inference_mode():
            return np.frombuffer(runner.launch(b).result().next_ids, dtype=np.int32).tolist()

    for slot, prompt in enumerate(prompts):
        prefix = kv[1][:SHARED] if slot == 2 else []
        new = prompt[len(prefix):]
        out = [free.pop() for _ in new]
        step += 1
        req = NewReq(req_slot=slot, prefix_slots=i32(prefix), temperature=0.0, top_p=1.0, top_k=-1, min_p=0.0,
                     seed=-1, penalties=biased if slot < 2 else None)
        (tok,) = launch(StepBatch(step=step, is_decode=False, req_slots=i32([slot]), input_ids=i32(new),
                                  cached_lens=i32([len(prefix)]), extend_lens=i32([len(new)]), out_slots=i32(out),
                                  sample_offsets=i32([0]), new_reqs=[req]))
        kv[slot], last[slot] = prefix + out, tok

    def decode_step(moves: list[KVMove]) -> StepBatch:
        nonlocal step
        step += 1
        slots = [0, 1, 2]
        out = [free.pop() for _ in slots]
        b = StepBatch(step=step, is_decode=True, req_slots=i32(slots), input_ids=i32([last[s] for s in slots]),
                      cached_lens=i32([len(kv[s]) for s in slots]), extend_lens=i32([1] * 3), out_slots=i32(out),
                      sample_offsets=i32([len(kv[s]) - len(prompts[s]) + 1 for s in slots]), new_reqs=[],
                      prefix_groups=i32([1, len(kv[0]), 2, SHARED]), kv_moves=moves)
        for s, o in zip(slots, out):
            kv[s].append(o)
        return b

    first = decode_step([])
    for s, t in zip([0, 1, 2], launch(first)):  # the graph's first replay, outside the check
        last[s] = t
    store = [KVMove(to_host=True, src=i32(kv[0][:40]), dst=i32(list(range(1, 41)))),  # a run: straight to the pool
             KVMove(to_host=True, src=i32(kv[1][-6:]), dst=i32([100, 90, 80, 70, 60, 50]))]  # scattered: staged
    b = decode_step(store)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            pending = runner.launch(b)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ids = np.frombuffer(pending.result().next_ids, dtype=np.int32)
    assert len(ids) == 3 and ((0 <= ids) & (ids < VOCAB)).all()
    runner.kv_cache.host.finish_stores()
    for layer in range(len(runner.kv_cache.k)):  # the stores landed: the run and the scattered rows
        assert torch.equal(runner.kv_cache.host.k[layer][1:41], runner.kv_cache.k[layer][kv[0][:40]].cpu())
        assert torch.equal(runner.kv_cache.host.v[layer][[100, 90, 80, 70, 60, 50]],
                           runner.kv_cache.v[layer][kv[1][-7:-1]].cpu())
