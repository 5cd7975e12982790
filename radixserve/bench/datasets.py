"""Benchmark workloads as conversations of turns: token ids always, text too when a tokenizer is loaded.

A single-turn dataset is conversations of one turn. In `multi-turn`, turn k's prompt is the whole
conversation so far (every earlier prompt and the answer the server actually gave) plus turn k's
question, so a radix cache can serve all of it but the question. `editing` asks the model (through its chat
template) to repeat or lightly edit a passage given in the prompt: a workload where n-gram speculation pays
because the answer copies its input.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from radixserve.config import ServerArgs

DATASETS = ("random", "generated-shared-prefix", "multi-turn", "sharegpt", "editing")
SHAREGPT_MAX_PROMPT, SHAREGPT_MAX_TOTAL, SHAREGPT_MIN_LEN = 1024, 2048, 4  # SGLang's filters


@dataclass
class Turn:
    input_ids: list[int]  # the new part of the prompt (the whole prompt for single-turn datasets)
    output_len: int
    text: str | None = None  # the same, as text (for the OpenAI routes); None without a tokenizer


Conversation = list[Turn]


@dataclass
class DatasetArgs:
    dataset: str = "random"
    num_prompts: int = 64
    seed: int = 1
    random_input_len: int = 256
    random_output_len: int = 64
    random_range_ratio: float = 1.0
    gsp_num_groups: int = 8
    gsp_prompts_per_group: int = 8
    gsp_system_prompt_len: int = 512
    gsp_question_len: int = 32
    gsp_output_len: int = 32
    mt_num_conversations: int = 8
    mt_turns: int = 4
    mt_question_len: int = 64
    mt_output_len: int = 32
    dataset_path: str | None = None
    sharegpt_output_len: int | None = None
    editing_passage_words: int = 120

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> DatasetArgs:
        return cls(**{name: getattr(ns, name) for name in cls.__dataclass_fields__})


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    d = DatasetArgs()
    g = parser.add_argument_group("dataset")
    g.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    g.add_argument("--num-prompts", type=int, default=d.num_prompts, help="random and sharegpt: number of prompts")
    g.add_argument("--seed", type=int, default=d.seed, help="dataset seed")
    g.add_argument("--random-input-len", type=int, default=d.random_input_len)
    g.add_argument("--random-output-len", type=int, default=d.random_output_len)
    g.add_argument("--random-range-ratio", type=float, default=d.random_range_ratio,
                   help="lengths are uniform in [len * ratio, len]")
    g.add_argument("--gsp-num-groups", type=int, default=d.gsp_num_groups, help="shared-prefix groups")
    g.add_argument("--gsp-prompts-per-group", type=int, default=d.gsp_prompts_per_group)
    g.add_argument("--gsp-system-prompt-len", type=int, default=d.gsp_system_prompt_len)
    g.add_argument("--gsp-question-len", type=int, default=d.gsp_question_len)
    g.add_argument("--gsp-output-len", type=int, default=d.gsp_output_len)
    g.add_argument("--mt-num-conversations", type=int, default=d.mt_num_conversations)
    g.add_argument("--mt-turns", type=int, default=d.mt_turns, help="turns per conversation")
    g.add_argument("--mt-question-len", type=int, default=d.mt_question_len, help="new prompt tokens per turn")
    g.add_argument("--mt-output-len", type=int, default=d.mt_output_len)
    g.add_argument("--dataset-path", help="sharegpt: a ShareGPT-format JSON file")
    g.add_argument("--sharegpt-output-len", type=int, help="sharegpt: fixed output length (default: the answer's)")
    g.add_argument("--editing-passage-words", type=int, default=d.editing_passage_words,
                   help="editing: words in each passage (the output length is its token count + 16)")


class _Vocab:
    """Random token ids from a vocabulary without its special tokens."""

    def __init__(self, vocab_size: int, tokenizer: Any | None, seed: int) -> None:
        special = set(getattr(tokenizer, "all_special_ids", None) or [])
        self.ids = np.array([i for i in range(vocab_size) if i not in special], dtype=np.int64)
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int) -> list[int]:
        return self.ids[self.rng.integers(0, len(self.ids), n)].tolist()

    def length(self, n: int, ratio: float) -> int:
        return int(self.rng.integers(max(1, int(n * ratio)), n + 1))


def load_dataset(a: DatasetArgs, tokenizer: Any | None, vocab_size: int) -> list[Conversation]:
    """The conversations of `a.dataset`; deterministic in `a.seed`."""
    vocab = _Vocab(vocab_size, tokenizer, a.seed)
    if a.dataset == "random":
        convs = [[Turn(vocab.sample(vocab.length(a.random_input_len, a.random_range_ratio)),
                       vocab.length(a.random_output_len, a.random_range_ratio))] for _ in range(a.num_prompts)]
    elif a.dataset == "generated-shared-prefix":
        convs = [[Turn(system + vocab.sample(a.gsp_question_len), a.gsp_output_len)]
                 for system in (vocab.sample(a.gsp_system_prompt_len) for _ in range(a.gsp_num_groups))
                 for _ in range(a.gsp_prompts_per_group)]
        random.Random(a.seed).shuffle(convs)
    elif a.dataset == "multi-turn":
        convs = [[Turn(vocab.sample(a.mt_question_len), a.mt_output_len) for _ in range(a.mt_turns)]
                 for _ in range(a.mt_num_conversations)]
    elif a.dataset == "sharegpt":
        return _sharegpt(a, tokenizer)
    elif a.dataset == "editing":
        return _editing(a, tokenizer)
    else:
        raise ValueError(f"unknown dataset {a.dataset!r}; choose one of {DATASETS}")
    if tokenizer is not None:
        for conv in convs:
            for turn in conv:
                turn.text = tokenizer.decode(turn.input_ids)
    return convs


def _sharegpt(a: DatasetArgs, tokenizer: Any | None) -> list[Conversation]:
    """First (human, gpt) exchange of each conversation, filtered as SGLang's bench_serving does."""
    if a.dataset_path is None:
        raise ValueError("--dataset sharegpt needs --dataset-path FILE.json")
    if tokenizer is None:
        raise ValueError("--dataset sharegpt needs a tokenizer (not --skip-tokenizer-init)")
    with open(a.dataset_path) as f:
        items = json.load(f)
    random.Random(a.seed).shuffle(items)
    convs: list[Conversation] = []
    for item in items:
        msgs = item.get("conversations") or item.get("conversation") or []
        if len(convs) == a.num_prompts:
            break
        if len(msgs) < 2:
            continue
        prompt, answer = msgs[0]["value"], msgs[1]["value"]
        ids = tokenizer.encode(prompt)
        out = a.sharegpt_output_len or len(tokenizer.encode(answer))
        if len(ids) < SHAREGPT_MIN_LEN or out < SHAREGPT_MIN_LEN:
            continue
        if a.sharegpt_output_len is None and (len(ids) > SHAREGPT_MAX_PROMPT or len(ids) + out > SHAREGPT_MAX_TOTAL):
            continue
        convs.append([Turn(ids, out, prompt)])
    if not convs:
        raise ValueError(f"no usable conversation in {a.dataset_path}")
    return convs


