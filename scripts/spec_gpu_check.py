"""Speculative decoding on one GPU, Llama-3.1-8B shape with dummy bf16 weights (about 5 minutes on an H100):

  verify    ModelRunner alone: one verify step of 4 draft tokens at batch 1 against a plain decode step (the
            decode step runs its CUDA graph; the ratio's target is <= 1.15), whole steps and forwards alone
  replay    through the Engine: batch 1 without speculation, recording each greedy output; then REPLAY, which
            drafts those outputs back (a draft that is always right), batch 1 again (target: >= 2.5x the tok/s
            without); both engines at batch 64 (above --speculative-batch-size-threshold speculation is off:
            target, not slower); sampled requests with penalties, bias, seeds and logprobs through verify steps;
            the greedy agreement of speculation on and off in bf16 (a verify step is an extend)
  standalone  STANDALONE with the target as its own draft (dummy weights of the same seed): tok/s, accepted
            length, greedy agreement

Run from the repo root on the GPU machine:
    source .whl/setup.sh && python3 scripts/spec_gpu_check.py OUT_DIR [--sections verify replay standalone]
Each section writes OUT_DIR/<section>.json as it ends (a section that fails writes its error); a summary is
printed last. `python3 -m pytest tests/test_speculative.py -k acceptance` checks FlashInfer's
chain_speculative_sampling against the target distribution.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
MODEL = str(ROOT / "radixserve" / "model_configs" / "llama-3.1-8b")
ENGINE = dict(load_format="dummy", skip_tokenizer_init=True, context_length=4096)
NUM_DRAFTS = 4
BATCH1_PROMPTS = 4
OUTPUT_LEN = 256
BIG_BATCH = 64


def prompts(n: int, length: int = 128, seed: int = 0) -> list[list[int]]:
    import numpy as np

    vocab = json.loads((Path(MODEL) / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(seed)
    return [rng.integers(vocab // 8, vocab // 2, length).tolist() for _ in range(n)]


def section_verify(out: Path) -> dict:
    """Batch 1, context 1024: a plain decode step (CUDA graph) vs a verify step of NUM_DRAFTS drafts (eager)."""
    import torch
    from gpu_check import Synth

    from radixserve.config import ServerArgs
    from radixserve.wire import i32
    from worker_proc.model_runner import ModelRunner, StepArrays

    runner = ModelRunner(ServerArgs(model_path=MODEL, load_format="dummy", context_length=4096,
                                    max_total_tokens=16384, speculative_algorithm="NGRAM"), 0, MODEL)
    synth = Synth(runner)
    ctx = min(1024, runner.context_length // 2)
    runner.launch(synth.batch(False, [0], [0], [1], [synth.new_req(0, synth.slots(ctx - 1))])).result()

    def batch(k: int):
        b = synth.batch(k == 0, [0], [ctx - 1], [k + 1], offsets=[5])
        if k:
            b.draft_lens = i32([k])
        return b

    def sync() -> None:
        if runner.device.type == "cuda":
            torch.cuda.synchronize()

    def median_time(fn, reps: int = 50) -> float:
        times = []
        for _ in range(reps + 10):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return sorted(times[10:])[reps // 2]

    def whole(k: int) -> float:  # upload, plan, forward, acceptance, sampled ids on the host
        return median_time(lambda: runner.launch(batch(k)).result())

    def forward_only(k: int) -> float:  # the target's forward: logits of the step's rows
        a = StepArrays.of(batch(k))
        return median_time(lambda: runner.forward(a, k == 0, None, every_token=k > 0))

    res = {"context": ctx, "num_drafts": NUM_DRAFTS, "decode_graphs": runner.graphs is not None}
    with torch.inference_mode():
        for name, fn in (("step", whole), ("forward", forward_only)):
            dec, ver = fn(0), fn(NUM_DRAFTS)
            res[name] = {"decode_ms": dec * 1e3, "verify_ms": ver * 1e3, "ratio": ver / dec}
    res["met"] = res["forward"]["ratio"] <= 1.15
    return res


def _timed(eng, batch: list[list[int]], sp: dict) -> tuple[list[dict], float]:
    t0 = time.perf_counter()
    outs = eng.generate(input_ids=batch, sampling_params=sp)
    return outs, time.perf_counter() - t0


def _engine_runs(eng, ps: list[list[int]], big: list[list[int]]) -> dict:
    """Batch 1 one prompt at a time (tok/s, accepted length), batch BIG_BATCH at once, sampled requests."""
    g = {"temperature": 0, "max_new_tokens": OUTPUT_LEN, "ignore_eos": True}
    eng.generate(input_ids=ps[0][:16], sampling_params={"max_new_tokens": 8})  # warm
    outs, t1 = [], 0.0
    for p in ps:
        o, dt = _timed(eng, [p], g)
        outs += o
        t1 += dt
    n1 = sum(len(o["output_ids"]) for o in outs)
    g64 = dict(g, max_new_tokens=64)
    outs64, t64 = _timed(eng, big, g64)
    n64 = sum(len(o["output_ids"]) for o in outs64)
    sampled = [{"temperature": 0.8, "top_p": 0.9, "top_k": 50, "max_new_tokens": 32, "frequency_penalty": 0.3,
                "seed": i if i % 2 else None, "logit_bias": {"100": 1.0}, "ignore_eos": True} for i in range(len(ps[:4]))]
    s = eng.generate(input_ids=ps[:4], sampling_params=sampled, return_logprob=True, top_logprobs_num=2)
    metas = [o["meta_info"] for o in outs]
    verify = sum(m.get("spec_verify_ct", 0) for m in metas)
    return {"batch1_tok_s": n1 / t1, "batch1_tokens": n1,
            "accept_length": n1 / verify if verify else None,
            f"batch{BIG_BATCH}_tok_s": n64 / t64,
            "sampled_ok": all(len(o["output_ids"]) == 32 == len(o["meta_info"]["output_token_logprobs"]) for o in s),
            "sampled": [(len(o["output_ids"]), len(o["meta_info"]["output_token_logprobs"]),
                         o["meta_info"]["finish_reason"]) for o in s],
            "outputs": [o["output_ids"] for o in outs]}


def _agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Greedy agreement in bf16: identical outputs, and tokens equal up to each output's first difference."""
    prefix = 0
    for x, y in zip(a, b):
        n = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        prefix += n
    return {"identical": a == b, "agreeing_prefix_tokens": prefix, "tokens": sum(len(x) for x in a)}


