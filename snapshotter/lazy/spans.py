"""Reading a remote layer span by span: fetch once, verify, cache, inflate (the read path).

`RemoteLayerReader` is the production `LayerReader` for lazily mounted layers. A read of the
tar stream maps to spans (`index.zinfo.SpanMap`); each span goes through the state table
below, and every transition is checked (`SpanStateError` on an illegal one: a bug).

    state        meaning                                    edges out
    UNREQUESTED  not local                                  → FETCHING (a read/prefetch starts
                                                              a fetch), → CACHED (found in the
                                                              disk cache)
    FETCHING     one Range request in flight holds it       → CACHED (verified, stored),
                                                            → UNREQUESTED (failed/cancelled)
    CACHED       verified compressed bytes on disk          → INFLATED (inflated into memory),
                                                            → UNREQUESTED (disk copy evicted or
                                                              found corrupt)
    INFLATED     also inflated in the in-memory LRU         → CACHED (dropped from the LRU)

Fetching (DESIGN.md D9): the span is the unit of verification, not of transfer. Adjacent
missing spans of a read are coalesced into one Range request of at most `max_request_bytes`;
on sequential access the request also takes the next `readahead_spans` missing spans; the runs
of one read go out in parallel. Given a `prefetch_nursery`, read-ahead is pipelined instead:
when a sequential read comes within half a window of missing spans, the next
`readahead_spans` missing spans are fetched by a task in that nursery while the read goes on. Concurrent readers of a span wait for the one fetch in flight
(singleflight). Every span of a response is checked against its zTOC digest inside the
source's worker thread, so a corrupt answer is an error of that source (retried there, then
the next source: D4); wrong bytes are never cached or returned. A read fails with
`LayerReadError` only when every source failed. Inflation runs in worker threads behind a
limiter sized to the CPU count; the last `inflated_cache_spans` inflated spans stay in memory.

The inflated disk tier (`SpanCache.inflated`, when configured) sits in front of the table and
is not a state of it: the table tracks the compressed bytes (what is fetched, what progress
reports), the tier only saves inflation. The inflate thread writes every span it inflates
(from verified compressed bytes only) to the tier; a read whose spans are all in the memory
LRU or the tier is served with one positioned read per span of just the bytes it needs, in a
worker thread, without touching the table (so it also works after the compressed copy was
evicted: no refetch). A tier miss (evicted, torn) falls back to the path above.

Units: bytes; offsets into the tar stream are `UncompressedOffset`, into the blob
`CompressedOffset`.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import trio

from index.digest import Digest
from index.model import CompressedOffset, SpanId, UncompressedOffset, Ztoc
from index.zinfo import GzipSpanMap, SpanDigestMismatch, SpanError, SpanMap, ZinfoError
from snapshotter.fs.errors import LayerReadError
from snapshotter.fs.readers import FetchProgress
from snapshotter.lazy.cache import CacheError, InflatedCache, SpanCache
from snapshotter.lazy.sources import BlobSource, ContentMismatch, FetchError

log = logging.getLogger(__name__)

MiB: Final = 1024 * 1024


class SpanState(enum.Enum):
    """Where a span's bytes are (see the module table)."""

    UNREQUESTED = "unrequested"
    FETCHING = "fetching"
    CACHED = "cached"
    INFLATED = "inflated"


TRANSITIONS: Final[Mapping[SpanState, frozenset[SpanState]]] = {
    # a read or prefetch starts a fetch; or the disk cache already has the span
    SpanState.UNREQUESTED: frozenset({SpanState.FETCHING, SpanState.CACHED}),
    # verified and stored; or every source failed / the fetch was cancelled
    SpanState.FETCHING: frozenset({SpanState.CACHED, SpanState.UNREQUESTED}),
    # inflated into the memory LRU; or the disk copy was evicted or found corrupt
    SpanState.CACHED: frozenset({SpanState.INFLATED, SpanState.UNREQUESTED}),
    # dropped from the memory LRU (the disk copy remains)
    SpanState.INFLATED: frozenset({SpanState.CACHED}),
}

