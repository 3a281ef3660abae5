"""The on-disk span cache: atomic writes, verification on read, LRU and released-first
eviction, persistence across restarts, statistics."""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest

from index.digest import Digest
from index.model import SpanId, UncompressedOffset
from snapshotter.lazy.cache import (
    INFLATED_BLOCK_BYTES,
    RELEASED_MARK,
    CacheConfig,
    CacheError,
    SpanCache,
)

LAYER_A = Digest("sha256:" + "a" * 64)
LAYER_B = Digest("sha256:" + "b" * 64)


def span_bytes(layer: Digest, span: int, size: int = 1000) -> bytes:
    seed = f"{layer}/{span}".encode()
    out = b""
    while len(out) < size:
        seed = hashlib.sha256(seed).digest()
        out += seed
    return out[:size]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def put(cache: SpanCache, layer: Digest, span: int, size: int = 1000) -> bytes:
    data = span_bytes(layer, span, size)
    cache.put(layer, SpanId(span), data)
    return data


def get(cache: SpanCache, layer: Digest, span: int, size: int = 1000) -> bytes | None:
    return cache.get(layer, SpanId(span), digest_of(span_bytes(layer, span, size)))


def test_put_then_get(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path)
    data = put(cache, LAYER_A, 3)
    assert cache.contains(LAYER_A, SpanId(3))
    assert not cache.contains(LAYER_A, SpanId(4))
    assert get(cache, LAYER_A, 3) == data
    assert get(cache, LAYER_A, 4) is None
    assert (tmp_path / "spans" / f"sha256-{'a' * 64}" / "3").read_bytes() == data
    assert list((tmp_path / "tmp").iterdir()) == []
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.hits, stats.misses, stats.puts) == (1, 1000, 1, 1, 1)
    assert cache.spans_of(LAYER_A) == frozenset({SpanId(3)})


def test_wrong_digest_or_corrupt_file_is_dropped(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path)
    data = put(cache, LAYER_A, 1)
    path = tmp_path / "spans" / f"sha256-{'a' * 64}" / "1"
    path.write_bytes(data[:-1] + b"X")
    assert get(cache, LAYER_A, 1) is None
    assert not path.exists()
    assert not cache.contains(LAYER_A, SpanId(1))
    assert cache.stats().corrupt_dropped == 1
    assert cache.stats().bytes == 0
    # a truncated file is just as wrong
    put(cache, LAYER_A, 2)
    path2 = path.parent / "2"
    path2.write_bytes(path2.read_bytes()[:10])
    assert get(cache, LAYER_A, 2) is None
    assert cache.stats().corrupt_dropped == 2


def test_a_file_deleted_behind_its_back_is_a_miss(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path)
    put(cache, LAYER_A, 1)
    (tmp_path / "spans" / f"sha256-{'a' * 64}" / "1").unlink()
    assert get(cache, LAYER_A, 1) is None
    assert cache.stats().entries == 0


def test_lru_eviction_keeps_the_size_bound(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path, CacheConfig(max_bytes=3500))
    for span in range(3):
        put(cache, LAYER_A, span)
    assert get(cache, LAYER_A, 0) is not None  # 0 is now the most recent
    put(cache, LAYER_A, 3)
    assert cache.spans_of(LAYER_A) == frozenset({SpanId(0), SpanId(2), SpanId(3)})
    assert not (tmp_path / "spans" / f"sha256-{'a' * 64}" / "1").exists()
    stats = cache.stats()
    assert stats.bytes == 3000 and stats.evictions == 1
    on_disk = sum(f.stat().st_size for f in (tmp_path / "spans").rglob("*") if f.is_file())
    assert on_disk == 3000


def test_released_layers_are_evicted_first(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path, CacheConfig(max_bytes=4000))
    put(cache, LAYER_A, 0)
    put(cache, LAYER_A, 1)
    put(cache, LAYER_B, 0)
    put(cache, LAYER_B, 1)
    cache.release_layer(LAYER_B)  # B is newer, but its image is gone
    assert cache.is_released(LAYER_B)
    assert (tmp_path / "spans" / f"sha256-{'b' * 64}" / RELEASED_MARK).exists()
    put(cache, LAYER_A, 2)
    assert cache.spans_of(LAYER_A) == frozenset({SpanId(0), SpanId(1), SpanId(2)})
    assert cache.spans_of(LAYER_B) == frozenset({SpanId(1)})
    put(cache, LAYER_A, 3)
    assert cache.spans_of(LAYER_B) == frozenset()
    # the released layer's directory is reclaimed with its last span
    assert not (tmp_path / "spans" / f"sha256-{'b' * 64}").exists()
    assert not cache.is_released(LAYER_B)
    assert cache.stats().bytes == 4000


