"""`RemoteLayerReader`: the `LayerReader` of a lazily mounted layer, and its error boundary.

One FUSE read, top to bottom (`read`):

1. the tar-stream range → the spans it needs and the slice of each (`SpanMap.slices_for_range`);
2. the read-ahead policy notes the read (`ReadAhead.observe`: sequential or not);
3. all spans in the memory LRU or the inflated tier → served from there (`SpanInflater.
   read_local`: page-cache bytes of small reads on the trio thread, else one worker
   thread), pipelined read-ahead started when sequential (the next missing spans fetched,
   and the span after the read's last inflated ahead of the reader);
4. else the span fetcher makes them local (`SpanFetcher.ensure`: cache, or coalesced verified
   Range requests shared with concurrent readers, read-ahead riding along unless pipelined);
5. the inflater inflates them (`SpanInflater.inflate_all`: memory LRU, or one shared
   inflation in a worker thread, written to the tier);
6. the slices are cut and joined (`index.zinfo.assemble`).

Errors are translated here, once, into `LayerReadError` (chained); the FUSE adapter turns that
into EIO:

    raised below                              read() raises
    SpanError (range outside the stream)      LayerReadError
    FetchError (every source failed)          LayerReadError; counted (`errors`, `last_error`)
    ZinfoError (a verified span won't inflate) LayerReadError; counted
    SpanGone four times in a row              LayerReadError
    the layer's task scope is closed          LayerClosed (a LayerReadError): no request made
    anything else                             propagates (the caller's boundary: the FUSE host
                                              counts it as a read error)

Tasks: given `tasks` (the LAYER's `TaskScope`, closed by its owner on unmount), pipelined
read-ahead runs there; closing it cancels them, cancels the fetches of reads in progress (they
raise `LayerClosed`: no retry, no refetch after the unmount) and makes later reads and
background steps raise `LayerClosed` without a request. Without `tasks`, read-ahead rides along in the read's
own request. Units: bytes; `UncompressedOffset` into the tar stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Final

import trio

from index.digest import Digest
from index.model import SpanId, UncompressedOffset, Ztoc
from index.zinfo import SpanError, SpanMap, SpanSlice, ZinfoError, assemble
from snapshotter.fs.errors import LayerReadError
from snapshotter.fs.readers import FetchProgress
from snapshotter.lazy.cache import SpanCache
from snapshotter.lazy.demand import DemandTracker
from snapshotter.lazy.fetcher import LayerCounters, SpanFetcher
from snapshotter.lazy.inflater import SpanGone, SpanInflater, SpanMemory
from snapshotter.lazy.readahead import ReadAhead
from snapshotter.lazy.sources import PEER_SOURCE_NAME, BlobSource, ChainSource, FetchError
from snapshotter.lazy.table import LOCAL, SpanState, SpanTable
from snapshotter.tasks import TaskScope

log = logging.getLogger(__name__)

MiB: Final = 1024 * 1024
_MAX_REFETCH: Final = 4


class LayerClosed(LayerReadError):
    """The layer's task scope is closed (it was unmounted): nothing is fetched for it."""


