"""`--baseline hf`: HF transformers `generate` on the same prompts, batched with left padding, greedy, and
exactly the requested output lengths (EOS held off with min_new_tokens, like ignore_eos on our side)."""

from __future__ import annotations

from typing import Any

from radixserve.bench.metrics import RequestResult


class HFBaseline:
    def __init__(self, model_dir: str, load_format: str, device: str, dtype: str) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        self.torch = torch
        self.device = torch.device(device)
        torch_dtype = getattr(torch, dtype)
        if load_format == "dummy":  # random weights from config.json alone, made on the device
            with self.device:
                self.model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch_dtype)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(self.device)
        self.model.eval()

    def generate(self, prompts: list[list[int]], output_lens: list[int],
                 batch_size: int) -> list[tuple[list[int], RequestResult]]:
        """Batches of equal output length (at most batch_size prompts each); results in the prompts' order."""
        order = sorted(range(len(prompts)), key=lambda i: output_lens[i])
        out: list[Any] = [None] * len(prompts)
        start = 0
        while start < len(order):
            n = output_lens[order[start]]
            batch = [i for i in order[start:start + batch_size] if output_lens[i] == n]
            for i, ids in zip(batch, self._generate([prompts[i] for i in batch], n), strict=True):
                out[i] = (ids, RequestResult(prompt_tokens=len(prompts[i]), output_tokens=len(ids)))
            start += len(batch)
        return out

    def _generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):  # left padding
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[:, width:].tolist()

    def close(self) -> None:
        del self.model
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
