"""`SpanBlobs`: whole layer blobs served from this node's span cache (the mirror's second source).

A lazily pulled layer whose background fetch has finished holds every span of its blob in
the span cache, each verified against its zTOC digest. Together they are the whole
compressed blob except the bytes before the first span (a gzip stream's header, usually 10
bytes) and any after the last one (none for gzip: its last span runs to the end of the
blob, trailer included). So the mirror can serve such a layer to containerd as an ordinary
blob, whole or by range, without this node's containerd holding it.

A layer is offered only when

- it has a span fetcher here (a mounted lazy layer, or one this node serves to peers),
- every span is in the span cache and none is being fetched,
- the spans are contiguous (neighbouring gzip spans may share one byte, never leave a gap),
- and the whole blob, head + spans + tail, hashes to the layer digest.

The head and tail come once per layer from the layer's repository upstream (`upstream(ref)`:
hosts.toml mirrors, then the registry; never peers, whose owners serve only span-aligned
ranges). The whole-blob check runs once per layer and span map in a task of `tasks` (a
lookup that gives up waiting for it does not stop it, so the next lookup finds it done),
reading the spans from the cache in one worker thread. Its result is remembered (a bounded
LRU of layers): a blob that does not match its digest is never served (one `mirror spans do
not make the layer` warning, keys `layer`, `digest`); a check that could not finish (the
head could not be fetched, a span left the cache) is forgotten and tried again on the next
lookup.

Streaming `[start, end)` reads the head, then each span's file from the cache (verified
against its span digest by the cache), without repeating the byte neighbouring gzip spans
share. A span evicted since the lookup is fetched again through the layer's fetcher (its
span digest checked), so an answer already started is not cut for it; `SpanBlobError` when
that fails too.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

import trio

from index.digest import Digest
from index.model import CompressedOffset, SpanId
from index.oci.reference import Reference
from index.zinfo import SpanMap
from snapshotter.lazy.cache import SpanCache
from snapshotter.lazy.fetcher import SpanFetcher
from snapshotter.lazy.sources import BlobSource, FetchError
from snapshotter.lazy.table import SpanState
from snapshotter.tasks import TaskScope

log = logging.getLogger(__name__)

MAX_REMEMBERED_LAYERS: Final = 256
"""Layers whose whole-blob check result (and head bytes) are kept."""

CHECK_THREADS: Final = trio.CapacityLimiter(1)
"""Worker threads hashing whole blobs out of the span cache (all layers): one at a time, so
checks never take the disk from readers."""

READ_THREADS: Final = trio.CapacityLimiter(4)
"""Worker threads reading span files for mirror answers (all layers)."""


class LayerFetchers(Protocol):
    """The span fetchers this node has (`SpanServer`: mounted layers and those it serves to
    peers)."""

    def fetcher_for(self, layer: Digest) -> SpanFetcher | None:
        """The span fetcher of `layer`, or None."""
        ...


class SpanBlobError(Exception):
    """A blob's bytes could not be read from the span cache (nor fetched again)."""


@dataclass(slots=True)
class SpanBlobStatistics:
    """Whole-blob checks that passed, that failed (never served), and that could not finish."""

    checked: int = 0
    mismatched: int = 0
    incomplete: int = 0


@dataclass(slots=True)
class _Blob:
    """One layer's whole-blob check: for the span map with `digests`, the `head` and `tail`
    bytes around the spans; `good` once the whole blob matched its digest."""

    digests: tuple[str, ...]
    done: trio.Event = field(default_factory=trio.Event)
    good: bool = False
    head: bytes = b""
    tail: bytes = b""


