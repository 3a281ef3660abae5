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

The window stops at the end of the file being read (`observe`'s `file_end`), as the kernel's
read-ahead stops at a file's size: a reader of one file in the middle of a layer (a binary, a
shared library, a module) gains nothing from the spans after it, and fetching them delays its
next file's span on a busy link (two of 20 such files fetched 8.5 MB of 43 MB that way). A
reader going through the layer in tar order (a scan, `tar c`, `find -exec cat`) is told
apart by where its reads start: right after a file it read to its end (`THROUGH_GAP`); its
window then runs past the file's end, into the files it will read next.
"""

from __future__ import annotations

from collections.abc import Callable

from index.model import SpanId

THROUGH_GAP = 64 * 1024
"""A read starting at most this far after the end of a file read to its end goes through the
layer in tar order (between them: the next file's tar header, and the headers of entries
without data, 512 bytes each, more with long names)."""


class ReadAhead:
    """The read-ahead state of one layer: `window` spans (0 = off) of `span_count`."""

    __slots__ = ("_done_at", "_last", "span_count", "window")

    def __init__(self, window: int, span_count: int) -> None:
        self.window = window
        self.span_count = span_count
        self._last = -2  # the first read is not sequential
        self._done_at = -1  # tar-stream end of the latest read that reached its file's end

    def __repr__(self) -> str:
        return f"<ReadAhead window={self.window} last_span={self._last}>"

    def observe(
        self,
        first: SpanId,
        last: SpanId,
        *,
        start: int = 0,
        end: int = 0,
        file_end: int | None = None,
        file_last: SpanId | None = None,
    ) -> SpanId | None:
        """Record a read of spans `first..last` (tar-stream bytes `[start, end)` of a file
        whose data ends at `file_end`, in span `file_last`; None: not a file's read). Returns
        the last span read-ahead may reach after it: `file_last` unless the reader goes
        through the layer (then the layer's last span); None when the read does not continue
        the previous one sequentially, or read-ahead is off."""
        sequential = first == self._last + 1 or (first == self._last and last > first)
        self._last = last
        through = 0 <= self._done_at <= start <= self._done_at + THROUGH_GAP
        if file_end is not None and end >= file_end:
            self._done_at = end
        if not sequential or self.window <= 0:
            return None
        if file_last is None or through:
            return SpanId(self.span_count - 1)
        return file_last

    def ride_along(self, last: SpanId, stop: SpanId) -> range:
        """The window after `last`, up to span `stop` (`observe`): spans a sequential read's
        request may take along (the fetcher takes the missing ones up to the first that is
        not)."""
        return range(last + 1, min(last + 1 + self.window, self.span_count, stop + 1))

    def pipelined_window(
        self, last: SpanId, stop: SpanId, missing: Callable[[SpanId], bool]
    ) -> range | None:
        """The window to fetch in the background after a sequential read ending in `last`
        (up to span `stop`), or None when no span of the window's first half is `missing`."""
        window = self.ride_along(last, stop)
        half = max(1, (self.window + 1) // 2)
        if not any(missing(SpanId(s)) for s in window[:half]):
            return None
        return window
