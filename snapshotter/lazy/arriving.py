"""Inflating the spans a read waits for while their Range answer arrives.

A read that must fetch its span used to wait for the whole answer, then for the span's
inflation (10-25 ms for a 4 MiB span): the link idles meanwhile, and a reader working through
files one at a time pays it for every file. `ArrivingRun` is the `BodySink` the span fetcher
gives the source for an on-demand request: the answer's bytes are copied into one buffer as
they come, and a worker thread inflates the read's spans from it, following the bytes in
(`SpanMap.inflate_arriving`), so the inflation ends a few milliseconds after the last byte.

Only the bytes up to the last wanted span are copied (read-ahead riding along is not), and
nothing inflated here is used unless that copy is exactly the start of what the fetch
returned and verified (`finish` compares it in full), so a retried, redirected or
failed-over answer, or a corrupt one, only costs the inflation done in vain: the read then
inflates the verified bytes as before. An answer that is not fed (a registry's 200 to a
Range request, read whole) starts no thread at all. A span whose inflation fails here is left to that ordinary path
too (which reports the error). At most `MAX_ARRIVING_RUNS` exist at once.

Threads: `work` runs in a worker thread (`ARRIVING_THREADS`): it inflates, waits for
`finish`'s verdict, then hands the trusted spans to `keep` (the inflated tier's queue, which
may block there); `begin`, `feed` and `finish` run on the trio thread, never blocking (a copy
into the buffer and a notify).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Sequence
from typing import Final

import trio

from index.model import SpanId
from index.zinfo import SpanMap, ZinfoError

log = logging.getLogger(__name__)

ARRIVING_THREADS: Final = trio.CapacityLimiter(2)
"""Worker threads inflating arriving spans (each waits for its bytes most of the time)."""


class _Abandoned(Exception):
    """The arriving bytes stopped short (the fetch failed, restarted or was cancelled)."""


MAX_ARRIVING_RUNS: Final = 4
"""Requests whose answer is inflated as it arrives, at most, in the whole daemon: each holds
a copy of its wanted spans' compressed bytes while it runs (`open_arriving` answers None
beyond, and that request's spans are inflated the ordinary way)."""
_open_runs = 0


def open_arriving(
    span_map: SpanMap,
    run: Sequence[SpanId],
    wanted: Collection[SpanId],
    keep: Callable[[SpanId, bytes], None] | None = None,
) -> ArrivingRun | None:
    """An `ArrivingRun` for `run`, or None when `MAX_ARRIVING_RUNS` are open (trio thread;
    `ArrivingRun.finish` closes it)."""
    global _open_runs
    if _open_runs >= MAX_ARRIVING_RUNS:
        return None
    _open_runs += 1
    return ArrivingRun(span_map, run, wanted, keep)


