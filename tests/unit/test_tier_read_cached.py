"""`InflatedCache.read_cached`: the inflated tier read on the trio thread without waiting for
the disk (page-cache bytes only, block sums verified), and the reader using it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from index.digest import Digest
from index.model import SpanId, UncompressedOffset
from snapshotter.lazy import ReadConfig, RemoteLayerReader
from snapshotter.lazy.cache import INFLATED_BLOCK_BYTES, CacheConfig, InflatedCache, SpanCache
from tests.support.lazylayer import Layer, MemorySource
from tests.support.pagecache import evict

LAYER = Digest("sha256:" + "c" * 64)


def tier_of(root: Path) -> InflatedCache:
    tier = SpanCache(root, CacheConfig(inflated_max_bytes=1 << 24)).inflated
    assert tier is not None
    return tier


def span_path(root: Path, start: int) -> Path:
    return root / "inflated" / "spans" / f"sha256-{'c' * 64}" / str(start)


def test_read_cached_serves_the_newest_span_from_the_page_cache(tmp_path: Path) -> None:
    tier = tier_of(tmp_path)
    size = 3 * INFLATED_BLOCK_BYTES + 10
    a, b = os.urandom(size), os.urandom(size)
    tier.put(LAYER, UncompressedOffset(0), a)
    tier.put(LAYER, UncompressedOffset(size), b)
    # b is the newest: served; a would need its recency written: left to `read`
    assert tier.read_cached(LAYER, UncompressedOffset(size), size, 100, 70_000) == b[100:70_100]
    assert tier.read_cached(LAYER, UncompressedOffset(0), size, 0, 10) is None
    assert tier.read(LAYER, UncompressedOffset(0), size, 0, 10) == a[:10]
    assert tier.read_cached(LAYER, UncompressedOffset(0), size, size - 5, 100) == a[-5:]
    assert tier.read_cached(LAYER, UncompressedOffset(7), size, 0, 10) is None  # not there
    stats = tier.stats()
    assert (stats.hits, stats.misses) == (3, 0)  # a miss here is left to `read` to count


def test_read_cached_waits_for_no_disk_read(tmp_path: Path) -> None:
    tier = tier_of(tmp_path)
    data = os.urandom(4 * INFLATED_BLOCK_BYTES)
    tier.put(LAYER, UncompressedOffset(0), data)
    evict(span_path(tmp_path, 0))  # checked: none of its pages is in the page cache
    assert tier.read_cached(LAYER, UncompressedOffset(0), len(data), 0, 100) is None
    assert tier.read(LAYER, UncompressedOffset(0), len(data), 0, 100) == data[:100]
    assert tier.read_cached(LAYER, UncompressedOffset(0), len(data), 0, 100) == data[:100]


def test_read_cached_checks_the_block_sums(tmp_path: Path) -> None:
    tier = tier_of(tmp_path)
    data = os.urandom(2 * INFLATED_BLOCK_BYTES)
    tier.put(LAYER, UncompressedOffset(0), data)
    path = span_path(tmp_path, 0)
    with open(path, "r+b") as f:
        f.seek(INFLATED_BLOCK_BYTES + 3)
        f.write(bytes([data[INFLATED_BLOCK_BYTES + 3] ^ 1]))
    assert tier.read_cached(LAYER, UncompressedOffset(0), len(data), 10, 10) == data[10:20]
    assert (
        tier.read_cached(LAYER, UncompressedOffset(0), len(data), INFLATED_BLOCK_BYTES, 9) is None
    )
    assert not path.exists() and tier.stats().corrupt_dropped == 1


async def test_the_reader_serves_the_tier_and_its_verified_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = Layer(files=8, size=150_000)
    cache = SpanCache(tmp_path / "cache", CacheConfig(inflated_max_bytes=1 << 26))
    reader = RemoteLayerReader(
        layer.digest,
        layer.ztoc,
        MemorySource(layer.blob),
        cache,
        config=ReadConfig(memory_cache_spans=1),
    )
    total = reader.span_map.uncompressed_archive_size
    for offset in range(0, total, 8192):  # every span inflated and in the tier
        got = await reader.read(UncompressedOffset(offset), 8192)
        assert got == layer.tar[offset : min(offset + 8192, total)]
    tier = cache.inflated
    assert tier is not None
    tier.flush()  # written behind the reads
    hits = tier.stats().hits
    in_threads: list[int] = []
    read = tier.read

    def counted(*args: Any) -> bytes | None:
        in_threads.append(1)
        return read(*args)

    monkeypatch.setattr(tier, "read", counted)
    start, end = reader.span_map.uncompressed_range(SpanId(1))
    for offset in range(start, end - 4096, 4096):  # span 1: no longer in memory, tier only
        got = await reader.read(UncompressedOffset(offset), 4096)
        assert got == layer.tar[offset : offset + 4096]
    assert tier.stats().hits - hits == len(range(start, end - 4096, 4096))
    assert len(in_threads) == 1  # the first read made it the newest; the rest: no thread hop
    assert reader.counters.errors == 0
