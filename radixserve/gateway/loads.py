"""SGLang's load report (`GET /v1/loads`, also `/loads`), the endpoint SGLang's model gateway (smg) polls first for
each worker's load: `{timestamp, version, dp_rank_count, loads: [per dp rank], aggregate}`, each rank's entry with
SGLang's field names. A radixserve server is one data-parallel rank (`--dp-size` runs whole replicas), so `loads`
has one entry, rank 0. `?dp_rank=N` keeps that rank's entry only (none for another N), as SGLang's does. No
throughput is measured here, so `gen_throughput` is left out (smg reads a missing field as 0).
"""

from __future__ import annotations

from datetime import datetime, timezone

from radixserve import __version__
from radixserve.errors import bad_request
from radixserve.stats import SchedulerStats


def rank_load(s: SchedulerStats, max_running_requests: int, dp_rank: int = 0) -> dict:
    """One rank's entry, SGLang's fields (smg's SchedulerLoadSnapshot)."""
    used, total = s.used_tokens, s.max_total_num_tokens
    return {"dp_rank": dp_rank, "num_running_reqs": s.num_running_reqs, "num_waiting_reqs": s.num_waiting_reqs,
            "num_total_reqs": s.num_running_reqs + s.num_waiting_reqs, "num_used_tokens": used,
            "max_total_num_tokens": total, "token_usage": used / total if total else 0.0,
            "cache_hit_rate": s.cache_hit_rate,
            "utilization": s.num_running_reqs / max_running_requests if max_running_requests else 0.0,
            "max_running_requests": max_running_requests}


def report(s: SchedulerStats, max_running_requests: int, dp_rank: str | None) -> dict:
    """The whole answer; `dp_rank` is the query parameter as given (a 400 if it is no integer)."""
    loads = [rank_load(s, max_running_requests)]
    if dp_rank is not None:
        try:
            wanted = int(dp_rank)
        except ValueError:
            raise bad_request(f"dp_rank must be an integer, not {dp_rank!r}", "dp_rank") from None
        loads = [entry for entry in loads if entry["dp_rank"] == wanted]
    n = len(loads)
    aggregate = {
        "total_running_reqs": sum(e["num_running_reqs"] for e in loads),
        "total_waiting_reqs": sum(e["num_waiting_reqs"] for e in loads),
        "total_reqs": sum(e["num_total_reqs"] for e in loads),
        "total_used_tokens": sum(e["num_used_tokens"] for e in loads),
        "total_tokens": sum(e["max_total_num_tokens"] for e in loads),
        "avg_token_usage": sum(e["token_usage"] for e in loads) / n if n else 0.0,
        "avg_utilization": sum(e["utilization"] for e in loads) / n if n else 0.0,
    }
    return {"timestamp": datetime.now(timezone.utc).isoformat(), "version": __version__, "dp_rank_count": n,
            "loads": loads, "aggregate": aggregate}
