"""Stop strings over streamed text: never show part of a stop string, cut at the first one."""

from __future__ import annotations

import re
from collections.abc import Sequence

REGEX_WINDOW = 1024  # characters of emitted text a stop regex match may start in


class StopMatcher:
    """Feed text deltas; get back what is safe to emit and, once, the stop string (or stop regex) that matched.

    Invariant: `_held` is the longest suffix of the text fed so far that is a proper prefix of
    some stop string (and contains none). Any stop string that completes later starts inside
    it, so emitted text never needs taking back and only `_held + delta` is searched.

    The match is the stop string that completes first, as if the text arrived one character
    at a time (ties: the longer one, which starts earlier), so the result does not depend on
    how the text was split into deltas.

    Stop regexes (SGLang's `stop_regex`) are searched in the new text plus the last REGEX_WINDOW characters
    before it, for the first match that ends in the new text. Text is not held back for them: when a match
    starts in text already emitted, `retracted` says how many emitted characters the cut takes back (a front
    end drops them if it has not sent them yet). A regex match ends the text as a stop string does, and the
    earlier one wins.
    """

    def __init__(self, stops: Sequence[str], no_stop_trim: bool = False, regexes: Sequence[str] = ()) -> None:
        self._stops = sorted({s for s in stops if s}, key=len, reverse=True)
        self._max_held = max((len(s) for s in self._stops), default=1) - 1
        self._no_stop_trim = no_stop_trim
        self._regexes = [(r, re.compile(r)) for r in regexes]
        self._recent = ""  # the last REGEX_WINDOW characters emitted (only with regexes)
        self._held = ""
        self.matched: str | None = None
        self.retracted = 0  # emitted characters that the matched stop regex takes back

    def feed(self, delta: str) -> tuple[str, str | None]:
        """Return `(emit_text, matched)`; after a match, further text is ignored."""
        if self.matched is not None:
            return "", None
        text = self._held + delta
        best: tuple[int, int, str] | None = None  # (end, start, stop), positions in `text`
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0 and (best is None or start + len(stop) < best[0]):
                best = (start + len(stop), start, stop)
        if self._regexes:
            found = self._regex_match(text)
            if found is not None and (best is None or found[0] < best[0]):
                best = found
        if best is not None:
            end, start, self.matched = best
            self._held = ""
            if not self._no_stop_trim and start < 0:
                self.retracted = -start
            return text[: end if self._no_stop_trim else max(start, 0)], self.matched
        keep = self._held_len(text)
        self._held = text[len(text) - keep :]
        emitted = text[: len(text) - keep]
        if self._regexes:
            self._recent = (self._recent + emitted)[-REGEX_WINDOW:]
        return emitted, None

    def _regex_match(self, text: str) -> tuple[int, int, str] | None:
        """The stop regex match that ends first in `text` (end, start; start < 0 inside emitted text)."""
        window, offset = self._recent + text, len(self._recent)
        best: tuple[int, int, str] | None = None
        for source, pattern in self._regexes:
            m = next((m for m in pattern.finditer(window) if m.end() > offset), None)
            if m is not None and (best is None or m.end() - offset < best[0]):
                best = (m.end() - offset, m.start() - offset, source)
        return best

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
