"""Ready means ready: the worker runs every path a request can reach before the server reports ready
(worker_proc/warmup.py), so the first requests after READY take no longer than the same requests later."""

from __future__ import annotations

import statistics
import time

from server_fixture import RadixServer

PROMPT = "The capital of France is"
KINDS = {
    "top-p/top-k + logprobs + penalties": {
        "sampling_params": {"max_new_tokens": 8, "temperature": 0.8, "top_p": 0.9, "top_k": 20, "ignore_eos": True,
                            "frequency_penalty": 0.5, "presence_penalty": 0.3, "repetition_penalty": 1.1},
        "return_logprob": True, "top_logprobs_num": 3, "logprob_start_len": 0},
    "greedy": {"sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}},
    "seeded min-p": {"sampling_params": {"max_new_tokens": 8, "temperature": 1.0, "min_p": 0.05, "sampling_seed": 7,
                                         "ignore_eos": True}},
}
REPEATS = 4
# A first request may take this many times the median of the same request once everything is built: room for a
# slow moment on a shared 2-core machine, far below a kernel built on the step path (seconds per kernel).
SLACK = 3.0


def seconds(server: RadixServer, body: dict) -> float:
    t = time.perf_counter()
    r = server.post("/generate", {"text": PROMPT, **body})
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["completion_tokens"] == 8
    return time.perf_counter() - t


def test_first_requests_after_ready_run_at_steady_speed():
    server = RadixServer("--log-level", "info")
    try:
        first = {name: seconds(server, body) for name, body in KINDS.items()}
        later: dict[str, list[float]] = {name: [] for name in KINDS}
        for _ in range(REPEATS):  # interleaved, so that a slow moment of the machine spreads over the kinds
            for name, body in KINDS.items():
                later[name].append(seconds(server, body))
        log = server.log_path.read_text(errors="replace")
    finally:
        server.stop_cleanly()
    warmed = [line for line in log.splitlines() if "warmed up in" in line]
    assert warmed and all(kind in warmed[0] for kind in ("greedy", "top-k/top-p", "min-p", "seeded", "penalties")), log
    for name, t in first.items():
        steady = statistics.median(later[name])
        assert t <= SLACK * steady, f"{name}: first request {t:.3f} s, later ones {later[name]} (median {steady:.3f})"


def runner_state(runner) -> list:
    """Everything of a ModelRunner that a request can see: each req slot's sampling parameters and penalties,
    the block table, the last sampled tokens and the sampler's generator."""
    sp, pen = runner.slot_params, runner.penalties
    arrays = [sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.seed, sp.min_new_tokens, sp.top_logprobs_num,
              sp.logprob_start, sp.wants_logprob, pen.counted, pen.biased]
    tensors = [sp.d_temperature, sp.d_top_p, sp.d_top_k, sp.d_min_p, runner.req_to_token, runner.last_sampled,
               runner.sampler.generator.get_state()]
    return [a.copy() for a in arrays] + [t.clone() for t in tensors] + [
        [len(s) for s in sp.stop_ids], [p is None for p in sp.prompt_ids], sorted(pen.bias)]


def assert_same_state(before: list, after: list) -> None:
    import numpy as np
    import torch

    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else np.array_equal(a, b), (a, b)


def test_warm_up_leaves_no_state(tmp_path):
    """The warm-up's steps run (they write KV slots past the padding slot, which no CPU step pads to) and leave
    every req slot as a fresh start-up does (worker_proc/warmup.py's invariant); tests/test_gpu.py checks the
    same on the GPU's paths."""
    from transformers import LlamaConfig

    from radixserve.config import ServerArgs
    from worker_proc.model_runner import ModelRunner
    from worker_proc.warmup import warm_up

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=251, max_position_embeddings=128).save_pretrained(tmp_path)
    args = ServerArgs(model_path=str(tmp_path), load_format="dummy", device="cpu", dtype="float32",
                      max_total_tokens=64, max_running_requests=8, grammar_backend="none")
    runner = ModelRunner(args, 0, str(tmp_path))
    before = runner_state(runner)
    warm_up(runner)
    assert_same_state(before, runner_state(runner))
    k = runner.kv_cache.k[0]
    assert k[1:12].abs().sum(dim=(1, 2)).bool().all() and not k[0].any()  # 2 x 5 + 1 slots written


def test_decode_sizes():
    """Warm-up decodes at every graph size and one size past the largest graph where a batch can be larger, with
    every sampling kind in one batch where the requests allow; never above max_running_requests or what fits."""
    from worker_proc.warmup import decode_sizes

    assert decode_sizes([], 256, 256, cuda=False) == [5]
    assert decode_sizes([], 4, 4, cuda=False) == [4]
    assert decode_sizes([], 256, 3, cuda=False) == [3]
    assert decode_sizes([1, 2, 4, 8], 8, 8, cuda=True) == [1, 2, 4, 5, 8]
    assert decode_sizes([1, 2, 4, 8], 16, 16, cuda=True) == [1, 2, 4, 5, 8, 9]
    assert decode_sizes([], 16, 16, cuda=True) == [1, 2, 5]  # graphs off
    assert decode_sizes([1, 2, 4, 8], 16, 1, cuda=True) == [1]
