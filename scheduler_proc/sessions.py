"""Multi-turn sessions (SGLang-compatible `session_params`) and the KV they keep pinned.

A session is a tree of turns: a request with `session_params.rid = R` continues turn R (its
prompt becomes R's prompt + R's output + the new input); several continuations of R fork.
Beyond SGLang, an open session pins its latest finished turn in the radix cache (a lock on
that path), so unrelated traffic cannot evict it; all pins together stay within
`session_kv_budget` tokens, the least recently used session giving way first. A pin saves recomputation and
never holds a request back: when pinned KV is all that stands between the requests and the KV they need, pins
give way too (`give_way`, least recently used first).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from radixserve.wire import SessionParams
from scheduler_proc.radix_cache import RadixCache


class SessionError(ValueError):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Turn:
    prompt_ids: np.ndarray
    parent: str | None
    output_ids: list[int] | None = None  # None while the turn is running
    children: list[str] = field(default_factory=list)


@dataclass
class Session:
    id: str
    capacity_of_str_len: int
    timeout: float | None
    last_used: float
    turns: dict[str, Turn] = field(default_factory=dict)
    pinned_node: object = None
    pinned_len: int = 0
    running: int = 0


class SessionTable:
    def __init__(self, cache: RadixCache | None, budget: int, max_sessions: int) -> None:
        self.cache = cache  # None when the radix cache is disabled: nothing to pin
        self.budget = budget
        self.max_sessions = max_sessions
        self.sessions: dict[str, Session] = {}
        self.turn_session: dict[str, Session] = {}  # rid -> session of running turns (maybe closed since)
        self.pinned_tokens = 0  # the sum of every session's pinned_len (check_invariants)
        self.pin_changes = 0  # pins taken or dropped so far (a change of the tree's locks)

    def open(self, session_id: str | None, capacity_of_str_len: int, timeout: float | None) -> str:
        if len(self.sessions) >= self.max_sessions:
            raise SessionError(f"too many open sessions (max {self.max_sessions})", status=429)
        sid = session_id or uuid.uuid4().hex
        if sid in self.sessions:
            raise SessionError(f"session {sid!r} is already open")
        if timeout is not None and timeout <= 0:
            raise SessionError("timeout must be positive")
        self.sessions[sid] = Session(sid, capacity_of_str_len, timeout, time.monotonic())
        return sid

    def close(self, session_id: str) -> None:
        """Drop the session and its pin; a turn of it still running goes on and pins nothing when it ends."""
        session = self._get(session_id)
        self._unpin(session)
        del self.sessions[session_id]

    def start_turn(self, rid: str, params: SessionParams, new_ids: list[int] | np.ndarray,
                   turn_end_ids: list[int] | None = None) -> np.ndarray:
        """Register a turn and return its full prompt; SessionError if it cannot continue. `turn_end_ids`
        close the previous turn's output when it does not end with them (wire.GenerateTokens)."""
        session = self._get(params.id)
        context: list[int] | np.ndarray = []
        if params.rid is not None:
            parent = session.turns.get(params.rid)
            if parent is None:
                raise SessionError(f"session {params.id!r} has no turn {params.rid!r}")
            if parent.output_ids is None:
                raise SessionError(f"turn {params.rid!r} is still running", status=409)
            if params.replace:
                for child in parent.children:
                    self._drop_subtree(session, child)
                parent.children = []
            output = parent.output_ids
            if turn_end_ids and output[len(output) - len(turn_end_ids):] != list(turn_end_ids):
                output = output + list(turn_end_ids)
            context = parent.prompt_ids if params.drop_previous_output else np.concatenate(
                [parent.prompt_ids, np.asarray(output, dtype=np.int32)])
            if params.offset is not None:
                context = context[:params.offset]
            parent.children.append(rid)
        prompt = np.concatenate([np.asarray(context, dtype=np.int32), np.asarray(new_ids, dtype=np.int32)])
        session.turns[rid] = Turn(prompt, params.rid)
        self.turn_session[rid] = session
        session.running += 1
        session.last_used = time.monotonic()
        return prompt

    def end_turn(self, rid: str, output_ids: list[int] | None, cached_ids: np.ndarray | None) -> None:
        """A turn finished (output_ids) or was aborted (None); pin the tree path of `cached_ids`. A turn whose
        session closed meanwhile changes nothing (not a session opened since under the same id)."""
        session = self.turn_session.pop(rid, None)
        if session is None or self.sessions.get(session.id) is not session:
            return
        session.running -= 1
        session.last_used = time.monotonic()
        turn = session.turns.get(rid)
        if turn is None:
            return
        if output_ids is None:
            self._drop_subtree(session, rid)
            return
        turn.output_ids = list(output_ids)
        if self.cache is not None and cached_ids is not None and len(cached_ids) <= self.budget:
            self._unpin(session)
            match = self.cache.match_prefix(cached_ids)
            self.cache.lock(match.node)
            session.pinned_node, session.pinned_len = match.node, len(match.slots)
            self.pinned_tokens += session.pinned_len
            self.pin_changes += 1
            self._fit_budget(keep=session)

    def expire(self, now: float) -> list[str]:
        """Close idle sessions past their timeout; returns their ids."""
        gone = [s.id for s in self.sessions.values()
                if s.timeout is not None and s.running == 0 and now - s.last_used > s.timeout]
        for sid in gone:
            self.close(sid)
        return gone

    def unpin_all(self) -> None:
        for session in self.sessions.values():
            self._unpin(session)

    def give_way(self) -> bool:
        """Unpin the least recently used pinned session; False when none is pinned."""
        pinned = [s for s in self.sessions.values() if s.pinned_node is not None]
        if not pinned:
            return False
        self._unpin(min(pinned, key=lambda s: s.last_used))
        return True

    def _fit_budget(self, keep: Session) -> None:
        """Unpin the least recently used sessions but `keep` until the pins fit the budget (a turn's end costs
        O(1) when they already fit)."""
        if self.pinned_tokens <= self.budget:
            return
        for session in sorted(self.sessions.values(), key=lambda s: s.last_used):
            if self.pinned_tokens <= self.budget:
                return
            if session is not keep:
                self._unpin(session)

    def _unpin(self, session: Session) -> None:
        if session.pinned_node is not None:
            self.cache.unlock(session.pinned_node)
            self.pinned_tokens -= session.pinned_len
            self.pin_changes += 1
            session.pinned_node, session.pinned_len = None, 0

    def _drop_subtree(self, session: Session, rid: str) -> None:
        turn = session.turns.pop(rid, None)
        if turn is None:
            return
        for child in turn.children:
            self._drop_subtree(session, child)

    def check_invariants(self) -> None:
        assert self.pinned_tokens == sum(s.pinned_len for s in self.sessions.values()), "pinned-token count is stale"
        assert all(s.pinned_node is not None for s in self.sessions.values() if s.pinned_len), "a length without a pin"
        turns = Counter(id(s) for s in self.turn_session.values() if self.sessions.get(s.id) is s)
        assert all(s.running == turns[id(s)] for s in self.sessions.values()), "a session's running count is stale"

    def _get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise SessionError(f"session {session_id!r} is not open")
        return session
