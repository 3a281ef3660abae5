"""`SpanServer`: what the peer listener answers with, span-aligned ranges of layer blobs.

A range is served from the layer's span fetcher, so a peer's request and this node's own
reads share one fetch of a span (the span table's FETCHING state is the singleflight across
every requester, local or remote):

- a layer mounted here: the mounted reader's fetcher;
- any other layer this node is asked to own: a fetcher of its own, built from the zTOC the
  requester names (from the local store, else fetched from the registry with this node's own
  credentials and checked against its digest), kept in a small LRU.

Spans already in the span cache are read from it (each checked against its digest by the
cache). Missing spans are fetched only when the requester allows it (`fetch`, the owner
protocol), from this node's upstream only (`SERVING_PEER`: no peer hops), within the
requester's budget; otherwise the answer is "not here".

Errors are one table, `ServeError.status`: 404 not held here (and not fetched), 416 not a
span-aligned range of the blob, 503 could not fetch it now (the registry refused or failed,
no credentials, out of time). Nothing else escapes.
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from index.digest import Digest
from index.model import SpanId, Ztoc
from index.oci.reference import Reference
from index.zinfo import SpanMap
from snapshotter.lazy.cache import SpanCache
from snapshotter.lazy.demand import DemandTracker
from snapshotter.lazy.fetcher import LayerCounters, SpanFetcher
from snapshotter.lazy.sources import BlobSource, FetchError
from snapshotter.lazy.table import SpanState, SpanTable
from snapshotter.singleflight import SingleFlight

from .source import SERVING_PEER

log = logging.getLogger(__name__)

MAX_OWNED_LAYERS: Final = 32
"""Fetchers of layers not mounted here kept for peers (their span tables)."""

CACHE_READ_THREADS: Final = trio.CapacityLimiter(4)
"""Worker threads reading span-cache files for peers (all requests)."""

ZtocLoader = Callable[[Reference, Digest], Awaitable[Ztoc]]
"""Loads a zTOC by digest (local store, else the registry of `ref`); raises on failure."""


class MountedLayers(Protocol):
    def fetcher_for(self, layer: Digest) -> SpanFetcher | None:
        """The span fetcher of a layer mounted here, or None."""
        ...


class ServeError(Exception):
    """A peer request that cannot be answered with bytes; `status` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class ServeStatistics:
    """What the listener served: requests answered with bytes, those bytes, spans fetched
    upstream for peers, and refusals by status."""

    served: int = 0
    bytes_served: int = 0
    fetched_for_peers: int = 0
    not_found: int = 0
    unavailable: int = 0