@dataclass(frozen=True, slots=True)
class ReadConfig:
    """Read-path tuning (`[remote]` keys of the same names; `RemoteConfig.read_config()`).

    `max_request_bytes`: the largest coalesced Range request (S3 likes 8-16 MiB);
    `readahead_spans`: missing spans after a sequential read's last span that are fetched with
    it (in the same request, or pipelined in the layer's task scope); 0 = no read-ahead;
    `memory_cache_spans`: inflated spans kept in memory per layer;
    `memory_cache_bytes`: inflated bytes kept in memory, all layers together;
    `memory`: the daemon-wide `SpanMemory` of that budget the readers of every layer share
    (made once by the owner of the layers: `with_shared_memory()`); None: each reader has one
    of its own;
    `inflate_threads`: worker threads for inflation, all layers (0 = the CPU count);
    `chunk_bytes`: peer ownership chunks (`[peers] chunk_bytes`) no request may cross; 0 = none.
    """

    max_request_bytes: int = 16 * MiB
    readahead_spans: int = 4
    memory_cache_spans: int = 8
    memory_cache_bytes: int = 32 * MiB
    inflate_threads: int = 0
    chunk_bytes: int = 0
    memory: SpanMemory | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.max_request_bytes <= 0:
            raise ValueError(f"max_request_bytes must be positive, got {self.max_request_bytes}")
        if self.readahead_spans < 0:
            raise ValueError(f"readahead_spans must not be negative, got {self.readahead_spans}")
        if self.memory_cache_spans < 1:
            raise ValueError(
                f"memory_cache_spans must be at least 1, got {self.memory_cache_spans}"
            )
        if self.memory_cache_bytes < 0:
            raise ValueError(
                f"memory_cache_bytes must not be negative, got {self.memory_cache_bytes}"
            )
        if self.inflate_threads < 0:
            raise ValueError(f"inflate_threads must not be negative, got {self.inflate_threads}")
        if self.chunk_bytes < 0:
            raise ValueError(f"chunk_bytes must not be negative, got {self.chunk_bytes}")

    def with_shared_memory(self) -> ReadConfig:
        """This config with a new `SpanMemory` of `memory_cache_bytes`, for every reader made
        with it to share."""
        return dataclasses.replace(self, memory=SpanMemory(self.memory_cache_bytes))


def default_inflate_limiter(config: ReadConfig | None = None) -> trio.CapacityLimiter:
    """A limiter for inflation threads: `config.inflate_threads`, or the CPU count."""
    threads = (config.inflate_threads if config else 0) or os.cpu_count() or 2
    return trio.CapacityLimiter(threads)


@dataclass(frozen=True, slots=True)
class LayerFetchStatus:
    """What an operator sees for one layer (`fetched_bytes` of the compressed blob).

    `errors` counts failures of this layer's fetches, inflations, read-ahead and background
    steps; `last_error` is the latest one's message ("" when none).
    """

    layer: str
    source: str
    spans: int
    states: Mapping[str, int]
    fetched_bytes: int
    total_bytes: int
    requests: int
    network_bytes: int
    errors: int
    last_error: str
    bytes_from: Mapping[str, int]
    """Compressed bytes made local by where they came from: `peers`, `registry` (hosts.toml
    mirrors included; also what this node fetched for peers as the chunk's owner while the
    layer was mounted) and `cache` (found in the span cache: an earlier run, or fetched as an
    owner before the layer was mounted here)."""

    @property
    def percent(self) -> float:
        return 100.0 if self.total_bytes <= 0 else 100.0 * self.fetched_bytes / self.total_bytes


