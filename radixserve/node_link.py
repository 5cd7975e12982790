"""The launchers' link between nodes (launch/multinode.py), over TCP: its messages, a channel of the wire of its own
(re-exported by wire.py)."""

from __future__ import annotations

from typing import Union

import msgspec


class NodeHello(msgspec.Struct, tag=True):
    """A remote node's launcher, first on the link to node 0's (launch/multinode.py); node 0 checks that the flags
    match its own (but those that may differ per node)."""

    node_rank: int
    server_args: bytes  # ServerArgs as JSON


class NodeHeartbeat(msgspec.Struct, tag=True):
    """Both ways, every HEARTBEAT_S: a link silent for longer than its timeout counts as a dead node."""


class NodeStop(msgspec.Struct, tag=True):
    """Node 0 stops: the remote node stops its workers and exits 1 if `error` is set, else 0."""

    error: str | None = None


NodeLink = Union[NodeHello, NodeHeartbeat, NodeStop]
