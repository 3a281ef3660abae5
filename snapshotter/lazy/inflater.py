"""Inflation of one layer's spans and its two caches: the memory LRU and the inflated tier.

A span is inflated from verified compressed bytes (just fetched, or read back from the span
cache, which hashes them) in a worker thread behind the shared inflate limiter; concurrent
readers of one span share one inflation (`SingleFlight`). The latest inflated spans stay in
memory (state INFLATED): at most `memory_spans` of the layer, and all layers together at most
the byte budget of the daemon-wide `SpanMemory` they share (least recently used first out,
across layers); every inflated span is also written to the inflated disk tier
(`SpanCache.inflated`, when configured), keyed by its tar-stream start.

The tier is not a state of the span table: the table tracks the compressed bytes (what is
fetched, what progress reports), the tier only saves inflation. A read whose spans are all in
the memory LRU or the tier is served by `read_local` with one positioned read per span of
just the bytes it needs (on the trio thread when a small read finds them all in the page
cache, else in one worker thread), without touching the table (so it also works
after the compressed copy was evicted: no refetch). A tier miss falls back to fetch + inflate.

Errors: `SpanGone` (the compressed copy of a CACHED span vanished or was corrupt: the caller
fetches it again) and `index.zinfo.ZinfoError` (verified bytes that do not inflate) are raised
bare, for the reader to translate. Units: bytes; tar-stream offsets.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import trio

from index.digest import Digest
from index.model import SpanId, UncompressedOffset
from index.zinfo import SpanMap, SpanSlice, assemble
from snapshotter.lazy.cache import InflatedCache, SpanCache
from snapshotter.lazy.table import SpanState, SpanTable
from snapshotter.singleflight import SingleFlight

TIER_READ_THREADS = trio.CapacityLimiter(16)
"""Worker threads reading inflated spans back from the memory LRU and the tier (local
`pread`s, all layers); reads that miss them inflate under the inflate limiter instead."""

INLINE_TIER_READ_BYTES = 256 * 1024
"""Reads of at most this many bytes try the inflated tier on the trio thread first (page-cache
bytes only: `InflatedCache.read_cached`): checking their block sums there costs less than a
thread hop; larger reads always go to a worker thread."""

log = logging.getLogger(__name__)


_TierRead = Callable[[Digest, UncompressedOffset, int, int, int], bytes | None]
"""`InflatedCache.read` or `read_cached`."""


class _TierPlan(NamedTuple):
    """A read from the memory LRU and the inflated tier: each slice with its span's bytes
    when they are in memory (None: read it from `tier`)."""

    tier: InflatedCache
    parts: list[tuple[SpanSlice, bytes | None]]


class SpanGone(Exception):
    """The disk copy of a CACHED span is gone or corrupt: fetch it again."""


class SpanMemory:
    """The byte budget of inflated spans kept in memory, shared by the `SpanInflater`s of
    every layer: one LRU across layers. Use from the trio thread.

    Holds the order and sizes only (the bytes stay with their inflater) and its inflaters
    weakly: a layer's spans leave the budget when its inflater is collected. The newest span
    is kept even when it alone is over `budget_bytes`.
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must not be negative, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._used = 0
        self._lru: OrderedDict[tuple[int, SpanId], int] = OrderedDict()
        self._owners: dict[int, weakref.ref[SpanInflater]] = {}
        self._spans: dict[int, set[SpanId]] = {}
        self._gone: deque[int] = deque()
        """Keys of collected inflaters: the garbage collector may run in any thread, or in
        the middle of a method here, so its callback only notes them (`_reap`)."""

    def __repr__(self) -> str:
        return f"<SpanMemory {self.used_bytes}/{self.budget_bytes} bytes, {len(self)} spans>"

    def __len__(self) -> int:
        self._reap()
        return len(self._lru)

    @property
    def used_bytes(self) -> int:
        """Inflated bytes in memory, all layers."""
        self._reap()
        return self._used

    def add(self, owner: SpanInflater, span: SpanId, size: int) -> None:
        """Count `owner`'s new in-memory span, then evict the least recently used spans (of
        any layer) until the budget holds again."""
        self._reap()
        key = id(owner)
        if key not in self._owners:
            self._owners[key] = weakref.ref(owner, functools.partial(self._collected, key))
            self._spans[key] = set()
        self._lru[(key, span)] = size
        self._lru.move_to_end((key, span))
        self._spans[key].add(span)
        self._used += size
        while self._used > self.budget_bytes and len(self._lru) > 1:
            (old_key, old_span), old_size = self._lru.popitem(last=False)
            self._used -= old_size
            self._spans[old_key].discard(old_span)
            old_owner = self._owners[old_key]()
            if old_owner is not None:
                old_owner.drop(old_span)

    def touch(self, owner: SpanInflater, span: SpanId) -> None:
        """`owner`'s span was used: now the most recently used."""
        key = (id(owner), span)
        if key in self._lru:
            self._lru.move_to_end(key)

    def remove(self, owner: SpanInflater, span: SpanId) -> None:
        """`owner` let go of its span itself."""
        size = self._lru.pop((id(owner), span), None)
        if size is not None:
            self._used -= size
            self._spans[id(owner)].discard(span)

    def _collected(self, key: int, _ref: object) -> None:
        self._gone.append(key)

    def _reap(self) -> None:
        """Collected inflaters' spans leave the budget (their bytes went with them). Before
        a new inflater is counted: it may have the id of one collected meanwhile."""
        while self._gone:
            key = self._gone.popleft()
            self._owners.pop(key, None)
            for span in self._spans.pop(key, ()):
                self._used -= self._lru.pop((key, span), 0)


