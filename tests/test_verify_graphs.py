"""Verify steps through their graphs (worker_proc/verify_graphs.py), on the CPU: the host-side padding of a verify
step to its graph's shape, the graphs captured, and whole verify steps through the graph path in float32 against
eager verify steps in lockstep (NGRAM-style given drafts, STANDALONE, EAGLE3; batch 1 and batch 3 padded to 4,
draft counts differing within a step, drafts accepted and rejected); the drafters' drafting through their graph
loops (worker_proc/draft_graphs.py) gives the eager drafts.

The CPU has no CUDA graphs: `CallGraphs` stands in for DecodeGraphs by calling the captured function again at each
replay; like a CUDA graph, that function reads only the step buffers at the addresses it was captured with, so the
padding, the fixed buffers and the choice of real rows are what is checked. tests/test_gpu_spec.py runs the same
lockstep with real CUDA graphs and FlashInfer on a GPU.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import numpy as np
import pytest
import torch
from test_models import random_hf_model
from test_speculative_draft import CONFIG, VOCAB, eagle3_head
from transformers import LlamaConfig

from radixserve.config import ServerArgs
from radixserve.wire import NewReq, StepBatch, i32
from worker_proc import speculative
from worker_proc.cuda_graph import DecodeGraphs, capture_keys, graph_keys
from worker_proc.model_runner import ModelRunner
from worker_proc.step_io import PAD_SLOT, StepArrays, padded_rows

WIDTH = 4  # --speculative-num-draft-tokens: a request's last token and up to 3 drafts
THRESHOLD = 4  # verify graphs at batch sizes 1, 2 and 4
PENDING = -1  # a draft the workers' draft model fills in
REF_LEN = 48
BATCH1 = [3, 2, 1, 3]  # draft counts of the batch-1 rounds
BATCH3_ROUNDS = 6  # then all three: request i drafts (round + i) % WIDTH


def prompts(vocab: int) -> list[list[int]]:
    return [[(31 * i + 7 * j * j) % (vocab - 1) + 1 for j in range(n)] for i, n in enumerate((37, 100, 5))]


def _arrays(*columns: list[int]) -> StepArrays:
    return StepArrays(*(np.asarray(c, dtype=np.int32) for c in columns))


def test_a_verify_step_is_padded_to_its_graph_request_by_request() -> None:
    a = _arrays([5, 2, 7], [10, 3, 20], [4, 1, 2], [11, 12, 13, 14, 21, 31, 32], [101, 102, 103, 104, 201, 301, 302])
    rows = padded_rows(a.extend, 4)
    assert rows.tolist() == [0, 1, 2, 3, 4, 8, 9]
    p = a.padded(4, 9, 4)
    assert p.req_slots.tolist() == [5, 2, 7, 9] and p.cached.tolist() == [10, 3, 20, 0]
    assert p.extend.tolist() == [4] * 4
    assert p.input_ids.tolist() == [11, 12, 13, 14, 21, 0, 0, 0, 31, 32, 0, 0, 0, 0, 0, 0]
    assert p.out_slots.tolist() == [101, 102, 103, 104, 201] + [PAD_SLOT] * 3 + [301, 302] + [PAD_SLOT] * 6
    # A decode batch is padded with requests alone (width 1), as before verify graphs.
    d = _arrays([5, 2], [10, 3], [1, 1], [-1, 21], [101, 201]).padded(4, 9)
    assert (d.req_slots.tolist(), d.cached.tolist(), d.extend.tolist()) == ([5, 2, 9, 9], [10, 3, 0, 0], [1] * 4)
    assert (d.input_ids.tolist(), d.out_slots.tolist()) == ([-1, 21, 0, 0], [101, 201, PAD_SLOT, PAD_SLOT])


def test_verify_graphs_are_captured_where_speculation_runs() -> None:
    sizes = [1, 2, 4, 8, 16]
    verify = lambda keys: sorted(bs for bs, width, _ in keys if width > 1)  # noqa: E731
    assert verify(graph_keys(sizes, False, 5, 8)) == [1, 2, 4, 8]
    assert verify(graph_keys(sizes, False, 5, 5)) == [1, 2, 4, 8]  # a batch of 5 pads to 8
    assert verify(graph_keys(sizes, False, 5, 100)) == sizes
    assert verify(graph_keys(sizes, True, 5, 0)) == [] == verify(graph_keys(sizes, True, None, 8))
    keys = graph_keys(sizes, True, 5, 2)
    assert sorted(keys) == sorted([(bs, 1, c) for bs in sizes for c in (False, True)] + [(1, 5, False), (2, 5, False)])
    assert [k[0] * k[1] for k in keys] == sorted((k[0] * k[1] for k in keys), reverse=True)  # largest first


# ---------------------------------------------------------------- verify steps through the graph path


class CallGraphs(DecodeGraphs):
    """DecodeGraphs where a 'graph' is its function, called again at each replay (on the CPU)."""

    def __init__(self) -> None:
        self._sizes, self._graphs = {}, {}

    def capture(self, bs: int, fn: Callable, cascade: bool = False, width: int = 1) -> None:
        self._graphs[bs, width, cascade] = (fn, None)
        if not cascade:
            bisect.insort(self._sizes.setdefault(width, []), bs)

    def replay(self, bs: int, cascade: bool = False, width: int = 1):
        return self._graphs[bs, width, cascade][0]()


def with_call_graphs(runner: ModelRunner) -> ModelRunner:
    """Capture the runner's decode and verify graphs as cuda_graph.capture_graphs does on CUDA, as CallGraphs."""
    args = runner.args
    for attn in (runner.attn, getattr(runner.draft, "attn", None)):
        if attn is not None:  # the torch backend plans a graph's step as any other
            attn.prepare_graph, attn.init_graphs = attn.prepare, lambda *_: None
    keys = graph_keys([1, 2, 4, 8], False, args.speculative_num_draft_tokens, args.speculative_batch_size_threshold)
    runner.graphs = capture_keys(runner, keys, CallGraphs)
    return runner


