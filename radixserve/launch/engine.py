"""The offline Engine: SGLang-shaped `generate()` over in-process tokenization and real backend processes."""

from __future__ import annotations

import itertools
import logging
import shutil
import time
import uuid
from typing import Any

import msgspec
import zmq

from radixserve import wire
from radixserve.config import ServerArgs
from radixserve.errors import ApiError
from radixserve.gateway.validation import parse_sampling
from radixserve.ipc import IpcPaths, Receiver, Sender
from radixserve.launch.supervisor import ChildDied, ProcessGroup, start_backend
from radixserve.model_files import resolve_model
from tokenizer_proc.output import RequestOutput
from tokenizer_proc.text import encode_prompt, eos_token_ids, load_tokenizer, request_text, turn_end_ids

log = logging.getLogger("radixserve")

Prompt = str | list[dict]  # raw text, or chat messages (the chat template is applied)


class Engine:
    """Starts the scheduler and TP worker processes; `generate` blocks until its requests finish."""

    def __init__(self, model_path: str | None = None, tp_size: int = 1, **server_args: Any) -> None:
        self.args = ServerArgs(model_path=model_path, tp_size=tp_size, **server_args)
        self.model_dir = resolve_model(self.args.model_path)
        self.tokenizer = load_tokenizer(self.args.tokenizer_path or self.model_dir, self.args.skip_tokenizer_init)
        self.eos_ids = eos_token_ids(self.tokenizer, self.model_dir)
        self._ids = itertools.count()
        self.ipc = IpcPaths.create()
        self._ctx = zmq.Context()
        self._inbox = Receiver(self._ctx, self.ipc.scheduler_out(0), wire.SchedulerOut)
        self._to_sched = Sender(self._ctx, self.ipc.scheduler_in)
        self.procs = ProcessGroup()
        start_backend(self.procs, self.args, self.ipc, self.model_dir, num_replies=1)
        try:
            try:
                ready = self._wait_reply("ready", timeout=600)
            except ChildDied as e:
                # A worker that failed to start may exit before the scheduler relays why: wait for it.
                ready = self._inbox.recv(timeout_ms=2000)
                if not isinstance(ready, wire.ControlReply):
                    raise RuntimeError(f"radixserve failed to start: {e} (its log says why; from a script, create "
                                       "the Engine under `if __name__ == '__main__':`, since child processes "
                                       "re-import the main module)") from e
            if not ready.ok:
                raise RuntimeError(f"radixserve failed to start: {ready.error}")
            self.worker_info = ready.result
        except BaseException:
            self.procs.stop()
            raise

    # ------------------------------------------------------------ public API

    def generate(self, prompt: Prompt | list[Prompt] | None = None, sampling_params: dict | list[dict] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None, return_logprob: bool = False,
                 logprob_start_len: int = -1, top_logprobs_num: int = 0,
                 session_params: dict | None = None) -> dict | list[dict]:
        """Generate for one prompt (returns a dict) or a list of prompts (returns a list).

        `session_params` ({id, rid, offset, replace, drop_previous_output}) continues a turn of
        a session opened with `open_session`; the returned meta_info.id is the new turn's rid.
        """
        try:
            return self._generate(prompt, sampling_params, input_ids, return_logprob, logprob_start_len,
                                  top_logprobs_num, session_params)
        except ApiError as e:  # the same checks as the HTTP API
            raise ValueError(str(e)) from None

    def _generate(self, prompt: Any, sampling_params: Any, input_ids: Any, return_logprob: bool,
                  logprob_start_len: int, top_logprobs_num: int, session_params: dict | None) -> dict | list[dict]:
        single, items = _as_batch(prompt, input_ids)
        if isinstance(sampling_params, list) and len(sampling_params) != len(items):
            raise ValueError("sampling_params has a different length than the prompts")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(items)
        logprob = wire.LogprobRequest(logprob_start_len, top_logprobs_num) if return_logprob else None
        session = msgspec.convert(session_params, wire.SessionParams) if session_params else None
        pending: dict[str, RequestOutput] = {}
        for item, sp_dict in zip(items, params):
            sampling = parse_sampling(sp_dict)
            kind = "input_ids" if _is_ids(item) else "messages" if isinstance(item, list) else "text"
            continue_chat = kind == "messages" and bool(session and session.rid)
            ids = encode_prompt(self.tokenizer, **{kind: item}, vocab_size=self.worker_info["vocab_size"],
                                continue_chat=continue_chat)
            rid = uuid.uuid4().hex
            pending[rid] = RequestOutput(request_text(self.tokenizer, ids, sampling), self.tokenizer, len(ids),
                                         logprob is not None, logprob_text=self.tokenizer is not None)
            self._to_sched.send(wire.GenerateTokens(rid=rid, input_ids=list(ids), sampling=sampling,
                                                    logprob=logprob, session=session, eos_token_ids=self.eos_ids,
                                                    turn_end_ids=turn_end_ids(self.tokenizer) if continue_chat else []))
        results = self._collect(pending)
        return results[0] if single else results

    def flush_cache(self) -> bool:
        return self._control("flush_cache").ok

    def open_session(self, capacity_of_str_len: int = 0, session_id: str | None = None,
                     timeout: float | None = None) -> str:
        reply = self._control("open_session", capacity_of_str_len=capacity_of_str_len, session_id=session_id,
                              timeout=timeout)
        if not reply.ok:
            raise ValueError(reply.error)
        return reply.result["session_id"]

    def close_session(self, session_id: str) -> None:
        reply = self._control("close_session", session_id=session_id)
        if not reply.ok:
            raise ValueError(reply.error)

    def server_info(self) -> dict:
        return self._control("server_info").result

    def check_invariants(self) -> dict:
        """Scheduler state between steps; raises AssertionError naming the broken invariant."""
        reply = self._control("check_invariants")
        if not reply.ok:
            raise AssertionError(reply.error)
        return reply.result

    def shutdown(self) -> None:
        if not self.procs.procs:
            return
        try:
            self._to_sched.send(wire.Control(call_id="shutdown", op="shutdown"))
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(p.exitcode is None for p in self.procs.procs):
                time.sleep(0.05)
        finally:
            self.procs.stop(timeout=2)
            self._ctx.destroy(linger=0)
            shutil.rmtree(self.ipc.root, ignore_errors=True)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        if getattr(self, "procs", None) is not None and self.procs.procs:
            self.shutdown()

    # ------------------------------------------------------------ internals

    def _collect(self, pending: dict[str, RequestOutput]) -> list[dict]:
        """Wait for every request to finish; results in submission order."""
        open_rids = set(pending)
        while open_rids:
            msg = self._recv()
            if not isinstance(msg, wire.TokenBatch):
                continue
            for out in msg.outs:
                req = pending.get(out.rid)
                if req is None or req.finish is not None:
                    continue
                stop = req.apply(out)
                if stop is not None:
                    self._to_sched.send(wire.Abort(rid=out.rid, finish=stop))
                if req.finish is not None:
                    open_rids.discard(out.rid)
        return [{"text": req.text.text, "output_ids": list(req.text.output_ids), "meta_info": {"id": rid, **req.meta()}}
                for rid, req in pending.items()]

    def _control(self, op: str, **args: Any) -> wire.ControlReply:
        call_id = f"{op}-{next(self._ids)}"
        self._to_sched.send(wire.Control(call_id=call_id, op=op, args=args))
        return self._wait_reply(call_id, timeout=60)

    def _wait_reply(self, call_id: str, timeout: float) -> wire.ControlReply:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self._recv(deadline)
            if isinstance(msg, wire.ControlReply) and msg.call_id == call_id:
                return msg
        raise TimeoutError(f"no reply to {call_id!r} within {timeout:.0f} s")

    def _recv(self, deadline: float | None = None) -> msgspec.Struct | None:
        """Next message from the scheduler; raises if a backend process died meanwhile."""
        while deadline is None or time.monotonic() < deadline:
            msg = self._inbox.recv(timeout_ms=200)
            if msg is not None:
                return msg
            self.procs.check()
        return None


def _is_ids(item: object) -> bool:
    return isinstance(item, list) and (not item or isinstance(item[0], int))


def _as_batch(prompt: Any, input_ids: Any) -> tuple[bool, list]:
    if (prompt is None) == (input_ids is None):
        raise ValueError("pass exactly one of prompt and input_ids")
    if input_ids is not None:
        single = not input_ids or isinstance(input_ids[0], int)
        return single, [input_ids] if single else list(input_ids)
    single = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict))
    return single, [prompt] if single else list(prompt)

