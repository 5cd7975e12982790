"""The client's exceptions: one base, then by cause (HTTP status, connection, timeout, stream, session)."""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """Base of every error the client raises."""


class APIStatusError(ClientError):
    """The server answered 4xx/5xx. `message`, `type`, `param`, `code` come from its OpenAI-shaped
    `{"error": {...}}` body when it has one; `body` is the raw text."""

    def __init__(self, status: int, body: str, error: dict[str, Any] | None = None) -> None:
        error = error or {}
        self.status = status
        self.body = body
        self.message: str = error.get("message") or body or f"HTTP {status}"
        self.type: str | None = error.get("type")
        self.param: str | None = error.get("param")
        self.code: str | int | None = error.get("code")
        super().__init__(f"HTTP {status}: {self.message}")


class APIConnectionError(ClientError):
    """The server could not be reached, or the connection broke."""


class APITimeoutError(APIConnectionError, TimeoutError):
    """A request took longer than the client's timeout."""


class StreamError(ClientError):
    """A stream carried an error event (`error` holds it) or ended before `data: [DONE]`."""

    def __init__(self, message: str, error: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.error = error


class SessionNotFoundError(ClientError, KeyError):
    """No local session has this id (never created, or deleted)."""

    def __str__(self) -> str:
        return f"no session {self.args[0]!r}"
