"""A read of spans that are all in the memory LRU is answered without starting a task or a
request, with a fake `BlobSource` at the seam."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.lowlevel

from index.model import SpanId, UncompressedOffset
from snapshotter.lazy import ReadConfig, RemoteLayerReader, SpanState
from snapshotter.lazy.cache import SpanCache
from tests.support.lazylayer import Layer, MemorySource


class SpawnCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.spawned = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.spawned += 1


async def test_a_read_across_spans_in_memory_starts_no_task(tmp_path: Path) -> None:
    layer = Layer(files=6, size=150_000)
    source = MemorySource(layer.blob)
    reader = RemoteLayerReader(
        layer.digest, layer.ztoc, source, SpanCache(tmp_path / "cache"), config=ReadConfig()
    )
    _, end0 = reader.span_map.uncompressed_range(SpanId(0))
    offset, size = UncompressedOffset(end0 - 1000), 3000  # spans 0 and 1
    assert await reader.read(offset, size) == layer.tar[offset : offset + size]
    assert [reader.table.state(SpanId(i)) for i in (0, 1)] == [SpanState.INFLATED] * 2
    requests = reader.counters.requests
    counter = SpawnCounter()
    trio.lowlevel.add_instrument(counter)
    try:
        for _ in range(3):
            assert await reader.read(offset, size) == layer.tar[offset : offset + size]
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert counter.spawned == 0
    assert reader.counters.requests == requests
