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
