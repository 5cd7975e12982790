"""`radixserve bench`: each mode on a tiny random Llama (with SmolLM2's tokenizer) and small counts; the
report's JSON shape and its consistency (token counts, cache hit rate 0 with the radix cache off)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from server_fixture import RadixServer
from transformers import AutoModelForCausalLM, LlamaConfig

from radixserve.bench.datasets import DatasetArgs, load_dataset, num_requests
from radixserve.bench.serve import _OpenAIChat, _Stream
from radixserve.launch.cli import main
from radixserve.model_files import resolve_model
from tokenizer_proc.text import load_tokenizer

PNG_MAGIC = b"\x89PNG"
SMALL = ["--max-total-tokens", "4096", "--context-length", "1024", "--log-level", "warning"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model(None))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer) -> str:
    """A 2-layer, 64-wide random Llama with SmolLM2's tokenizer (so the text routes work too)."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def bench(out_dir: Path, *argv: str) -> dict:
    assert main(["bench", *argv, "--output-dir", str(out_dir), "--output-name", "report"]) == 0
    report = json.loads((out_dir / "report.json").read_text())
    assert (out_dir / "report.png").read_bytes()[:4] == PNG_MAGIC
    assert report["settings"] and report["machine"]["cpu_count"] >= 1 and report["date"]
    return report


def by_label(report: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for run in report["runs"]:
        out.setdefault(run["label"], []).append(run)
    return out


def check_counts(metrics: dict, requests: int, output_tokens: int, input_tokens: int | None = None) -> None:
    assert metrics["completed"] == requests and metrics["failed"] == 0
    assert metrics["output_tokens"] == output_tokens
    if input_tokens is not None:
        assert metrics["input_tokens"] == input_tokens
    d = metrics["duration_s"]
    assert d > 0 and metrics["output_throughput"] == pytest.approx(output_tokens / d)
    assert metrics["total_throughput"] == pytest.approx((metrics["input_tokens"] + output_tokens) / d)
    assert metrics["request_throughput"] == pytest.approx(requests / d)
    assert metrics["cache_hit_rate"] == pytest.approx(metrics["cached_tokens"] / metrics["input_tokens"])


# ---------------------------------------------------------------- datasets

def test_datasets(tokenizer, tmp_path) -> None:
    vocab = len(tokenizer)
    rnd = DatasetArgs(dataset="random", num_prompts=20, random_input_len=30, random_output_len=10,
                      random_range_ratio=0.5)
    convs = load_dataset(rnd, tokenizer, vocab)
    assert len(convs) == 20 and all(len(c) == 1 for c in convs)
    assert all(15 <= len(c[0].input_ids) <= 30 and 5 <= c[0].output_len <= 10 for c in convs)
    assert all(c[0].text == tokenizer.decode(c[0].input_ids) for c in convs)
    assert not set(tokenizer.all_special_ids) & {t for c in convs for t in c[0].input_ids}
    assert [c[0].input_ids for c in load_dataset(rnd, tokenizer, vocab)] == [c[0].input_ids for c in convs]

    gsp = DatasetArgs(dataset="generated-shared-prefix", gsp_num_groups=3, gsp_prompts_per_group=4,
                      gsp_system_prompt_len=20, gsp_question_len=5, gsp_output_len=7)
    convs = load_dataset(gsp, None, 100)
    assert len(convs) == 12 and all(len(c[0].input_ids) == 25 and c[0].output_len == 7 for c in convs)
    prefixes = [tuple(c[0].input_ids[:20]) for c in convs]
    assert sorted(prefixes.count(p) for p in set(prefixes)) == [4, 4, 4]
    assert convs[0][0].text is None

    mt = DatasetArgs(dataset="multi-turn", mt_num_conversations=3, mt_turns=4, mt_question_len=6, mt_output_len=2)
    convs = load_dataset(mt, None, 100)
    assert num_requests(convs) == 12 and all(len(t.input_ids) == 6 for c in convs for t in c)

    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "Tell me a long story about a cat, please."},
                           {"from": "gpt", "value": "Once upon a time there was a cat who liked to sleep."}]},
        {"conversations": [{"from": "human", "value": "Hi"}]},  # no answer: skipped
        {"conversations": [{"from": "human", "value": "What is two plus two, exactly?"},
                           {"from": "gpt", "value": "Two plus two is four."}]},
    ]))
    share = DatasetArgs(dataset="sharegpt", dataset_path=str(path), num_prompts=10)
    convs = load_dataset(share, tokenizer, vocab)
    assert len(convs) == 2 and all(c[0].input_ids == tokenizer.encode(c[0].text) for c in convs)
    assert {c[0].output_len for c in convs} == {len(tokenizer.encode(a)) for a in (
        "Once upon a time there was a cat who liked to sleep.", "Two plus two is four.")}

    edits = DatasetArgs(dataset="editing", num_prompts=6, editing_passage_words=40)
    convs = load_dataset(edits, tokenizer, vocab)
    assert len(convs) == 6 and [c[0].input_ids for c in load_dataset(edits, tokenizer, vocab)] == [
        c[0].input_ids for c in convs]
    for c in convs:  # a chat prompt that carries its passage, and room to copy all of it
        turn = c[0]
        assert turn.input_ids == tokenizer.encode(turn.text, add_special_tokens=False)
        passage = turn.text.split("\n\n")[1].split("<|im_end|>")[0]
        assert len(passage.split()) >= 40 and turn.output_len == len(tokenizer.encode(passage)) + 16
    asks = {c[0].text.split("<|im_start|>user\n")[1].split("\n")[0] for c in convs}
    assert len(asks) > 1 and any(ask.startswith("Repeat") for ask in asks)  # more than one kind of edit