class SpanBlobs:
    """Layer blobs out of the span cache (see the module doc). Use from the trio thread."""

    def __init__(
        self,
        *,
        layers: LayerFetchers,
        cache: SpanCache,
        upstream: Callable[[Reference], BlobSource],
        tasks: TaskScope,
    ) -> None:
        self._layers = layers
        self._cache = cache
        self._upstream = upstream
        self._tasks = tasks
        self._blobs: OrderedDict[Digest, _Blob] = OrderedDict()
        self.stats = SpanBlobStatistics()

    def __repr__(self) -> str:
        good = sum(1 for b in self._blobs.values() if b.good)
        return f"<SpanBlobs remembered={len(self._blobs)} good={good}>"

    async def size(self, ref: Reference, layer: Digest) -> int | None:
        """The size in bytes of blob `layer` when it can be served from the span cache (every
        span cached, the whole blob checked against `layer`), else None. Waits for the check
        the first time (the caller bounds the wait; the check goes on without it). Never
        raises but `trio.Cancelled`."""
        fetcher = self._layers.fetcher_for(layer)
        if fetcher is None or not _complete(fetcher, self._cache):
            return None
        span_map = fetcher.span_map
        blob = self._blobs.get(layer)
        if blob is None or blob.digests != span_map.span_digests:
            if _gap(span_map) is not None:
                return None
            blob = _Blob(span_map.span_digests)
            if not self._tasks.start_soon(
                self._check, ref, fetcher, blob, name=f"mirror check {layer}"
            ):
                return None
            self._blobs[layer] = blob
            while len(self._blobs) > MAX_REMEMBERED_LAYERS:
                self._blobs.popitem(last=False)
        self._blobs.move_to_end(layer)
        await blob.done.wait()
        return span_map.compressed_archive_size if blob.good else None

    async def stream(self, layer: Digest, start: int, end: int) -> AsyncGenerator[bytes, None]:
        """The bytes `[start, end)` of blob `layer`, which `size` accepted. Raises
        `SpanBlobError` when the layer is no longer here or a span cannot be read."""
        fetcher = self._layers.fetcher_for(layer)
        blob = self._blobs.get(layer)
        if fetcher is None or blob is None or not blob.good:
            raise SpanBlobError(f"layer {layer} is not served from the span cache")
        span_map = fetcher.span_map
        if blob.digests != span_map.span_digests:
            raise SpanBlobError(f"layer {layer}: its span map changed since it was checked")
        size = span_map.compressed_archive_size
        end = min(end, size)
        n = span_map.span_count
        first_start = span_map.compressed_range(SpanId(0))[0] if n else size
        last_end = span_map.compressed_range(SpanId(n - 1))[1] if n else size
        if start < first_start:
            yield blob.head[start : min(end, first_start)]
        # the first span holding a byte at or past `start` (spans are in blob order)
        i = bisect.bisect_right(
            range(n), max(start, first_start), key=lambda s: span_map.compressed_range(SpanId(s))[1]
        )
        while i < n:
            span = SpanId(i)
            span_start, span_end = span_map.compressed_range(span)
            # a span's own bytes begin where its predecessor's end (they may share one byte)
            own = span_map.compressed_range(SpanId(i - 1))[1] if i else span_start
            if own >= end:
                break
            data = await self._span_bytes(fetcher, span)
            yield data[max(own, start) - span_start : min(span_end, end) - span_start]
            i += 1
        if end > last_end:
            yield blob.tail[max(start, last_end) - last_end : end - last_end]

    async def _cached(self, fetcher: SpanFetcher, span: SpanId) -> bytes | None:
        """The span's verified bytes from the span cache, or None (a worker thread)."""
        return await trio.to_thread.run_sync(
            self._cache.get,
            fetcher.layer,
            span,
            fetcher.span_map.span_digests[span],
            limiter=READ_THREADS,
        )

    async def _span_bytes(self, fetcher: SpanFetcher, span: SpanId) -> bytes:
        data = await self._cached(fetcher, span)
        if data is not None:
            return data
        # evicted (or found corrupt) since the lookup: fetch it again rather than cut the answer
        if fetcher.table.state(span) is SpanState.CACHED:
            fetcher.table.set(span, SpanState.UNREQUESTED)
        try:
            got = await fetcher.ensure([span])
        except FetchError as e:
            raise SpanBlobError(f"layer {fetcher.layer} span {span}: {e}") from e
        data = got.get(span)
        if data is None:
            data = await self._cached(fetcher, span)
        if data is None:
            raise SpanBlobError(f"layer {fetcher.layer} span {span}: not in the span cache")
        return data

    async def _check(self, ref: Reference, fetcher: SpanFetcher, blob: _Blob) -> None:
        """Fetch the head and tail, hash the whole blob, record the result in `blob`; an
        unfinished check is forgotten (tried again on the next lookup)."""
        layer = fetcher.layer
        span_map = fetcher.span_map
        finished = False
        try:
            size = span_map.compressed_archive_size
            n = span_map.span_count
            first_start = span_map.compressed_range(SpanId(0))[0] if n else size
            last_end = span_map.compressed_range(SpanId(n - 1))[1] if n else size
            source = self._upstream(ref)
            try:
                if first_start > 0:
                    blob.head = await source.fetch(
                        layer, CompressedOffset(0), CompressedOffset(first_start)
                    )
                if last_end < size:
                    blob.tail = await source.fetch(
                        layer, CompressedOffset(last_end), CompressedOffset(size)
                    )
            except FetchError as e:
                log.debug(
                    "mirror spans: the blob's head could not be fetched",
                    extra={"layer": str(layer), "error": str(e)},
                )
                return
            stop = threading.Event()
            try:
                digest = await trio.to_thread.run_sync(
                    _hash_blob,
                    self._cache,
                    span_map,
                    layer,
                    blob.head,
                    blob.tail,
                    stop,
                    limiter=CHECK_THREADS,
                    abandon_on_cancel=True,
                )
            finally:
                stop.set()  # an abandoned thread stops at its next span
            if digest is None:
                self.stats.incomplete += 1
                log.debug("mirror spans: a span left the cache", extra={"layer": str(layer)})
                return
            finished = True
            if digest == str(layer):
                blob.good = True
                self.stats.checked += 1
            else:
                self.stats.mismatched += 1
                log.warning(
                    "mirror spans do not make the layer",
                    extra={"layer": str(layer), "digest": digest},
                )
        finally:
            if not finished and self._blobs.get(layer) is blob:
                del self._blobs[layer]
            blob.done.set()


