"""A tokenizer process: text -> token ids for the scheduler, token ids -> text chunks for the gateway.

Tokenizer i binds `tokenizer_in(i)` (gateway requests) and `scheduler_out(i)` (its requests'
tokens, `reply_to = i`), and pushes to `scheduler_in` and `gateway_in`. The gateway routes a
request and its abort to the same tokenizer, so each one owns the state of its requests.

A streaming request gets a TextChunk per scheduler output that changes it; a non-streaming one
only its final chunk. Chunks made from one drain of the scheduler socket go out as one TextBatch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import msgspec
import zmq

from radixserve import wire
from radixserve.config import ServerArgs
from radixserve.ipc import IpcPaths, Receiver, Sender
from radixserve.procutil import child_init
from tokenizer_proc.output import RequestOutput
from tokenizer_proc.text import encode_prompt, eos_token_ids, load_tokenizer, request_text, turn_end_ids

log = logging.getLogger("radixserve.tokenizer")

@dataclass
class _Req:
    """What this tokenizer keeps of one request until it finishes."""

    stream: bool
    output: RequestOutput
    sent_chars: int = 0  # of output.text.text, in chunks already sent
    sent_ids: int = 0


class TokenizerProcess:
    def __init__(self, args: ServerArgs, ipc: IpcPaths, index: int, model_dir: str) -> None:
        self.args = args
        self.index = index
        self.tokenizer = load_tokenizer(args.tokenizer_path or model_dir, args.skip_tokenizer_init)
        self.eos_ids = eos_token_ids(self.tokenizer, model_dir)
        # Both narrowed by the scheduler's ready reply (the model's), which precedes every request.
        self.context_length = args.context_length or 1 << 62
        self.vocab_size = len(self.tokenizer) if self.tokenizer is not None else 1 << 31
        self.ctx = zmq.Context()
        self.from_gateway = Receiver(self.ctx, ipc.tokenizer_in(index), wire.TokenizerIn)
        self.from_scheduler = Receiver(self.ctx, ipc.scheduler_out(index), wire.SchedulerOut)
        self.to_scheduler = Sender(self.ctx, ipc.scheduler_in)
        self.to_gateway = Sender(self.ctx, ipc.gateway_in)
        self.reqs: dict[str, _Req] = {}

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

    # ------------------------------------------------------------ gateway -> scheduler

    def _on_gateway(self, msg: msgspec.Struct) -> bool | None:
        if isinstance(msg, wire.GenerateText):
            self._submit(msg)
        elif isinstance(msg, wire.Abort):
            if msg.rid in self.reqs:
                self.to_scheduler.send(msg)  # the scheduler answers with the final (abort) output
        elif isinstance(msg, wire.Control):
            self.to_scheduler.send(msgspec.structs.replace(msg, reply_to=self.index))
            if msg.op == "shutdown":
                return False
        return None

    def _submit(self, msg: wire.GenerateText) -> None:
        try:
            continue_chat = msg.session is not None and msg.session.rid is not None
            ids = encode_prompt(self.tokenizer, text=msg.text, input_ids=msg.input_ids, messages=msg.messages,
                                continue_chat=continue_chat, vocab_size=self.vocab_size)
            turn_end = turn_end_ids(self.tokenizer) if continue_chat and msg.messages is not None else []
        except ValueError as e:
            return self._reject(msg.rid, str(e))
        except Exception as e:  # a client's input must never take the process down (e.g. odd chat content)
            log.warning("cannot tokenize request %s: %r", msg.rid, e)
            return self._reject(msg.rid, f"cannot tokenize the prompt: {e}")
        sampling = msg.sampling
        if any(t >= self.vocab_size for t in sampling.stop_token_ids):
            return self._reject(msg.rid, f"stop_token_ids must be below the vocabulary size {self.vocab_size}")
        if msg.fill_context:
            room = self.context_length - len(ids)
            if room <= 0:
                return self._reject(msg.rid, f"the prompt ({len(ids)} tokens) leaves no room for output in the "
                                             f"context length ({self.context_length} tokens)")
            sampling = msgspec.structs.replace(sampling, max_new_tokens=room)
        try:
            text = request_text(self.tokenizer, ids, sampling)
        except ValueError as e:
            return self._reject(msg.rid, str(e))
        self.reqs[msg.rid] = _Req(msg.stream, RequestOutput(text, self.tokenizer, len(ids), msg.logprob is not None,
                                                            msg.return_text_in_logprobs))
        self.to_scheduler.send(wire.GenerateTokens(rid=msg.rid, input_ids=ids, sampling=sampling,
                                                   reply_to=self.index, logprob=msg.logprob, session=msg.session,
                                                   eos_token_ids=self.eos_ids, turn_end_ids=turn_end))

    def _reject(self, rid: str, message: str) -> None:
        finish = wire.FinishReason(type="abort", message=message)
        self.to_gateway.send(wire.TextBatch([wire.TextChunk(
            rid=rid, text="", output_ids=[], finished=True,
            meta={"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0, "finish_reason": finish.to_json()})]))

    # ------------------------------------------------------------ scheduler -> gateway

    def _on_scheduler(self, msgs: list[msgspec.Struct]) -> None:
        chunks = []
        for msg in msgs:
            if isinstance(msg, wire.ControlReply):
                if msg.call_id == "ready":
                    self.context_length = min(self.context_length, msg.result["context_length"])
                    self.vocab_size = msg.result["vocab_size"]
                self.to_gateway.send(msg)
                continue
            for out in msg.outs:
                req = self.reqs.get(out.rid)
                if req is None:
                    continue  # ended here already (a stop string); this is the scheduler catching up
                stop = req.output.apply(out)
                if stop is not None:
                    self.to_scheduler.send(wire.Abort(rid=out.rid, finish=stop))
                if req.output.finish is not None:
                    del self.reqs[out.rid]
                    chunks.append(self._chunk(out.rid, req))
                elif req.stream:
                    chunks.append(self._chunk(out.rid, req))
        if chunks:
            self.to_gateway.send(wire.TextBatch(chunks))

    def _chunk(self, rid: str, req: _Req) -> wire.TextChunk:
        """What the request output since its previous chunk (see wire.TextChunk)."""
        out = req.output
        text, ids = out.text.text, out.text.output_ids
        chunk = wire.TextChunk(rid=rid, text=text[req.sent_chars:], output_ids=ids[req.sent_ids:],
                               meta=out.meta(since=req.sent_ids), finished=out.finish is not None)
        req.sent_chars, req.sent_ids = len(text), len(ids)
        return chunk


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
