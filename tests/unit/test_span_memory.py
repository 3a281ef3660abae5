"""The daemon-wide byte budget of inflated spans in memory (`SpanMemory`): one LRU shared by
the readers of every layer, with a fake `BlobSource` at the seam."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import pytest

from index.model import SpanId, UncompressedOffset
from snapshotter.config import RemoteConfig, load
from snapshotter.errors import ConfigError
from snapshotter.lazy import ReadConfig, RemoteLayerReader, SpanState
from snapshotter.lazy.cache import SpanCache
from tests.support.lazylayer import Layer, MemorySource


@pytest.fixture(scope="module")
def layers() -> tuple[Layer, Layer]:
    return Layer(files=12, size=150_000), Layer(files=9, size=170_000)


def span_size(reader: RemoteLayerReader, span: int) -> int:
    start, end = reader.span_map.uncompressed_range(SpanId(span))
    return end - start


async def read_span(reader: RemoteLayerReader, layer: Layer, span: int) -> None:
    start, _ = reader.span_map.uncompressed_range(SpanId(span))
    got = await reader.read(UncompressedOffset(start), 100)
    assert got == layer.tar[start : start + 100]


def readers(
    layers: tuple[Layer, Layer], tmp_path: Path, config: ReadConfig
) -> tuple[RemoteLayerReader, RemoteLayerReader]:
    cache = SpanCache(tmp_path / "cache")
    a, b = layers
    assert a.digest != b.digest
    return (
        RemoteLayerReader(a.digest, a.ztoc, MemorySource(a.blob), cache, config=config),
        RemoteLayerReader(b.digest, b.ztoc, MemorySource(b.blob), cache, config=config),
    )


def inflated(reader: RemoteLayerReader) -> list[int]:
    return [
        i for i in range(len(reader.table)) if reader.table.state(SpanId(i)) is SpanState.INFLATED
    ]


async def test_layers_share_one_budget_lru_across_layers(
    layers: tuple[Layer, Layer], tmp_path: Path
) -> None:
    config = ReadConfig()
    a, b = readers(layers, tmp_path, config)
    sizes = [span_size(r, i) for r in (a, b) for i in range(3)]
    # room for any three of the spans 0-2 of either layer, never for four
    assert 4 * min(sizes) > 3 * max(sizes)
    config = ReadConfig(memory_cache_bytes=3 * max(sizes)).with_shared_memory()
    memory = config.memory
    assert memory is not None
    a, b = readers(layers, tmp_path, config)

    def used(*spans: tuple[RemoteLayerReader, int]) -> int:
        return sum(span_size(r, i) for r, i in spans)

    await read_span(a, layers[0], 0)
    await read_span(a, layers[0], 1)
    await read_span(b, layers[1], 0)
    assert (inflated(a), inflated(b)) == ([0, 1], [0])
    assert memory.used_bytes == used((a, 0), (a, 1), (b, 0)) and len(memory) == 3

    await read_span(a, layers[0], 0)  # a hit: a's span 0 is now the most recently used
    await read_span(b, layers[1], 1)  # over budget: a's span 1 (the least recent) goes
    assert (inflated(a), inflated(b)) == ([0], [0, 1])
    assert a.table.state(SpanId(1)) is SpanState.CACHED
    assert memory.used_bytes == used((a, 0), (b, 0), (b, 1)) <= memory.budget_bytes

    await read_span(b, layers[1], 2)  # then b's span 0: a's span 0 was used after it
    assert (inflated(a), inflated(b)) == ([0], [1, 2])
    await read_span(a, layers[0], 1)  # an evicted span reads again (from the span cache)
    assert (inflated(a), inflated(b)) == ([1], [1, 2])
    assert memory.used_bytes == used((a, 1), (b, 1), (b, 2))


async def test_the_per_layer_cap_still_holds_under_a_large_budget(
    layers: tuple[Layer, Layer], tmp_path: Path
) -> None:
    config = ReadConfig(memory_cache_spans=2, memory_cache_bytes=1 << 30).with_shared_memory()
    memory = config.memory
    assert memory is not None
    a, b = readers(layers, tmp_path, config)
    for i in range(4):
        await read_span(a, layers[0], i)
        await read_span(b, layers[1], i)
    assert (inflated(a), inflated(b)) == ([2, 3], [2, 3])
    assert len(memory) == 4
    assert memory.used_bytes == sum(span_size(r, i) for r in (a, b) for i in (2, 3))


async def test_a_budget_below_one_span_keeps_the_newest(
    layers: tuple[Layer, Layer], tmp_path: Path
) -> None:
    config = ReadConfig(memory_cache_bytes=0).with_shared_memory()
    a, b = readers(layers, tmp_path, config)
    await read_span(a, layers[0], 0)
    await read_span(b, layers[1], 0)
    assert (inflated(a), inflated(b)) == ([], [0])
    assert config.memory is not None and len(config.memory) == 1


async def test_a_collected_readers_spans_leave_the_budget(
    layers: tuple[Layer, Layer], tmp_path: Path
) -> None:
    config = ReadConfig().with_shared_memory()
    memory = config.memory
    assert memory is not None
    a, b = readers(layers, tmp_path, config)
    await read_span(a, layers[0], 0)
    await read_span(a, layers[0], 1)
    await read_span(b, layers[1], 0)
    assert len(memory) == 3
    del a
    gc.collect()
    assert len(memory) == 1
    assert memory.used_bytes == span_size(b, 0)


async def test_readers_without_a_shared_memory_have_their_own(
    layers: tuple[Layer, Layer], tmp_path: Path
) -> None:
    a, b = readers(layers, tmp_path, ReadConfig())
    await read_span(a, layers[0], 0)
    assert a.inflater.memory is not b.inflater.memory
    assert len(a.inflater.memory) == 1 and len(b.inflater.memory) == 0
    assert a.inflater.memory.budget_bytes == ReadConfig().memory_cache_bytes == 32 << 20


def test_the_config_key_reaches_the_read_config(tmp_path: Path) -> None:
    assert RemoteConfig().memory_cache_bytes == 32 * 1024 * 1024
    path = tmp_path / "config.toml"
    path.write_text("[remote]\nmemory_cache_bytes = 1048576\n")
    read = load(path).remote.read_config()
    assert read.memory_cache_bytes == 1 << 20 and read.memory is None
    shared = read.with_shared_memory()
    assert shared.memory is not None and shared.memory.budget_bytes == 1 << 20
    assert shared == read  # the shared object is not part of the settings

    path.write_text("[remote]\nmemory_cache_bytes = -1\n")
    with pytest.raises(ConfigError, match="memory_cache_bytes must not be negative"):
        load(path)


def test_freed_heap_is_given_back_at_most_once_per_interval() -> None:
    from snapshotter.remote import heap as trees

    time.sleep(trees.TRIM_INTERVAL_SEC)
    assert trees.release_free_memory() is True  # glibc on every machine this runs on
    assert trees.release_free_memory() is False
