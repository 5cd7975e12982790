"""Server-side sessions through the Engine (real scheduler and worker processes)."""

from __future__ import annotations

import pytest

from radixserve import Engine
from radixserve.wire import SessionParams
from scheduler_proc.sessions import SessionTable
from tokenizer_proc.text import encode_prompt, turn_end_ids

GREEDY = {"temperature": 0, "max_new_tokens": 12}


@pytest.fixture(scope="module")
def engine():
    with Engine(dtype="float32", max_total_tokens=512, max_running_requests=8, session_kv_budget=256) as eng:
        yield eng


def turn(engine, sid, rid, text, **params):
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    return engine.generate(input_ids=ids, sampling_params={**GREEDY, **params},
                           session_params={"id": sid, "rid": rid})


def test_multi_turn_reuses_previous_turn(engine):
    sid = engine.open_session()
    rid, prev_total = None, 0
    for k in range(5):
        res = turn(engine, sid, rid, f" Turn {k}: tell me one more fact about rivers.")
        meta = res["meta_info"]
        if k > 0:
            assert meta["cached_tokens"] >= prev_total - 1
            assert meta["prompt_tokens"] > prev_total
        prev_total = meta["prompt_tokens"] + meta["completion_tokens"]
        rid = meta["id"]
    engine.close_session(sid)
    engine.check_invariants()


def test_fork_shares_history_and_differs_by_seed(engine):
    sid = engine.open_session()
    first = turn(engine, sid, None, "Once upon a time there was a small robot who")
    root = first["meta_info"]["id"]
    sampled = {"temperature": 1.0, "max_new_tokens": 16, "ignore_eos": True}
    a = turn(engine, sid, root, " Then", **sampled, seed=1)
    b = turn(engine, sid, root, " Then", **sampled, seed=2)
    history = first["meta_info"]["prompt_tokens"] + first["meta_info"]["completion_tokens"]
    assert a["meta_info"]["cached_tokens"] >= history - 1
    assert b["meta_info"]["cached_tokens"] >= history - 1
    assert a["output_ids"] != b["output_ids"]
    engine.close_session(sid)


def test_session_errors(engine):
    res = turn(engine, "no-such-session", None, "hi")
    assert res["meta_info"]["finish_reason"]["type"] == "abort"
    assert res["meta_info"]["finish_reason"]["status_code"] == 400
    sid = engine.open_session()
    res = turn(engine, sid, "no-such-turn", "hi")
    assert res["meta_info"]["finish_reason"]["status_code"] == 400
    with pytest.raises(ValueError):
        engine.open_session(session_id=sid)
    engine.close_session(sid)
    with pytest.raises(ValueError):
        engine.close_session(sid)


def test_open_session_survives_a_flood_then_can_be_evicted(engine):
    engine.flush_cache()
    sid = engine.open_session()
    first = turn(engine, sid, None, "Remember the secret word: pineapple. Say ok.")
    history = first["meta_info"]["prompt_tokens"] + first["meta_info"]["completion_tokens"]
    flood = [list(range(1000 + 200 * i, 1000 + 200 * i + 150)) for i in range(4)]  # 600 tokens > 512 pool
    engine.generate(input_ids=flood, sampling_params={"temperature": 0, "max_new_tokens": 4})
    info = engine.check_invariants()
    assert info["session_pinned_tokens"] >= history - 1
    again = turn(engine, sid, first["meta_info"]["id"], " What was the word?")
    assert again["meta_info"]["cached_tokens"] >= history - 1
    engine.close_session(sid)
    assert engine.check_invariants()["session_pinned_tokens"] == 0
    engine.generate(input_ids=flood, sampling_params={"temperature": 0, "max_new_tokens": 4})
    ids = engine.tokenizer.encode("Remember the secret word: pineapple. Say ok.", add_special_tokens=False)
    fresh = engine.generate(input_ids=ids, sampling_params=GREEDY)
    assert fresh["meta_info"]["cached_tokens"] == 0


