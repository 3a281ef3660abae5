"""Span fetching of one layer: the span table, coalesced Range requests, and the fetches in
flight that concurrent readers share.

The span is the unit of verification, not of transfer: the missing spans a caller needs (plus
the read-ahead it asks to take along) are coalesced into Range requests of at most
`max_request_bytes`, which go out in parallel. With `chunk_bytes` (peers on) a request never
crosses a chunk, so each goes to one chunk's owners. Every span of an answer is checked against its
zTOC digest inside the source's worker thread (`_CheckRun`), so a corrupt answer is a failure
of that source (retried there, then the next source of a chain); wrong bytes are never cached
or returned. Verified spans are written to the span cache (compressed) and move to CACHED.

A caller that needs a span some other fetch holds (FETCHING) waits for that fetch; when it
failed or was cancelled the span is UNREQUESTED again and the caller fetches it itself. Not a
`SingleFlight` per span: one request carries several spans (keys), and which spans join a
request is decided when it starts (coalescing, read-ahead), so a waiter waits on the
multi-span `_Fetch` that holds its span.

Errors: a request's `FetchError` (or any other exception) is recorded on its `_Fetch` and
raised, unchanged, to the caller that started it (`ensure` when it needed one of its spans,
`fetch_missing`, `step`); waiters fetch again instead. The callers' boundaries count them
(`LayerCounters`) and translate them. Units: bytes, compressed offsets.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import trio

from index.digest import Digest
from index.model import CompressedOffset, SpanId
from index.zinfo import SpanError, SpanMap
from snapshotter.lazy.arriving import open_arriving
from snapshotter.lazy.cache import CacheError, SpanCache
from snapshotter.lazy.demand import DemandTracker
from snapshotter.lazy.sources import VERIFY_THREADS, BlobSource, ContentMismatch
from snapshotter.lazy.table import SpanState, SpanTable, coalesce

log = logging.getLogger(__name__)

CACHE_WARNING_INTERVAL_SEC = 10.0
"""A layer's spans that cannot be cached (a full or read-only disk) are logged at most once in
this many seconds, with the number of failures left out since: the reads go on (served from
the fetched bytes), and a full disk would otherwise log every request."""


@dataclass(slots=True)
class LayerCounters:
    """What one layer's reader has done: Range requests and their bytes, failures counted by
    the boundaries that handled them (reads, read-ahead, background steps) and the last one's
    message."""

    requests: int = 0
    network_bytes: int = 0
    errors: int = 0
    last_error: str = ""

    def record_error(self, message: str) -> None:
        self.errors += 1
        self.last_error = message


@dataclass(eq=False)
class _Fetch:
    """One Range request in flight: its spans, verified bytes per span, and completion;
    `wanted`: its spans a read waits for (inflated while the answer arrives)."""

    spans: list[SpanId]
    wanted: frozenset[SpanId] = frozenset()
    done: trio.Event = field(default_factory=trio.Event)
    results: dict[SpanId, bytes] = field(default_factory=dict)
    inflated: dict[SpanId, bytes] = field(default_factory=dict)
    error: Exception | None = None


class SpanFetcher:
    """Makes spans of `layer` local (see the module doc). Use from the trio thread.

    `table` is the layer's span table (this object moves spans UNREQUESTED ↔ FETCHING → CACHED;
    the inflater moves CACHED ↔ INFLATED). `io_limiter` bounds cache writes; on-demand fetches
    run under `tracker.demand()`. Nothing here needs closing.
    """

    def __init__(
        self,
        layer: Digest,
        span_map: SpanMap,
        source: BlobSource,
        cache: SpanCache,
        table: SpanTable,
        *,
        max_request_bytes: int,
        tracker: DemandTracker,
        io_limiter: trio.CapacityLimiter,
        counters: LayerCounters,
        chunk_bytes: int = 0,
        keep_inflated: Callable[[SpanId, bytes], None] | None = None,
    ) -> None:
        self.layer = layer
        self.span_map = span_map
        self.source = source
        self.cache = cache
        self.table = table
        self.max_request_bytes = max_request_bytes
        self.tracker = tracker
        self.counters = counters
        self._io_limiter = io_limiter
        self._keep_inflated = keep_inflated
        self._cache_warn_after = float("-inf")
        self._cache_failures_unlogged = 0
        self._inflight: dict[SpanId, _Fetch] = {}
        self._cursor = 0
        self._demand_end: SpanId | None = None
        self.last_demand = -math.inf
        """Trio time of this layer's latest on-demand fetch (a read's, or its read-ahead)."""
        self._chunks: list[int] | None = None
        if chunk_bytes > 0:
            self._chunks = [
                span_map.compressed_range(SpanId(i))[0] // chunk_bytes
                for i in range(span_map.span_count)
            ]

    def __repr__(self) -> str:
        return f"<SpanFetcher {self.layer} in_flight={len(self._inflight)} {self.table!r}>"

    def missing(self, span: SpanId) -> bool:
        """Whether `span` must be fetched: UNREQUESTED and not in the disk cache (a span the
        cache index lists moves to CACHED here; no I/O)."""
        if self.table.state(span) is not SpanState.UNREQUESTED:
            return False
        if self.cache.contains(self.layer, span):
            self.table.set(span, SpanState.CACHED)
            return False
        return True

    async def ensure(
        self,
        needed: Sequence[SpanId],
        ride_along: range = range(0),
        inflated: dict[SpanId, bytes] | None = None,
    ) -> dict[SpanId, bytes]:
        """Make every span of `needed` local; returns the verified compressed bytes of the
        spans fetched or waited for here (the others are in the cache).

        When this call starts a request, the missing spans at the start of `ride_along` join
        it. Given `inflated`, the needed spans this call fetches are inflated while their
        answer arrives (`ArrivingRun`, when the span map can) and put there, with those of the
        fetches it waited for. Raises the error of a request this call started for a needed
        span (`FetchError`, or whatever else the source raised).
        """
        got: dict[SpanId, bytes] = {}
        while True:
            waits: list[_Fetch] = []
            missing: list[SpanId] = []
            for span in needed:
                if self.table.state(span) is SpanState.FETCHING:
                    waits.append(self._inflight[span])
                elif self.missing(span):
                    missing.append(span)
            if not missing and not waits:
                return got
            mine: list[_Fetch] = []
            if missing:
                for extra in ride_along:
                    if extra <= missing[-1]:
                        continue
                    if extra != missing[-1] + 1 or not self.missing(SpanId(extra)):
                        break
                    missing.append(SpanId(extra))
                wanted_now = frozenset(needed) if inflated is not None else frozenset()
                mine = self._start_runs(missing, wanted_now)
                self._demanded(missing)
            with self.tracker.demand():
                async with trio.open_nursery() as nursery:
                    for fetch in mine:
                        nursery.start_soon(self._run, fetch)
                    for fetch in waits:
                        nursery.start_soon(fetch.done.wait)
            for fetch in (*mine, *waits):
                got.update(fetch.results)
                if inflated is not None:
                    inflated.update(fetch.inflated)
            wanted = set(needed)
            for fetch in mine:
                if fetch.error is not None and not wanted.isdisjoint(fetch.spans):
                    raise fetch.error
            # Fetches of other readers that failed left their spans UNREQUESTED: loop and
            # fetch them ourselves.

    async def fetch_missing(self, spans: range) -> None:
        """Fetch the missing spans among `spans` (read-ahead), as on-demand work.

        Raises the first failed request's error (`FetchError` or another exception) once all
        are done; the failed spans are UNREQUESTED again.
        """
        missing = [SpanId(s) for s in spans if self.missing(SpanId(s))]
        if not missing:
            return
        fetches = self._start_runs(missing)
        self._demanded(missing)
        with self.tracker.demand():
            async with trio.open_nursery() as nursery:
                for fetch in fetches:
                    nursery.start_soon(self._run, fetch)
        for fetch in fetches:
            if fetch.error is not None:
                raise fetch.error

    def _demanded(self, spans: Sequence[SpanId]) -> None:
        """On-demand fetches of `spans` (ascending) start now."""
        self.tracker.record(sum(self.table.sizes[s] for s in spans))
        self.last_demand = trio.current_time()
        self._demand_end = spans[-1]

    async def step(self, max_bytes: int) -> int:
        """Fetch the next run of missing spans after the previous step's, or after the last
        on-demand fetch when one started since (background work that follows a reader).

        Returns the compressed bytes fetched, 0 when nothing is missing or startable. Raises
        the request's error (`FetchError` or another exception).
        """
        n = len(self.table)
        if self._demand_end is not None:
            self._cursor, self._demand_end = (self._demand_end + 1) % n, None
        run: list[SpanId] = []
        total = 0
        for i in range(n):
            span = SpanId((self._cursor + i) % n)
            if self.missing(span):
                if run and (
                    span != run[-1] + 1
                    or total + self.table.sizes[span] > max_bytes
                    or (self._chunks is not None and self._chunks[span] != self._chunks[run[-1]])
                ):
                    break
                run.append(span)
                total += self.table.sizes[span]
            elif run:
                break
        if not run:
            return 0
        self._cursor = (run[-1] + 1) % n
        fetch = self._start(run)
        await self._run(fetch)
        if fetch.error is not None:
            raise fetch.error
        return total

    # -- one request -----------------------------------------------------------------------

    def _start_runs(
        self, missing: list[SpanId], wanted: frozenset[SpanId] = frozenset()
    ) -> list[_Fetch]:
        return [
            self._start(run, wanted)
            for run in coalesce(missing, self.table.sizes, self.max_request_bytes, self._chunks)
        ]

    def _start(self, run: list[SpanId], wanted: frozenset[SpanId] = frozenset()) -> _Fetch:
        fetch = _Fetch(run, wanted.intersection(run))
        for span in run:
            self.table.set(span, SpanState.FETCHING)
            self._inflight[span] = fetch
        return fetch

    async def _run(self, fetch: _Fetch) -> None:
        """Fetch, verify and store one run. Never raises an Exception: it is stored in
        `fetch.error`; cancellation propagates. Either way the spans leave FETCHING and
        waiters are woken."""
        run = fetch.spans
        start = self.span_map.compressed_range(run[0])[0]
        end = self.span_map.compressed_range(run[-1])[1]
        ok = False
        t0 = trio.current_time()
        inflated: dict[SpanId, bytes] = {}
        try:
            self.counters.requests += 1
            check = _CheckRun(self.span_map, run, self.layer, self.source.name)
            data = await self._fetch_checked(fetch, start, end, check, inflated)
            self.counters.network_bytes += len(data)
            # the check cut the verified bytes in the worker thread (no big copies here)
            fetch.results.update(check.verified)
            try:
                await trio.to_thread.run_sync(self._store, fetch.results, limiter=self._io_limiter)
            except CacheError as e:
                self._cache_failed(run, e)
            ok = True
            log.debug(
                "spans fetched",
                extra={
                    "layer": str(self.layer),
                    "spans": f"{run[0]}-{run[-1]}",
                    "bytes": end - start,
                    "ms": round((trio.current_time() - t0) * 1000),
                },
            )
        except Exception as e:
            fetch.error = e
            log.debug("layer %s: fetching spans %d-%d failed: %r", self.layer, run[0], run[-1], e)
        finally:
            for span in run:
                del self._inflight[span]
                self.table.set(span, SpanState.CACHED if ok else SpanState.UNREQUESTED)
            if ok:
                fetch.inflated = inflated
            fetch.done.set()

    async def _fetch_checked(
        self,
        fetch: _Fetch,
        start: int,
        end: int,
        check: _CheckRun,
        inflated: dict[SpanId, bytes],
    ) -> bytes:
        """The verified bytes `[start, end)` of `fetch`'s spans from the source; its wanted
        spans are inflated while the answer comes in when they can be (`open_arriving`) and
        put in `inflated`. Raises what the source or the check raise (bare, not in an
        exception group)."""
        arriving = None
        if fetch.wanted and self.span_map.inflates_arriving:
            arriving = open_arriving(self.span_map, fetch.spans, fetch.wanted, self._keep_inflated)
        if arriving is None:
            data = await self.source.fetch(
                self.layer, CompressedOffset(start), CompressedOffset(end), check=check
            )
            if not check.verified:  # a source that did not run the check: run it here
                await trio.to_thread.run_sync(check, data, limiter=VERIFY_THREADS)
            return data
        verified: bytes | None = None
        failure: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(arriving.run)
                try:
                    data = await self.source.fetch(
                        self.layer,
                        CompressedOffset(start),
                        CompressedOffset(end),
                        check=check,
                        sink=arriving,
                    )
                    if not check.verified:
                        await trio.to_thread.run_sync(check, data, limiter=VERIFY_THREADS)
                    verified = data
                except BaseException as e:  # raised below, once the inflating thread is done
                    failure = e
                finally:
                    arriving.finish(verified)
        finally:
            arriving.finish(None)  # closed whatever happened (a no-op after the first)
        if failure is not None:
            raise failure
        assert verified is not None
        inflated.update(arriving.inflated)
        return verified

    def _cache_failed(self, run: list[SpanId], error: CacheError) -> None:
        """Log a failed cache write, at most once per `CACHE_WARNING_INTERVAL_SEC`."""
        now = trio.current_time()
        if now < self._cache_warn_after:
            self._cache_failures_unlogged += 1
            return
        self._cache_warn_after = now + CACHE_WARNING_INTERVAL_SEC
        left_out, self._cache_failures_unlogged = self._cache_failures_unlogged, 0
        log.warning(
            "layer %s: spans %s not cached (%d more not logged since): %s",
            self.layer,
            run,
            left_out,
            error,
            extra={"layer": str(self.layer), "error": str(error), "left_out": left_out},
        )

    def _store(self, results: Mapping[SpanId, bytes]) -> None:
        for span, data in results.items():
            self.cache.put(self.layer, span, data)


class _CheckRun:
    """Verifies every span of a coalesced answer, in the source's worker thread.

    On success `verified` holds the answer cut into spans (so the trio thread never copies
    megabytes); a failing call leaves it empty and raises `ContentMismatch`.
    """

    __slots__ = ("_layer", "_source", "_span_map", "_spans", "verified")

    def __init__(
        self, span_map: SpanMap, spans: Sequence[SpanId], layer: Digest, source: str
    ) -> None:
        self._span_map = span_map
        self._spans = tuple(spans)
        self._layer = layer
        self._source = source
        self.verified: dict[SpanId, bytes] = {}

    def __call__(self, data: bytes) -> None:
        self.verified = {}
        try:
            views = self._span_map.split_compressed(self._spans, data)
            for span, view in zip(self._spans, views, strict=True):
                self._span_map.verify(span, view)
        except SpanError as e:  # SpanDigestMismatch, or an answer of the wrong length
            raise ContentMismatch(f"layer {self._layer}: {e}", source=self._source) from e
        if len(views) == 1:
            self.verified = {self._spans[0]: data}
        else:
            self.verified = {s: bytes(v) for s, v in zip(self._spans, views, strict=True)}