class ArrivingRun:
    """The compressed bytes of one Range request `[start, end)` of a layer, covering the
    consecutive spans `run`, as they arrive; inflates the spans in `wanted` meanwhile.
    Made by `open_arriving`."""

    def __init__(
        self,
        span_map: SpanMap,
        run: Sequence[SpanId],
        wanted: Collection[SpanId],
        keep: Callable[[SpanId, bytes], None] | None = None,
    ) -> None:
        self._span_map = span_map
        self._wanted = frozenset(wanted)
        # only the bytes up to the last wanted span are kept (read-ahead riding along is not)
        self._run = [s for s in run if s <= max(self._wanted, default=run[0])]
        self._base = span_map.compressed_range(run[0])[0]
        size = span_map.compressed_range(self._run[-1])[1] - self._base
        self._buffer = bytearray(size)
        self._view = memoryview(self._buffer)
        self._received = 0
        self._want = 0  # bytes the worker waits for
        self._attempts = 0
        self._ended = False  # no more bytes will come
        self._cond = threading.Condition()
        self.inflated: dict[SpanId, bytes] = {}
        """The wanted spans inflated from the verified bytes, once `finish(data)` accepted
        them and `work` returned."""
        self._keep = keep
        self._trusted = False
        self._decided = False  # `finish` said whether the bytes were the verified ones
        self._begun = trio.Event()  # an answer began, or the fetch is over

    def __repr__(self) -> str:
        return (
            f"<ArrivingRun spans {self._run[0]}-{self._run[-1]} "
            f"received={self._received}/{len(self._buffer)} inflated={len(self.inflated)}>"
        )

    # -- the source's side (BodySink), trio thread ------------------------------------------

    def begin(self) -> None:
        """An answer starts; a second one (a retry, another endpoint) ends the streaming."""
        self._attempts += 1
        self._begun.set()
        if self._attempts > 1:
            self._end()

    def feed(self, chunk: bytes) -> None:
        """The next bytes of the answer: copied into the buffer, up to its end."""
        start = self._received
        if self._ended or start >= len(self._buffer):
            return
        stop = min(start + len(chunk), len(self._buffer))
        self._view[start:stop] = chunk[: stop - start]
        with self._cond:
            self._received = stop
            if stop >= self._want:  # the worker waits for this much: wake it
                self._cond.notify()

    # -- the fetcher's side, trio thread -----------------------------------------------------

    def finish(self, data: bytes | None) -> None:
        """The fetch is over: `data` are the verified bytes it returned (None: it failed or was
        cancelled). What `work` inflates is kept only if the buffer holds exactly the start of
        `data`. Closes this run (`open_arriving`); later calls do nothing."""
        global _open_runs
        if self._decided:
            return
        _open_runs -= 1
        size = len(self._buffer)
        trusted = (
            data is not None
            and self._received == size
            and len(data) >= size
            and self._view == memoryview(data)[:size]
        )
        with self._cond:
            self._trusted = trusted
            self._decided = True
            self._ended = True
            self._cond.notify()
        self._begun.set()

    async def run(self) -> None:
        """`work` in a worker thread, started when an answer begins (none for a source that
        does not feed it); `inflated` is set when it returns. Call `finish` (the thread waits
        until then). Cancelled, it does not wait for the thread (which ends on its own once
        `finish` is called, keeping nothing). Never raises an Exception (an unexpected one is
        logged: nothing is kept)."""
        await self._begun.wait()
        if self._attempts == 0:
            return  # finished without an answer fed: nothing to inflate here
        try:
            self.inflated = await trio.to_thread.run_sync(
                self.work, limiter=ARRIVING_THREADS, abandon_on_cancel=True
            )
        except Exception:
            log.exception("inflating arriving spans failed unexpectedly")

    def _end(self) -> None:
        with self._cond:
            self._ended = True
            self._cond.notify()

    # -- the worker thread ---------------------------------------------------------------------

    def work(self) -> dict[SpanId, bytes]:
        """In a worker thread: inflate the wanted spans in order as their bytes arrive; stops
        at the first span that cannot be inflated here (the read inflates it itself)."""
        out: dict[SpanId, bytes] = {}
        for span in self._run:
            if span not in self._wanted:
                continue
            start, end = self._span_map.compressed_range(span)
            lo, hi = start - self._base, end - self._base

            def arrived(n: int, lo: int = lo, hi: int = hi) -> int:
                return self._wait(min(lo + n, hi)) - lo

            try:
                out[span] = self._span_map.inflate_arriving(span, self._view[lo:hi], arrived)
            except (_Abandoned, ZinfoError):
                break
        with self._cond:
            while not self._decided:
                self._cond.wait()
            if not self._trusted:
                return {}
        if self._keep is not None:
            for span, data in out.items():
                self._keep(span, data)
        return out

    def _wait(self, upto: int) -> int:
        """Block until `upto` bytes of the answer are in; returns how many are. Raises
        `_Abandoned` when they never will be."""
        with self._cond:
            self._want = upto
            while self._received < upto:
                if self._ended:
                    raise _Abandoned(f"{self._received} of {upto} bytes arrived")
                self._cond.wait()
            return self._received
