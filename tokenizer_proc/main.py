"""A tokenizer process: text -> token ids for the scheduler, token ids -> text chunks for the gateway.

Tokenizer i binds `tokenizer_in(i)` (gateway requests) and `scheduler_out(i)` (its requests'
tokens, `reply_to = i`), and pushes to `scheduler_in` and `gateway_in`. The gateway routes a
request and its abort to the same tokenizer, so each one owns the state of its requests.

The text work is TokenizerCore's (frontend.py, shared with the offline Engine); this module moves its
messages. A streaming request gets a TextDelta per scheduler output; a non-streaming one only its final
delta. Deltas made from one drain of the scheduler socket go out as one TextBatch.
"""

from __future__ import annotations

import logging
import os

import msgspec
import zmq

from radixserve import wire
from radixserve.config import ServerArgs
from radixserve.ipc import IpcPaths, Receiver, Sender, Undecodable
from radixserve.procutil import child_init
from radixserve.stats import GetTokenizerStats
from tokenizer_proc.frontend import TokenizerCore

log = logging.getLogger("radixserve.tokenizer")


class TokenizerProcess:
    def __init__(self, args: ServerArgs, ipc: IpcPaths, index: int, model_dir: str) -> None:
        self.index = index
        self.core = TokenizerCore(args, model_dir, index)
        self.ctx = zmq.Context()
        self.from_gateway = Receiver(self.ctx, ipc.tokenizer_in(index), wire.TokenizerIn)
        self.from_scheduler = Receiver(self.ctx, ipc.scheduler_out(index), wire.SchedulerOut)
        self.to_scheduler = Sender(self.ctx, ipc.scheduler_in)
        self.to_gateway = Sender(self.ctx, ipc.gateway_in)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.from_gateway.sock, zmq.POLLIN)
        poller.register(self.from_scheduler.sock, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self.from_scheduler.sock in ready:
                self._on_scheduler(self.from_scheduler.drain())
            if self.from_gateway.sock in ready:
                for msg in self.from_gateway.drain():
                    if self._on_gateway(msg) is False:
                        return

    def _on_gateway(self, msg: msgspec.Struct) -> bool | None:
        if isinstance(msg, Undecodable):
            self.to_gateway.send(msg.rejection())
        elif isinstance(msg, wire.GenerateText):
            sent = self.core.submit(msg)
            (self.to_gateway if isinstance(sent, wire.Rejected) else self.to_scheduler).send(sent)
        elif isinstance(msg, wire.Abort):
            if msg.rid in self.core:
                self.to_scheduler.send(msg)  # the scheduler answers with the final (abort) output
        elif isinstance(msg, GetTokenizerStats):
            self.to_gateway.send(wire.ControlReply(msg.call_id, result=self.core.metrics.stats))
        elif isinstance(msg, wire.ShutdownServer):
            self.to_scheduler.send(msg)
            return False
        else:  # a control call: the scheduler answers it, to this tokenizer
            self.to_scheduler.send(msgspec.structs.replace(msg, reply_to=self.index))
        return None

    def _on_scheduler(self, msgs: list[msgspec.Struct]) -> None:
        deltas = []
        for msg in msgs:
            got = self.core.receive(msg)
            for abort in got.aborts:
                self.to_scheduler.send(abort)
            deltas += got.deltas
            if got.passed is not None:
                self.to_gateway.send(got.passed)
        if deltas:
            self.to_gateway.send(wire.TextBatch(deltas))


def run_tokenizer(args_json: bytes, ipc_root: str, index: int, model_dir: str, parent_pid: int) -> None:
    args = msgspec.json.decode(args_json, type=ServerArgs)
    child_init(f"tokenizer-{index}", parent_pid, args.log_level)
    try:
        proc = TokenizerProcess(args, IpcPaths(ipc_root), index, model_dir)
        proc.run()
    except Exception:
        log.exception("tokenizer %d crashed", index)
        os._exit(1)
    proc.ctx.destroy(linger=1000)  # let the forwarded shutdown reach the scheduler
    os._exit(0)
