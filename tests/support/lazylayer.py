"""A gzip layer in memory with its zTOC, and a fake `BlobSource` over it (unit tests of the
lazy read path and its sources)."""

from __future__ import annotations

import io
import tarfile

import trio

from index.builder import build_ztoc_from_stream
from index.digest import Digest
from index.model import CompressedOffset, CompressionAlgorithm, SpanId, Ztoc
from index.oci.responses import BodySink
from index.zinfo import Arrived, SpanMap
from snapshotter.lazy.reader import RemoteLayerReader
from snapshotter.lazy.sources import Check, SourceUnavailable
from tests.support.tarfixtures import TarEntrySpec, compress, make_tar

SPAN = 64 * 1024


class Layer:
    """A gzip layer in memory: tar bytes, blob, digest and zTOC (64 KiB spans)."""

    def __init__(self, files: int = 12, size: int = 150_000) -> None:
        entries = [
            TarEntrySpec(f"dir/file{i:02d}", size=size + i * 977, content="mixed", seed=i)
            for i in range(files)
        ]
        self.tar = make_tar(entries)
        self.blob = compress(self.tar, "py6")
        self.digest = Digest.of(self.blob)
        self.ztoc: Ztoc = build_ztoc_from_stream(
            io.BytesIO(self.blob), CompressionAlgorithm.GZIP, SPAN
        )

    def files(self) -> dict[str, tuple[int, bytes]]:
        """name → (data offset in the tar stream, content)."""
        out = {}
        with tarfile.open(fileobj=io.BytesIO(self.tar)) as tf:
            for m in tf.getmembers():
                f = tf.extractfile(m)
                assert f is not None
                out[m.name] = (m.offset_data, f.read())
        return out


class MemorySource:
    """Serves ranges of one blob; records calls (and cancelled ones); can fail, corrupt, hold
    requests (`gate`) or raise any exception (`raise_next`)."""

    def __init__(self, blob: bytes, name: str = "memory") -> None:
        self.blob = blob
        self._name = name
        self.calls: list[tuple[int, int]] = []
        self.fail_next = 0
        self.corrupt_next = 0
        self.always_corrupt = False
        self.gate: trio.Event | None = None
        self.delay_sec = 0.0
        self.cancelled = 0
        self.raise_next: list[Exception] = []
        self.feed_chunk_bytes = 65536
        """A given `sink` is fed the answer in chunks of this size (0: not fed)."""

    @property
    def name(self) -> str:
        return self._name

    async def fetch(
        self,
        digest: Digest,
        start: CompressedOffset,
        end: CompressedOffset,
        *,
        check: Check | None = None,
        sink: BodySink | None = None,
    ) -> bytes:
        self.calls.append((start, end))
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay_sec:
                await trio.sleep(self.delay_sec)
        except trio.Cancelled:
            self.cancelled += 1
            raise
        if self.raise_next:
            raise self.raise_next.pop(0)
        if self.fail_next:
            self.fail_next -= 1
            raise SourceUnavailable(f"{self._name}: injected failure", source=self._name)
        data = self.blob[start:end]
        if self.always_corrupt or self.corrupt_next:
            self.corrupt_next = max(self.corrupt_next - 1, 0)
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if sink is not None and self.feed_chunk_bytes:  # as a registry answer arrives
            sink.begin()
            for i in range(0, len(data), self.feed_chunk_bytes):
                sink.feed(data[i : i + self.feed_chunk_bytes])
                await trio.sleep(0)
        if check is not None:
            check(data)
        return data

    @property
    def bytes_served(self) -> int:
        return sum(e - s for s, e in self.calls)


class CountingSpanMap:
    """A span map that counts inflations: `inflates` (a read's own, `inflate`) and
    `arriving` (while the answer arrives, `inflate_arriving`); put it on a reader with
    `count_inflations`."""

    def __init__(self, inner: SpanMap) -> None:
        self._inner = inner
        self.inflates = 0
        self.arriving = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    @property
    def total(self) -> int:
        return self.inflates + self.arriving

    def inflate(self, span: SpanId, data: bytes) -> bytes:
        self.inflates += 1
        return self._inner.inflate(span, data)

    def inflate_arriving(self, span: SpanId, buffer: memoryview, arrived: Arrived) -> bytes:
        self.arriving += 1
        return self._inner.inflate_arriving(span, buffer, arrived)


def count_inflations(reader: RemoteLayerReader) -> CountingSpanMap:
    """Count `reader`'s inflations (both its inflater's and its fetcher's)."""
    counting = CountingSpanMap(reader.span_map)
    reader.inflater.span_map = counting  # type: ignore[assignment]
    reader.fetcher.span_map = counting  # type: ignore[assignment]
    return counting
