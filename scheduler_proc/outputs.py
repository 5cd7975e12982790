"""What a step makes of a request: its output message, whether it finished, the input logprobs it gained, and
when its front end is sent what it made."""

from __future__ import annotations

from radixserve.wire import FinishReason, ReqOut, StepResult
from scheduler_proc.request import Req


def check_finish(req: Req, num_outputs: int, context_length: int) -> FinishReason | None:
    """Why `req` ends once it has its first `num_outputs` output tokens (a stop id, max_new_tokens, the
    context), or None. Tokens after those may be PENDING (sampled by a step still in flight)."""
    sp = req.sampling
    last = req.output_ids[num_outputs - 1] if num_outputs else None
    if last is not None and num_outputs >= sp.min_new_tokens and last in req.stop_ids:
        return FinishReason(type="stop", matched=last)
    if num_outputs >= sp.max_new_tokens:
        return FinishReason(type="length", length=sp.max_new_tokens)
    if len(req.prompt_ids) + num_outputs >= context_length:
        return FinishReason(type="length", length=num_outputs)
    return None


def take_outputs(req: Req, k: int, ids: list[int], context_length: int) -> tuple[list[int], FinishReason | None]:
    """A step's tokens for `req` into its pending outputs from index k (one, or a verify step's accepted drafts and
    one more), cut at the first finish among them: what it reports, and that finish (or None). Invariant: no token
    past a finish is ever reported (what the cut drops stays past the output, and `end` frees its KV)."""
    req.output_ids[k:k + len(ids)] = ids
    req.pending -= len(ids)
    for j in range(1, len(ids) + 1):
        finish = check_finish(req, k + j, context_length)
        if finish is not None:
            del req.output_ids[k + j:k + len(ids)]
            return ids[:j], finish
    return ids, None


def make_out(req: Req, new_ids: list[int], finish: FinishReason | None, first: bool = False) -> ReqOut:
    """The message for `req`'s new tokens (its last when `finish` is set); the first one carries its input
    logprobs, if asked for."""
    out = ReqOut(rid=req.rid, new_ids=new_ids, prompt_tokens=len(req.prompt_ids),
                 cached_tokens=req.cached_tokens, completion_tokens=req.num_outputs, finish=finish,
                 spec=req.spec if finish is not None else None, cached_tokens_host=req.cached_tokens_host)
    if first and req.input_logprobs:
        out.input_logprobs = req.input_logprobs
        out.input_top_logprobs = req.input_top_logprobs
        out.input_ids = req.prompt_ids.tolist()
    return out


def add_input_logprobs(req: Req, result: StepResult, i: int) -> None:
    """Append the prompt logprobs that entry `i` of the step computed for `req`."""
    if not req.input_logprobs and req.logprob.logprob_start_len == 0:
        req.input_logprobs.append(None)  # the first prompt token has no logprob
        req.input_top_logprobs.append(None)
    req.input_logprobs.extend(result.input_logprobs[i])
    req.input_top_logprobs.extend(result.input_top_logprobs.get(i, [None] * len(result.input_logprobs[i])))


def report(req: Req, out: ReqOut) -> ReqOut | None:
    """What `req`'s front end is sent of a step's (unfinished) output: `out` joined to the outputs not sent yet,
    once due — at once for the first message (it carries the input logprobs, so none ever waits), then every
    `req.report_interval` output tokens; else None, and it waits in `req.unsent`. The last goes by `final_report`."""
    out = _joined(req.unsent, out)
    if req.reported >= 0 and req.num_outputs - req.reported < req.report_interval:
        req.unsent = out
        return None
    req.unsent, req.reported = None, req.num_outputs
    return out


def final_report(req: Req, last: ReqOut) -> ReqOut:
    """`req`'s last message (as it ends, its output cut to what it keeps): `last` joined to the outputs not sent
    yet, without tokens past the kept output (a stop string the front end matched ends it before tokens that were
    sampled meanwhile)."""
    out = _joined(req.unsent, last)
    req.unsent = None
    keep = max(req.num_outputs - max(req.reported, 0), 0)
    if len(out.new_ids) > keep:
        del out.new_ids[keep:]
        if out.output_logprobs is not None:
            del out.output_logprobs[keep:]
        if out.output_top_logprobs is not None:
            del out.output_top_logprobs[keep:]
    return out


def _joined(earlier: ReqOut | None, later: ReqOut) -> ReqOut:
    """Two consecutive outputs of one request as one message: their tokens and logprobs in order, the later one's
    counts and finish. `earlier` is never a first message, so neither carries input logprobs twice."""
    if earlier is None:
        return later
    later.new_ids = earlier.new_ids + later.new_ids
    if earlier.output_logprobs is not None:
        later.output_logprobs = earlier.output_logprobs + (later.output_logprobs or [])
    if earlier.output_top_logprobs is not None:
        later.output_top_logprobs = earlier.output_top_logprobs + (later.output_top_logprobs or [])
    return later
