"""Multi-turn conversations on the server's own sessions (SGLang's `open_session` and
`session_params`): each turn continues the previous turn's rid, so the server extends the KV cache
it already holds instead of recomputing the conversation, and only the new input is sent.

A fork is a new local session that continues from the same turn of the same server session; the
server keeps both branches (several continuations of one rid fork there too). The server session
is closed when the last local session using it is deleted.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from radixserve.client._sync import blocking
from radixserve.client.errors import SessionNotFoundError
from radixserve.client.http import AsyncClient, Client

Mode = Literal["chat", "text"]


@dataclass(frozen=True)
class Turn:
    prompt: str
    text: str
    """The model's answer."""
    rid: str
    """The server's id of this turn; the next turn continues it."""
    prompt_tokens: int
    """The whole conversation so far plus the new input, in tokens."""
    completion_tokens: int
    cached_tokens: int
    """Prompt tokens the server took from its cache."""
    finish_reason: str | None


@dataclass(frozen=True)
class Session:
    """A snapshot of a local session: its history and the server session it continues."""

    id: str
    server_session_id: str
    turns: tuple[Turn, ...] = ()


@dataclass(eq=False)
class _Slot:
    session: Session
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    deleted: bool = False


class AsyncSessionManager:
    """Local sessions over one AsyncClient, on its event loop. Turns of one session run one at a
    time (a lock each); different sessions run concurrently.

    `mode="chat"`: each prompt is a user message on /v1/chat/completions, rendered by the server as
    a continuation of the chat template; options are OpenAI's (`max_tokens`, `temperature`, `seed`).
    `mode="text"`: the prompt is raw text appended to the conversation on /generate; options are
    `sampling_params` (`max_new_tokens`, ...). `session_timeout`: seconds idle before the server
    closes a session on its own."""

    def __init__(self, client: AsyncClient, *, mode: Mode = "chat", capacity_of_str_len: int = 65536,
                 session_timeout: float | None = None) -> None:
        if mode not in ("chat", "text"):
            raise ValueError(f"mode must be 'chat' or 'text', got {mode!r}")
        self.client = client
        self.mode = mode
        self.capacity_of_str_len = capacity_of_str_len
        self.session_timeout = session_timeout
        self._slots: dict[str, _Slot] = {}
        self._server_refs: Counter[str] = Counter()

    async def __aenter__(self) -> AsyncSessionManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def create_session(self, session_id: str | None = None) -> Session:
        """Open a server session; the local id is `session_id`, or else the server's id."""
        server_id = await self.client.open_session(self.capacity_of_str_len, timeout=self.session_timeout)
        try:
            return self._add(Session(session_id or server_id, server_id))
        except ValueError:
            await self.client.close_session(server_id)
            raise

    def get_session(self, session_id: str) -> Session:
        return self._slot(session_id).session

    def session_ids(self) -> list[str]:
        return list(self._slots)

    async def generate(self, session_id: str, prompt: str, **options: Any) -> Turn:
        """One turn: send `prompt` as a continuation of the session's last turn; returns the turn,
        which is also appended to the session's history. One answer per turn (no `n`, no stream)."""
        if options.get("n", 1) != 1 or options.get("stream"):
            raise ValueError("a session turn has one answer and is not streamed (n=1, no stream)")
        slot = self._slot(session_id)
        async with slot.lock:
            if slot.deleted:
                raise SessionNotFoundError(session_id)
            session = slot.session
            params = {"id": session.server_session_id}
            if session.turns:
                params["rid"] = session.turns[-1].rid
            turn = await (self._chat_turn if self.mode == "chat" else self._text_turn)(prompt, params, options)
            slot.session = replace(session, turns=(*session.turns, turn))
            return turn

    async def fork_session(self, session_id: str, new_session_id: str | None = None) -> Session:
        """A new local session with the same history, continuing from the same turn (waits for a
        turn of the source that is running)."""
        slot = self._slot(session_id)
        async with slot.lock:
            if slot.deleted:
                raise SessionNotFoundError(session_id)
            return self._add(replace(slot.session, id=new_session_id or uuid.uuid4().hex))

    async def delete_session(self, session_id: str) -> None:
        """Forget the session (after its running turn, if any); the server session is closed when no
        other local session (a fork) still uses it."""
        slot = self._slots.pop(session_id, None)
        if slot is None:
            raise SessionNotFoundError(session_id)
        async with slot.lock:
            slot.deleted = True
            server_id = slot.session.server_session_id
            self._server_refs[server_id] -= 1
            if self._server_refs[server_id] == 0:
                del self._server_refs[server_id]
                await self.client.close_session(server_id)

    async def close(self) -> None:
        """Delete every session."""
        for session_id in list(self._slots):
            await self.delete_session(session_id)

    def _add(self, session: Session) -> Session:
        if session.id in self._slots:
            raise ValueError(f"session {session.id!r} already exists")
        self._slots[session.id] = _Slot(session)
        self._server_refs[session.server_session_id] += 1
        return session

    def _slot(self, session_id: str) -> _Slot:
        slot = self._slots.get(session_id)
        if slot is None:
            raise SessionNotFoundError(session_id)
        return slot

    async def _chat_turn(self, prompt: str, params: dict[str, str], options: dict[str, Any]) -> Turn:
        resp = await self.client.chat([{"role": "user", "content": prompt}], session_params=params, **options)
        choice, usage = resp["choices"][0], resp["usage"]
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return Turn(prompt, choice["message"]["content"], resp["id"], usage["prompt_tokens"],
                    usage["completion_tokens"], cached, choice.get("finish_reason"))

    async def _text_turn(self, prompt: str, params: dict[str, str], options: dict[str, Any]) -> Turn:
        resp = await self.client.generate(prompt, options, session_params=params)
        meta = resp["meta_info"]
        finish = meta.get("finish_reason")
        return Turn(prompt, resp["text"], meta["id"], meta["prompt_tokens"], meta["completion_tokens"],
                    meta.get("cached_tokens", 0), finish["type"] if finish else None)


class SessionManager:
    """Blocking face of AsyncSessionManager, on a Client's event loop thread; safe to share
    between threads."""

    def __init__(self, client: Client, *, mode: Mode = "chat", capacity_of_str_len: int = 65536,
                 session_timeout: float | None = None) -> None:
        self._loop = client._loop
        self._impl = AsyncSessionManager(client._impl, mode=mode, capacity_of_str_len=capacity_of_str_len,
                                         session_timeout=session_timeout)

    def __enter__(self) -> SessionManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_session(self, session_id: str) -> Session:
        return self._impl.get_session(session_id)

    def session_ids(self) -> list[str]:
        return self._impl.session_ids()

    create_session = blocking(AsyncSessionManager.create_session)
    generate = blocking(AsyncSessionManager.generate)
    fork_session = blocking(AsyncSessionManager.fork_session)
    delete_session = blocking(AsyncSessionManager.delete_session)
    close = blocking(AsyncSessionManager.close)
