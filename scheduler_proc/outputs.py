"""What a step makes of a request: its output message, whether it finished, the input logprobs it gained."""

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
                 spec=req.spec if finish is not None else None)
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