WORDS = ("the river town market old bridge morning evening light stone garden window road house children teacher "
         "letter winter summer harbor ship captain bread baker music street night lamp quiet field farmer rain "
         "mountain village story book table friend door wall clock bell forest path small large bright dark warm "
         "cold slowly quickly always never often walked carried opened closed watched found remembered built "
         "painted wrote read sang waited").split()
EDITS = ("Repeat the following passage exactly, word for word.",
         "Rewrite the following passage, replacing the word '{a}' with '{b}' everywhere. Change nothing else.",
         "Copy the following passage, but write '{a}' in capital letters wherever it appears.")


def _editing(a: DatasetArgs, tokenizer: Any | None) -> list[Conversation]:
    """Chat prompts that ask to repeat or lightly edit a passage of random sentences given in the prompt."""
    if tokenizer is None:
        raise ValueError("--dataset editing needs a tokenizer (not --skip-tokenizer-init)")
    rng = random.Random(a.seed)
    convs: list[Conversation] = []
    for _ in range(a.num_prompts):
        words, sentences = 0, []
        while words < a.editing_passage_words:
            sentence = rng.choices(WORDS, k=rng.randrange(6, 14))
            sentences.append(" ".join(sentence).capitalize() + ".")
            words += len(sentence)
        passage = " ".join(sentences)
        x, y = rng.sample(WORDS, 2)
        ask = rng.choice(EDITS).format(a=x, b=y)
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"{ask}\n\n{passage}"}],
                                             add_generation_prompt=True, tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
        convs.append([Turn(ids, len(tokenizer.encode(passage, add_special_tokens=False)) + 16, text)])
    return convs


def tokenizer_and_vocab(args: ServerArgs) -> tuple[Any | None, int]:
    """The model's tokenizer (None with --skip-tokenizer-init) and the vocabulary prompts are drawn from."""
    from radixserve.model_files import load_hf_config, resolve_model

    model_dir = resolve_model(args.model_path, args.download_dir)
    if args.skip_tokenizer_init:
        return None, load_hf_config(model_dir).vocab_size
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path or model_dir)
    return tokenizer, len(tokenizer)


def num_requests(convs: list[Conversation]) -> int:
    return sum(len(c) for c in convs)