class SpanServer:
    """Serves span-aligned ranges of layers (see the module doc). Use from the trio thread."""

    def __init__(
        self,
        *,
        layers: MountedLayers,
        cache: SpanCache,
        load_ztoc: ZtocLoader,
        upstream: Callable[[Reference], BlobSource],
        tracker: DemandTracker,
        io_limiter: trio.CapacityLimiter,
        max_request_bytes: int,
    ) -> None:
        self._layers = layers
        self._cache = cache
        self._load_ztoc = load_ztoc
        self._upstream = upstream
        self._tracker = tracker
        self._io_limiter = io_limiter
        self._max_request_bytes = max_request_bytes
        self._owned: OrderedDict[Digest, SpanFetcher] = OrderedDict()
        self._loading: SingleFlight[Digest, SpanFetcher] = SingleFlight()
        self.stats = ServeStatistics()

    def __repr__(self) -> str:
        return f"<SpanServer owned={len(self._owned)} served={self.stats.served}>"

    def fetcher_for(self, layer: Digest) -> SpanFetcher | None:
        """The span fetcher of `layer`: mounted here, else one kept for peers; or None."""
        return self._layers.fetcher_for(layer) or self._owned.get(layer)

    async def serve_range(
        self,
        ref: Reference,
        layer: Digest,
        ztoc: Digest | None,
        start: int,
        end: int,
        *,
        fetch: bool,
        budget_sec: float,
    ) -> bytes:
        """The verified bytes `[start, end)` of `layer`. Raises `ServeError`."""
        try:
            data = await self._serve(ref, layer, ztoc, start, end, fetch, budget_sec)
        except ServeError as e:
            if e.status == 404:
                self.stats.not_found += 1
            elif e.status == 503:
                self.stats.unavailable += 1
            raise
        self.stats.served += 1
        self.stats.bytes_served += len(data)
        return data

    async def _serve(
        self,
        ref: Reference,
        layer: Digest,
        ztoc: Digest | None,
        start: int,
        end: int,
        fetch: bool,
        budget_sec: float,
    ) -> bytes:
        with trio.move_on_after(budget_sec) as scope:
            fetcher = self._layers.fetcher_for(layer)
            if fetcher is None:
                if ztoc is None:
                    raise ServeError(404, f"layer {layer} is not served here")
                fetcher = await self._owned_layer(ref, layer, ztoc, fetch)
            spans = _spans_between(fetcher.span_map, start, end)
            token = SERVING_PEER.set(True)
            try:
                return await self._read(fetcher, spans, fetch)
            finally:
                SERVING_PEER.reset(token)
        assert scope.cancelled_caught
        raise ServeError(503, f"bytes {start}-{end} of {layer}: not fetched within {budget_sec} s")

    async def _read(self, fetcher: SpanFetcher, spans: Sequence[SpanId], fetch: bool) -> bytes:
        layer = fetcher.layer
        for _ in range(2):  # a span evicted between fetch and read is fetched once more
            if not fetch and any(
                fetcher.table.state(s) is SpanState.FETCHING or fetcher.missing(s) for s in spans
            ):
                raise ServeError(404, f"layer {layer}: spans {spans[0]}-{spans[-1]} not here")
            got: dict[SpanId, bytes] = {}
            if fetch:
                before = fetcher.counters.network_bytes
                try:
                    got = await fetcher.ensure(spans)
                except FetchError as e:
                    raise ServeError(503, f"layer {layer}: {e}") from e
                if fetcher.counters.network_bytes > before:
                    self.stats.fetched_for_peers += 1
            parts: list[bytes] = []
            # gzip spans share a boundary byte: each span's bytes go from where the last ended
            covered = fetcher.span_map.compressed_range(spans[0])[0]
            for span in spans:
                span_start, span_end = fetcher.span_map.compressed_range(span)
                data = got.get(span)
                if data is None:
                    data = await trio.to_thread.run_sync(
                        self._cache.get,
                        layer,
                        span,
                        fetcher.span_map.span_digests[span],
                        limiter=CACHE_READ_THREADS,
                    )
                if data is None:
                    # evicted or corrupt: fetched again next time. An INFLATED span keeps its
                    # state (its reader has it in memory); this node cannot send it now.
                    if fetcher.table.state(span) is SpanState.CACHED:
                        fetcher.table.set(span, SpanState.UNREQUESTED)
                    break
                parts.append(data[covered - span_start :] if covered > span_start else data)
                covered = span_end
            else:
                return b"".join(parts)
        raise ServeError(503 if fetch else 404, f"layer {layer}: spans vanished from the cache")

    async def _owned_layer(
        self, ref: Reference, layer: Digest, ztoc: Digest, fetch: bool
    ) -> SpanFetcher:
        owned = self._owned.get(layer)
        if owned is not None:
            self._owned.move_to_end(layer)
            return owned
        if not fetch:
            raise ServeError(404, f"layer {layer} is not served here")

        async def load() -> SpanFetcher:
            try:
                z = await self._load_ztoc(ref, ztoc)
                span_map = SpanMap.from_ztoc(z)
            except Exception as e:  # registry, store or format: the owner cannot serve it
                raise ServeError(503, f"zTOC {ztoc} of {layer}: {e}") from e
            made = self._make_fetcher(ref, layer, span_map)
            self._owned[layer] = made
            while len(self._owned) > MAX_OWNED_LAYERS:
                self._owned.popitem(last=False)
            return made

        return await self._loading.do(layer, load)

    def _make_fetcher(self, ref: Reference, layer: Digest, span_map: SpanMap) -> SpanFetcher:
        sizes = [end - start for start, end in map(span_map.compressed_range, _ids(span_map))]
        table = SpanTable(sizes)
        for span in self._cache.spans_of(layer):
            if 0 <= span < len(table):
                table.set(span, SpanState.CACHED)
        return SpanFetcher(
            layer,
            span_map,
            self._upstream(ref),
            self._cache,
            table,
            max_request_bytes=self._max_request_bytes,
            tracker=self._tracker,
            io_limiter=self._io_limiter,
            counters=LayerCounters(),
        )


def _ids(span_map: SpanMap) -> list[SpanId]:
    return [SpanId(i) for i in range(span_map.span_count)]


def _spans_between(span_map: SpanMap, start: int, end: int) -> list[SpanId]:
    """The spans exactly covering `[start, end)` (the first starts at `start`, the last ends
    at `end`; neighbours may share a byte); ServeError 416 when the range does not begin and
    end on span boundaries. Binary searches over the spans' start and end offsets."""
    ids = range(span_map.span_count)
    first = bisect.bisect_left(ids, start, key=lambda s: span_map.compressed_range(SpanId(s))[0])
    last = bisect.bisect_left(ids, end, key=lambda s: span_map.compressed_range(SpanId(s))[1])
    if (
        end <= start
        or first >= len(ids)
        or span_map.compressed_range(SpanId(first))[0] != start
        or last >= len(ids)
        or span_map.compressed_range(SpanId(last))[1] != end
        or last < first
    ):
        raise ServeError(416, f"range {start}-{end} is not a run of whole spans")
    return [SpanId(i) for i in range(first, last + 1)]