class SpecDriver:
    """The StepBatches a scheduler would send to one runner: a prefill per request, plain decode steps, verify steps
    with given drafts; each request's tokens and the KV slots of its computed tokens (rejected drafts' slots go back
    to the free list)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.free = [int(s) for s in np.random.default_rng(0).permutation(np.arange(1, runner.num_kv_slots))]
        self.step = 0
        self.tokens: dict[int, list[int]] = {}  # req slot -> prompt and outputs (the last one not computed yet)
        self.kv: dict[int, list[int]] = {}
        self.prompt_len: dict[int, int] = {}

    def _launch(self, slots: list[int], ids: list[int], extend: list[int], out: list[int], offsets: list[int],
                is_decode: bool = False, drafts: list[int] | None = None, new: list[NewReq] = ()):
        self.step += 1
        b = StepBatch(step=self.step, is_decode=is_decode, req_slots=i32(slots), input_ids=i32(ids),
                      cached_lens=i32([len(self.kv[s]) for s in slots]), extend_lens=i32(extend), out_slots=i32(out),
                      sample_offsets=i32(offsets), new_reqs=list(new), draft_lens=i32(drafts) if drafts else b"")
        with torch.inference_mode():
            res = self.runner.launch(b).result()
        ids_out = np.frombuffer(res.next_ids, dtype=np.int32).tolist()
        accepted = np.frombuffer(res.accept_lens, dtype=np.int32).tolist() if drafts else [0] * len(slots)
        return b, ids_out, accepted

    def prefill(self, slot: int, prompt: list[int]) -> None:
        self.kv[slot], self.prompt_len[slot] = [], len(prompt)
        out = [self.free.pop() for _ in prompt]
        new = NewReq(req_slot=slot, prefix_slots=b"", temperature=0.0, top_p=1.0, top_k=-1, min_p=0.0, seed=-1)
        _, ids, _ = self._launch([slot], prompt, [len(prompt)], out, [0], new=[new])
        self.kv[slot] = out
        self.tokens[slot] = list(prompt) + ids

    def outputs(self, slot: int) -> list[int]:
        return self.tokens[slot][self.prompt_len[slot]:]

    def decode(self, slots: list[int], steps: int) -> None:
        for _ in range(steps):
            out = [self.free.pop() for _ in slots]
            _, ids, _ = self._launch(slots, [self.tokens[s][-1] for s in slots], [1] * len(slots), out,
                                     [len(self.outputs(s)) for s in slots], is_decode=True)
            for s, o, t in zip(slots, out, ids):
                self.kv[s].append(o)
                self.tokens[s].append(t)

    def verify(self, slots: list[int], drafts: list[list[int]]) -> tuple[StepBatch, list[int], list[int]]:
        """One verify step (drafts per request; PENDING where the draft model drafts); its batch, the emitted tokens
        (flat) and the accepted counts."""
        ids = [t for s, d in zip(slots, drafts) for t in [self.tokens[s][-1], *d]]
        extend = [1 + len(d) for d in drafts]
        out = [self.free.pop() for _ in ids]
        b, emitted, accepted = self._launch(slots, ids, extend, out, [len(self.outputs(s)) for s in slots],
                                            drafts=[len(d) for d in drafts])
        first = first_out = 0
        for s, n, a in zip(slots, extend, accepted):
            self.kv[s] += out[first_out:first_out + a + 1]
            self.free += out[first_out + a + 1:first_out + n]
            self.tokens[s] += emitted[first:first + a + 1]
            first, first_out = first + a + 1, first_out + n
        return b, emitted, accepted


def reference(runner: ModelRunner, vocab: int) -> list[list[int]]:
    """Each prompt's greedy continuation by plain decoding, REF_LEN tokens (req slots 0-2 of `runner`, which is
    dropped after)."""
    d = SpecDriver(runner)
    for i, p in enumerate(prompts(vocab)):
        d.prefill(i, p)
    d.decode([0, 1, 2], REF_LEN - 1)
    return [d.outputs(i) for i in range(3)]


def rounds() -> list[tuple[list[int], list[int]]]:
    """(req slots, draft counts) of each verify step: request 0 alone, then all three, counts differing."""
    alone = [([0], [d]) for d in BATCH1]
    together = [([0, 1, 2], [(r + i) % WIDTH for i in range(3)]) for r in range(BATCH3_ROUNDS)]
    return alone + together


def given(ref: list[list[int]], vocab: int):
    """A draft source: the reference continuation after each request's outputs (right while the request follows
    it), the last draft corrupted every third step so that some drafts are rejected."""
    def drafts(driver: SpecDriver, slots: list[int], counts: list[int], step: int) -> list[list[int]]:
        out = []
        for s, n in zip(slots, counts):
            k = len(driver.outputs(s))
            d = [ref[s][(k + j) % REF_LEN] for j in range(n)]
            if d and (step + s) % 3 == 2:
                d[-1] = d[-1] % (vocab - 1) + 1
            out.append(d)
        return out
    return drafts


def from_draft_model(driver: SpecDriver, slots: list[int], counts: list[int], step: int) -> list[list[int]]:
    return [[PENDING] * n for n in counts]


def lockstep(eager: ModelRunner, graph: ModelRunner, monkeypatch, draft_source, vocab: int, tol: float) -> dict:
    """Prefill, then the verify rounds on an eager runner and a graph runner side by side: at every step (printed)
    the same drafts (a draft model's), emitted tokens and accepted counts, and EAGLE3's target states of the step's
    rows within relative error `tol`; each of the graph runner's verify steps through its graph."""
    used: list[bool] = []
    real = speculative.graph_verify

    def spy(runner, a, drafts):
        out = real(runner, a, drafts)
        used.append(out is not None)
        return out

    monkeypatch.setattr(speculative, "graph_verify", spy)
    e, g = SpecDriver(eager), SpecDriver(graph)
    for i, p in enumerate(prompts(vocab)):
        for d in (e, g):
            d.prefill(i, p)
    assert e.tokens == g.tokens, "prefill differs (not a verify step)"
    accepted = drafted = 0
    name = eager.args.speculative_algorithm
    for step, (slots, counts) in enumerate(rounds()):
        drafts = draft_source(e, slots, counts, step)
        used.clear()
        b, e_ids, e_acc = e.verify(slots, drafts)
        assert used == [False], used
        used.clear()
        _, g_ids, g_acc = g.verify(slots, drafts)
        assert used == [True], f"step {step}: the graph runner ran its verify step eagerly"
        print(f"{name} step {step}: slots {slots} drafts {drafts} cached {np.frombuffer(b.cached_lens, np.int32)}"
              f"\n  eager emitted {e_ids} accepted {e_acc}\n  graph emitted {g_ids} accepted {g_acc}")
        assert (g_ids, g_acc) == (e_ids, e_acc), f"{name} step {step}: the graph's verify step differs from eager"
        e_in, g_in = (d.runner.step_input_ids.tolist() for d in (e, g))
        assert e_in == g_in, f"{name} step {step}: drafts differ: eager {e_in}, graph {g_in}"
        e_aux, g_aux = (getattr(d.runner.model.model, "aux", None) for d in (e, g))
        if e_aux is not None:
            assert g_aux.shape == e_aux.shape == (len(e_in), e_aux.shape[1]), (g_aux.shape, e_aux.shape)
            rel = ((g_aux.float() - e_aux.float()).norm() / e_aux.float().norm()).item()
            print(f"  EAGLE3 target states: relative error {rel:.3g}")
            assert rel <= tol, f"{name} step {step}: target states differ (relative error {rel:.3g})"
        accepted += sum(e_acc)
        drafted += sum(counts)
    print(f"{name}: {accepted} of {drafted} drafts accepted")
    return {"accepted": accepted, "drafted": drafted}


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("verify-graphs") / "target"
    random_hf_model(LlamaConfig(**CONFIG, vocab_size=VOCAB), 0, path)
    return str(path)


def cpu_runner(model_dir: str, algorithm: str = "NGRAM", **flags) -> ModelRunner:
    args = ServerArgs(model_path=model_dir, device="cpu", dtype="float32", attention_backend="torch",
                      max_total_tokens=2048, max_running_requests=8, speculative_algorithm=algorithm,
                      speculative_num_draft_tokens=WIDTH, speculative_batch_size_threshold=THRESHOLD, **flags)
    return ModelRunner(args, 0, model_dir)


@pytest.mark.parametrize("algorithm", ["NGRAM", "STANDALONE", "EAGLE3"])
def test_verify_steps_through_the_graph_path_give_the_eager_tokens(target, algorithm, monkeypatch, tmp_path) -> None:
    ref = reference(cpu_runner(target), VOCAB)
    flags, source = {}, from_draft_model
    if algorithm == "NGRAM":
        source = given(ref, VOCAB)
    elif algorithm == "STANDALONE":
        flags = {"speculative_draft_model_path": target}  # the target as its own draft
    else:
        tokens = [t for out in ref for t in out]
        eagle3_head(tmp_path / "head", max(set(tokens), key=tokens.count), zero_lm_head=False)
        flags = {"speculative_draft_model_path": str(tmp_path / "head")}
    graph = with_call_graphs(cpu_runner(target, algorithm, **flags))
    assert graph.graphs.sizes_of(WIDTH) == [1, 2, 4]
    # a drafter drafts through its own loop beside each verify graph (draft_graphs.py)
    assert (graph.draft_graphs is not None and graph.draft_graphs.sizes_of(WIDTH) == [1, 2, 4]) == \
        (algorithm != "NGRAM")
    stats = lockstep(cpu_runner(target, algorithm, **flags), graph, monkeypatch, source, VOCAB, 1e-5)
    # EAGLE3's head has random weights (its drafts depend on the target states it reads): rarely right.
    assert algorithm == "EAGLE3" or 0 < stats["accepted"], stats
    assert algorithm == "STANDALONE" or stats["accepted"] < stats["drafted"], stats