def test_a_stop_string_ends_the_turn_where_it_matched(engine):
    sid = engine.open_session()
    first = turn(engine, sid, None, "Count: one, two, three, four, five, six,", max_new_tokens=24, ignore_eos=True)
    text = first["text"]
    assert len(text) > 4
    stop = text[2:4]
    cut = turn(engine, sid, None, "Count: one, two, three, four, five, six,", max_new_tokens=24, ignore_eos=True,
               stop=[stop])
    assert cut["meta_info"]["finish_reason"]["matched"] == stop
    meta = cut["meta_info"]
    nxt = turn(engine, sid, meta["id"], " seven")
    new_len = len(engine.tokenizer.encode(" seven", add_special_tokens=False))
    # The next turn continues from exactly what the client saw, not the tokens generated past the match.
    assert nxt["meta_info"]["prompt_tokens"] == meta["prompt_tokens"] + meta["completion_tokens"] + new_len
    engine.close_session(sid)
    engine.check_invariants()


def test_turn_end_ids_close_only_a_turn_that_lacks_them():
    table = SessionTable(None, budget=0, max_sessions=4)
    sid = table.open(None, 0, None)
    table.start_turn("a", SessionParams(id=sid), [1, 2])
    table.end_turn("a", [5, 6], None)  # stopped by length: no closing id
    assert table.start_turn("b", SessionParams(id=sid, rid="a"), [9], turn_end_ids=[2]).tolist() == [1, 2, 5, 6, 2, 9]
    table.end_turn("b", [7, 2], None)  # ended with it
    prompt = table.start_turn("c", SessionParams(id=sid, rid="b"), [9], turn_end_ids=[2])
    assert prompt.tolist() == [1, 2, 5, 6, 2, 9, 7, 2, 9]
    assert table.start_turn("d", SessionParams(id=sid, rid="a"), [9]).tolist() == [1, 2, 5, 6, 9]  # raw ids: as is


def test_chat_continuation_closes_a_turn_cut_by_length(engine):
    """A chat turn stopped by max_new_tokens has no EOS; the next turn's template text needs it."""
    sid = engine.open_session()
    first = engine.generate([{"role": "user", "content": "Name three rivers."}],
                            sampling_params={**GREEDY, "max_new_tokens": 5, "ignore_eos": True},
                            session_params={"id": sid})
    meta = first["meta_info"]
    assert meta["finish_reason"]["type"] == "length"
    follow = [{"role": "user", "content": "And two lakes?"}]
    nxt = engine.generate(follow, sampling_params=GREEDY, session_params={"id": sid, "rid": meta["id"]})
    close = turn_end_ids(engine.tokenizer)
    assert close == [engine.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    if first["output_ids"][-len(close):] == close:  # greedy may have produced it as its fifth token
        close = []
    new = encode_prompt(engine.tokenizer, messages=follow, continue_chat=True)
    assert nxt["meta_info"]["prompt_tokens"] == (meta["prompt_tokens"] + meta["completion_tokens"]
                                                 + len(close) + len(new))
    engine.close_session(sid)
    engine.check_invariants()


def test_a_turn_outliving_its_session_leaves_a_reopened_one_alone():
    """A session closed while its turn runs, then opened again under the same id: the old turn's end changes
    nothing in the new session (its running count, its turns)."""
    table = SessionTable(None, budget=0, max_sessions=4)
    table.open("s", 0, None)
    table.start_turn("old", SessionParams(id="s"), [1, 2])
    table.close("s")
    table.open("s", 0, None)
    table.start_turn("new", SessionParams(id="s"), [3])
    table.end_turn("old", [5], None)
    session = table.sessions["s"]
    assert session.running == 1 and set(session.turns) == {"new"}
    table.check_invariants()
    table.end_turn("new", [6], None)
    assert session.running == 0 and session.turns["new"].output_ids == [6]
    table.check_invariants()
