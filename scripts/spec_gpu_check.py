"""Speculative decoding on one GPU, Llama-3.1-8B shape with dummy bf16 weights (about 5 minutes on an H100):

  verify    ModelRunner alone: one verify step of 4 draft tokens at batch 1 against a plain decode step, both
            through their CUDA graphs (the ratio's target is <= 1.15), whole steps and forwards alone; the verify
            forward run eagerly too, for contrast
  engine    through the Engine: batch 1 without speculation, recording each greedy output; then REPLAY, which
            drafts those outputs back (a draft that is always right), batch 1 again (target: >= 2.5x the tok/s
            without); both at batch 64 (above --speculative-batch-size-threshold speculation is off: target, not
            slower; three rounds on fresh prompts, the median, the prefill alone timed beside); STANDALONE with
            the Llama-3.2-1B shape as its draft (dummy: its drafts are wrong, the worst case) and EAGLE3 with
            a dummy head of the public layout (eagle3_config), on two of the prompts; for each, sampled requests
            with penalties, bias, seeds and logprobs through verify steps, and the greedy agreement with the run
            without speculation in bf16 (a verify step is an extend: a rounding can flip a near-tie)
  verify-eagle3  the same with EAGLE3's head (dummy) drafting in the verify step; a profile of those steps
            to OUT_DIR/verify-EAGLE3.prof; a decode step at batch 64 with the head following it and without
  engine-det  off and REPLAY as in engine, both with --enable-deterministic-inference: there a verify step
            computes a token with the bits a decode step gives it, so the replayed draft is always right (in plain
            bf16 it parts at the first near tie the two round apart, and is wrong from there on)
  eagle3-det  EAGLE3 (dummy head) against no speculation at batch 1, both with --enable-deterministic-inference:
            greedy tokens identical

Run from the repo root on the GPU machine:
    source .whl/setup.sh && python3 scripts/spec_gpu_check.py OUT_DIR \
        [--sections verify verify-eagle3 engine engine-det eagle3-det]
Each section writes OUT_DIR/<section>.json as it ends (a section that fails writes its error); a summary is
printed last. `python3 -m pytest tests/test_speculative.py -k acceptance` checks FlashInfer's
chain_speculative_sampling against the target distribution.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
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
BIG_OUTPUT_LEN = 64
BIG_ROUNDS = 3
DRAFT_MODEL = str(ROOT / "radixserve" / "model_configs" / "llama-3.2-1b")  # Llama-3.1-8B's draft as published


def prompts(n: int, length: int = 128, seed: int = 0) -> list[list[int]]:
    import numpy as np

    vocab = json.loads((Path(MODEL) / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(seed)
    return [rng.integers(vocab // 8, vocab // 2, length).tolist() for _ in range(n)]


def section_verify(out: Path, algorithm: str = "NGRAM") -> dict:
    """Batch 1, context 1024: a plain decode step vs a verify step of NUM_DRAFTS drafts, both through their CUDA
    graphs (the verify forward also eagerly). `algorithm` EAGLE3: the head (dummy) drafts in the verify step and
    follows each step; a profile of its verify steps (top kernels and host calls) goes to OUT/verify-EAGLE3.prof,
    and a pipelined decode step of BIG_BATCH requests is timed with the head following it and without."""
    import numpy as np
    import torch
    from gpu_check import Synth

    from radixserve.config import ServerArgs
    from radixserve.wire import i32
    from worker_proc.model_runner import ModelRunner
    from worker_proc.step_io import StepArrays
    from worker_proc.verify_graphs import graph_verify

    spec = draft_flags(algorithm, eagle3_config(out)) if algorithm == "EAGLE3" else dict(
        speculative_algorithm=algorithm, speculative_num_draft_tokens=NUM_DRAFTS + 1)
    runner = ModelRunner(ServerArgs(model_path=MODEL, load_format="dummy", context_length=4096,
                                    max_total_tokens=16384, **spec), 0, MODEL)
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

    def forward_only(k: int) -> float:  # the target's forward: logits of the step's rows (as launch runs it)
        a = StepArrays.of(batch(k))
        if k == 0:
            return median_time(lambda: runner.forward(a, True))
        drafts = np.full(1, k, dtype=np.int64)
        return median_time(lambda: graph_verify(runner, a, drafts) or runner.forward(a, False, None, True))

    def eager_verify() -> float:
        a = StepArrays.of(batch(NUM_DRAFTS))
        return median_time(lambda: runner.forward(a, False, None, every_token=True))

    graphs = runner.graphs
    res = {"context": ctx, "num_drafts": NUM_DRAFTS, "decode_graphs": graphs is not None,
           "verify_graphs": graphs.sizes_of(NUM_DRAFTS + 1) if graphs is not None else []}
    with torch.inference_mode():
        for name, fn in (("step", whole), ("forward", forward_only)):
            dec, ver = fn(0), fn(NUM_DRAFTS)
            res[name] = {"decode_ms": dec * 1e3, "verify_ms": ver * 1e3, "ratio": ver / dec}
        res["forward"]["verify_eager_ms"] = eager_verify() * 1e3
        if algorithm == "EAGLE3":
            (out / "verify-EAGLE3.prof").write_text(_profile(lambda: whole(NUM_DRAFTS), runner.device.type))
            # Above the batch threshold a step is plain decode, but the head still follows its tokens
            ms = {}
            for name, drafter in (("with_head_ms", runner.draft), ("without_ms", None)):
                runner.draft = drafter
                ms[name] = Synth(runner, seed=1).decode_loop(BIG_BATCH, ctx, 20, overlap=True) * 1e3
            res[f"decode_batch{BIG_BATCH}"] = dict(ms, ratio=ms["with_head_ms"] / ms["without_ms"])
    res["met"] = res["forward"]["ratio"] <= 1.15
    return res


def _profile(step, device_type: str) -> str:
    """torch.profiler's tables (by device time, by host time) over 5 calls of `step`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            step()
    table = prof.key_averages()
    by_device = table.table(sort_by="self_cuda_time_total", row_limit=30) if device_type == "cuda" else ""
    return by_device + "\n" + table.table(sort_by="cpu_time_total", row_limit=40)


