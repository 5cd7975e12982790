"""The offline Engine: SGLang-shaped `generate()` in this process over the same front-end core as the server:
SGLang's native request, its sub-requests and its answer (radixserve/native_api.py, as the gateway's /generate),
the tokenizer front end (tokenizer_proc.frontend, as the tokenizer process), and real backend processes."""

from __future__ import annotations

import shutil
import time
from typing import Any

import msgspec
import zmq

from radixserve import wire
from radixserve.config import ServerArgs
from radixserve.errors import ApiError, from_validation
from radixserve.ipc import IpcPaths, Receiver, Sender
from radixserve.launch.supervisor import ChildDied, ProcessGroup, start_backend
from radixserve.model_files import resolve_model
from radixserve.native_api import NativeRequest, Output, native_result, rejected_result, sub_requests
from tokenizer_proc.frontend import TokenizerCore

Prompt = str | list[dict]  # raw text, or chat messages (the chat template is applied)


class EngineRequest(NativeRequest, kw_only=True):
    """The native request as the Engine takes it: a prompt (`text`) may also be chat messages."""

    text: str | list[Any] | None = None


class Engine:
    """Starts the scheduler and TP worker processes; `generate` blocks until its requests finish."""

    def __init__(self, model_path: str | None = None, tp_size: int = 1, **server_args: Any) -> None:
        self.args = ServerArgs(model_path=model_path, tp_size=tp_size, **server_args)
        if self.args.nnodes > 1 or self.args.dp_size > 1:
            raise ValueError("the Engine runs one replica on one node: "
                             "--nnodes and --dp-size are for `radixserve serve`")
        self.model_dir = resolve_model(self.args.model_path, self.args.download_dir, self.args.revision)
        self.core = TokenizerCore(self.args, self.model_dir)
        self._calls = wire.CallIds()
        self.ipc = IpcPaths.create()
        self._ctx = zmq.Context()
        self._inbox = Receiver(self._ctx, self.ipc.scheduler_out(0), wire.SchedulerOut)
        self._to_sched = Sender(self._ctx, self.ipc.scheduler_in)
        self.procs = ProcessGroup()
        start_backend(self.procs, self.args, self.ipc, self.model_dir, num_replies=1)
        try:
            self.runtime = self._wait_ready()
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
        self.core.receive(msg)
        return msg.runtime

    # ------------------------------------------------------------ public API

    def generate(self, prompt: Prompt | list[Prompt] | None = None, sampling_params: dict | list[dict] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None, return_logprob: bool = False,
                 logprob_start_len: int = -1, top_logprobs_num: int = 0,
                 session_params: dict | None = None) -> dict | list[dict]:
        """Generate for one prompt (returns a dict) or a list of prompts (returns a list), as /generate answers.

        `session_params` ({id, rid, offset, replace, drop_previous_output}) continues a turn of
        a session opened with `open_session`; the returned meta_info.id is the new turn's rid.
        Invalid input raises ValueError, as the HTTP API answers 400.
        """
        try:
            req = msgspec.convert({"text": prompt, "input_ids": input_ids, "sampling_params": sampling_params,
                                   "return_logprob": return_logprob, "logprob_start_len": logprob_start_len,
                                   "top_logprobs_num": top_logprobs_num, "session_params": session_params,
                                   "return_text_in_logprobs": self.tokenizer is not None}, EngineRequest)
            single, msgs = sub_requests(req)
        except msgspec.ValidationError as e:
            raise ValueError(str(from_validation(e))) from None
        except ApiError as e:
            raise ValueError(str(e)) from None
        started = time.perf_counter()
        sends = [self.core.submit(msg) for msg in msgs]
        rejected = next((s for s in sends if isinstance(s, wire.Rejected)), None)
        if rejected is not None:
            for msg in msgs:
                self.core.drop(msg.rid)
            raise ValueError(rejected.message)
        for send in sends:
            self._to_sched.send(send)
        finals = self._collect([msg.rid for msg in msgs])
        results = [_result(msg, finals[msg.rid], started) for msg in msgs]
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
        return {"worker": msgspec.to_builtins(status.runtime), "scheduler": status.scheduler_info()}

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

    def _collect(self, rids: list[str]) -> dict[str, wire.TextDelta | wire.Rejected]:
        """Wait for every request's final delta (a non-streamed request has only that one), or its rejection."""
        finals: dict[str, wire.TextDelta | wire.Rejected] = {}
        open_rids = set(rids)
        while open_rids:
            got = self.core.receive(self._recv())
            for abort in got.aborts:
                self._to_sched.send(abort)
            ends = [d for d in got.deltas if d.finish is not None]
            if isinstance(got.passed, wire.Rejected):
                ends.append(got.passed)
            for end in ends:
                if end.rid in open_rids:
                    finals[end.rid] = end
                    open_rids.discard(end.rid)
        return finals

    def _control(self, kind: type[wire.Call], **fields: Any) -> wire.ControlReply:
        call = self._calls.call(kind, **fields)
        self._to_sched.send(call)
        deadline = time.monotonic() + 60
        while (msg := self._recv(deadline)) is not None:
            if isinstance(msg, wire.ControlReply) and msg.call_id == call.call_id:
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


def _result(req: wire.GenerateText, final: wire.TextDelta | wire.Rejected, started: float) -> dict:
    """/generate's answer of one finished request (the one delta of a request that does not stream holds all of
    its output), or SGLang's Engine's abort for one the backend rejected."""
    if isinstance(final, wire.Rejected):
        return rejected_result(req, final)
    out = Output()
    out.add(final)
    return native_result(req, out, started)
