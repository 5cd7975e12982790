"""Python client for radixserve (and SGLang servers): HTTP calls, multi-turn sessions that reuse the
server's KV cache, and a local tracker of shared token prefixes.

    from radixserve.client import Client, SessionManager
"""

from radixserve.client.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ClientError,
    SessionNotFoundError,
    StreamError,
)
from radixserve.client.http import AsyncClient, Client, HealthStatus
from radixserve.client.prefix_tree import PrefixStats, PrefixTree, SharedPrefix
from radixserve.client.sessions import AsyncSessionManager, Session, SessionManager, Turn

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncSessionManager",
    "Client",
    "ClientError",
    "HealthStatus",
    "PrefixStats",
    "PrefixTree",
    "Session",
    "SessionManager",
    "SessionNotFoundError",
    "SharedPrefix",
    "StreamError",
    "Turn",
]