def _complete(fetcher: SpanFetcher, cache: SpanCache) -> bool:
    """Whether every span of the layer is in the span cache and none is being fetched."""
    for i in range(fetcher.span_map.span_count):
        span = SpanId(i)
        if (
            fetcher.table.state(span) is SpanState.FETCHING
            or fetcher.missing(span)
            or not cache.contains(fetcher.layer, span)
        ):
            return False
    return fetcher.span_map.span_count > 0


def _gap(span_map: SpanMap) -> int | None:
    """The first blob offset no span covers between the first and the last span, or None."""
    covered: int | None = None
    for i in range(span_map.span_count):
        start, end = span_map.compressed_range(SpanId(i))
        if covered is not None and start > covered:
            return covered
        covered = end if covered is None else max(covered, end)
    return None


def _hash_blob(
    cache: SpanCache,
    span_map: SpanMap,
    layer: Digest,
    head: bytes,
    tail: bytes,
    stop: threading.Event,
) -> str | None:
    """`sha256:<hex>` of head + the spans (each shared byte once) + tail, read from the
    cache; None when a span is not there any more or `stop` is set (worker thread)."""
    h = hashlib.sha256(head)
    covered: int | None = None
    for i in range(span_map.span_count):
        if stop.is_set():
            return None
        span = SpanId(i)
        start, end = span_map.compressed_range(span)
        data = cache.get(layer, span, span_map.span_digests[i])
        if data is None:
            return None
        skip = 0 if covered is None else max(covered - start, 0)
        h.update(memoryview(data)[skip:])
        covered = end
    h.update(tail)
    return "sha256:" + h.hexdigest()