# ---------------------------------------------------------------- modes

def test_offline_shared_prefix_with_both_baselines(tiny_model, tmp_path) -> None:
    # Two running requests at a time, so that later requests of a group find its prefix cached.
    report = bench(tmp_path, "offline", "--model-path", tiny_model, "--skip-tokenizer-init", *SMALL,
                   "--max-running-requests", "2", "--dataset", "generated-shared-prefix", "--gsp-num-groups", "2",
                   "--gsp-prompts-per-group", "3", "--gsp-system-prompt-len", "48", "--gsp-question-len", "8",
                   "--gsp-output-len", "5", "--baseline", "no-radix", "--baseline", "hf", "--hf-batch-size", "1", "3",
                   "--hf-num-prompts", "4")
    runs = by_label(report)
    assert list(runs) == ["radixserve", "no-radix", "hf-bs1", "hf-bs3"] and all(len(r) == 1 for r in runs.values())
    for label, (run,) in runs.items():
        n = 4 if label.startswith("hf") else 6  # HF on the first 4 prompts only
        check_counts(run["metrics"], n, n * 5, n * 56)
        assert "ttft_ms" not in run["metrics"]  # offline: no per-token timing
    assert runs["radixserve"][0]["metrics"]["cache_hit_rate"] > 0
    assert all(runs[k][0]["metrics"]["cache_hit_rate"] == 0 for k in ("no-radix", "hf-bs1", "hf-bs3"))
    assert [r["baseline"] for r in report["ratios"]] == ["no-radix", "hf-bs1", "hf-bs3",
                                                         report["ratios"][-1]["baseline"]]
    best = max(("hf-bs1", "hf-bs3"), key=lambda k: runs[k][0]["metrics"]["output_throughput"])
    assert report["ratios"][-1]["baseline"] == best and report["ratios"][-1]["best_of"] == "hf-bs*"
    assert all(r["output_throughput"] > 0 for r in report["ratios"])
    assert report["engine"]["device"] == "cpu"
    kinds = f"weights {report['engine']['dtype']}, KV {report['engine']['dtype']}"  # every run labelled
    assert all(run["dtypes"] == kinds for (run,) in runs.values())


@pytest.fixture(scope="module")
def no_radix_server(tiny_model) -> Iterator[RadixServer]:
    srv = RadixServer("--model-path", tiny_model, "--served-model-name", "tiny", "--disable-radix-cache")
    yield srv
    srv.stop()


def test_serve_launch_and_no_radix_baseline(tiny_model, no_radix_server, tmp_path) -> None:
    """Native /generate with input_ids, multi-turn, concurrency 1 and 2: a launched server against a no-radix one."""
    report = bench(tmp_path, "serve", "--launch-server", "--model-path", tiny_model, "--skip-tokenizer-init", *SMALL,
                   "--dataset", "multi-turn", "--mt-num-conversations", "2", "--mt-turns", "3",
                   "--mt-question-len", "8", "--mt-output-len", "4", "--max-concurrency", "1", "2",
                   "--baseline", "no-radix", "--baseline-url", no_radix_server.url)
    runs = by_label(report)
    assert list(runs) == ["radixserve", "no-radix"]
    for label, points in runs.items():
        assert [r["max_concurrency"] for r in points] == [1, 2]
        for run in points:
            m = run["metrics"]
            check_counts(m, 6, 6 * 4, 2 * (8 + 20 + 32))  # turn k's prompt: k earlier turns of 8 + 4, then 8
            for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_latency_ms"):
                assert 0 < m[key]["p50"] <= m[key]["p99"], key
            assert m["ttft_ms"]["mean"] <= m["e2e_latency_ms"]["mean"]
            assert len(run["ttft_ms_values"]) == 6
            assert (m["cache_hit_rate"] > 0) == (label == "radixserve")
            by_turn = m["ttft_ms_by_turn"]
            assert [(t["turn"], t["requests"], t["prompt_tokens"]) for t in by_turn] == [(1, 2, 8), (2, 2, 20),
                                                                                          (3, 2, 32)]
            assert all(0 < t["p50"] <= t["p99"] for t in by_turn)
            assert (by_turn[2]["cached_tokens"] >= 19) == (label == "radixserve")  # turn 3 reuses turn 2's 20
    assert [(r["baseline"], r["max_concurrency"]) for r in report["ratios"]] == [("no-radix", 1), ("no-radix", 2)]


