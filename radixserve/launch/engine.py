"""The offline Engine: SGLang-shaped `generate()` in this process over the tokenizer front end
(tokenizer_proc.frontend, the same code as the tokenizer process) and real backend processes."""

from __future__ import annotations

import itertools
import shutil
import time
import uuid
from typing import Any, TypeVar

import msgspec
import zmq

from radixserve import wire
from radixserve.config import ServerArgs
from radixserve.errors import ApiError
from radixserve.gateway.validation import TokenId, parse_sampling
from radixserve.ipc import IpcPaths, Receiver, Sender
from radixserve.launch.supervisor import ChildDied, ProcessGroup, start_backend
from radixserve.model_files import resolve_model
from tokenizer_proc.frontend import TokenizerCore

Prompt = str | list[dict]  # raw text, or chat messages (the chat template is applied)
Call = TypeVar("Call", bound=wire.ControlCall)


class Engine:
    """Starts the scheduler and TP worker processes; `generate` blocks until its requests finish."""

    def __init__(self, model_path: str | None = None, tp_size: int = 1, **server_args: Any) -> None:
        self.args = ServerArgs(model_path=model_path, tp_size=tp_size, **server_args)
        if self.args.nnodes > 1 or self.args.dp_size > 1:
            raise ValueError("the Engine runs one replica on one node: "
                             "--nnodes and --dp-size are for `radixserve serve`")
        self.model_dir = resolve_model(self.args.model_path, self.args.download_dir)
        self.core = TokenizerCore(self.args.tokenizer_path or self.model_dir, self.model_dir,
                                  self.args.skip_tokenizer_init)
        self._call_ids = itertools.count()
        self.ipc = IpcPaths.create()
        self._ctx = zmq.Context()
        self._inbox = Receiver(self._ctx, self.ipc.scheduler_out(0), wire.SchedulerOut)
        self._to_sched = Sender(self._ctx, self.ipc.scheduler_in)
        self.procs = ProcessGroup()
        start_backend(self.procs, self.args, self.ipc, self.model_dir, num_replies=1)
        try:
            self.runtime = self.core.runtime = self._wait_ready()
        except BaseException:
            self.procs.stop()
            raise

    @property
    def tokenizer(self) -> Any | None:
        return self.core.tokenizer

    def _wait_ready(self) -> wire.RuntimeInfo:
        deadline = time.monotonic() + 600
        try:
            while not isinstance(msg := self._recv(deadline), wire.Ready):
                if msg is None:
                    raise TimeoutError("the backend did not start within 600 s")
        except ChildDied as e:
            # A worker that failed to start may exit before the scheduler relays why: wait for it.
            msg = self._inbox.recv(timeout_ms=2000)
            if not isinstance(msg, wire.Ready):
                raise RuntimeError(f"radixserve failed to start: {e} (its log says why; from a script, create "
                                   "the Engine under `if __name__ == '__main__':`, since child processes "
                                   "re-import the main module)") from e
        if msg.runtime is None:
            raise RuntimeError(f"radixserve failed to start: {msg.error}")
        return msg.runtime

    # ------------------------------------------------------------ public API

    def generate(self, prompt: Prompt | list[Prompt] | None = None, sampling_params: dict | list[dict] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None, return_logprob: bool = False,
                 logprob_start_len: int = -1, top_logprobs_num: int = 0,
                 session_params: dict | None = None) -> dict | list[dict]:
        """Generate for one prompt (returns a dict) or a list of prompts (returns a list).

        `session_params` ({id, rid, offset, replace, drop_previous_output}) continues a turn of
        a session opened with `open_session`; the returned meta_info.id is the new turn's rid.
        Invalid input raises ValueError, as the HTTP API answers 400.
        """
        single, items = _as_batch(prompt, input_ids)
        if isinstance(sampling_params, list) and len(sampling_params) != len(items):
            raise ValueError("sampling_params has a different length than the prompts")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(items)
        logprob = wire.LogprobRequest(logprob_start_len, top_logprobs_num) if return_logprob else None
        session = msgspec.convert(session_params, wire.SessionParams) if session_params else None
        msgs = [self._request(item, sp, logprob, session) for item, sp in zip(items, params)]
        sends = [self.core.submit(msg) for msg in msgs]
        rejected = next((s for s in sends if isinstance(s, wire.Rejected)), None)
        if rejected is not None:
            for msg in msgs:
                self.core.drop(msg.rid)
            raise ValueError(rejected.message)
        for send in sends:
            self._to_sched.send(send)
        outputs = self._collect([msg.rid for msg in msgs])
        results = [_result(msg, outputs[msg.rid]) for msg in msgs]
        return results[0] if single else results

    def flush_cache(self) -> bool:
        return self._control(wire.FlushCache).ok

    def open_session(self, capacity_of_str_len: int = 0, session_id: str | None = None,
                     timeout: float | None = None) -> str:
        reply = self._control(wire.OpenSession, capacity_of_str_len=capacity_of_str_len, session_id=session_id,
                              idle_timeout=timeout)
        if not isinstance(reply.result, wire.SessionOpened):
            raise ValueError(reply.error)
        return reply.result.session_id

    def close_session(self, session_id: str) -> None:
        reply = self._control(wire.CloseSession, session_id=session_id)
        if not reply.ok:
            raise ValueError(reply.error)

    def server_info(self) -> dict:
        """The runtime facts (`worker`) and the scheduler's counters (`scheduler`), as /get_server_info."""
        status = self._control(wire.GetServerInfo).result
        assert isinstance(status, wire.ServerStatus)
        return {"worker": msgspec.to_builtins(status.runtime),
                "scheduler": msgspec.to_builtins(status.scheduler) | {"invariants": status.invariants}}

    def check_invariants(self) -> dict:
        """Scheduler state between steps; raises AssertionError naming the broken invariant."""
        reply = self._control(wire.CheckInvariants)
        if not reply.ok:
            raise AssertionError(reply.error)
        assert isinstance(reply.result, wire.ServerStatus)
        return msgspec.to_builtins(reply.result.scheduler)

    def shutdown(self) -> None:
        if not self.procs.procs:
            return
        try:
            self._to_sched.send(wire.ShutdownServer())
            self.procs.wait_exited(5)
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

    def _request(self, item: Any, sampling: dict | None, logprob: wire.LogprobRequest | None,
                 session: wire.SessionParams | None) -> wire.GenerateText:
        """One prompt as the gateway would pass it on, validated as the HTTP API validates it."""
        try:
            sp = parse_sampling(sampling)
        except ApiError as e:
            raise ValueError(str(e)) from None
        prompt: dict[str, Any]
        if _is_ids(item):
            try:
                prompt = {"input_ids": msgspec.convert(item, list[TokenId])}
            except msgspec.ValidationError as e:
                raise ValueError(f"input_ids: {e}") from None
        else:
            prompt = {"messages": item} if isinstance(item, list) else {"text": item}
        return wire.GenerateText(rid=uuid.uuid4().hex, sampling=sp, logprob=logprob, session=session,
                                 return_text_in_logprobs=self.tokenizer is not None, **prompt)

    def _collect(self, rids: list[str]) -> dict[str, wire.TextDelta | wire.Rejected]:
        """Wait for every request's final delta (a non-streamed request has only that one), or its rejection."""
        finals: dict[str, wire.TextDelta | wire.Rejected] = {}
        open_rids = set(rids)
        while open_rids:
            msg = self._recv()
            if isinstance(msg, wire.Rejected) and msg.rid in open_rids:
                self.core.drop(msg.rid)
                finals[msg.rid] = msg
                open_rids.discard(msg.rid)
            elif isinstance(msg, wire.TokenBatch):
                for out in msg.outs:
                    delta, abort = self.core.feed(out)
                    if abort is not None:
                        self._to_sched.send(abort)
                    if delta is not None and delta.finish is not None and delta.rid in open_rids:
                        finals[delta.rid] = delta
                        open_rids.discard(delta.rid)
        return finals

    def _control(self, kind: type[Call], **fields: Any) -> wire.ControlReply:
        call_id = f"{kind.__name__}-{next(self._call_ids)}"
        self._to_sched.send(kind(call_id=call_id, **fields))
        deadline = time.monotonic() + 60
        while (msg := self._recv(deadline)) is not None:
            if isinstance(msg, wire.ControlReply) and msg.call_id == call_id:
                return msg
        raise TimeoutError(f"no reply to {kind.__name__} within 60 s")

    def _recv(self, deadline: float | None = None) -> msgspec.Struct | None:
        """Next message from the scheduler; raises if a backend process died meanwhile."""
        while deadline is None or time.monotonic() < deadline:
            msg = self._inbox.recv(timeout_ms=200)
            if msg is not None:
                return msg
            self.procs.check()
        return None


def _result(msg: wire.GenerateText, final: wire.TextDelta | wire.Rejected) -> dict:
    """SGLang's `{text, output_ids, meta_info}` of one finished request; a request the scheduler rejected
    (too long for the context, a session conflict) ends as SGLang's Engine ends it: an abort with its status."""
    if isinstance(final, wire.Rejected):
        finish = {"type": "abort", "message": final.message, "status_code": final.status}
        return {"text": "", "output_ids": [], "meta_info": {"id": msg.rid, "prompt_tokens": 0, "completion_tokens": 0,
                                                            "cached_tokens": 0, "finish_reason": finish}}
    meta: dict[str, Any] = {"id": msg.rid, "prompt_tokens": final.prompt_tokens,
                            "completion_tokens": final.completion_tokens, "cached_tokens": final.cached_tokens,
                            "finish_reason": msgspec.to_builtins(final.finish)}
    if msg.logprob is not None:
        meta.update(input_token_logprobs=final.input_logprobs, input_top_logprobs=final.input_top_logprobs,
                    output_token_logprobs=final.output_logprobs, output_top_logprobs=final.output_top_logprobs)
    return {"text": final.text, "output_ids": final.output_ids, "meta_info": meta}


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