class RemoteLayerReader:
    """A `LayerReader` (and `ReportsProgress`) over a layer blob held by `source`.

    `layer` is the blob digest, `ztoc` its zTOC, `cache` the (shared) span cache. Limiters
    are shared across layers: `inflate_limiter` (CPU-bound work, default: `config`'s
    `inflate_threads`) and `io_limiter` (cache writes). `tracker` is told about on-demand
    fetches so background fetching yields to them. `tasks` is the layer's own task scope (see
    the module doc); its owner closes it. Raises `LayerReadError` from the constructor when
    the zTOC's span information is unusable. Nothing here needs closing; cache and source are
    shared.
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
        tasks: TaskScope | None = None,
    ) -> None:
        self.layer = layer
        self.source = source
        self.cache = cache
        self.config = config or ReadConfig()
        self.tracker = tracker or DemandTracker()
        self._tasks = tasks
        try:
            self.span_map = SpanMap.from_ztoc(ztoc)
            ranges = [
                self.span_map.compressed_range(SpanId(i)) for i in range(self.span_map.span_count)
            ]
        except ZinfoError as e:
            raise LayerReadError(f"layer {layer}: zTOC has unusable span info: {e}") from e
        self.table = SpanTable([end - start for start, end in ranges])
        self.counters = LayerCounters()
        self.inflater = SpanInflater(
            layer,
            self.span_map,
            cache,
            self.table,
            memory_spans=self.config.memory_cache_spans,
            limiter=inflate_limiter or default_inflate_limiter(self.config),
            memory=(
                self.config.memory
                if self.config.memory is not None
                else SpanMemory(self.config.memory_cache_bytes)
            ),
        )
        self.fetcher = SpanFetcher(
            layer,
            self.span_map,
            source,
            cache,
            self.table,
            max_request_bytes=self.config.max_request_bytes,
            tracker=self.tracker,
            io_limiter=io_limiter or trio.CapacityLimiter(4),
            counters=self.counters,
            chunk_bytes=self.config.chunk_bytes,
            keep_inflated=self.inflater.keep_in_tier,
        )
        self.read_ahead = ReadAhead(self.config.readahead_spans, len(self.table))
        self._inflating_ahead: set[SpanId] = set()
        cache.retain_layer(layer)  # in use again: no longer evictable first (rare tiny I/O)
        for span in cache.spans_of(layer):
            if 0 <= span < len(self.table):
                self.table.set(span, SpanState.CACHED)

    def __repr__(self) -> str:
        return (
            f"<RemoteLayerReader {self.layer} via {self.source.name} {self.table!r} "
            f"requests={self.counters.requests} errors={self.counters.errors}>"
        )

    @property
    def closed(self) -> bool:
        """Whether the layer's task scope is closed (the layer is going away)."""
        return self._tasks is not None and self._tasks.closed

    # -- status ------------------------------------------------------------------------------

    def progress(self) -> FetchProgress:
        """Compressed bytes held locally vs the blob size."""
        total = self.span_map.compressed_archive_size
        return FetchProgress(min(self.table.local_bytes, total), total)

    def status(self) -> LayerFetchStatus:
        progress = self.progress()
        c = self.counters
        return LayerFetchStatus(
            layer=str(self.layer),
            source=self.source.name,
            spans=len(self.table),
            states={s.value: self.table.count(s) for s in SpanState},
            fetched_bytes=progress.fetched_bytes,
            total_bytes=progress.total_bytes,
            requests=c.requests,
            network_bytes=c.network_bytes,
            errors=c.errors,
            last_error=c.last_error,
            bytes_from=self._bytes_from(progress.fetched_bytes),
        )

    def _bytes_from(self, local_bytes: int) -> dict[str, int]:
        if isinstance(self.source, ChainSource):
            served = self.source.served()
            peers = served.pop(PEER_SOURCE_NAME, 0)
            registry = sum(served.values())
        else:
            peers, registry = 0, self.counters.network_bytes
        return {
            "cache": max(0, local_bytes - peers - registry),
            "peers": peers,
            "registry": registry,
        }

    def is_complete(self) -> bool:
        """Whether every span is local (cached or inflated)."""
        return (
            self.table.count(SpanState.UNREQUESTED) == 0
            and self.table.count(SpanState.FETCHING) == 0
        )

    @property
    def last_demand(self) -> float:
        """Trio time of this layer's latest on-demand fetch (-inf: none)."""
        return self.fetcher.last_demand

    def record_error(self, message: str) -> None:
        """Count a failure of work done for this layer elsewhere (a background step)."""
        self.counters.record_error(message)

    # -- the LayerReader API ---------------------------------------------------------------

    async def read(
        self, offset: UncompressedOffset, size: int, file_end: int | None = None
    ) -> bytes:
        """Bytes `[offset, offset + size)` of the tar stream (fewer only at its end), of a
        file whose data ends at `file_end` (read-ahead stops there; see `ReadAhead`).

        Raises `LayerReadError` (chained; see the module's table): the range is outside the
        stream, a span could not be fetched from any source, a verified span does not inflate,
        or the layer is closed (`LayerClosed`).
        """
        end = min(offset + size, self.span_map.uncompressed_archive_size)
        if end <= offset:
            return b""
        if self.closed:
            raise LayerClosed(f"layer {self.layer}: unmounted")
        try:
            slices = self.span_map.slices_for_range(offset, end - offset)
        except SpanError as e:
            raise LayerReadError(f"layer {self.layer}: range {offset}+{size}: {e}") from e
        spans = [s.span for s in slices]
        stop = self._observe(spans, offset, end, file_end)
        local = await self.inflater.read_local(slices)
        if local is not None:
            return local
        ride_along = (
            self.read_ahead.ride_along(spans[-1], stop)
            if stop is not None and self._tasks is None
            else range(0)
        )
        try:
            parts = await self._load(spans, ride_along)
        except FetchError as e:
            self.counters.record_error(str(e))
            raise LayerReadError(f"layer {self.layer}: spans {spans[0]}-{spans[-1]}: {e}") from e
        except ZinfoError as e:
            self.counters.record_error(str(e))
            raise LayerReadError(f"layer {self.layer}: {e}") from e
        return assemble(slices, parts)

    def read_now(
        self,
        offset: UncompressedOffset,
        size: int,
        file_end: int | None = None,
        *,
        observe: bool = True,
    ) -> bytes | None:
        """What `read` would return, when its spans are in memory or (small reads) in the
        inflated tier's page cache (`SpanInflater.read_now`); None when `read` must be
        awaited, also for anything `read` would raise. A read answered here counts for
        read-ahead like one answered by `read` (pipelined read-ahead starts from here too),
        unless `observe` is False."""
        slices = self._slices_at_hand(offset, size)
        if slices is None:
            return None
        data = self.inflater.read_now(slices)
        if data is not None and observe:
            self._observe([s.span for s in slices], offset, offset + len(data), file_end)
        return data

    def at_hand_end(self, offset: UncompressedOffset, limit: int) -> int:
        """How far from `offset` the tar stream is inflated at hand (`SpanInflater.at_hand`:
        what `read_now` may answer), looking no further than `offset + limit`: the end of the
        last of the consecutive such spans from `offset`'s on; `offset` when its span is not.
        """
        size = self.span_map.uncompressed_archive_size
        if self.closed or not 0 <= offset < size:
            return offset
        span = self.span_map.span_for_offset(offset)
        end = int(offset)
        while end < min(offset + limit, size):
            start, stop = self.span_map.uncompressed_range(span)
            if not self.inflater.at_hand(span, start):
                break
            end = stop
            span = SpanId(span + 1)
        return end

    async def read_local(self, offset: UncompressedOffset, size: int) -> bytes | None:
        """What `read` would return, when every span it needs is inflated at hand (the memory
        LRU or the inflated tier): nothing is fetched, no read-ahead starts and the read-ahead
        policy does not see it; None otherwise (a span only compressed or not local, the tier
        lost it, the layer closed, a range outside the stream)."""
        slices = self._slices_at_hand(offset, size)
        if slices is None:
            return None
        data = self.inflater.read_now(slices)
        if data is None:
            data = await self.inflater.read_local(slices)
        return data

    def _slices_at_hand(self, offset: UncompressedOffset, size: int) -> list[SpanSlice] | None:
        """The span slices of a read that may be answered from what is at hand; None for an
        empty range, one outside the stream, or a closed layer."""
        end = min(offset + size, self.span_map.uncompressed_archive_size)
        if end <= offset or self.closed:
            return None
        try:
            return self.span_map.slices_for_range(offset, end - offset)
        except SpanError:
            return None

    def _observe(
        self, spans: Sequence[SpanId], start: int, end: int, file_end: int | None
    ) -> SpanId | None:
        """Tell the read-ahead policy about a read of `spans` (tar-stream `[start, end)` of a
        file ending at `file_end`); the last span read-ahead may reach, None when the read is
        not sequential. A sequential read with a task scope starts its pipelined read-ahead
        here."""
        file_last = None
        if file_end is not None and 0 < file_end <= self.span_map.uncompressed_archive_size:
            file_last = self.span_map.span_for_offset(UncompressedOffset(file_end - 1))
        stop = self.read_ahead.observe(
            spans[0], spans[-1], start=start, end=end, file_end=file_end, file_last=file_last
        )
        if stop is not None and self._tasks is not None:
            self._start_read_ahead(spans[-1], stop)
        return stop

    def _cancelled_on_close(self) -> AbstractContextManager[trio.CancelScope]:
        """The block of an on-demand fetch: cancelled when the layer's scope closes."""
        if self._tasks is None:
            return contextlib.nullcontext(trio.CancelScope())
        return self._tasks.cancelled_on_close()

    async def _load(self, spans: Sequence[SpanId], ride_along: range) -> list[bytes]:
        """The inflated `spans`: made local, then inflated; fetched again when a cached copy
        vanishes meanwhile. Raises `FetchError`, `ZinfoError`, `LayerReadError`, `LayerClosed`
        (the layer's scope closed while this read was fetching)."""
        for _ in range(_MAX_REFETCH):
            got: dict[SpanId, bytes] = {}
            inflated: dict[SpanId, bytes] = {}  # spans inflated while their answer arrived
            if not all(self.table.state(s) in LOCAL for s in spans):
                # Requests of this read stop when the layer's scope closes (unmount).
                with self._cancelled_on_close() as block:
                    got = await self.fetcher.ensure(spans, ride_along, inflated)
                if block.cancelled_caught:  # unmounted meanwhile: no retry, no refetch
                    raise LayerClosed(f"layer {self.layer}: unmounted during the read")
            try:
                return await self.inflater.inflate_all(spans, got, inflated)
            except SpanGone:
                continue
        raise LayerReadError(f"layer {self.layer}: spans {spans} keep vanishing from the cache")

    # -- read-ahead and background -----------------------------------------------------------

    def _start_read_ahead(self, last: SpanId, stop: SpanId) -> None:
        """Start a pipelined read-ahead task in the layer's scope when the policy says so, or
        when the span after `last` (up to `stop`) is worth inflating ahead of the reader."""
        assert self._tasks is not None
        window = self.read_ahead.pipelined_window(last, stop, self.fetcher.missing)
        after = SpanId(last + 1)
        inflate = after if after <= stop and self._worth_inflating(after) else None
        if window is None and inflate is None:
            return
        if inflate is not None:
            self._inflating_ahead.add(inflate)
        # False: the scope is closing, the layer is going away; nothing to do
        if not self._tasks.start_soon(
            self._read_ahead_task, window or range(0), inflate, name="read-ahead"
        ):
            self._inflating_ahead.discard(after)

    def _worth_inflating(self, span: SpanId) -> bool:
        """Whether inflating `span` now saves a sequential reader the wait for it: it exists,
        it is neither in memory nor in the inflated tier, and no task inflates it already."""
        if span >= len(self.table) or span in self._inflating_ahead:
            return False
        if self.table.state(span) is SpanState.INFLATED:
            return False
        tier = self.inflater.tier
        return tier is None or not tier.contains(
            self.layer, self.span_map.uncompressed_range(span)[0]
        )

    async def _read_ahead_task(self, window: range, inflate: SpanId | None) -> None:
        """Fetch the window's missing spans, then make `inflate` (the span after the read's
        last) local and inflated, so the reader's next span is ready when it gets there: the
        read-ahead task's boundary. A `FetchError` or `ZinfoError` is counted and ends the
        task (the read that needs the span tries again); anything else is counted and raised
        to the scope's boundary, which logs it."""
        try:
            if window:
                await self.fetcher.fetch_missing(window)
            if inflate is not None:
                await self._load([inflate], range(0))
        except (FetchError, ZinfoError, LayerReadError) as e:
            self.counters.record_error(f"read-ahead: {e}")
        except Exception as e:
            self.counters.record_error(f"read-ahead: {type(e).__name__}: {e}")
            raise
        finally:
            if inflate is not None:
                self._inflating_ahead.discard(inflate)

    async def prefetch_step(self, max_bytes: int) -> int:
        """Fetch the next run of missing spans (background work, not inflated).

        Returns the compressed bytes fetched, 0 when nothing is missing. Raises `LayerClosed`
        when the layer is closed (no request made), else the request's error (`FetchError`,
        or anything else the source raised) for the caller's boundary.
        """
        if self.closed:
            raise LayerClosed(f"layer {self.layer}: unmounted")
        return await self.fetcher.step(max_bytes)