def test_retain_clears_the_released_mark(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path, CacheConfig(max_bytes=3000))
    put(cache, LAYER_B, 0)
    put(cache, LAYER_A, 0)
    cache.release_layer(LAYER_B)
    cache.retain_layer(LAYER_B)  # re-pulled before eviction
    assert not (tmp_path / "spans" / f"sha256-{'b' * 64}" / RELEASED_MARK).exists()
    put(cache, LAYER_A, 1)
    put(cache, LAYER_A, 2)  # plain LRU now: B/0 is the oldest
    assert cache.spans_of(LAYER_B) == frozenset()
    assert cache.spans_of(LAYER_A) == frozenset({SpanId(0), SpanId(1), SpanId(2)})


def test_release_of_an_uncached_layer_is_a_no_op(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path)
    cache.release_layer(LAYER_A)
    assert not cache.is_released(LAYER_A)
    assert cache.stats().released_layers == 0


def test_index_survives_a_restart_with_lru_order_and_marks(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path, CacheConfig(max_bytes=10_000))
    for span in range(3):
        put(cache, LAYER_A, span)
    put(cache, LAYER_B, 0)
    cache.release_layer(LAYER_B)
    base = 1_700_000_000
    layer_dir = tmp_path / "spans" / f"sha256-{'a' * 64}"
    for span, age in ((0, 30), (1, 10), (2, 20)):  # 0 oldest, then 2, then 1
        os.utime(layer_dir / str(span), ns=((base - age) * 10**9, (base - age) * 10**9))
    (tmp_path / "tmp" / "half-written").write_bytes(b"junk")
    (tmp_path / "spans" / "not-a-layer").mkdir()

    reopened = SpanCache(tmp_path, CacheConfig(max_bytes=3000))
    assert not (tmp_path / "tmp" / "half-written").exists()
    assert reopened.stats().entries == 4 and reopened.stats().released_layers == 1
    assert get(reopened, LAYER_A, 1) is not None
    # over the bound at the next put: B (released), then A/0, the oldest, go
    put(reopened, LAYER_A, 3)
    assert reopened.spans_of(LAYER_B) == frozenset()
    assert reopened.spans_of(LAYER_A) == frozenset({SpanId(1), SpanId(2), SpanId(3)})


def test_oversized_span_is_not_stored(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path, CacheConfig(max_bytes=500))
    put(cache, LAYER_A, 0)
    assert cache.stats().entries == 0
    assert get(cache, LAYER_A, 0) is None


def test_drop_layer_frees_everything(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path)
    for span in range(4):
        put(cache, LAYER_A, span)
    put(cache, LAYER_B, 0)
    assert cache.drop_layer(LAYER_A) == 4000
    assert not (tmp_path / "spans" / f"sha256-{'a' * 64}").exists()
    assert cache.stats().entries == 1 and cache.stats().bytes == 1000


def test_unwritable_cache_raises_cache_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root ignores directory modes; make the spans dir a file's child instead
        cache = SpanCache(tmp_path)
        blocker = tmp_path / "spans" / f"sha256-{'a' * 64}"
        blocker.write_bytes(b"not a directory")
    else:
        cache = SpanCache(tmp_path)
        (tmp_path / "spans").chmod(0o500)
    with pytest.raises(CacheError, match=f"storing {LAYER_A} span 0"):
        put(cache, LAYER_A, 0)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert cache.stats().entries == 0
    with pytest.raises(CacheError, match="cannot create"):
        SpanCache(tmp_path / "spans" / f"sha256-{'a' * 64}" / "sub")


def test_concurrent_puts_and_gets_keep_the_bound(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path, CacheConfig(max_bytes=20_000))
    errors: list[BaseException] = []

    def work(layer: Digest) -> None:
        try:
            for span in range(50):
                put(cache, layer, span)
                got = get(cache, layer, span)
                assert got is None or got == span_bytes(layer, span)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(layer,)) for layer in (LAYER_A, LAYER_B)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = cache.stats()
    assert stats.bytes <= 20_000 and stats.entries == stats.bytes // 1000
    on_disk = [f for f in (tmp_path / "spans").rglob("*") if f.is_file()]
    assert len(on_disk) == stats.entries


