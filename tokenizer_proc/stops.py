"""Stop strings over streamed text: never show part of a stop string, cut at the first one."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed text deltas; get back what is safe to emit and, once, the stop string that matched.

    Invariant: `_held` is the longest suffix of the text fed so far that is a proper prefix of
    some stop string (and contains none). Any stop string that completes later starts inside
    it, so emitted text never needs taking back and only `_held + delta` is searched.

    The match is the stop string that completes first, as if the text arrived one character
    at a time (ties: the longer one, which starts earlier), so the result does not depend on
    how the text was split into deltas.
    """

    def __init__(self, stops: Sequence[str], no_stop_trim: bool = False) -> None:
        self._stops = sorted({s for s in stops if s}, key=len, reverse=True)
        self._max_held = max((len(s) for s in self._stops), default=1) - 1
        self._no_stop_trim = no_stop_trim
        self._held = ""
        self.matched: str | None = None

    def feed(self, delta: str) -> tuple[str, str | None]:
        """Return `(emit_text, matched)`; after a match, further text is ignored."""
        if self.matched is not None:
            return "", None
        text = self._held + delta
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0 and (best is None or start + len(stop) < best[0]):
                best = (start + len(stop), start, stop)
        if best is not None:
            end, start, self.matched = best
            self._held = ""
            return text[: end if self._no_stop_trim else start], self.matched
        keep = self._held_len(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], None

    def _held_len(self, text: str) -> int:
        for k in range(min(len(text), self._max_held), 0, -1):
            tail = text[-k:]
            if any(stop.startswith(tail) for stop in self._stops):
                return k
        return 0

    def flush(self) -> str:
        """At finish: release the held-back tail (it never completed a stop string)."""
        held, self._held = self._held, ""
        return held