def _timed(eng, batch: list[list[int]], sp: dict) -> tuple[list[dict], float]:
    t0 = time.perf_counter()
    outs = eng.generate(input_ids=batch, sampling_params=sp)
    return outs, time.perf_counter() - t0


def _engine_runs(eng, ps: list[list[int]]) -> dict:
    """Batch 1 one prompt at a time (tok/s, accepted length); batch BIG_BATCH at once BIG_ROUNDS times on fresh
    prompts (no radix hits), the prefill alone (one output token) timed beside each; sampled requests."""
    g = {"temperature": 0, "max_new_tokens": OUTPUT_LEN, "ignore_eos": True}
    eng.generate(input_ids=ps[0][:16], sampling_params={"max_new_tokens": 8})  # warm
    outs, t1 = [], 0.0
    for p in ps:
        o, dt = _timed(eng, [p], g)
        outs += o
        t1 += dt
    n1 = sum(len(o["output_ids"]) for o in outs)
    big_runs, prefills = [], []
    for r in range(BIG_ROUNDS):
        outs64, t64 = _timed(eng, prompts(BIG_BATCH, seed=10 + r), dict(g, max_new_tokens=BIG_OUTPUT_LEN))
        big_runs.append(sum(len(o["output_ids"]) for o in outs64) / t64)
        prefills.append(_timed(eng, prompts(BIG_BATCH, seed=20 + r), dict(g, max_new_tokens=1))[1])
    sampled = [{"temperature": 0.8, "top_p": 0.9, "top_k": 50, "max_new_tokens": 32, "frequency_penalty": 0.3,
                "seed": i if i % 2 else None, "logit_bias": {"100": 1.0}, "ignore_eos": True}
               for i in range(len(ps[:4]))]
    s = eng.generate(input_ids=ps[:4], sampling_params=sampled, return_logprob=True, top_logprobs_num=2)
    metas = [o["meta_info"] for o in outs]
    verify = sum(m.get("spec_verify_ct", 0) for m in metas)
    return {"batch1_tok_s": n1 / t1, "batch1_tokens": n1,
            "accept_length": n1 / verify if verify else None,
            f"batch{BIG_BATCH}_tok_s": statistics.median(big_runs), f"batch{BIG_BATCH}_rounds_tok_s": big_runs,
            f"batch{BIG_BATCH}_prefill_s": statistics.median(prefills), f"batch{BIG_BATCH}_prefills_s": prefills,
            "sampled_ok": all(len(o["output_ids"]) == 32 == len(o["meta_info"]["output_token_logprobs"]) for o in s),
            "sampled_lengths": [(len(o["output_ids"]), len(o["meta_info"]["output_token_logprobs"])) for o in s],
            "outputs": [o["output_ids"] for o in outs]}