# -- the inflated tier ----------------------------------------------------------------------------


def inflated_cache(root: Path, inflated_max_bytes: int = 1 << 20) -> SpanCache:
    return SpanCache(root, CacheConfig(max_bytes=1 << 20, inflated_max_bytes=inflated_max_bytes))


def test_inflated_tier_is_off_unless_configured(tmp_path: Path) -> None:
    assert SpanCache(tmp_path).inflated is None
    assert not (tmp_path / "inflated").exists()
    with pytest.raises(ValueError, match="must not be negative"):
        CacheConfig(inflated_max_bytes=-1)


def test_inflated_reads_only_the_bytes_asked_for(tmp_path: Path) -> None:
    tier = inflated_cache(tmp_path).inflated
    assert tier is not None
    data = span_bytes(LAYER_A, 7, 5000)
    start = UncompressedOffset(4_194_304)
    tier.put(LAYER_A, start, data)
    path = tmp_path / "inflated" / "spans" / f"sha256-{'a' * 64}" / str(start)
    assert path.read_bytes() == data + struct.pack("<I", zlib.crc32(data))  # one block, its sum
    assert list((tmp_path / "inflated" / "tmp").iterdir()) == []
    assert tier.contains(LAYER_A, start) and not tier.contains(LAYER_B, start)
    assert tier.read(LAYER_A, start, 5000, 100, 4096) == data[100:4196]
    assert tier.read(LAYER_A, start, 5000, 4000, 4096) == data[4000:]  # clipped at the end
    assert tier.read(LAYER_A, start, 5000, 5000, 10) == b""
    assert tier.read(LAYER_A, UncompressedOffset(0), 5000, 0, 10) is None
    stats = tier.stats()
    assert (stats.entries, stats.bytes, stats.hits, stats.misses) == (1, 5004, 3, 1)


def test_damaged_inflated_file_is_dropped(tmp_path: Path) -> None:
    tier = inflated_cache(tmp_path, inflated_max_bytes=1 << 20).inflated
    assert tier is not None
    start = UncompressedOffset(0)
    size = 3 * INFLATED_BLOCK_BYTES + 100
    data = span_bytes(LAYER_A, 0, size)
    tier.put(LAYER_A, start, data)
    path = tmp_path / "inflated" / "spans" / f"sha256-{'a' * 64}" / "0"
    assert path.stat().st_size == size + 4 * 4
    with open(path, "r+b") as f:  # one byte of the third block flipped behind the cache's back
        f.seek(2 * INFLATED_BLOCK_BYTES + 7)
        f.write(bytes([data[2 * INFLATED_BLOCK_BYTES + 7] ^ 1]))
    # reads of the intact blocks are served; the first one touching the damaged block drops it
    assert tier.read(LAYER_A, start, size, 10, 1000) == data[10:1010]
    assert (
        tier.read(LAYER_A, start, size, INFLATED_BLOCK_BYTES - 5, 10)
        == data[INFLATED_BLOCK_BYTES - 5 : INFLATED_BLOCK_BYTES + 5]
    )
    assert tier.read(LAYER_A, start, size, 2 * INFLATED_BLOCK_BYTES + 1000, 10) is None
    assert not path.exists() and not tier.contains(LAYER_A, start)
    assert tier.stats().corrupt_dropped == 1
    # a damaged sum is found as well
    tier.put(LAYER_A, start, data)
    with open(path, "r+b") as f:
        f.seek(size + 4)
        f.write(b"\0\0\0\0")
    assert tier.read(LAYER_A, start, size, INFLATED_BLOCK_BYTES, 10) is None
    assert tier.stats().corrupt_dropped == 2


