"""Drives a model the way a worker does, for tests: a KVCache, a req_to_token table, ForwardMeta per step.

`RaggedRunner.step` runs one ragged batch (any mix of prompt chunks); `greedy` prefills several prompts in
one batch and then decodes them together, returning every step's last-token logits and the tokens.
"""

from __future__ import annotations

import os

import torch

from worker_proc.attention import backend_class
from worker_proc.attention.base import ForwardMeta
from worker_proc.kv_cache import KVCache


class RaggedRunner:
    def __init__(self, model: torch.nn.Module, max_reqs: int = 4, context_len: int = 128,
                 backend: str = "torch") -> None:
        param = next(model.parameters())
        self.model, self.device = model, param.device
        self.kv = KVCache(model.num_layers, max_reqs * context_len + 1, model.num_kv_heads_local,
                          model.head_dim, param.dtype, self.device)
        self.attn = backend_class(backend)(self.kv, model.num_q_heads_local, model.head_dim, model.attention_layers)
        self.req_to_token = torch.zeros(max_reqs, context_len, dtype=torch.int32, device=self.device)
        self.lens = [0] * max_reqs
        self.next_kv_slot = 1  # slot 0 is padding

    def step(self, reqs: list[int], new_tokens: list[list[int]], every_token: bool = False) -> torch.Tensor:
        """Append `new_tokens[i]` to request slot `reqs[i]`; returns each request's last-token logits [B, V]
        (`every_token`: the logits of every new token, [sum of lengths, V])."""
        out_slots, positions = [], []
        for req, toks in zip(reqs, new_tokens, strict=True):
            slots = range(self.next_kv_slot, self.next_kv_slot + len(toks))
            self.next_kv_slot += len(toks)
            start = self.lens[req]
            self.req_to_token[req, start:start + len(toks)] = torch.tensor(slots, dtype=torch.int32, device=self.device)
            self.lens[req] += len(toks)
            out_slots += slots
            positions += range(start, start + len(toks))
        extend = [len(t) for t in new_tokens]
        seq_lens = [self.lens[r] for r in reqs]
        def dev(values: list[int], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        indptr = dev([0] + extend, torch.int32).cumsum(0, dtype=torch.int32)
        meta = ForwardMeta(
            is_decode=all(n == 1 for n in extend), req_slots=dev(reqs, torch.int32),
            seq_lens=dev(seq_lens, torch.int32), extend_lens=dev(extend, torch.int32), qo_indptr=indptr,
            out_slots=dev(out_slots, torch.int64), req_to_token=self.req_to_token,
            seq_lens_cpu=seq_lens, extend_lens_cpu=extend)
        self.attn.prepare(meta)
        ids = dev([t for toks in new_tokens for t in toks], torch.long)
        hidden = self.model(ids, dev(positions, torch.long), self.attn)
        return self.model.compute_logits(hidden if every_token else hidden[indptr[1:].long() - 1])


@torch.inference_mode()
def greedy(model: torch.nn.Module, prompts: list[list[int]], steps: int,
           backend: str = "torch") -> tuple[torch.Tensor, list[list[int]]]:
    """Logits [steps + 1, B, V] (prefill, then each decode step) and the `steps + 1` greedy tokens per prompt,
    attention through `backend` (a worker_proc.attention name)."""
    runner = RaggedRunner(model, max_reqs=len(prompts), backend=backend)
    reqs = list(range(len(prompts)))
    logits = [runner.step(reqs, prompts)]
    tokens = [[t] for t in logits[-1].argmax(-1).tolist()]
    for _ in range(steps):
        logits.append(runner.step(reqs, [[toks[-1]] for toks in tokens]))
        for toks, t in zip(tokens, logits[-1].argmax(-1).tolist(), strict=True):
            toks.append(t)
    return torch.stack(logits), tokens


def tp_worker(rank: int, world_size: int, init_method: str, model_dirs: list[str], prompts: list[list[int]],
              steps: int, out_path: str, device_type: str = "cpu", ep_size: int = 1) -> None:
    """One TP rank (a torch.multiprocessing.spawn target; gloo on cpu, nccl on cuda:rank; MoE experts over
    `ep_size` groups): greedy-decode with each model, real and dummy weights; rank 0 saves
    {model_dir: {"logits", "tokens", "dummy_logits"}} (on the CPU) to `out_path`."""
    from radixserve.model_files import load_hf_config
    from worker_proc import parallel
    from worker_proc.weights import load_model

    torch.set_num_threads(1)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    parallel.init_tp(rank, world_size, init_method, "nccl" if device.type == "cuda" else "gloo", ep_size)
    try:
        results = {}
        for model_dir in model_dirs:
            config = load_hf_config(model_dir)
            logits, tokens = greedy(load_model(model_dir, config, "safetensors", torch.float32, device), prompts, steps)
            dummy = load_model(model_dir, config, "dummy", torch.float32, device, seed=3)
            results[model_dir] = {"logits": logits.cpu(), "tokens": tokens,
                                  "dummy_logits": greedy(dummy, prompts, 2)[0].cpu()}
        if rank == 0:
            torch.save(results, out_path)
    finally:
        parallel.destroy_tp()
    # Skip interpreter teardown, where gloo (torch 2.13, CPU) now and then aborts the process with
    # "terminate called without an active exception" (about 1 run in 10) after all the work is done.
    os._exit(0)


@torch.no_grad()
def hf_reference(hf: torch.nn.Module, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """HF logits predicting each of `tokens` after `prompt` (teacher-forced), [len(tokens), V]."""
    logits = hf(torch.tensor([prompt + tokens[:-1]])).logits[0].float()
    return logits[len(prompt) - 1:]


def assert_greedy_matches_hf(model: torch.nn.Module, hf: torch.nn.Module, prompts: list[list[int]], steps: int) -> None:
    """Our model is HF's architecture, its batched greedy tokens equal HF `generate`'s for each prompt alone, and
    every step's logits equal HF's teacher-forced ones to 1e-4 (float32)."""
    assert type(model).__name__ == type(hf).__name__
    logits, tokens = greedy(model, prompts, steps)
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])  # with the mask: generate would take a token equal to pad_token_id for padding
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=steps + 1)[0, len(prompt):]
        assert tokens[i] == expected.tolist()
        torch.testing.assert_close(logits[:, i], hf_reference(hf, prompt, tokens[i]), atol=1e-4, rtol=0)