def _agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Greedy agreement in bf16: identical outputs, and tokens equal up to each output's first difference."""
    prefix = 0
    for x, y in zip(a, b):
        n = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        prefix += n
    return {"identical": a == b, "agreeing_prefix_tokens": prefix, "tokens": sum(len(x) for x in a)}


def draft_flags(algorithm: str, draft: Path | str) -> dict:
    """The Engine's / ServerArgs' flags of a drafter with dummy weights (STANDALONE: a model; EAGLE3: a head,
    eagle3_config) and NUM_DRAFTS drafts."""
    return dict(speculative_algorithm=algorithm, speculative_draft_model_path=str(draft),
                speculative_draft_load_format="dummy", speculative_num_draft_tokens=NUM_DRAFTS + 1)


def eagle3_config(out: Path) -> Path:
    """A dummy EAGLE-3 head for the target, in the public layout's config (weights: --speculative-draft-load-format
    dummy): one decoder layer of the target's width, a 32000-token draft vocabulary."""
    target = json.loads((Path(MODEL) / "config.json").read_text())
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
            "rms_norm_eps", "hidden_act", "max_position_embeddings", "rope_theta", "rope_scaling", "head_dim")
    config = {k: target[k] for k in keys if k in target}
    config.update(architectures=["LlamaForCausalLMEagle3"], model_type="llama", num_hidden_layers=1,
                  draft_vocab_size=min(32000, target["vocab_size"]), tie_word_embeddings=False)
    path = out / "eagle3_head"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def section_engine(out: Path, deterministic: bool = False) -> dict:
    """Without speculation, then REPLAY of its outputs, STANDALONE (the Llama-3.2-1B shape as its draft) and EAGLE3 (a
    dummy head): each through the Engine. `deterministic`: off and REPLAY alone, both in that mode, where the
    replayed draft is always right (in plain bf16 it is right only until a near tie rounds apart)."""
    from radixserve import Engine

    engine = dict(ENGINE, enable_deterministic_inference=deterministic)
    ps = prompts(BATCH1_PROMPTS)
    with Engine(MODEL, **engine) as eng:
        off = _engine_runs(eng, ps)
    path = out / f"replay_drafts{'_det' if deterministic else ''}.json"
    path.write_text(json.dumps([p + o for p, o in zip(ps, off["outputs"])]))
    flags = {"REPLAY": dict(speculative_algorithm="REPLAY", speculative_replay_path=str(path),
                            speculative_num_draft_tokens=NUM_DRAFTS + 1)}
    if not deterministic:
        flags.update(EAGLE3=draft_flags("EAGLE3", eagle3_config(out)),
                     STANDALONE=draft_flags("STANDALONE", DRAFT_MODEL))
    res = {"off": off}
    for algo, kw in flags.items():
        try:
            with Engine(MODEL, **engine, **kw) as eng:
                on = _engine_runs(eng, ps if algo == "REPLAY" else ps[:2])
        except Exception:
            res[algo] = {"error": traceback.format_exc()}
            continue
        on["agreement"] = _agreement(off["outputs"][:len(on["outputs"])], on["outputs"])
        on["batch1_speedup"] = on["batch1_tok_s"] / off["batch1_tok_s"]
        on[f"batch{BIG_BATCH}_ratio"] = on[f"batch{BIG_BATCH}_tok_s"] / off[f"batch{BIG_BATCH}_tok_s"]
        on[f"batch{BIG_BATCH}_prefill_ratio"] = on[f"batch{BIG_BATCH}_prefill_s"] / off[f"batch{BIG_BATCH}_prefill_s"]
        res[algo] = on
        (out / "engine.partial.json").write_text(json.dumps(res, indent=2, default=str))
    replay = res.get("REPLAY", {})
    res["met"] = {"REPLAY batch 1 >= 2.5x": replay.get("batch1_speedup", 0) >= 2.5}
    for algo in flags:  # above the threshold: plain decode, the drafters passing over it (drafter.py)
        res["met"][f"{algo} batch {BIG_BATCH} (threshold: plain decode) not slower"] = \
            res[algo].get(f"batch{BIG_BATCH}_ratio", 0) >= 0.97
    if deterministic:
        res["met"]["REPLAY greedy identical (its draft always right)"] = replay.get("agreement", {}).get("identical")
    else:
        res["met"]["EAGLE3 greedy identical"] = res.get("EAGLE3", {}).get("agreement", {}).get("identical")
    for r in res.values():
        if isinstance(r, dict) and "outputs" in r:
            r["outputs"] = len(r["outputs"])
    return res


