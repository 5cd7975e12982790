"""Speculative decoding on a GPU (not run by the author: no machine was lent): the Llama-3.1-8B shape with dummy
weights through the Engine, NGRAM vs off at batch 1 (tok/s, accepted length), batch 9 equal to batch 1, sampled
requests with penalties, bias, seeds and logprobs, and the greedy agreement in bf16 (a verify step is an extend).
Run from the repo root on the GPU machine: `source .whl/setup.sh && python3 scripts/spec_gpu_check.py`; with
`python3 -m pytest tests/test_speculative.py -k acceptance` for FlashInfer's chain_speculative_sampling."""

import time
from pathlib import Path

from radixserve import Engine

MODEL = str(Path(__file__).parent.parent / "radixserve" / "model_configs" / "llama-3.1-8b")

PASSAGE = ("The old lighthouse keeper climbed the spiral stairs every evening at dusk. He polished the great lens, "
           "trimmed the wick, and watched the ships pass through the narrow strait below.")
PROMPTS = [list(range(1000, 1040)) * 4, list(range(500, 700)), [7, 8, 9] * 30]
G = {"temperature": 0, "max_new_tokens": 64}


def main():
    res = {}
    for algo in (None, "NGRAM"):
        kw = {"speculative_algorithm": algo} if algo else {}
        with Engine(MODEL, load_format="dummy", skip_tokenizer_init=True, context_length=4096, **kw) as eng:
            eng.generate(input_ids=PROMPTS[0], sampling_params=G)
            t = time.time()
            outs = [eng.generate(input_ids=p, sampling_params=G) for p in PROMPTS]
            dt = time.time() - t
            res[algo] = [o["output_ids"] for o in outs]
            n = sum(len(o["output_ids"]) for o in outs)
            print(algo, f"{n / dt:.1f} tok/s batch 1", [o["meta_info"].get("spec_accept_length") for o in outs])
            batch = eng.generate(input_ids=PROMPTS * 3, sampling_params=G)
            same = [o["output_ids"] for o in batch[:3]] == res[algo]
            print(algo, "batch 9 (above the speculation threshold: plain decode) equal to batch 1:", same)
            sampled = [{"temperature": 0.8, "top_p": 0.9, "top_k": 50, "max_new_tokens": 32, "frequency_penalty": 0.3,
                        "seed": i if i % 2 else None, "logit_bias": {"100": 1.0}} for i in range(6)]
            s = eng.generate(input_ids=PROMPTS * 2, sampling_params=sampled,
                             return_logprob=True, top_logprobs_num=2)
            print(algo, "sampled ok", [len(o["output_ids"]) for o in s],
                  [len(o["meta_info"]["output_token_logprobs"]) for o in s])
    agree = sum(a == b for x, y in zip(res[None], res["NGRAM"]) for a, b in zip(x, y))
    total = sum(len(x) for x in res[None])
    print("greedy agreement bf16 (token positions):", agree, "/", total, "identical:", res[None] == res["NGRAM"])


if __name__ == "__main__":
    main()
