"""Issue 6's acceptance through radixserve.client against a real server: a 5-turn conversation
reuses each turn's KV, sessions that share a document share the server's cache as the local
PrefixTree predicts, and two forks of one turn both hit the shared history yet differ by seed."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise

import pytest
from server_fixture import RadixServer
from transformers import AutoTokenizer

from radixserve.client import Client, PrefixTree, SessionManager, SharedPrefix

GREEDY = {"max_tokens": 16, "temperature": 0}
DOC = ("The Rhine rises in the Swiss Alps, flows through Lake Constance, forms part of the border "
       "between Germany and France, and passes Cologne and Duisburg before it reaches the North Sea "
       "in the Netherlands. Barges carry coal, grain and containers along most of its length.")



@pytest.fixture(scope="module")
def client(server: RadixServer) -> Iterator[Client]:
    with Client(server.url, timeout=300) as c:
        yield c


def test_integration_multi_turn(client: Client) -> None:
    questions = ["My name is Ada and I like rivers.", "What is my name?", "What do I like?",
                 "Name one long river.", "Thank you, goodbye."]
    with SessionManager(client) as sessions:
        sid = sessions.create_session().id
        turns = [sessions.generate(sid, q, **GREEDY) for q in questions]
        assert sessions.get_session(sid).turns == tuple(turns)
    for prev, turn in pairwise(turns):
        history = prev.prompt_tokens + prev.completion_tokens
        assert turn.cached_tokens >= history - 1, (turn, history)
        assert turn.prompt_tokens > history


def test_integration_prefix_sharing(client: Client) -> None:
    """Sessions opening with one document: the tracker finds who shares it, and the server's cache
    serves at least that shared prefix to the later session."""
    tokenizer = AutoTokenizer.from_pretrained(client.model_info()["tokenizer_path"])
    prompts = {"rhine-1": DOC + "\nQuestion: Where does the Rhine rise?\nAnswer:",
               "rhine-2": DOC + "\nQuestion: What do barges carry?\nAnswer:",
               "other": "Write a short poem about the moon.\n"}
    tree = PrefixTree()
    with SessionManager(client, mode="text") as sessions:
        for name, prompt in prompts.items():
            ids = tokenizer.encode(prompt)
            sharing = tree.find_sharing_sessions(ids)
            turn = sessions.generate(sessions.create_session(name).id, prompt, max_new_tokens=8, temperature=0)
            assert turn.prompt_tokens == len(ids)
            assert turn.cached_tokens >= max((s.length for s in sharing), default=0) - 1
            tree.register_prefix(name, ids)
    second = tokenizer.encode(prompts["rhine-2"])
    shared = tree.find_sharing_sessions(second)
    assert [s.session_id for s in shared] == ["rhine-2", "rhine-1"]
    assert shared[0] == SharedPrefix("rhine-2", len(second)) and shared[1].length >= len(tokenizer.encode(DOC)) - 1
    stats = tree.stats()
    assert stats.total_sessions == stats.active_prefixes == 3 and stats.total_nodes == 4  # shared DOC: one node


def test_integration_session_fork(client: Client) -> None:
    sampled = {"max_tokens": 16, "temperature": 1.0, "ignore_eos": True}
    with SessionManager(client) as sessions:
        sid = sessions.create_session().id
        first = sessions.generate(sid, "Tell me a story about a small robot.", **GREEDY)
        for name in ("a", "b", "a-again"):
            sessions.fork_session(sid, name)
        a = sessions.generate("a", "What happened next?", **sampled, seed=1)
        b = sessions.generate("b", "What happened next?", **sampled, seed=2)
        again = sessions.generate("a-again", "What happened next?", **sampled, seed=1)
        history = first.prompt_tokens + first.completion_tokens
        assert a.cached_tokens >= history - 1 and b.cached_tokens >= history - 1
        assert a.text != b.text and again.text == a.text
        assert sessions.get_session("a").turns == (first, a) and sessions.get_session(sid).turns == (first,)
