"""The seam between the layer filesystem and whatever produces a layer's bytes.

The host reads a regular file through `LayerReader.read`, in uncompressed tar-stream offsets.
The production reader (span fetch, verify, inflate, cache) lives elsewhere; this module holds
the Protocol plus two local readers used by tests and tools:

* `LocalTarReader`: an uncompressed tar stream in a local file;
* `LocalBlobReader`: a gzip (or tar) layer blob in a local file, read span by span through
  `index.zinfo.SpanMap` (each span verified against its digest, then inflated in a worker
  thread; concurrent readers of one span share one inflation).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import trio

from index.model import SpanId, UncompressedOffset, Ztoc
from index.zinfo import SpanError, SpanMap, ZinfoError
from snapshotter.fs.errors import LayerReadError


class LayerReader(Protocol):
    """Reads the uncompressed tar stream of one layer."""

    async def read(
        self, offset: UncompressedOffset, size: int, file_end: int | None = None
    ) -> bytes:
        """Exactly `size` bytes of the tar stream from `offset` (fewer only at its end).
        `file_end`: where the data of the file being read ends in the stream (None: not a
        file's read), for a reader that reads ahead to stop there.

        Raises:
            LayerReadError: the bytes could not be fetched, verified or inflated. Anything else
                raised is treated by the host as a read failure too.
        """
        ...


@runtime_checkable
class ReadsNow(Protocol):
    """A reader that can answer some reads at once, without waiting (from memory or the page
    cache): the FUSE server then answers them without starting a task."""

    def read_now(
        self,
        offset: UncompressedOffset,
        size: int,
        file_end: int | None = None,
        *,
        observe: bool = True,
    ) -> bytes | None:
        """What `read` would return, when it is at hand now; None when `read` must be awaited
        (also for anything `read` would raise). A read answered here is one read: `read` is
        not called for it. `observe=False`: a look at what is at hand that no read-ahead
        policy counts as a read."""
        ...

    def at_hand_end(self, offset: UncompressedOffset, limit: int) -> int:
        """How far from `offset` (looking no further than `offset + limit`) `read_now` may
        find the stream at hand; `offset` when not even there."""
        ...


@runtime_checkable
class ReadsLocal(Protocol):
    """A reader that can say what is local: a file's bytes copied to a passthrough backing
    file (`snapshotter.fs.passthrough`) must never cost a fetch."""

    async def read_local(self, offset: UncompressedOffset, size: int) -> bytes | None:
        """What `read` would return, when every byte of it is local (nothing is fetched, no
        read-ahead starts); None otherwise, also for anything `read` would raise."""
        ...


@dataclass(frozen=True, slots=True)
class FetchProgress:
    """How much of a layer blob is local: bytes of the compressed blob, fetched and total."""

    fetched_bytes: int
    total_bytes: int

    @property
    def percent(self) -> float:
        return 100.0 if self.total_bytes <= 0 else 100.0 * self.fetched_bytes / self.total_bytes


@runtime_checkable
class ReportsProgress(Protocol):
    """A reader that knows how much of its layer has been fetched (shown in the status file)."""

    def progress(self) -> FetchProgress: ...


async def _read_or_none(reader: LayerReader, offset: UncompressedOffset, size: int) -> bytes | None:
    """`reader.read`, None when it fails (`ReadsLocal` of a reader whose bytes are all local)."""
    try:
        return await reader.read(offset, size)
    except LayerReadError:
        return None


def _pread(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks: list[bytes] = []
        done = 0
        while done < size:
            chunk = os.pread(fd, size - done, offset + done)
            if not chunk:
                break
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class LocalTarReader:
    """A layer whose uncompressed tar stream is the local file `path`.

    Reads run in worker threads (bounded by `limiter`), never on the trio thread.
    """

    def __init__(self, path: Path, *, limiter: trio.CapacityLimiter | None = None) -> None:
        self.path = path
        self._limiter = limiter or trio.CapacityLimiter(4)

    def __repr__(self) -> str:
        return f"<LocalTarReader {self.path}>"

    async def read(
        self, offset: UncompressedOffset, size: int, file_end: int | None = None
    ) -> bytes:
        """Bytes `[offset, offset + size)` of the file. Raises `LayerReadError` on OSError."""
        try:
            data: bytes = await trio.to_thread.run_sync(
                _pread, self.path, offset, size, limiter=self._limiter
            )
        except OSError as e:
            raise LayerReadError(f"reading {size} bytes at {offset} of {self.path}: {e}") from e
        return data

    async def read_local(self, offset: UncompressedOffset, size: int) -> bytes | None:
        """`read`: the whole stream is local (None when it fails)."""
        return await _read_or_none(self, offset, size)


class LocalBlobReader:
    """A layer read from its local compressed blob file through the zTOC's span map.

    Every span is read from `blob_path`, checked against its zTOC digest and inflated from its
    checkpoint in a worker thread (`limiter` bounds them); the last `cached_spans` inflated spans
    are kept in memory, and concurrent readers of one span wait for one inflation.
    """

    def __init__(
        self,
        blob_path: Path,
        ztoc: Ztoc,
        *,
        limiter: trio.CapacityLimiter | None = None,
        cached_spans: int = 8,
    ) -> None:
        self.blob_path = blob_path
        try:
            self.span_map = SpanMap.from_ztoc(ztoc)
        except ZinfoError as e:
            raise LayerReadError(f"zTOC of {blob_path} has unusable span info: {e}") from e
        self._limiter = limiter or trio.CapacityLimiter(os.cpu_count() or 2)
        self._cached_spans = max(cached_spans, 1)
        self._spans: OrderedDict[int, bytes] = OrderedDict()
        self._inflight: dict[int, trio.Event] = {}
        self._fetched: set[int] = set()
        self._fetched_bytes = 0

    def __repr__(self) -> str:
        return (
            f"<LocalBlobReader {self.blob_path} spans={self.span_map.span_count} "
            f"fetched={len(self._fetched)}>"
        )

    def progress(self) -> FetchProgress:
        return FetchProgress(self._fetched_bytes, self.span_map.compressed_archive_size)

    def _load_span(self, span_id: SpanId) -> tuple[bytes, int]:
        start, end = self.span_map.compressed_range(span_id)
        compressed = _pread(self.blob_path, start, end - start)
        return self.span_map.read_span(span_id, compressed), len(compressed)

    async def _span(self, span_id: SpanId) -> bytes:
        while True:
            cached = self._spans.get(span_id)
            if cached is not None:
                self._spans.move_to_end(span_id)
                return cached
            event = self._inflight.get(span_id)
            if event is None:
                break
            await event.wait()  # then loop: served from the cache, or retried here on failure
        event = self._inflight[span_id] = trio.Event()
        try:
            try:
                loaded: tuple[bytes, int] = await trio.to_thread.run_sync(
                    self._load_span, span_id, limiter=self._limiter
                )
            except (OSError, ZinfoError) as e:
                raise LayerReadError(f"span {span_id} of {self.blob_path}: {e}") from e
            data, fetched = loaded
            if span_id not in self._fetched:
                self._fetched.add(span_id)
                self._fetched_bytes += fetched
            self._spans[span_id] = data
            while len(self._spans) > self._cached_spans:
                self._spans.popitem(last=False)
            return data
        finally:
            del self._inflight[span_id]
            event.set()

    async def read(
        self, offset: UncompressedOffset, size: int, file_end: int | None = None
    ) -> bytes:
        """Bytes `[offset, offset + size)` of the tar stream, verified span by span.

        Raises `LayerReadError` (chained) when the blob cannot be read, a span digest does not
        match or inflation fails.
        """
        end = min(offset + size, self.span_map.uncompressed_archive_size)
        if end <= offset:
            return b""
        try:
            span_ids = self.span_map.spans_for_range(offset, end - offset)
        except SpanError as e:
            raise LayerReadError(f"range {offset}+{size} of {self.blob_path}: {e}") from e
        parts: list[bytes] = []
        for span_id in span_ids:
            data = await self._span(SpanId(span_id))
            span_start, _ = self.span_map.uncompressed_range(SpanId(span_id))
            lo = max(offset - span_start, 0)
            hi = min(end - span_start, len(data))
            parts.append(data[lo:hi])
        return b"".join(parts)

    async def read_local(self, offset: UncompressedOffset, size: int) -> bytes | None:
        """`read`: the whole blob is local (None when it fails)."""
        return await _read_or_none(self, offset, size)
