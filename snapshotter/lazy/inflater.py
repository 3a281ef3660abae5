"""Inflation of one layer's spans and its two caches: the memory LRU and the inflated tier.

A span is inflated from verified compressed bytes (just fetched, or read back from the span
cache, which hashes them) in a worker thread behind the shared inflate limiter; concurrent
readers of one span share one inflation (`SingleFlight`). The last `memory_spans` inflated
spans stay in memory (state INFLATED); every inflated span is also written to the inflated
disk tier (`SpanCache.inflated`, when configured), keyed by its tar-stream start.

The tier is not a state of the span table: the table tracks the compressed bytes (what is
fetched, what progress reports), the tier only saves inflation. A read whose spans are all in
the memory LRU or the tier is served by `read_local` with one positioned read per span of
just the bytes it needs, in one worker thread, without touching the table (so it also works
after the compressed copy was evicted: no refetch). A tier miss falls back to fetch + inflate.

Errors: `SpanGone` (the compressed copy of a CACHED span vanished or was corrupt: the caller
fetches it again) and `index.zinfo.ZinfoError` (verified bytes that do not inflate) are raised
bare, for the reader to translate. Units: bytes; tar-stream offsets.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import trio

from index.digest import Digest
from index.model import SpanId
from index.zinfo import SpanMap, SpanSlice
from snapshotter.lazy.cache import CacheError, InflatedCache, SpanCache
from snapshotter.lazy.table import SpanState, SpanTable
from snapshotter.singleflight import SingleFlight

TIER_READ_THREADS = trio.CapacityLimiter(16)
"""Worker threads reading inflated spans back from the memory LRU and the tier (local
`pread`s, all layers); reads that miss them inflate under the inflate limiter instead."""

log = logging.getLogger(__name__)


class SpanGone(Exception):
    """The disk copy of a CACHED span is gone or corrupt: fetch it again."""


class SpanInflater:
    """Inflated spans of `layer` (see the module doc). Use from the trio thread.

    `table` is the layer's span table (this object moves spans CACHED ↔ INFLATED, and CACHED →
    UNREQUESTED when the disk copy is gone). `limiter` bounds inflation threads (CPU-bound,
    shared by all layers). Nothing here needs closing.
    """

    def __init__(
        self,
        layer: Digest,
        span_map: SpanMap,
        cache: SpanCache,
        table: SpanTable,
        *,
        memory_spans: int,
        limiter: trio.CapacityLimiter,
    ) -> None:
        self.layer = layer
        self.span_map = span_map
        self.cache = cache
        self.table = table
        self.memory_spans = memory_spans
        self.tier: InflatedCache | None = cache.inflated
        self._limiter = limiter
        self._lru: OrderedDict[SpanId, bytes] = OrderedDict()
        self._flight: SingleFlight[SpanId, bytes] = SingleFlight()
        self._tier_warned = False

    def __repr__(self) -> str:
        return f"<SpanInflater {self.layer} memory={len(self._lru)}/{self.memory_spans}>"

    async def inflate_all(
        self, spans: Sequence[SpanId], compressed: Mapping[SpanId, bytes]
    ) -> list[bytes]:
        """The inflated `spans`, in parallel; `compressed` has the bytes of spans just fetched
        (the others are read from the span cache). Raises `ZinfoError` (preferred) or
        `SpanGone`, bare."""
        if len(spans) == 1:
            return [await self.inflate(spans[0], compressed.get(spans[0]))]
        results: list[bytes] = [b""] * len(spans)
        errors: list[Exception] = []

        async def one(i: int, span: SpanId) -> None:
            try:
                results[i] = await self.inflate(span, compressed.get(span))
            except Exception as e:  # re-raised bare below, not in an ExceptionGroup
                errors.append(e)

        async with trio.open_nursery() as nursery:
            for i, span in enumerate(spans):
                nursery.start_soon(one, i, span)
        if errors:
            raise next((e for e in errors if not isinstance(e, SpanGone)), errors[0])
        return results

    async def inflate(self, span: SpanId, compressed: bytes | None) -> bytes:
        """The inflated span, from memory or inflated now. Raises `SpanGone`, `ZinfoError`."""
        hit = self._lru.get(span)
        if hit is not None:
            self._lru.move_to_end(span)
            return hit
        return await self._flight.do(span, functools.partial(self._inflate, span, compressed))

    async def _inflate(self, span: SpanId, compressed: bytes | None) -> bytes:
        try:
            data: bytes = await trio.to_thread.run_sync(
                self._load_inflate, span, compressed, limiter=self._limiter
            )
        except SpanGone:
            if self.table.state(span) is SpanState.CACHED:
                self.table.set(span, SpanState.UNREQUESTED)
            raise
        if self.table.state(span) is SpanState.CACHED:
            self.table.set(span, SpanState.INFLATED)
            self._lru[span] = data
            while len(self._lru) > self.memory_spans:
                old, _ = self._lru.popitem(last=False)
                self.table.set(old, SpanState.CACHED)
        return data

    def _load_inflate(self, span: SpanId, compressed: bytes | None) -> bytes:
        """In a worker thread: the verified compressed span (given, or from the cache, which
        hashes it) inflated, and written to the inflated tier. Raises `SpanGone`, `ZinfoError`.
        """
        if compressed is None:
            compressed = self.cache.get(self.layer, span, self.span_map.span_digests[span])
            if compressed is None:
                raise SpanGone(f"layer {self.layer}: span {span} left the span cache")
        data = self.span_map.inflate(span, compressed)
        if self.tier is not None:
            start, end = self.span_map.uncompressed_range(span)
            if len(data) == end - start:
                try:
                    self.tier.put(self.layer, start, data)
                except CacheError as e:
                    if not self._tier_warned:  # once per layer: a full disk would flood the log
                        self._tier_warned = True
                        log.warning("layer %s: inflated span %d not kept: %s", self.layer, span, e)
        return data

    async def read_local(self, slices: Sequence[SpanSlice]) -> bytes | None:
        """The bytes of `slices` from the memory LRU and the inflated tier, or None when a
        span is in neither (or the tier lost it meanwhile). None too when every span is in
        the LRU (the ordinary path serves those without a thread hop) or there is no tier."""
        tier = self.tier
        if tier is None:
            return None
        plan: list[tuple[SpanSlice, bytes | None]] = []
        from_disk = False
        for s in slices:
            hit = self._lru.get(s.span)
            if hit is None:
                if not tier.contains(self.layer, s.start):
                    return None
                from_disk = True
            plan.append((s, hit))
        if not from_disk:
            return None

        def load() -> bytes | None:
            parts: list[bytes] = []
            for s, hit in plan:
                part = (
                    hit[s.lo : s.hi]
                    if hit is not None
                    else tier.read(self.layer, s.start, s.length, s.lo, s.hi - s.lo)
                )
                if part is None:
                    return None
                parts.append(part)
            return parts[0] if len(parts) == 1 else b"".join(parts)

        return await trio.to_thread.run_sync(load, limiter=TIER_READ_THREADS)