@pytest.mark.parametrize("backend", ["openai", "openai-chat"])
def test_serve_openai_routes(no_radix_server, tiny_model, tmp_path, backend) -> None:
    report = bench(tmp_path, "serve", "--base-url", no_radix_server.url, "--backend", backend,
                   "--model-path", tiny_model, "--dataset", "multi-turn", "--mt-num-conversations", "2",
                   "--mt-turns", "2", "--mt-question-len", "8", "--mt-output-len", "3", "--request-rate", "20",
                   "--max-concurrency", "2")
    (run,) = report["runs"]
    assert run["request_rate"] == 20 and run["max_concurrency"] == 2
    check_counts(run["metrics"], 4, 4 * 3)
    assert run["metrics"]["cache_hit_rate"] == 0 and run["metrics"]["input_tokens"] > 4 * 8
    assert run["metrics"]["ttft_ms"]["p50"] > 0 and report["ratios"] == []


def test_openai_usage_is_parsed() -> None:
    st = _Stream()
    api = _OpenAIChat()
    assert api.on_event({"choices": [{"index": 0, "delta": {"content": "Hi"}}]}, st) == 1
    assert api.on_event({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11,
                                                  "prompt_tokens_details": {"cached_tokens": 5}}}, st) == 0
    assert (st.text, st.prompt_tokens, st.output_tokens, st.cached_tokens) == ("Hi", 9, 2, 5)


def test_one_batch_dummy_weights(tiny_model, tmp_path) -> None:
    report = bench(tmp_path, "one-batch", "--model-path", tiny_model, "--load-format", "dummy",
                   "--skip-tokenizer-init", *SMALL, "--batch-size", "1", "2", "--input-len", "16",
                   "--output-len", "16", "--runs", "2")
    assert [(r["batch_size"], r["input_len"], r["output_len"]) for r in report["runs"]] == [(1, 16, 16), (2, 16, 16)]
    for r in report["runs"]:
        assert r["prefill_ms"] > 0 and r["decode_ms"] > 0
        assert r["decode_tok_s"] == pytest.approx(r["batch_size"] / r["decode_ms"] * 1e3)
        assert r["prefill_floor_ms"] is None and r["decode_floor_ms"] is None  # no floor on a CPU
        assert r["prefill_flops"] > r["decode_flops"] > 0 and r["decode_bytes"] > 0
    assert "no physical floor" in report["device"]["note"]


def test_one_batch_counts_the_bytes_of_weights_kept_quantized() -> None:
    """A CPU's quantized weights (here Q4_1 blocks, ~0.6 bytes per weight; the weight kinds are no torch dtype):
    the body's bytes per weight come from the worker's parameter count and stored bytes."""
    from types import SimpleNamespace

    from radixserve.bench.one_batch import ModelShape

    config = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, vocab_size=100,
                             tie_word_embeddings=True)
    body, vocab = 50_000, 6_400
    shape = ModelShape.of(config, {"dtype": "bfloat16", "weight_dtype": "Q4_1+Q8_0", "kv_bytes_per_token": 512,
                                   "num_params": body + vocab, "weight_bytes": int(body * 0.625) + 2 * vocab})
    assert (shape.body_params, shape.vocab_params) == (body, vocab)
    assert shape.body_elem_bytes == pytest.approx(0.625, rel=1e-4)
    nbytes, flops = shape.step(1, 1, 10, 10)
    assert nbytes == pytest.approx(body * 0.625 + 2 * vocab + 11 * 512, rel=1e-4)
    assert flops == 2 * body + 2 * vocab + 4 * 2 * 64 * 10


def test_one_batch_refuses_a_batch_the_kv_pool_cannot_hold() -> None:
    from radixserve.bench.one_batch import _check_points_fit

    _check_points_fit([(64, 1024)], 32, 64 * 1056)  # exactly fits
    fits_not = r"64 x \(1024 \+ 32\) tokens do not fit .* 67583 slots.*--mem-fraction-static"
    with pytest.raises(SystemExit, match=fits_not):
        _check_points_fit([(1, 1024), (64, 1024)], 32, 64 * 1056 - 1)


def test_module_entry_point_help() -> None:
    out = subprocess.run([sys.executable, "-m", "radixserve.bench", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and all(mode in out.stdout for mode in ("serve", "offline", "one-batch"))


def test_report_commit(monkeypatch) -> None:
    from radixserve.bench.report import _git_commit

    monkeypatch.delenv("GIT_COMMIT", raising=False)
    assert _git_commit()  # this checkout's commit (with -dirty while tracked files are edited)
    monkeypatch.setenv("GIT_COMMIT", "0123abc")  # a copied tree whose git metadata may lag
    assert _git_commit() == "0123abc"