def test_torn_inflated_file_is_dropped(tmp_path: Path) -> None:
    tier = inflated_cache(tmp_path).inflated
    assert tier is not None
    start = UncompressedOffset(0)
    tier.put(LAYER_A, start, span_bytes(LAYER_A, 0, 3000))
    path = tmp_path / "inflated" / "spans" / f"sha256-{'a' * 64}" / "0"
    with open(path, "r+b") as f:  # a file cut short behind the cache's back
        f.truncate(1000)
    assert tier.read(LAYER_A, start, 3000, 0, 10) is None
    assert not path.exists() and not tier.contains(LAYER_A, start)
    assert tier.stats().corrupt_dropped == 1
    # a file of another span layout (same start, other length) is not served either
    tier.put(LAYER_A, start, span_bytes(LAYER_A, 0, 3000))
    assert tier.read(LAYER_A, start, 2999, 0, 10) is None
    # deleted behind the cache's back: a miss, forgotten
    tier.put(LAYER_A, start, span_bytes(LAYER_A, 0, 3000))
    path.unlink()
    assert tier.read(LAYER_A, start, 3000, 0, 10) is None
    assert tier.stats().entries == 0


def test_inflated_tier_is_bounded_lru_and_survives_a_restart(tmp_path: Path) -> None:
    cache = inflated_cache(tmp_path, inflated_max_bytes=10_000)
    tier = cache.inflated
    assert tier is not None
    for i in range(3):
        tier.put(LAYER_A, UncompressedOffset(i * 4000), span_bytes(LAYER_A, i, 4000))
    # 12000 > 10000: the oldest (0) went
    assert not tier.contains(LAYER_A, UncompressedOffset(0))
    assert tier.stats().bytes == 8008 and tier.stats().evictions == 1  # each with its sum
    assert tier.read(LAYER_A, UncompressedOffset(4000), 4000, 0, 1) is not None  # now newest
    time.sleep(0.01)
    on_disk = tmp_path / "inflated" / "spans" / f"sha256-{'a' * 64}"
    assert sorted(p.name for p in on_disk.iterdir()) == ["4000", "8000"]
    assert os.stat(on_disk / "4000").st_mtime_ns >= os.stat(on_disk / "8000").st_mtime_ns

    reopened = inflated_cache(tmp_path, inflated_max_bytes=10_000).inflated
    assert reopened is not None
    assert reopened.stats().entries == 2
    assert reopened.read(LAYER_A, UncompressedOffset(8000), 4000, 0, 4000) == span_bytes(
        LAYER_A, 2, 4000
    )
    reopened.put(LAYER_B, UncompressedOffset(0), span_bytes(LAYER_B, 0, 4000))
    assert reopened.stats().bytes == 8008  # the least recently used A span went


def test_layer_marks_and_drop_cover_both_tiers(tmp_path: Path) -> None:
    cache = inflated_cache(tmp_path, inflated_max_bytes=9000)
    tier = cache.inflated
    assert tier is not None
    put(cache, LAYER_A, 0)
    tier.put(LAYER_A, UncompressedOffset(0), span_bytes(LAYER_A, 0, 4000))
    tier.put(LAYER_B, UncompressedOffset(0), span_bytes(LAYER_B, 0, 4000))
    cache.release_layer(LAYER_A)
    assert cache.is_released(LAYER_A) and tier.is_released(LAYER_A)
    cache.retain_layer(LAYER_A)
    assert not cache.is_released(LAYER_A) and not tier.is_released(LAYER_A)
    cache.release_layer(LAYER_A)
    # the released layer's inflated span is evicted first, although B's is older
    tier.put(LAYER_B, UncompressedOffset(4000), span_bytes(LAYER_B, 1, 4000))
    assert not tier.contains(LAYER_A, UncompressedOffset(0))
    assert tier.contains(LAYER_B, UncompressedOffset(0))
    assert not (tmp_path / "inflated" / "spans" / f"sha256-{'a' * 64}").exists()
    assert cache.drop_layer(LAYER_B) == 8008
    assert tier.stats().entries == 0
    assert not (tmp_path / "inflated" / "spans" / f"sha256-{'b' * 64}").exists()


def test_the_tier_writer_writes_behind_and_ends_when_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from snapshotter.lazy import cache as cache_module

    monkeypatch.setattr(cache_module, "WRITER_IDLE_SEC", 0.05)
    tier = inflated_cache(tmp_path).inflated
    assert tier is not None
    layer = Digest("sha256:" + "ab" * 32)
    for round_no in range(2):  # a new writer after the first one ended
        tier.put_later(layer, UncompressedOffset(round_no * 10), b"x" * 10)
        writer = tier._writer
        tier.flush()
        assert tier.contains(layer, UncompressedOffset(round_no * 10))
        assert writer is not None
        writer.join(5)
        assert not writer.is_alive(), "the idle writer did not end"