_LOCAL: Final = frozenset({SpanState.CACHED, SpanState.INFLATED})


class SpanStateError(Exception):
    """An illegal span state transition was attempted (a bug in the caller)."""


class SpanTable:
    """The state of every span of one layer, plus the compressed bytes held locally.

    `sizes[i]` is the compressed size of span i in bytes. Raises `SpanStateError` on any
    transition not in `TRANSITIONS`.
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        self.sizes = tuple(sizes)
        self._states = [SpanState.UNREQUESTED] * len(self.sizes)
        self._counts = {state: 0 for state in SpanState}
        self._counts[SpanState.UNREQUESTED] = len(self.sizes)
        self.local_bytes = 0

    def __len__(self) -> int:
        return len(self._states)

    def __repr__(self) -> str:
        counts = " ".join(f"{s.value}={n}" for s, n in self._counts.items())
        return f"<SpanTable spans={len(self)} {counts} local_bytes={self.local_bytes}>"

    def state(self, span: SpanId) -> SpanState:
        return self._states[span]

    def count(self, state: SpanState) -> int:
        return self._counts[state]

    def set(self, span: SpanId, new: SpanState) -> None:
        """Move `span` to `new`. Raises `SpanStateError` for an edge not in the table."""
        old = self._states[span]
        if new not in TRANSITIONS[old]:
            raise SpanStateError(f"span {span}: illegal transition {old.value} → {new.value}")
        self._states[span] = new
        self._counts[old] -= 1
        self._counts[new] += 1
        if (old in _LOCAL) != (new in _LOCAL):
            self.local_bytes += self.sizes[span] if new in _LOCAL else -self.sizes[span]


def coalesce(spans: Sequence[SpanId], sizes: Sequence[int], max_bytes: int) -> list[list[SpanId]]:
    """Group sorted span ids into runs of consecutive ids of at most `max_bytes` each.

    A span larger than `max_bytes` is a run of its own. `sizes[i]` is span i's compressed size.
    """
    runs: list[list[SpanId]] = []
    total = 0
    for span in spans:
        if runs and span == runs[-1][-1] + 1 and total + sizes[span] <= max_bytes:
            runs[-1].append(span)
            total += sizes[span]
        else:
            runs.append([span])
            total = sizes[span]
    return runs


class DemandTracker:
    """Knows whether on-demand fetches are running or ran recently (for background fetch).

    One per daemon, shared by every reader and the background fetcher. Times are trio clock
    seconds.
    """

    def __init__(self) -> None:
        self.active = 0
        self.last_end = -math.inf
        self._idle = trio.Event()
        self._idle.set()

    def __repr__(self) -> str:
        return f"<DemandTracker active={self.active} last_end={self.last_end:.3f}>"

    @contextlib.contextmanager
    def demand(self) -> Iterator[None]:
        """Wrap an on-demand fetch."""
        if self.active == 0:
            self._idle = trio.Event()
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self.last_end = trio.current_time()
            if self.active == 0:
                self._idle.set()

    def touch(self) -> None:
        """Count now as on-demand activity: a new layer mount pauses background fetching for
        a full quiet period, as the container that needs it is about to start reading."""
        self.last_end = max(self.last_end, trio.current_time())

    async def wait_quiet(self, period_sec: float) -> None:
        """Return once no on-demand fetch has run for `period_sec` seconds."""
        while True:
            if self.active:
                await self._idle.wait()
                continue
            remaining = self.last_end + period_sec - trio.current_time()
            if remaining <= 0:
                return
            await trio.sleep(remaining)


@dataclass(frozen=True, slots=True)
class ReadConfig:
    """Read-path tuning (wire into `snapshotter.config` as `[fetch]`/`[read]` keys).

    `max_request_bytes`: the largest coalesced Range request (S3 likes 8-16 MiB);
    `readahead_spans`: missing spans after a sequential read's last span that are fetched with
    it (in the same request, or pipelined in the prefetch nursery);
    `inflated_cache_spans`: inflated spans kept in memory per layer;
    `inflate_threads`: worker threads for inflation (0 = the CPU count).
    """

    max_request_bytes: int = 16 * MiB
    readahead_spans: int = 4
    inflated_cache_spans: int = 8
    inflate_threads: int = 0

    def __post_init__(self) -> None:
        if self.max_request_bytes <= 0:
            raise ValueError(f"max_request_bytes must be positive, got {self.max_request_bytes}")
        if self.readahead_spans < 0 or self.inflated_cache_spans < 1 or self.inflate_threads < 0:
            raise ValueError(f"bad read config {self!r}")


@dataclass(frozen=True, slots=True)
class LayerFetchStatus:
    """What an operator sees for one layer (`fetched_bytes` of the compressed blob)."""

    layer: str
    source: str
    spans: int
    states: Mapping[str, int]
    fetched_bytes: int
    total_bytes: int
    requests: int
    network_bytes: int
    last_error: str

    @property
    def percent(self) -> float:
        return 100.0 if self.total_bytes <= 0 else 100.0 * self.fetched_bytes / self.total_bytes


@dataclass(eq=False)
class _Fetch:
    """One Range request in flight: its spans, result bytes per span, and completion."""

    spans: list[SpanId]
    done: trio.Event = field(default_factory=trio.Event)
    results: dict[SpanId, bytes] = field(default_factory=dict)
    error: BaseException | None = None


class _Refetch(Exception):
    """The disk copy of a CACHED span is gone or corrupt: fetch it again."""


def default_inflate_limiter(config: ReadConfig | None = None) -> trio.CapacityLimiter:
    """A limiter for inflation threads: `config.inflate_threads`, or the CPU count."""
    threads = (config.inflate_threads if config else 0) or os.cpu_count() or 2
    return trio.CapacityLimiter(threads)


class RemoteLayerReader:
    """A `LayerReader` (and `ReportsProgress`) over a layer blob held by `source`.

    `layer` is the blob digest, `ztoc` its zTOC, `cache` the (shared) span cache. Limiters
    are shared across layers: `inflate_limiter` (CPU-bound work, default: CPU count) and
    `io_limiter` (cache writes). `tracker` is told about on-demand fetches so background
    fetching yields to them. `prefetch_nursery`, if given, runs pipelined read-ahead fetches;
    its owner cancels them (e.g. when the layer is unmounted). Raises `LayerReadError` from the
    constructor when the zTOC's span information is unusable. Nothing here needs closing; the
    cache and source are shared.
    """

    def __init__(
        self,
        layer: Digest,
        ztoc: Ztoc,
        source: BlobSource,
        cache: SpanCache,
        *,
        config: ReadConfig | None = None,
        tracker: DemandTracker | None = None,
        inflate_limiter: trio.CapacityLimiter | None = None,
        io_limiter: trio.CapacityLimiter | None = None,
        prefetch_nursery: trio.Nursery | None = None,
    ) -> None:
        self.layer = layer
        self._nursery = prefetch_nursery
        self.source = source
        self.cache = cache
        self.config = config or ReadConfig()
        self.tracker = tracker or DemandTracker()
        try:
            self.span_map = SpanMap.from_ztoc(ztoc)
            self._ranges = [
                self.span_map.compressed_range(SpanId(i)) for i in range(self.span_map.span_count)
            ]
        except ZinfoError as e:
            raise LayerReadError(f"layer {layer}: zTOC has unusable span info: {e}") from e
        self.table = SpanTable([end - start for start, end in self._ranges])
        self._inflate_limiter = inflate_limiter or default_inflate_limiter(self.config)
        self._io_limiter = io_limiter or trio.CapacityLimiter(4)
        self._tier: InflatedCache | None = cache.inflated
        self._tier_warned = False
        self._inflight: dict[SpanId, _Fetch] = {}
        self._inflating: dict[SpanId, trio.Event] = {}
        self._lru: OrderedDict[SpanId, bytes] = OrderedDict()
        self._last_span: int = -2  # the first read is not sequential
        self._cursor = 0
        self.requests = 0
        self.network_bytes = 0
        self.last_error = ""
        cache.retain_layer(layer)  # in use again: no longer evictable first (rare tiny I/O)
        for span in cache.spans_of(layer):
            if 0 <= span < len(self.table):
                self.table.set(span, SpanState.CACHED)

    def __repr__(self) -> str:
        return (
            f"<RemoteLayerReader {self.layer} via {self.source.name} {self.table!r} "
            f"requests={self.requests}>"
        )

    # -- status ------------------------------------------------------------------------------

    def progress(self) -> FetchProgress:
        """Compressed bytes held locally vs the blob size."""
        total = self.span_map.compressed_archive_size
        return FetchProgress(min(self.table.local_bytes, total), total)

    def status(self) -> LayerFetchStatus:
        progress = self.progress()
        return LayerFetchStatus(
            layer=str(self.layer),
            source=self.source.name,
            spans=len(self.table),
            states={s.value: self.table.count(s) for s in SpanState},
            fetched_bytes=progress.fetched_bytes,
            total_bytes=progress.total_bytes,
            requests=self.requests,
            network_bytes=self.network_bytes,
            last_error=self.last_error,
        )

    def is_complete(self) -> bool:
        """Whether every span is local (cached or inflated)."""
        return (
            self.table.count(SpanState.UNREQUESTED) == 0
            and self.table.count(SpanState.FETCHING) == 0
        )

    # -- fetching ----------------------------------------------------------------------------

    def _slices(self, data: bytes, spans: Sequence[SpanId]) -> dict[SpanId, bytes]:
        """Cut a response for `spans` (starting at the first span's start) into spans."""
        base = self._ranges[spans[0]][0]
        return {s: data[self._ranges[s][0] - base : self._ranges[s][1] - base] for s in spans}

    def _claim_from_cache(self, span: SpanId) -> bool:
        """UNREQUESTED → CACHED if the cache index lists the span (no I/O)."""
        if self.cache.contains(self.layer, span):
            self.table.set(span, SpanState.CACHED)
            return True
        return False

    def _start(self, run: list[SpanId]) -> _Fetch:
        fetch = _Fetch(run)
        for span in run:
            self.table.set(span, SpanState.FETCHING)
            self._inflight[span] = fetch
        return fetch

    async def _run_fetch(self, fetch: _Fetch) -> None:
        """Fetch one run; never raises a FetchError (it is stored in `fetch.error`)."""
        run = fetch.spans
        start = self._ranges[run[0]][0]
        end = self._ranges[run[-1]][1]
        ok = False
        try:
            self.requests += 1
            check = _CheckRun(self, run, start)
            data = await self.source.fetch(
                self.layer, CompressedOffset(start), CompressedOffset(end), check=check
            )
            self.network_bytes += len(data)
            # the check sliced the verified bytes in the worker thread (no big copies here)
            fetch.results.update(check.verified if check.verified else self._slices(data, run))
            try:
                await trio.to_thread.run_sync(self._store, fetch.results, limiter=self._io_limiter)
            except CacheError as e:
                log.warning("layer %s: spans %s not cached: %s", self.layer, run, e)
            ok = True
        except FetchError as e:
            fetch.error = e
            self.last_error = str(e)
            log.warning("layer %s: fetching spans %d-%d failed: %s", self.layer, run[0], run[-1], e)
        finally:
            for span in run:
                del self._inflight[span]
                self.table.set(span, SpanState.CACHED if ok else SpanState.UNREQUESTED)
            fetch.done.set()

    def _store(self, results: Mapping[SpanId, bytes]) -> None:
        for span, data in results.items():
            self.cache.put(self.layer, span, data)

    def _missing_after(self, span: int, limit: int) -> list[SpanId]:
        out: list[SpanId] = []
        for i in range(span + 1, min(span + 1 + limit, len(self.table))):
            sid = SpanId(i)
            if self.table.state(sid) is not SpanState.UNREQUESTED or self._claim_from_cache(sid):
                break
            out.append(sid)
        return out

    async def _ensure(self, needed: Sequence[SpanId], sequential: bool) -> dict[SpanId, bytes]:
        """Make every span of `needed` local; returns compressed bytes fetched here for them.

        Raises `LayerReadError` when a fetch this call started failed on every source.
        """
        got: dict[SpanId, bytes] = {}
        pipelined = self._nursery is not None
        if sequential and pipelined and self.config.readahead_spans:
            self._maybe_read_ahead(needed[-1])
        while True:
            waits: list[_Fetch] = []
            missing: list[SpanId] = []
            for span in needed:
                state = self.table.state(span)
                if state is SpanState.FETCHING:
                    waits.append(self._inflight[span])
                elif state is SpanState.UNREQUESTED and not self._claim_from_cache(span):
                    missing.append(span)
            if not missing and not waits:
                return got
            mine: list[_Fetch] = []
            if missing:
                if sequential and not pipelined and self.config.readahead_spans:
                    missing += self._missing_after(missing[-1], self.config.readahead_spans)
                runs = coalesce(missing, self.table.sizes, self.config.max_request_bytes)
                mine = [self._start(run) for run in runs]
            with self.tracker.demand():
                async with trio.open_nursery() as nursery:
                    for fetch in mine:
                        nursery.start_soon(self._run_fetch, fetch)
                    for fetch in waits:
                        nursery.start_soon(fetch.done.wait)
            for fetch in [*mine, *waits]:
                got.update(fetch.results)
            failed = [f for f in mine if f.error is not None and set(f.spans) & set(needed)]
            if failed:
                error = failed[0].error
                raise LayerReadError(
                    f"layer {self.layer}: spans {failed[0].spans[0]}-{failed[0].spans[-1]}: {error}"
                ) from error
            # Fetches of other readers that failed leave their spans UNREQUESTED: loop and
            # fetch them ourselves.

    def _maybe_read_ahead(self, last: SpanId) -> None:
        """Start a read-ahead task when a span in the first half of the window is missing."""
        window = self.config.readahead_spans
        first_half = range(last + 1, min(last + 1 + max(1, (window + 1) // 2), len(self.table)))
        if not any(self.table.state(SpanId(s)) is SpanState.UNREQUESTED for s in first_half):
            return
        assert self._nursery is not None
        with contextlib.suppress(RuntimeError):  # a closing nursery: the layer is going away
            self._nursery.start_soon(self._read_ahead, last)

    async def _read_ahead(self, last: SpanId) -> None:
        """Fetch the missing spans of the window after `last` (pipelined read-ahead)."""
        missing = [
            SpanId(s)
            for s in range(last + 1, min(last + 1 + self.config.readahead_spans, len(self.table)))
            if self.table.state(SpanId(s)) is SpanState.UNREQUESTED
            and not self._claim_from_cache(SpanId(s))
        ]
        if not missing:
            return
        fetches = [
            self._start(run)
            for run in coalesce(missing, self.table.sizes, self.config.max_request_bytes)
        ]
        with self.tracker.demand():
            async with trio.open_nursery() as nursery:
                for fetch in fetches:
                    nursery.start_soon(self._run_fetch, fetch)

    async def prefetch_step(self, max_bytes: int) -> int:
        """Fetch the next run of missing spans (background work, not inflated).

        Returns the compressed bytes fetched, 0 when nothing is missing. Raises `FetchError`
        when the run failed on every source.
        """
        n = len(self.table)
        run: list[SpanId] = []
        total = 0
        for i in range(n):
            span = SpanId((self._cursor + i) % n)
            if self.table.state(span) is SpanState.UNREQUESTED and not self._claim_from_cache(span):
                if run and (span != run[-1] + 1 or total + self.table.sizes[span] > max_bytes):
                    break
                run.append(span)
                total += self.table.sizes[span]
            elif run:
                break
        if not run:
            return 0
        self._cursor = (run[-1] + 1) % n
        fetch = self._start(run)
        await self._run_fetch(fetch)
        if fetch.error is not None:
            raise fetch.error
        return total

    async def check_gzip_header(self) -> None:
        """Fetch the bytes before span 0 and require a gzip member header (spec/soci.md §2.4.9).

        A no-op for uncompressed layers. Raises `LayerReadError` when the bytes cannot be
        fetched or are not a gzip header (the zTOC does not describe this blob).
        """
        if not isinstance(self.span_map, GzipSpanMap) or not len(self.table):
            return
        end = self._ranges[0][0] + (1 if self.span_map.zinfo.checkpoints[0].bits else 0)
        if end <= 0:
            return

        def is_gzip(data: bytes) -> None:
            if len(data) < 10 or data[:3] != b"\x1f\x8b\x08":
                raise ContentMismatch(
                    f"layer {self.layer}: bytes 0-{end} are not a gzip header", source=""
                )

        try:
            with self.tracker.demand():
                await self.source.fetch(
                    self.layer, CompressedOffset(0), CompressedOffset(end), check=is_gzip
                )
        except FetchError as e:
            self.last_error = str(e)
            raise LayerReadError(f"layer {self.layer}: gzip header: {e}") from e

    # -- inflating ---------------------------------------------------------------------------

    def _load_inflate(self, span: SpanId, compressed: bytes | None) -> bytes:
        """In a worker thread: the verified compressed span (given, or from the cache, which
        hashes it) inflated, and written to the inflated tier. Raises `_Refetch`, `ZinfoError`.
        """
        if compressed is None:
            compressed = self.cache.get(self.layer, span, self.span_map.span_digests[span])
            if compressed is None:
                raise _Refetch(span)
        data = self.span_map.inflate(span, compressed)
        if self._tier is not None:
            start, end = self.span_map.uncompressed_range(span)
            if len(data) == end - start:
                try:
                    self._tier.put(self.layer, start, data)
                except CacheError as e:
                    if not self._tier_warned:  # once per layer: a full disk would flood the log
                        self._tier_warned = True
                        log.warning("layer %s: inflated span %d not kept: %s", self.layer, span, e)
        return data

    async def _inflated(self, span: SpanId, compressed: bytes | None) -> bytes:
        """The inflated span. Raises `_Refetch` or `LayerReadError` (inflation failed)."""
        while True:
            hit = self._lru.get(span)
            if hit is not None:
                self._lru.move_to_end(span)
                return hit
            event = self._inflating.get(span)
            if event is None:
                break
            await event.wait()
            if compressed is None and self.table.state(span) not in _LOCAL:
                raise _Refetch(span)
        event = self._inflating[span] = trio.Event()
        try:
            try:
                data: bytes = await trio.to_thread.run_sync(
                    self._load_inflate, span, compressed, limiter=self._inflate_limiter
                )
            except _Refetch:
                if self.table.state(span) is SpanState.CACHED:
                    self.table.set(span, SpanState.UNREQUESTED)
                raise
            except ZinfoError as e:
                self.last_error = f"span {span}: {e}"
                raise LayerReadError(f"layer {self.layer}: span {span}: {e}") from e
            if self.table.state(span) is SpanState.CACHED:
                self.table.set(span, SpanState.INFLATED)
                self._lru[span] = data
                while len(self._lru) > self.config.inflated_cache_spans:
                    old, _ = self._lru.popitem(last=False)
                    self.table.set(old, SpanState.CACHED)
            return data
        finally:
            del self._inflating[span]
            event.set()

    # -- the LayerReader API ---------------------------------------------------------------

    async def read(self, offset: UncompressedOffset, size: int) -> bytes:
        """Bytes `[offset, offset + size)` of the tar stream (fewer only at its end).

        Raises `LayerReadError` (chained) when the range is outside the stream, a span could
        not be fetched from any source, or a verified span does not inflate.
        """
        end = min(offset + size, self.span_map.uncompressed_archive_size)
        if end <= offset:
            return b""
        try:
            spans = [SpanId(s) for s in self.span_map.spans_for_range(offset, end - offset)]
        except SpanError as e:
            raise LayerReadError(f"layer {self.layer}: range {offset}+{size}: {e}") from e
        # Sequential means the reads have moved on into the next span. Reads that stay inside
        # one span (small files, several FUSE requests of one file) do not widen the fetch:
        # read-ahead there would fetch megabytes for a few kilobytes of scattered reads.
        sequential = spans[0] == self._last_span + 1 or (
            spans[0] == self._last_span and len(spans) > 1
        )
        self._last_span = spans[-1]
        if self._tier is not None:
            local = await self._read_local(spans, offset, end)
            if local is not None:
                if sequential and self._nursery is not None and self.config.readahead_spans:
                    self._maybe_read_ahead(spans[-1])
                return local
        for _ in range(4):
            got = await self._ensure(spans, sequential)
            try:
                parts = await self._inflate_all(spans, got)
            except _Refetch:
                continue
            break
        else:
            raise LayerReadError(f"layer {self.layer}: spans {spans} keep vanishing from the cache")
        out: list[bytes] = []
        for span, data in zip(spans, parts, strict=True):
            span_start = self.span_map.uncompressed_range(span)[0]
            lo = max(offset - span_start, 0)
            hi = min(end - span_start, len(data))
            out.append(data[lo:hi])
        return out[0] if len(out) == 1 else b"".join(out)

    async def _read_local(self, spans: Sequence[SpanId], offset: int, end: int) -> bytes | None:
        """`[offset, end)` from the memory LRU and the inflated tier, or None when a span is
        in neither (or the tier lost it meanwhile). None too when every span is in the LRU:
        the ordinary path serves those without a thread hop."""
        tier = self._tier
        assert tier is not None
        plan: list[tuple[UncompressedOffset, int, int, int, bytes | None]] = []
        from_disk = False
        for span in spans:
            start, stop = self.span_map.uncompressed_range(span)
            lo, hi = max(offset - start, 0), min(end, stop) - start
            hit = self._lru.get(span)
            if hit is None:
                if not tier.contains(self.layer, start):
                    return None
                from_disk = True
            plan.append((start, stop - start, lo, hi, hit))
        if not from_disk:
            return None

        def load() -> bytes | None:
            parts: list[bytes] = []
            for start, length, lo, hi, hit in plan:
                part = (
                    hit[lo:hi]
                    if hit is not None
                    else tier.read(self.layer, start, length, lo, hi - lo)
                )
                if part is None:
                    return None
                parts.append(part)
            return parts[0] if len(parts) == 1 else b"".join(parts)

        return await trio.to_thread.run_sync(load)

    async def _inflate_all(self, spans: list[SpanId], got: Mapping[SpanId, bytes]) -> list[bytes]:
        if len(spans) == 1:
            return [await self._inflated(spans[0], got.get(spans[0]))]
        results: list[bytes | None] = [None] * len(spans)
        errors: list[_Refetch | LayerReadError] = []

        async def one(i: int, span: SpanId) -> None:
            try:
                results[i] = await self._inflated(span, got.get(span))
            except (_Refetch, LayerReadError) as e:  # re-raised bare, not in an ExceptionGroup
                errors.append(e)

        async with trio.open_nursery() as nursery:
            for i, span in enumerate(spans):
                nursery.start_soon(one, i, span)
        if errors:
            raise next((e for e in errors if isinstance(e, LayerReadError)), errors[0])
        return [r for r in results if r is not None]


class _CheckRun:
    """Verifies every span of a coalesced response, in the source's worker thread.

    On success `verified` holds the response cut into spans (so the trio thread never copies
    megabytes); a failing call leaves it empty and raises `ContentMismatch`.
    """

    __slots__ = ("_base", "_reader", "_spans", "verified")

    def __init__(self, reader: RemoteLayerReader, spans: Sequence[SpanId], base: int) -> None:
        self._reader = reader
        self._spans = tuple(spans)
        self._base = base
        self.verified: dict[SpanId, bytes] = {}

    def __call__(self, data: bytes) -> None:
        self.verified = {}
        view = memoryview(data)
        for span in self._spans:
            start, end = self._reader._ranges[span]
            try:
                self._reader.span_map.verify(span, view[start - self._base : end - self._base])
            except SpanDigestMismatch as e:
                raise ContentMismatch(
                    f"layer {self._reader.layer}: {e}", source=self._reader.source.name
                ) from e
        self.verified = self._reader._slices(data, self._spans)
