"""The whole GPU check in one command: correctness first, then throughput (run it through gpu_check.sh).

Sections, each in its own process under a time limit (a hang costs one section, not the run):
  env       GPU, driver, package versions, commit
  ceilings  device-copy bandwidth and bf16 matmul rate measured on this GPU (every floor below is stated from
            them, measured again in each section that states one)
  pytest    tests/test_gpu.py: FlashInfer + CUDA graphs vs HF transformers, Engine end to end, TP=2
  runner    Llama-3.1-8B shape, dummy bf16 weights, ModelRunner.step on synthetic StepBatches:
            decode at batch 1 and at batch 256 x 1k context, prefill of 8 x 2048, against their floors;
            eager / CUDA graphs (fused Triton element-wise kernels) / graphs with plain torch element-wise
            kernels; a kernel-time profile of one eager step
  hf        HF transformers `generate` on the same shape (512 in, 128 out, batch 1 and 128)
  engine    the same through radixserve's Engine (scheduler + worker processes)
  tp2_70b   Llama-3.1-70B shape, dummy weights, --tp-size 2 through the Engine (needs 2 GPUs)
Results go to OUT/results.json; a summary table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
CONFIGS = ROOT / "radixserve" / "model_configs"
SECTIONS = {"env": 60, "ceilings": 60, "pytest": 540, "runner": 180, "engine": 120, "tp2_70b": 300, "hf": 120}


def _sync_time(fn, reps: int) -> float:
    """Median seconds of `fn` over `reps` runs, timed with CUDA events after two warm-ups."""
    import torch

    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------- sections


def section_env() -> dict:
    import torch

    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": os.environ.get("GIT_COMMIT", "?"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
            "gpu": torch.cuda.get_device_name(0), "python": sys.version.split()[0]}
    for mod in ("flashinfer", "triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 (report, don't fail)
            info[mod] = f"missing ({type(e).__name__})"
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem",
                          "--format=csv,noheader"], capture_output=True, text=True)
    info["nvidia_smi"] = smi.stdout.strip().splitlines()
    return info


def section_ceilings() -> dict:
    """This GPU's device-copy bandwidth (bytes read + written per second) and bf16 matmul rate: the ceilings every
    floor in this check is stated from."""
    import torch

    res = {"gpu": torch.cuda.get_device_name(0), "copy_TBps": _copy_rate() / 1e12,
           "bf16_matmul_TFLOPs": _matmul_rate() / 1e12}
    torch.cuda.empty_cache()  # the measurements' buffers go back before a model loads
    return res


def _copy_rate() -> float:
    """Bytes per second that a device-to-device copy of 2 GiB of bf16 reads and writes."""
    import torch

    n = 1 << 30
    a = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    return 2 * n * 2 / _sync_time(lambda: b.copy_(a), 10)


def _matmul_rate() -> float:
    """bf16 FLOP per second of an 8192 x 8192 x 8192 product."""
    import torch

    m = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    return 2 * 8192**3 / _sync_time(lambda: m @ m, 10)


def section_pytest(out: Path) -> dict:
    results = Path(tempfile.mkdtemp()) / "pytest_results.json"
    env = {**os.environ, "RADIXSERVE_GPU_RESULTS": str(results)}
    log = out / "pytest.log"
    with open(log, "w") as f:  # written as it runs: a killed run still leaves its log
        proc = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_gpu.py"), "-q", "-rA",
                               "-p", "no:cacheprovider", "--durations=8", "--timeout=240"], env=env, stdout=f,
                              stderr=subprocess.STDOUT)
    lines = log.read_text().splitlines()
    summary = [line for line in lines if line.startswith(("PASSED", "FAILED", "ERROR", "SKIPPED"))]
    tail = lines[-1:]
    detail = json.loads(results.read_text()) if results.exists() else {}
    return {"returncode": proc.returncode, "summary": summary + tail, "detail": detail}


class Synth:
    """Synthetic StepBatches for one ModelRunner: requests with a cached prefix of random KV, then decode."""

    def __init__(self, runner, seed: int = 0) -> None:
        import numpy as np

        self.runner, self.np = runner, np
        self.rng = np.random.default_rng(seed)
        self.next_slot, self.step_id = 1, 0

    def slots(self, n: int):
        if self.next_slot + n > self.runner.num_kv_slots:
            self.next_slot = 1  # reuse: the benchmark only needs valid slots
        s = self.np.arange(self.next_slot, self.next_slot + n, dtype=self.np.int32)
        self.next_slot += n
        return s

    def ids(self, n: int):
        return self.rng.integers(0, self.runner.model.vocab_size, n, dtype=self.np.int32)

    def new_req(self, slot: int, prefix):
        from radixserve.wire import NewReq

        return NewReq(req_slot=slot, prefix_slots=prefix.tobytes(), temperature=0.0, top_p=1.0, top_k=-1, min_p=0.0,
                      seed=-1)

    def batch(self, is_decode: bool, req_slots, cached, extend, new_reqs=(), input_ids=None, offsets=None):
        from radixserve.wire import StepBatch, i32

        self.step_id += 1
        total = int(sum(extend))
        ids = self.ids(total) if input_ids is None else self.np.asarray(input_ids, self.np.int32)
        return StepBatch(step=self.step_id, is_decode=is_decode, req_slots=i32(req_slots), input_ids=ids.tobytes(),
                         cached_lens=i32(cached), extend_lens=i32(extend), out_slots=self.slots(total).tobytes(),
                         sample_offsets=i32(offsets if offsets is not None else [0] * len(req_slots)),
                         new_reqs=list(new_reqs))

    def decode_loop(self, bs: int, ctx: int, steps: int, warmup: int = 3, overlap: bool = False,
                    clock=time.perf_counter) -> float:
        """Seconds per decode step of `bs` requests whose context grows from `ctx`: the median of whole steps
        (launch, then wait for the sampled ids on the host), or with `overlap` the mean step of a pipeline that
        launches step N+1 before waiting for step N's ids (as the scheduler runs it); by `clock` (wall time, or
        e.g. time.process_time)."""
        slots = list(range(bs))
        new = [self.new_req(s, self.slots(ctx - 1)) for s in slots]
        times, pending = [], None
        for i in range(warmup + steps):
            if i == warmup:
                start = clock()
            b = self.batch(True, slots, [ctx - 1 + i] * bs, [1] * bs, new if i == 0 else (), offsets=[i] * bs)
            t0 = clock()
            launched = self.runner.launch(b)
            if not overlap:
                launched.result()
                times.append(clock() - t0)
                continue
            if pending is not None:
                pending.result()
            pending = launched
        if overlap:
            pending.result()
            return (clock() - start) / steps
        run = sorted(times[warmup:])
        return run[len(run) // 2]

    def greedy(self, prompts: list[list[int]], steps: int) -> list[list[int]]:
        """Prefill `prompts` in one step, then decode them together greedily; returns the sampled ids."""
        np = self.np
        slots = list(range(len(prompts)))
        new = [self.new_req(s, np.zeros(0, np.int32)) for s in slots]
        r = self.runner.launch(self.batch(False, slots, [0] * len(slots), [len(p) for p in prompts], new,
                                          input_ids=[t for p in prompts for t in p])).result()
        out = [[int(t)] for t in np.frombuffer(r.next_ids, np.int32)]
        for i in range(steps):
            cached = [len(p) + i for p in prompts]
            r = self.runner.launch(self.batch(True, slots, cached, [1] * len(slots), input_ids=[o[-1] for o in out],
                                              offsets=[i + 1] * len(slots))).result()
            for o, t in zip(out, np.frombuffer(r.next_ids, np.int32)):
                o.append(int(t))
        return out


def _check_fused_ops() -> dict:
    """worker_proc.fused's Triton kernels against the torch code they replace, on random bf16 inputs."""
    import torch

    import worker_proc.layers as layers
    from worker_proc import fused
    from worker_proc.kv_cache import KVCache

    torch.manual_seed(0)
    x, res = (torch.randn(37, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    norm = layers.RMSNorm(4096, 1e-5, torch.bfloat16, "cuda")
    norm.weight.data.normal_(1.0, 0.1)
    gu = torch.randn(37, 2 * 14336, device="cuda", dtype=torch.bfloat16)
    qkv = torch.randn(37, 48, 128, device="cuda", dtype=torch.bfloat16)  # q | k | v heads, as in the model
    cos, sin = (torch.randn(37, 1, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    slots = torch.randperm(100, device="cuda")[:37].to(torch.int32) + 1

    def outputs() -> list[torch.Tensor]:
        cache = KVCache(1, 101, 8, 128, torch.bfloat16, "cuda")
        cache.store(0, slots, qkv[:, 32:40], qkv[:, 40:])
        rotated = layers.apply_rotary(qkv[:, :40], cos, sin)
        after = KVCache(1, 101, 8, 128, torch.bfloat16, "cuda")  # rotary + store, fused into one kernel
        if fused.ENABLED:
            q = fused.rotary_store(qkv[:, :40], qkv[:, 40:], cos, sin, slots, after.k[0], after.v[0], 32)
        else:
            q = rotated[:, :32]
            after.store(0, slots, rotated[:, 32:], qkv[:, 40:])
        return [*norm(x, res), layers.SiluAndMul()(gu), rotated, cache.k[0], cache.v[0], q, after.k[0], after.v[0]]

    with_fused = outputs()
    fused.ENABLED = False
    try:
        plain = outputs()
    finally:
        fused.ENABLED = True
    names = ("add_rmsnorm", "residual", "silu_and_mul", "rotary", "store_k", "store_v", "rotary_store_q",
             "rotary_store_k", "rotary_store_v")
    return {n: ((f.float() - p.float()).norm() / p.float().norm()).item() for n, f, p in zip(names, with_fused, plain)}


def _step_phases(runner, synth, bs: int, ctx: int) -> dict:
    """Where one graph decode step's time goes, each phase synchronised (median ms of 20): upload + block table,
    attention plan (FlashInfer plan + page indices), graph replay (the forward), sampling + copies to the host."""
    import numpy as np
    import torch

    from worker_proc.sampling import SampleRows
    from worker_proc.step_io import StepArrays

    graph_bs = runner.graphs.padded_size(bs)
    a = StepArrays(np.arange(bs, dtype=np.int32), np.full(bs, ctx, np.int32), np.ones(bs, np.int32), synth.ids(bs),
                   synth.slots(bs))
    phases: dict[str, list[float]] = {"upload": [], "plan": [], "replay": [], "sample": []}
    for _ in range(20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        d = runner._to_device(a.padded(graph_bs, runner.pad_row), is_decode=True)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        runner.attn.prepare_graph(d.meta)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        logits = runner.graphs.replay(graph_bs)[0][:bs]
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        ids, _ = runner.sampler.sample(logits, SampleRows(a.req_slots, d.req_slots[:bs], np.zeros(bs, np.int32)))
        ids.cpu()
        t4 = time.perf_counter()
        for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[k].append(dt * 1e3)
    return {k: sorted(v)[len(v) // 2] for k, v in phases.items()}


def _decode_attention_kernels(runner, bs: int, ctx: int) -> dict:
    """One layer's decode attention alone (tensor-core path): FlashInfer's fa2 kernel (what the backend uses)
    against its sm90 fa3 kernel, on contiguous and on scattered pages."""
    import flashinfer
    import torch

    k, v = runner.kv_cache.k[0].unsqueeze(1), runner.kv_cache.v[0].unsqueeze(1)
    heads, kv_heads, dim = runner.model.num_q_heads_local, k.shape[2], k.shape[3]
    q = torch.randn(bs, heads, dim, dtype=torch.bfloat16, device="cuda")
    indptr = torch.arange(bs + 1, dtype=torch.int32) * ctx
    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    pages = {"contiguous": torch.arange(1, bs * ctx + 1, dtype=torch.int32, device="cuda"),
             "scattered": torch.randperm(runner.num_kv_slots - 1, device="cuda")[:bs * ctx].to(torch.int32) + 1}
    res = {}
    for backend in ("fa2", "fa3"):
        for layout, indices in pages.items():
            try:
                wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True,
                                                                        backend=backend)
                wrapper.plan(indptr, indices, torch.ones(bs, dtype=torch.int32), heads, kv_heads, dim, 1,
                             q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
                s = _sync_time(lambda w=wrapper: w.run(q, (k, v)), 20)
                res[f"{backend}_{layout}"] = {"us": s * 1e6, "kv_TBps": bs * ctx * kv_heads * dim * 2 * 2 / s / 1e12}
            except Exception as e:  # noqa: BLE001 (a lead, not a requirement)
                res[f"{backend}_{layout}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return res


def _profile_eager_decode(synth, out: Path) -> dict:
    """Kernel time by kind for one eager batch-1 decode step (CUDA graphs off)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    graphs, synth.runner.graphs = synth.runner.graphs, None
    try:
        synth.decode_loop(1, 512, 2, warmup=1)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            synth.decode_loop(1, 512, 3, warmup=0)
        torch.cuda.synchronize()
    finally:
        synth.runner.graphs = graphs
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=30)
    (out / "profile_decode_bs1.txt").write_text(table)
    steps = 3
    total_us = sum(e.self_device_time_total for e in kernels) / steps
    gemm_us = sum(e.self_device_time_total for e in kernels
                  if any(k in e.key.lower() for k in ("gemm", "gemv", "sm90", "cutlass", "nvjet"))) / steps
    attn_us = sum(e.self_device_time_total for e in kernels
                  if "prefill" in e.key.lower() or "decode" in e.key.lower()) / steps
    return {"kernels_per_step": sum(e.count for e in kernels) / steps, "gpu_us_per_step": total_us,
            "gemm_us": gemm_us, "attention_us": attn_us, "other_us": total_us - gemm_us - attn_us}


def section_runner(out: Path) -> dict:
    import numpy as np
    import torch

    from radixserve.config import ServerArgs
    from worker_proc import fused, gemv
    from worker_proc.cuda_graph import capture_graphs
    from worker_proc.model_runner import ModelRunner

    ceilings = section_ceilings()  # measured before the model takes the memory
    bw, matmul_rate = ceilings["copy_TBps"] * 1e12, ceilings["bf16_matmul_TFLOPs"] * 1e12
    model_dir = str(CONFIGS / "llama-3.1-8b")
    args = ServerArgs(model_path=model_dir, load_format="dummy", device="cuda", dtype="bfloat16",
                      max_running_requests=256, cuda_graph_max_bs=256, max_total_tokens=300_000)
    t0 = time.monotonic()
    runner = ModelRunner(args, 0, model_dir)
    res: dict = {"ceilings": ceilings, "startup_s": time.monotonic() - t0, "weight_GB": runner.weight_bytes / 1e9,
                 "kv_tokens": runner.num_kv_slots - 1, "graph_sizes": runner.graphs.sizes if runner.graphs else None}
    with torch.no_grad():
        for t in runner.kv_cache.k + runner.kv_cache.v:
            t.normal_()  # attention never reads zeros
    synth = Synth(runner)
    kv_bytes = runner.kv_bytes_per_token
    w = runner.weight_bytes
    m = runner.model
    # Bytes a decode step must read: every weight except the embedding table (it reads B rows of it), plus KV.
    embed = m.model.embed_tokens.weight.numel() * m.model.embed_tokens.weight.element_size()
    res["floors"] = {"bs1_ms": w / bw * 1e3, "bs1_ms_no_embedding": (w - embed) / bw * 1e3}

    def decode(bs: int, ctx: int, steps: int) -> dict:
        s = synth.decode_loop(bs, ctx, steps)
        overlapped = synth.decode_loop(bs, ctx, steps, overlap=True)
        floor = (w + bs * (ctx + steps / 2) * kv_bytes) / bw
        return {"ms_per_step": s * 1e3, "tok_s": bs / s, "floor_ms": floor * 1e3, "floor_tok_s": bs / floor,
                "pct_of_floor": floor / s * 100, "overlap_ms_per_step": overlapped * 1e3,
                "overlap_pct_of_floor": floor / overlapped * 100}

    def graph_ms(bs: int) -> float | None:
        """GPU time of one replay of the graph of size `bs` (planned for the last decode batch)."""
        if runner.graphs is None or bs not in runner.graphs.sizes:
            return None
        return _sync_time(lambda: runner.graphs.replay(bs), 20) * 1e3

    def prefill() -> dict:
        n, length = 8, 2048
        slots = list(range(n))

        def run():
            new = [synth.new_req(s, np.zeros(0, np.int32)) for s in slots]
            runner.launch(synth.batch(False, slots, [0] * n, [length] * n, new)).result()

        run()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        s = sorted(times)[1]
        layers = m.num_layers
        linear = sum(p.numel() for name, p in m.named_parameters() if ".layers." in name and p.dim() == 2)
        hidden_q = m.num_q_heads_local * m.head_dim
        flops = 2 * linear * n * length + layers * n * 2 * 2 * hidden_q * length * (length + 1) / 2 \
            + 2 * m.lm_head.weight.numel() * n
        return {"s": s, "tokens_s": n * length / s, "model_TFLOP": flops / 1e12, "TFLOPs": flops / s / 1e12,
                "floor_s": flops / matmul_rate, "pct_of_matmul_rate": flops / s / matmul_rate * 100}

    def guarded(fn, *a) -> dict:
        try:
            return fn(*a)
        except Exception as e:  # noqa: BLE001 (report, go on with the figures)
            return {"error": f"{type(e).__name__}: {e}"[:500]}

    res["fused_ops_rel_err"] = guarded(_check_fused_ops)
    with torch.inference_mode():
        res["profile_eager_bs1"] = guarded(_profile_eager_decode, synth, out)
        graphs, runner.graphs = runner.graphs, None
        res["eager_bs1"] = decode(1, 512, 30)
        prompts = [synth.ids(n).tolist() for n in (40, 77, 5, 130)]
        eager_tokens = synth.greedy(prompts, 24)
        runner.graphs = graphs
        res["graphs_greedy_identical"] = synth.greedy(prompts, 24) == eager_tokens
        for variant in ("graphs", "graphs_cublas", "graphs_unfused"):
            if variant != "graphs":  # the small-batch projections through cuBLAS; the element-wise steps in torch
                gemv.ENABLED = False
                fused.ENABLED = variant != "graphs_unfused"
                runner.graphs = None
                torch.cuda.empty_cache()
                runner.graphs = capture_graphs(runner)
            r = res[variant] = {"bs1": decode(1, 512, 100)}
            r["bs1"]["graph_gpu_ms"] = graph_ms(1)
            if variant == "graphs_cublas":
                continue
            r["bs256_ctx1k"] = decode(256, 1024, 30)
            r["bs256_ctx1k"]["graph_gpu_ms"] = graph_ms(256)
            r["prefill_8x2048"] = prefill()
            if variant == "graphs":
                r["phases_bs1"] = guarded(_step_phases, runner, synth, 1, 600)
                r["phases_bs256"] = guarded(_step_phases, runner, synth, 256, 1030)
                r["attention_bs256_ctx1k"] = guarded(_decode_attention_kernels, runner, 256, 1024)
        fused.ENABLED = gemv.ENABLED = True
    return res


def _engine_bench(eng, bs: int, prompt_len: int, out_len: int, seed: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, eng.runtime.vocab_size, (bs, prompt_len)).tolist()
    params = {"temperature": 0, "max_new_tokens": out_len, "ignore_eos": True}
    t = time.perf_counter()
    outs = eng.generate(input_ids=prompts, sampling_params=params)
    s = time.perf_counter() - t
    n = sum(len(o["output_ids"]) for o in outs)
    return {"s": s, "output_tok_s": n / s, "batch": bs, "in": prompt_len, "out": out_len}


def section_hf() -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(CONFIGS / "llama-3.1-8b")
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    res = {}
    for bs in (1, 128):
        ids = torch.randint(0, config.vocab_size, (bs, 512), device="cuda")
        with torch.inference_mode():
            model.generate(ids[:, :16], attention_mask=torch.ones_like(ids[:, :16]), max_new_tokens=4, do_sample=False)
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=128, min_new_tokens=128,
                           do_sample=False)
            torch.cuda.synchronize()
            s = time.perf_counter() - t
        res[f"bs{bs}"] = {"s": s, "output_tok_s": bs * 128 / s}
    return res


def section_engine() -> dict:
    from radixserve import Engine

    t = time.monotonic()
    with Engine(str(CONFIGS / "llama-3.1-8b"), load_format="dummy", skip_tokenizer_init=True, context_length=4096,
                max_running_requests=128, cuda_graph_max_bs=128) as eng:
        res = {"startup_s": time.monotonic() - t, "kv_tokens": eng.server_info()["scheduler"]["max_total_num_tokens"]}
        _engine_bench(eng, 2, 64, 8, seed=0)  # warm-up
        res["bs1"] = _engine_bench(eng, 1, 512, 128, seed=1)
        res["bs128"] = _engine_bench(eng, 128, 512, 128, seed=2)
    return res


def section_tp2_70b() -> dict:
    """The 70B shape at --tp-size 2, all-reduces through symmetric memory (the default) and through NCCL only."""
    import torch

    from radixserve import Engine

    if torch.cuda.device_count() < 2:
        return {"skipped": "needs 2 GPUs"}
    res: dict = {"ceilings": section_ceilings()}  # each rank reads half the weights on its own GPU
    for label, nccl_only in (("p2p_all_reduce", False), ("nccl_all_reduce", True)):
        t = time.monotonic()
        with Engine(str(CONFIGS / "llama-3.1-70b"), tp_size=2, load_format="dummy", skip_tokenizer_init=True,
                    context_length=4096, max_total_tokens=65536, max_running_requests=64, cuda_graph_max_bs=64,
                    disable_custom_all_reduce=nccl_only) as eng:
            info = eng.server_info()
            r = {"startup_s": time.monotonic() - t}
            res["kv_tokens"] = info["scheduler"]["max_total_num_tokens"]
            res["bs1_floor_tok_s"] = res["ceilings"]["copy_TBps"] * 1e12 / (info["worker"]["weight_bytes"] / 2)
            _engine_bench(eng, 2, 64, 8, seed=0)
            r["bs1"] = _engine_bench(eng, 1, 256, 64, seed=1)
            r["bs32"] = _engine_bench(eng, 32, 256, 64, seed=2)
        res[label] = r
    return res


# ---------------------------------------------------------------- driver


def run_section(name: str, out: Path) -> dict:
    fn = globals()[f"section_{name}"]
    return fn(out) if fn.__code__.co_argcount else fn()


def summary(results: dict) -> str:
    lines = []
    env = results.get("env", {})
    lines.append(f"GPU {env.get('gpu')} x{env.get('gpus')}, torch {env.get('torch')},"
                 f" flashinfer {env.get('flashinfer')}, commit {env.get('commit')}, {env.get('date')}")
    for key in ("ceilings", "runner", "tp2_70b"):
        c = results.get(key, {}) if key == "ceilings" else results.get(key, {}).get("ceilings", {})
        if "copy_TBps" in c:
            lines.append(f"measured on {c['gpu']} ({key}): copy {c['copy_TBps']:.2f} TB/s, bf16 matmul "
                         f"{c['bf16_matmul_TFLOPs']:.0f} TFLOP/s; floors below are stated from the section's own")
    p = results.get("pytest", {})
    lines += [f"pytest: {s}" for s in p.get("summary", [])[-12:]]
    r = results.get("runner", {})
    for variant in ("graphs", "graphs_cublas", "graphs_unfused"):
        v = r.get(variant)
        if not v:
            continue
        if "bs256_ctx1k" not in v:
            lines.append(f"{variant}: decode bs1 {v['bs1']['tok_s']:.0f} tok/s ({v['bs1']['pct_of_floor']:.0f}% of "
                         f"floor), pipelined {v['bs1']['overlap_ms_per_step']:.2f} ms/step, graph "
                         f"{v['bs1']['graph_gpu_ms']:.2f} ms")
            continue
        b1, b256, pf = v["bs1"], v["bs256_ctx1k"], v["prefill_8x2048"]
        lines.append(f"{variant}: decode bs1 {b1['tok_s']:.0f} tok/s ({b1['pct_of_floor']:.0f}% of floor "
                     f"{b1['floor_tok_s']:.0f}) | bs256x1k {b256['tok_s']:.0f} tok/s ({b256['pct_of_floor']:.0f}% "
                     f"of floor {b256['floor_tok_s']:.0f}; target 70%) | prefill 8x2048 {pf['TFLOPs']:.0f} TFLOP/s "
                     f"({pf['pct_of_matmul_rate']:.0f}% of the measured matmul rate; target 50%)")
    for key in ("phases_bs1", "phases_bs256"):
        ph = r.get("graphs", {}).get(key, {})
        if "replay" in ph:
            lines.append(f"{key} (ms, synchronised): " + ", ".join(f"{k} {v:.2f}" for k, v in ph.items()))
    att = r.get("graphs", {}).get("attention_bs256_ctx1k", {})
    if att and "error" not in att:
        lines.append("decode attention bs256 x 1k, one layer: " + ", ".join(
            f"{k} {v['us']:.0f} us ({v['kv_TBps']:.2f} TB/s)" if "us" in v else f"{k} {v['error'][:80]}"
            for k, v in att.items()))
    if "eager_bs1" in r:
        lines.append(f"eager (no graphs) decode bs1: {r['eager_bs1']['tok_s']:.0f} tok/s; "
                     f"greedy identical with/without graphs: {r.get('graphs_greedy_identical')}")
    for key in ("hf", "engine"):
        e = results.get(key, {})
        if "bs1" in e:
            big = e.get("bs128", {})
            lines.append(f"{key}: 512 in / 128 out: bs1 {e['bs1']['output_tok_s']:.0f} tok/s, "
                         f"bs128 {big.get('output_tok_s', float('nan')):.0f} tok/s")
    t = results.get("tp2_70b", {})
    for label in ("p2p_all_reduce", "nccl_all_reduce"):
        if label in t:
            lines.append(f"70B tp2 ({label}): bs1 {t[label]['bs1']['output_tok_s']:.1f} tok/s (floor "
                         f"{t['bs1_floor_tok_s']:.1f}), bs32 {t[label]['bs32']['output_tok_s']:.0f} tok/s")
    for name, res in results.items():
        if "error" in res:
            lines.append(f"{name}: ERROR {res['error'][-300:]}")
    return "\n".join(lines)


def run_child(cmd: list[str], name: str, result: Path, timeout: float, out: Path, **popen: Any) -> dict:
    """Run section `name` in a child process that writes its results as JSON to `result`; its output is appended
    to out/sections.log. Returns the results, or {"error": ...} when it fails or runs past `timeout` seconds."""
    t = time.monotonic()
    print(f"== {name}", flush=True)
    try:
        proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True, **popen)
        log = proc.stdout + proc.stderr
        res = json.loads(result.read_text()) if proc.returncode == 0 and result.exists() else \
            {"error": f"exit {proc.returncode}: {log[-1500:]}"}
    except subprocess.TimeoutExpired as e:
        log = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        res = {"error": f"timed out after {e.timeout:.0f} s: {log[-1500:]}"}
    with open(out / "sections.log", "a") as f:
        f.write(f"\n===== {name} ({time.monotonic() - t:.0f} s)\n{log}")
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", default=list(SECTIONS), help=f"any of {list(SECTIONS)}")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    parser.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section in this process,
    parser.add_argument("--result", help=argparse.SUPPRESS)  # writing its results to this file
    parser.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", 3600)),
                        help="seconds for the whole run; sections that would start after it are skipped")
    a = parser.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.section:
        Path(a.result).write_text(json.dumps(run_section(a.section, out), indent=1, default=str))
        return
    parts = Path(tempfile.mkdtemp())
    deadline = time.monotonic() + a.budget
    results: dict = {}
    for name in a.sections:
        left = deadline - time.monotonic()
        if left < 20:
            results[name] = {"error": "skipped: out of time"}
            continue
        part = parts / f"{name}.json"
        results[name] = run_child([sys.executable, __file__, "--section", name, "--out", str(out), "--result",
                                   str(part)], name, part, min(SECTIONS[name], left), out)
        print(json.dumps(results[name], default=str)[:3000], flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print("\n== summary\n" + summary(results))


if __name__ == "__main__":
    main()
