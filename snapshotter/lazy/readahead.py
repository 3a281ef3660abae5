"""Read-ahead policy: when a layer's reads are sequential, and which spans to fetch ahead.

Pure bookkeeping, no I/O: the reader asks it, the span fetcher fetches.

Sequential means the reads have moved on into the next span (or one read crosses from the
last read's span into the next). Reads that stay inside one span (small files, several FUSE
requests of one file) are not: read-ahead there would fetch megabytes for a few kilobytes of
scattered reads. The window is the `window` spans after a sequential read's last span:

- riding along (no task scope to pipeline in): the missing spans at the start of the window
  join the read's own request (`ride_along`);
- pipelined: a task fetches the window's missing spans while the read goes on, started only
  when a span in the first half of the window is missing (`pipelined_window`), so a reader
  moving through a fetched window does not start a request per span.
"""

from __future__ import annotations

from collections.abc import Callable

from index.model import SpanId


class ReadAhead:
    """The read-ahead state of one layer: `window` spans (0 = off) of `span_count`."""

    __slots__ = ("_last", "span_count", "window")

    def __init__(self, window: int, span_count: int) -> None:
        self.window = window
        self.span_count = span_count
        self._last = -2  # the first read is not sequential

    def __repr__(self) -> str:
        return f"<ReadAhead window={self.window} last_span={self._last}>"

    def observe(self, first: SpanId, last: SpanId) -> bool:
        """Record a read of spans `first..last`; whether it continues the previous read
        sequentially (and read-ahead is on)."""
        sequential = first == self._last + 1 or (first == self._last and last > first)
        self._last = last
        return sequential and self.window > 0

    def ride_along(self, last: SpanId) -> range:
        """The window after `last`: spans a sequential read's request may take along (the
        fetcher takes the missing ones up to the first that is not)."""
        return range(last + 1, min(last + 1 + self.window, self.span_count))

    def pipelined_window(self, last: SpanId, missing: Callable[[SpanId], bool]) -> range | None:
        """The window to fetch in the background after a sequential read ending in `last`,
        or None when no span of the window's first half is `missing`."""
        half = max(1, (self.window + 1) // 2)
        first_half = range(last + 1, min(last + 1 + half, self.span_count))
        if not any(missing(SpanId(s)) for s in first_half):
            return None
        return self.ride_along(last)