class SpanInflater:
    """Inflated spans of `layer` (see the module doc). Use from the trio thread.

    `table` is the layer's span table (this object moves spans CACHED ↔ INFLATED, and CACHED →
    UNREQUESTED when the disk copy is gone). `limiter` bounds inflation threads (CPU-bound,
    shared by all layers). `memory` is the daemon-wide budget of in-memory spans (default: one
    of this layer's own, unbounded in bytes, so `memory_spans` alone bounds it). Nothing here
    needs closing.
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
        memory: SpanMemory | None = None,
    ) -> None:
        self.layer = layer
        self.span_map = span_map
        self.cache = cache
        self.table = table
        self.memory_spans = memory_spans
        self.memory = memory if memory is not None else SpanMemory(1 << 62)
        self.tier: InflatedCache | None = cache.inflated
        self._limiter = limiter
        self._lru: OrderedDict[SpanId, bytes] = OrderedDict()
        self._flight: SingleFlight[SpanId, bytes] = SingleFlight()

    def __repr__(self) -> str:
        return f"<SpanInflater {self.layer} memory={len(self._lru)}/{self.memory_spans}>"

    async def inflate_all(
        self,
        spans: Sequence[SpanId],
        compressed: Mapping[SpanId, bytes],
        inflated: Mapping[SpanId, bytes] | None = None,
    ) -> list[bytes]:
        """The inflated `spans`, in parallel; `compressed` has the bytes of spans just fetched
        (the others are read from the span cache), `inflated` spans already inflated from
        verified bytes (kept in memory here, not inflated again). Raises `ZinfoError`
        (preferred) or `SpanGone`, bare."""
        if inflated:  # kept once the others are in hand (keeping them may evict those)
            try:
                if all(span in inflated for span in spans):
                    return [inflated[span] for span in spans]
                return await self._inflate_all(spans, compressed, inflated)
            finally:
                for span, data in inflated.items():
                    self.adopt(span, data)
        return await self._inflate_all(spans, compressed, {})

    async def _inflate_all(
        self,
        spans: Sequence[SpanId],
        compressed: Mapping[SpanId, bytes],
        inflated: Mapping[SpanId, bytes],
    ) -> list[bytes]:
        if len(spans) == 1:
            return [await self.inflate(spans[0], compressed.get(spans[0]))]
        hits = self._memory_hits(spans)
        if hits is not None:  # all in memory: no tasks to start
            return hits
        results: list[bytes] = [b""] * len(spans)
        errors: list[Exception] = []

        async def one(i: int, span: SpanId) -> None:
            try:
                if span in inflated:
                    results[i] = inflated[span]
                    return
                results[i] = await self.inflate(span, compressed.get(span))
            except Exception as e:  # re-raised bare below, not in an ExceptionGroup
                errors.append(e)

        async with trio.open_nursery() as nursery:
            for i, span in enumerate(spans):
                nursery.start_soon(one, i, span)
        if errors:
            raise next((e for e in errors if not isinstance(e, SpanGone)), errors[0])
        return results

    def _memory_hits(self, spans: Sequence[SpanId]) -> list[bytes] | None:
        """The inflated `spans` when every one is in the memory LRU (now the most recently
        used), else None (and nothing touched)."""
        lru = self._lru
        hits: list[bytes] = []
        for span in spans:
            hit = lru.get(span)
            if hit is None:
                return None
            hits.append(hit)
        for span in spans:
            lru.move_to_end(span)
            self.memory.touch(self, span)
        return hits

    async def inflate(self, span: SpanId, compressed: bytes | None) -> bytes:
        """The inflated span, from memory or inflated now. Raises `SpanGone`, `ZinfoError`."""
        hit = self._lru.get(span)
        if hit is not None:
            self._lru.move_to_end(span)
            self.memory.touch(self, span)
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
            self._keep(span, data)
        return data

    def _keep(self, span: SpanId, data: bytes) -> None:
        """CACHED `span` is INFLATED now: `data` joins the memory LRU (evicting down to the
        layer's and the daemon's budgets)."""
        self.table.set(span, SpanState.INFLATED)
        self._lru[span] = data
        while len(self._lru) > self.memory_spans:
            old = next(iter(self._lru))
            self.memory.remove(self, old)
            self.drop(old)
        self.memory.add(self, span, len(data))

    def adopt(self, span: SpanId, data: bytes) -> None:
        """Keep `data` in memory as if inflated here: the span inflated elsewhere from
        verified bytes (`ArrivingRun`, which queued it for the tier: `keep_in_tier`). Nothing
        when the span is not CACHED (already in memory, or gone)."""
        if self.table.state(span) is SpanState.CACHED:
            self._keep(span, data)

    def keep_in_tier(self, span: SpanId, data: bytes) -> None:
        """In a worker thread: queue the inflated span for the inflated tier, as an inflation
        here does (blocks while the tier's writer is behind)."""
        if self.tier is not None:
            start, end = self.span_map.uncompressed_range(span)
            if len(data) == end - start:
                self.tier.put_later(self.layer, start, data)

    def drop(self, span: SpanId) -> None:
        """Let go of the in-memory copy of `span` (INFLATED → CACHED); `SpanMemory` calls this
        to evict it. Nothing when it is not in memory."""
        if self._lru.pop(span, None) is not None:
            self.table.set(span, SpanState.CACHED)

    def _load_inflate(self, span: SpanId, compressed: bytes | None) -> bytes:
        """In a worker thread: the verified compressed span (given, or from the cache, which
        hashes it) inflated, and queued for the inflated tier. Raises `SpanGone`, `ZinfoError`.
        """
        if compressed is None:
            compressed = self.cache.get(self.layer, span, self.span_map.span_digests[span])
            if compressed is None:
                raise SpanGone(f"layer {self.layer}: span {span} left the span cache")
        data = self.span_map.inflate(span, compressed)
        self.keep_in_tier(span, data)
        return data

    def at_hand(self, span: SpanId, start: UncompressedOffset) -> bool:
        """Whether `span` (starting at tar offset `start`) is inflated at hand: in the memory
        LRU or the inflated tier (no I/O; the tier's bytes may still be off the page cache)."""
        return span in self._lru or (
            self.tier is not None and self.tier.contains(self.layer, start)
        )

    def read_now(self, slices: Sequence[SpanSlice]) -> bytes | None:
        """The bytes of `slices` when they are at hand: every span in the memory LRU (now the
        most recently used), or a read of up to `INLINE_TIER_READ_BYTES` from the LRU and the
        inflated tier's page cache (verified, `InflatedCache.read_cached`). None otherwise:
        nothing here waits for I/O beyond a page-cache `pread`."""
        hits = self._memory_hits([s.span for s in slices])
        if hits is not None:
            return assemble(slices, hits)
        plan = self._tier_plan(slices)
        if plan is None or sum(s.hi - s.lo for s in slices) > INLINE_TIER_READ_BYTES:
            return None
        return self._gather(plan, plan.tier.read_cached)

    async def read_local(self, slices: Sequence[SpanSlice]) -> bytes | None:
        """The bytes of `slices` from the memory LRU and the inflated tier, or None when a
        span is in neither (or the tier lost it meanwhile). None too when every span is in
        the LRU (the ordinary path serves those without a thread hop) or there is no tier.
        Reads of up to `INLINE_TIER_READ_BYTES` whose tier bytes are all in the page cache are
        read here, verified, without a thread hop (`InflatedCache.read_cached`); the others in
        one worker thread."""
        plan = self._tier_plan(slices)
        if plan is None:
            return None
        if sum(s.hi - s.lo for s in slices) <= INLINE_TIER_READ_BYTES:
            data = self._gather(plan, plan.tier.read_cached)
            if data is not None:
                return data
        return await trio.to_thread.run_sync(
            self._gather, plan, plan.tier.read, limiter=TIER_READ_THREADS
        )

    def _tier_plan(self, slices: Sequence[SpanSlice]) -> _TierPlan | None:
        """Where each slice's span is, when each is in the memory LRU or the inflated tier
        and at least one only in the tier; None otherwise (or without a tier)."""
        tier = self.tier
        if tier is None:
            return None
        parts: list[tuple[SpanSlice, bytes | None]] = []
        from_disk = False
        for s in slices:
            hit = self._lru.get(s.span)
            if hit is None:
                if not tier.contains(self.layer, s.start):
                    return None
                from_disk = True
            parts.append((s, hit))
        return _TierPlan(tier, parts) if from_disk else None

    def _gather(self, plan: _TierPlan, read: _TierRead) -> bytes | None:
        """The plan's bytes: the in-memory ones sliced, the others through `read` (the tier's
        `read_cached`, page cache only, or `read`, in a worker thread); None on a miss."""
        parts: list[bytes] = []
        for s, hit in plan.parts:
            part = (
                hit[s.lo : s.hi]
                if hit is not None
                else read(self.layer, s.start, s.length, s.lo, s.hi - s.lo)
            )
            if part is None:
                return None
            parts.append(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)
