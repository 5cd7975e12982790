"""Where the tensor-parallel ranks live when they span nodes (`--nnodes N --node-rank R --dist-init-addr HOST:PORT`).

Node R runs ranks [R*k, (R+1)*k) with k = tp_size / nnodes; node 0 also runs the gateway, tokenizers and the
scheduler. Ports, all on node 0 (HOST):
- PORT: torch.distributed's rendezvous (a TCP store served by rank 0), for every rank.
- PORT+1: the launchers' link (`launch/multinode.py`): each remote launcher keeps a TCP connection with
  heartbeats to node 0's, so a node that dies (or is cut off) stops all of them.
- PORT+2+r: rank r's step batches, for ranks on nodes other than 0. Here the sender binds and the remote
  worker connects (node 0's address is the only one known to all); every other socket keeps ipc.py's rule
  that the receiver binds. Results come back from rank 0, which is on node 0, over ipc as before.
On one node (nnodes == 1) nothing listens on TCP: the ranks meet at a file in the ipc directory.
"""

from __future__ import annotations

from dataclasses import dataclass

import zmq

from radixserve import wire
from radixserve.config import ServerArgs
from radixserve.ipc import IpcPaths, Receiver, Sender

ANY_INTERFACE = "0.0.0.0"  # node 0's listening sockets: remote nodes reach it at --dist-init-addr's host


@dataclass(frozen=True)
class NodeLayout:
    nnodes: int
    node_rank: int
    tp_size: int
    host: str  # node 0's address ("" on one node)
    port: int  # --dist-init-addr's port (0 on one node)

    @staticmethod
    def of(args: ServerArgs) -> NodeLayout:
        host, _, port = (args.dist_init_addr or "").rpartition(":") if args.nnodes > 1 else ("", "", "0")
        return NodeLayout(args.nnodes, args.node_rank, args.tp_size, host, int(port))

    @property
    def ranks_per_node(self) -> int:
        return self.tp_size // self.nnodes

    @property
    def local_ranks(self) -> range:
        """The TP ranks whose workers run on this node."""
        k = self.ranks_per_node
        return range(self.node_rank * k, (self.node_rank + 1) * k)

    def local_index(self, rank: int) -> int:
        """Rank's position among this node's ranks (its GPU, counted from --base-gpu-id)."""
        return rank % self.ranks_per_node

    def on_head(self, rank: int) -> bool:
        """True if rank runs on node 0, beside the scheduler."""
        return rank < self.ranks_per_node

    def tp_init_method(self, ipc: IpcPaths) -> str:
        return ipc.tp_init_method if self.nnodes == 1 else f"tcp://{self.host}:{self.port}"

    @property
    def link_port(self) -> int:
        return self.port + 1

    def step_port(self, rank: int) -> int:
        return self.port + 2 + rank

    def step_sender(self, ctx: zmq.Context, ipc: IpcPaths, rank: int) -> Sender:
        """The scheduler's socket to rank's inbox: ipc on node 0, else bound on node 0 for the rank to connect."""
        if self.on_head(rank):
            return Sender(ctx, ipc.worker_in(rank))
        return Sender(ctx, f"tcp://{ANY_INTERFACE}:{self.step_port(rank)}", bind=True)

    def step_receiver(self, ctx: zmq.Context, ipc: IpcPaths, rank: int) -> Receiver:
        """Rank's inbox for StepBatch / Shutdown (the same bytes on every rank)."""
        if self.on_head(rank):
            return Receiver(ctx, ipc.worker_in(rank), wire.WorkerIn)
        return Receiver(ctx, f"tcp://{self.host}:{self.step_port(rank)}", wire.WorkerIn, bind=False)
