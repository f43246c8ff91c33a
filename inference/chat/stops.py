"""Finds stop strings in streamed text, even when one spans several tokens.

Text that might be the start of a stop string is held back until it is known not to be,
so a stop string is never emitted, not even in part.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feeds text through; reports the text safe to emit and whether a stop string was hit."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def push(self, text: str) -> str:
        """Add `text`; return what can be emitted now. After a match, everything is dropped."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buf = self._pending + text
        found = [(i, s) for s in self._stops if (i := buf.find(s)) >= 0]
        cut = min(found)[0] if found else -1
        if cut >= 0:
            self.stopped = True
            self.matched = min(found)[1]
            self._pending = ""
            return buf[:cut]
        hold = self._longest_stop_prefix_suffix(buf)
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """Release held text at the end of generation (it turned out not to be a stop)."""
        text, self._pending = self._pending, ""
        return "" if self.stopped else text

    def _longest_stop_prefix_suffix(self, buf: str) -> int:
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best