def section_replay(out: Path) -> dict:
    from radixserve import Engine

    ps, big = prompts(BATCH1_PROMPTS), prompts(BIG_BATCH, seed=1)
    with Engine(MODEL, **ENGINE) as eng:
        off = _engine_runs(eng, ps, big)
    path = out / "replay_drafts.json"
    path.write_text(json.dumps([p + o for p, o in zip(ps, off["outputs"])]))
    with Engine(MODEL, **ENGINE, speculative_algorithm="REPLAY", speculative_replay_path=str(path),
                speculative_num_draft_tokens=NUM_DRAFTS + 1) as eng:
        on = _engine_runs(eng, ps, big)
    res = {"off": off, "replay": on, "agreement": _agreement(off["outputs"], on["outputs"]),
           "batch1_speedup": on["batch1_tok_s"] / off["batch1_tok_s"],
           f"batch{BIG_BATCH}_ratio": on[f"batch{BIG_BATCH}_tok_s"] / off[f"batch{BIG_BATCH}_tok_s"]}
    res["met"] = {"batch1 >= 2.5x": res["batch1_speedup"] >= 2.5,
                  f"batch{BIG_BATCH} not slower": res[f"batch{BIG_BATCH}_ratio"] >= 0.97}
    for r in (off, on):
        r["outputs"] = len(r["outputs"])
    return res


def section_standalone(out: Path) -> dict:
    from radixserve import Engine

    ps, big = prompts(2), prompts(8, seed=1)
    with Engine(MODEL, **ENGINE) as eng:
        off = _engine_runs(eng, ps, big)
    with Engine(MODEL, **ENGINE, speculative_algorithm="STANDALONE", speculative_draft_model_path=MODEL,
                speculative_draft_load_format="dummy", speculative_num_draft_tokens=NUM_DRAFTS + 1) as eng:
        on = _engine_runs(eng, ps, big)
    res = {"off_batch1_tok_s": off["batch1_tok_s"], "on_batch1_tok_s": on["batch1_tok_s"],
           "accept_length": on["accept_length"], "agreement": _agreement(off["outputs"], on["outputs"]),
           "sampled_ok": on["sampled_ok"]}
    return res


SECTIONS = {"verify": section_verify, "replay": section_replay, "standalone": section_standalone}


def main() -> None:
    global MODEL, OUTPUT_LEN
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    p.add_argument("--model", default=MODEL, help="a config directory (dummy weights; a tiny one for a CPU smoke run)")
    p.add_argument("--output-len", type=int, default=OUTPUT_LEN)
    ns = p.parse_args()
    MODEL, OUTPUT_LEN = ns.model, ns.output_len
    ns.out_dir.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name in ns.sections:
        t0 = time.monotonic()
        try:
            res = SECTIONS[name](ns.out_dir)
        except Exception:
            res = {"error": traceback.format_exc()}
        res["seconds"] = round(time.monotonic() - t0, 1)
        (ns.out_dir / f"{name}.json").write_text(json.dumps(res, indent=2, default=str))
        summary[name] = res
        print(f"== {name} ({res['seconds']} s)\n{json.dumps(res, indent=2, default=str)}", flush=True)
    (ns.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
