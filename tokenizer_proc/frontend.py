"""The tokenizer front end without sockets, shared by the tokenizer process and the offline Engine.

`submit` turns a request (text, ids or chat messages) into the scheduler's GenerateTokens, or a
Rejected; `receive` takes in each message from the scheduler: a step's ReqOuts become the TextDeltas to
pass on (each stream interval, once at the end otherwise) and, when a stop string matched here first,
the Aborts that tell the scheduler where an output ends; the rest passes on to the front end (a Ready with
this side's tool-call format).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgspec

from radixserve import wire
from radixserve.config import ServerArgs
from tokenizer_proc.chat_tools import tool_call_format
from tokenizer_proc.metrics import RequestMetrics
from tokenizer_proc.output import RequestOutput
from tokenizer_proc.request_log import RequestLog
from tokenizer_proc.text import ChatOptions, encode_prompt, eos_token_ids, load_tokenizer, request_text, turn_end_ids

# Output tokens per scheduler message of a request that is not streamed and has no stop strings (SGLang's
# DEFAULT_FORCE_STREAM_INTERVAL): its text is decoded as it goes, in parts, and no one message grows with the output.
UNSTREAMED_REPORT_INTERVAL = 50


class Received(NamedTuple):
    """What one scheduler message makes: deltas for the front end, Aborts for the scheduler, a message to pass on."""

    deltas: list[wire.TextDelta]
    aborts: list[wire.Abort]
    passed: msgspec.Struct | None


class TokenizerCore:
    """Owns the text state of its requests from submit until their final delta; `metrics` counts and times them."""

    def __init__(self, args: ServerArgs, model_dir: str, reply_to: int = 0) -> None:
        self.tokenizer: Any | None = load_tokenizer(args.tokenizer_path or model_dir, args.skip_tokenizer_init,
                                                    args.trust_remote_code, args.chat_template)
        self.eos_ids = eos_token_ids(self.tokenizer, model_dir)
        self.tool_call_format = tool_call_format(self.tokenizer, args.tool_call_parser)
        self.reply_to = reply_to
        self.stream_interval = args.stream_interval  # a stream's default
        self.runtime: wire.RuntimeInfo | None = None  # from the scheduler's Ready, before any request
        # rid -> (stream interval in tokens, as SGLang's stream_interval, or 0: not streamed; output)
        self._reqs: dict[str, tuple[int, RequestOutput]] = {}
        self.metrics = RequestMetrics()
        self.request_log = RequestLog(args.log_requests_level, self.tokenizer) if args.log_requests else None

    def __contains__(self, rid: str) -> bool:
        return rid in self._reqs

    def __len__(self) -> int:
        return len(self._reqs)

    def submit(self, msg: wire.GenerateText) -> wire.GenerateTokens | wire.Rejected:
        """Tokenize `msg`; a client's input never raises here, it is rejected."""
        try:
            continue_chat = msg.session is not None and msg.session.rid is not None
            chat = ChatOptions(msg.tools, msg.chat_template_kwargs, msg.continue_final_message)
            ids = encode_prompt(self.tokenizer, text=msg.text, input_ids=msg.input_ids, messages=msg.messages,
                                continue_chat=continue_chat, chat=chat)
            turn_end = turn_end_ids(self.tokenizer) if continue_chat and msg.messages is not None else []
            sampling = self._sampling(msg, len(ids))
            text = request_text(self.tokenizer, ids, sampling)
        except ValueError as e:
            return wire.Rejected(msg.rid, 400, str(e))
        except Exception as e:  # e.g. chat content the template cannot render
            return wire.Rejected(msg.rid, 400, f"cannot tokenize the prompt: {e}")
        interval = (sampling.stream_interval or self.stream_interval) if msg.stream else 0
        # The scheduler sends this request's tokens every `report` of them (and its first and last at once):
        # every step where stop strings are matched here, a stream's interval, else SGLang's unstreamed one.
        report = 1 if sampling.stop or sampling.stop_regex else interval or UNSTREAMED_REPORT_INTERVAL
        self._reqs[msg.rid] = (interval, RequestOutput(msg.rid, text, self.tokenizer, len(ids),
                                                         msg.logprob is not None, msg.return_text_in_logprobs))
        if msg.log_metrics:
            self.metrics.start(msg.rid)
        sent = wire.GenerateTokens(rid=msg.rid, input_ids=ids, sampling=sampling, reply_to=self.reply_to,
                                   logprob=msg.logprob, session=msg.session, eos_token_ids=self.eos_ids,
                                   turn_end_ids=turn_end, report_interval=report)
        if self.request_log is not None and msg.log_metrics:
            self.request_log.arrived(sent, msg.stream)
        return sent

    def _sampling(self, msg: wire.GenerateText, n_prompt: int) -> wire.SamplingParams:
        if not msg.fill_context:
            return msg.sampling
        assert self.runtime is not None, "requests arrive after Ready"
        room = self.runtime.context_length - n_prompt
        if room <= 0:
            raise ValueError(f"the prompt ({n_prompt} tokens) leaves no room for output in the context length "
                             f"({self.runtime.context_length} tokens)")
        return msgspec.structs.replace(msg.sampling, max_new_tokens=room)

    def receive(self, msg: msgspec.Struct) -> Received:
        """One message from the scheduler (wire.SchedulerOut): a TokenBatch's outputs fed through; a Rejected
        request forgotten here; Ready's runtime facts kept (the front end gets them with the tool-call format)."""
        if isinstance(msg, wire.TokenBatch):
            deltas, aborts = [], []
            for out in msg.outs:
                delta, abort = self.feed(out)
                if abort is not None:
                    aborts.append(abort)
                if delta is not None:
                    deltas.append(delta)
            return Received(deltas, aborts, None)
        if isinstance(msg, wire.Ready):
            self.runtime = msg.runtime
            msg = msgspec.structs.replace(msg, tool_call_format=self.tool_call_format)
        elif isinstance(msg, wire.Rejected):
            self.drop(msg.rid)
        return Received([], [], msg)

    def feed(self, out: wire.ReqOut) -> tuple[wire.TextDelta | None, wire.Abort | None]:
        """One step's output of a request: the delta to pass on (if any) and the Abort to send (if any)."""
        entry = self._reqs.get(out.rid)
        if entry is None:
            return None, None  # it ended here already (a stop string): the scheduler is catching up
        interval, output = entry
        n_before = len(output.text.output_ids)
        stop = output.apply(out)
        self.metrics.tokens(out.rid, len(output.text.output_ids) - n_before)
        abort = wire.Abort(rid=out.rid, finish=stop) if stop is not None else None
        if output.finish is not None:
            del self._reqs[out.rid]
            last = output.take()
            seconds = self.metrics.end(last)
            if self.request_log is not None and seconds is not None:
                self.request_log.ended(last, output.text.output_ids, seconds)
            return last, abort
        return (output.take() if interval and output.due(interval) else None), abort

    def drop(self, rid: str) -> bool:
        """Forget a request the scheduler rejected; whether it was known here."""
        self.metrics.drop(rid)
        return self._reqs.pop(rid, None) is not None