def section_eagle3_deterministic(out: Path) -> dict:
    """EAGLE3 (a dummy head) against plain decoding, both with --enable-deterministic-inference, batch 1: the
    greedy tokens must be identical (in plain bf16 a verify step, an extend, can round a near tie apart)."""
    from radixserve import Engine

    g = {"temperature": 0, "max_new_tokens": OUTPUT_LEN, "ignore_eos": True}
    res = {}
    for name, kw in (("off", {}), ("EAGLE3", draft_flags("EAGLE3", eagle3_config(out)))):
        with Engine(MODEL, **ENGINE, enable_deterministic_inference=True, **kw) as eng:
            timed = [_timed(eng, [p], g) for p in prompts(2)]
        res[name] = {"outputs": [o[0]["output_ids"] for o, _ in timed],
                     "tok_s": sum(len(o[0]["output_ids"]) for o, _ in timed) / sum(dt for _, dt in timed)}
    res["agreement"] = _agreement(res["off"]["outputs"], res["EAGLE3"]["outputs"])
    res["met"] = {"EAGLE3 greedy identical (deterministic mode)": res["agreement"]["identical"]}
    for r in (res["off"], res["EAGLE3"]):
        r["outputs"] = len(r["outputs"])
    return res


SECTIONS = {"verify": section_verify, "verify-eagle3": functools.partial(section_verify, algorithm="EAGLE3"),
            "engine": section_engine,
            "engine-det": functools.partial(section_engine, deterministic=True),
            "eagle3-det": section_eagle3_deterministic}


def main() -> None:
    global MODEL, DRAFT_MODEL, OUTPUT_LEN
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    p.add_argument("--model", default=MODEL, help="a config directory (dummy weights; a tiny one for a CPU smoke run)")
    p.add_argument("--draft-model", default=DRAFT_MODEL, help="STANDALONE's draft: a config directory of the same "
                   "vocabulary (dummy weights)")
    p.add_argument("--output-len", type=int, default=OUTPUT_LEN)
    ns = p.parse_args()
    MODEL, DRAFT_MODEL, OUTPUT_LEN = ns.model, ns.draft_model, ns.output_len
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
