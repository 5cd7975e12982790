"""A request whose values the workers or the scheduler cannot apply ends alone, with a 400, and the server keeps
serving: values the gateway would not let through, injected below it.

- Worker: the real ModelRunner and Scheduler in this process (the loop of scheduler_proc/main.py without its
  sockets); the bad request ends with an error naming its field, a concurrent request completes with the tokens
  it has alone, and no KV slot is left behind.
- Scheduler: a real Engine's scheduler process receives a message whose values break the wire's bounds; it
  answers that request with a 400 and serves the next one.
"""

from __future__ import annotations

import msgspec
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from radixserve import Engine, wire
from radixserve.config import ServerArgs
from scheduler_proc.scheduler import Scheduler
from worker_proc.model_runner import ModelRunner

VOCAB = 128
PROMPT = list(range(3, 40))
GREEDY = wire.SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def backend(model_dir: str) -> tuple[ServerArgs, ModelRunner]:
    args = ServerArgs(model_path=model_dir, dtype="float32", max_total_tokens=2048, max_running_requests=8,
                      grammar_backend="none", skip_tokenizer_init=True)
    return args, ModelRunner(args, 0, model_dir)


def run(args: ServerArgs, runner: ModelRunner, requests: dict[str, wire.SamplingParams]) -> tuple[dict, dict]:
    """Every request to its end, one step at a time; (output ids by rid, rejections by rid)."""
    s = Scheduler(args, runner.num_kv_slots, runner.context_length, VOCAB)
    for rid, sp in requests.items():
        s.add_request(wire.GenerateTokens(rid=rid, input_ids=PROMPT, sampling=sp))
    outputs: dict[str, list[int]] = {rid: [] for rid in requests}
    rejected: dict[str, wire.Rejected] = {}
    for _ in range(100):
        batch = s.schedule().batch
        if batch is None:
            break
        outcome = s.process_result(runner.launch(batch).result())
        for _, out in outcome.outs:
            outputs[out.rid] += out.new_ids
        rejected.update((r.rid, r) for _, r in outcome.replies)
    assert not s.has_work
    s.check_invariants()
    assert s.flush_cache() and s.allocator.num_free == s.allocator.capacity, "a KV slot was left behind"
    return outputs, rejected


@pytest.mark.parametrize(("field", "bad"), [
    ("temperature", msgspec.structs.replace(GREEDY, temperature=1e39)),
    ("min_p", msgspec.structs.replace(GREEDY, temperature=1.0, min_p=float("nan"))),
    ("repetition_penalty", msgspec.structs.replace(GREEDY, repetition_penalty=1e-300)),
    ("logit_bias", msgspec.structs.replace(GREEDY, logit_bias={"5": 1e39})),
], ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the 1e39 bias becomes inf: the workers reject it
def test_worker_ends_the_request_it_cannot_apply(backend: tuple[ServerArgs, ModelRunner], field: str,
                                                 bad: wire.SamplingParams) -> None:
    args, runner = backend
    alone, _ = run(args, runner, {"good": GREEDY})
    outputs, rejected = run(args, runner, {"bad": bad, "good": GREEDY, "after": GREEDY})
    assert set(rejected) == {"bad"} and rejected["bad"].status == 400
    assert field in rejected["bad"].message, rejected["bad"].message
    assert outputs["good"] == outputs["after"] == alone["good"] and len(alone["good"]) == 8
    assert outputs["bad"] == []


def test_scheduler_answers_a_message_it_cannot_decode(model_dir: str) -> None:
    """Below the gateway: a GenerateTokens whose temperature breaks the wire's bound reaches the scheduler process.
    It answers that request with a 400 naming the field and goes on serving."""
    with Engine(model_dir, dtype="float32", max_total_tokens=2048, skip_tokenizer_init=True,
                grammar_backend="none") as engine:
        good = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}
        expected = engine.generate(input_ids=PROMPT, sampling_params=good)["output_ids"]
        bad = wire.GenerateTokens(rid="bad", input_ids=PROMPT,
                                  sampling=msgspec.structs.replace(GREEDY, temperature=1e39))
        engine._to_sched.send(bad)
        finals = engine._collect(["bad"])
        assert isinstance(finals["bad"], wire.Rejected) and finals["bad"].status == 400
        assert "temperature" in finals["bad"].message, finals["bad"].message
        assert engine.generate(input_ids=PROMPT, sampling_params=good)["output_ids"] == expected
        assert engine.check_invariants()["num_running_reqs"] == 0
