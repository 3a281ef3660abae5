"""The remote read path with a fake `BlobSource` at the seam: state table, read-ahead policy,
coalescing, shared fetches and inflations, verification, retries across sources, the caches,
and the layer's task scope.

The registry-backed versions of these checks are in tests/integration/test_remote_read.py.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import trio
import trio.testing

from index.model import SpanId, UncompressedOffset
from index.zinfo import SpanInflateError, SpanMap
from snapshotter.fs.errors import LayerReadError
from snapshotter.lazy import (
    TRANSITIONS,
    LayerClosed,
    ReadConfig,
    RemoteLayerReader,
    SpanState,
    SpanStateError,
    SpanTable,
    coalesce,
)
from snapshotter.lazy.cache import CacheConfig, SpanCache
from snapshotter.lazy.readahead import THROUGH_GAP, ReadAhead
from snapshotter.lazy.sources import (
    AllSourcesFailed,
    ChainSource,
    ContentMismatch,
    SourceUnavailable,
)
from snapshotter.tasks import TaskScope, open_task_scope
from tests.support.lazylayer import CountingSpanMap, Layer, MemorySource, count_inflations

SPAN = 64 * 1024


# -- a layer and a fake source -------------------------------------------------------------------


@pytest.fixture(scope="module")
def layer() -> Layer:
    return Layer()


def make_reader(
    layer: Layer,
    source: MemorySource | ChainSource,
    cache_dir: Path,
    tasks: TaskScope | None = None,
    **config: int,
) -> RemoteLayerReader:
    """A reader of `layer` with `config`; read-ahead pipelined in `tasks` when given."""
    return RemoteLayerReader(
        layer.digest,
        layer.ztoc,
        source,
        SpanCache(cache_dir),
        config=ReadConfig(**config),
        tasks=tasks,
    )


async def read_all_files(reader: RemoteLayerReader, layer: Layer, chunk: int = 128 * 1024) -> None:
    """Read every file through `reader` in `chunk`-sized reads and compare with tarfile."""
    for name, (offset, data) in layer.files().items():
        got = bytearray()
        pos = 0
        while pos < len(data):
            got += await reader.read(UncompressedOffset(offset + pos), min(chunk, len(data) - pos))
            pos += chunk
        assert bytes(got) == data, name


# -- the state table --------------------------------------------------------------------------


def test_every_edge_of_the_transition_table() -> None:
    for old, new in itertools.product(SpanState, SpanState):
        table = SpanTable([10, 20])
        # walk span 0 to `old` through legal edges
        path = {
            SpanState.UNREQUESTED: [],
            SpanState.FETCHING: [SpanState.FETCHING],
            SpanState.CACHED: [SpanState.FETCHING, SpanState.CACHED],
            SpanState.INFLATED: [SpanState.CACHED, SpanState.INFLATED],
        }[old]
        for step in path:
            table.set(SpanId(0), step)
        assert table.state(SpanId(0)) is old
        if new in TRANSITIONS[old]:
            table.set(SpanId(0), new)
            assert table.state(SpanId(0)) is new
        else:
            with pytest.raises(SpanStateError, match=f"{old.value} → {new.value}"):
                table.set(SpanId(0), new)
            assert table.state(SpanId(0)) is old


def test_span_table_counts_local_bytes() -> None:
    table = SpanTable([10, 20, 30])
    table.set(SpanId(1), SpanState.FETCHING)
    assert table.local_bytes == 0
    table.set(SpanId(1), SpanState.CACHED)
    table.set(SpanId(2), SpanState.CACHED)
    assert table.local_bytes == 50
    table.set(SpanId(2), SpanState.INFLATED)
    assert table.local_bytes == 50
    table.set(SpanId(1), SpanState.UNREQUESTED)
    assert table.local_bytes == 30
    assert table.count(SpanState.UNREQUESTED) == 2
    assert table.count(SpanState.INFLATED) == 1


def test_coalesce_groups_consecutive_spans_up_to_the_limit() -> None:
    sizes = [4, 4, 4, 4, 10, 4, 4]
    ids = [SpanId(i) for i in (0, 1, 2, 3, 4, 5, 6)]
    assert coalesce(ids, sizes, 12) == [[0, 1, 2], [3], [4], [5, 6]]
    assert coalesce([SpanId(i) for i in (0, 2, 3, 6)], sizes, 100) == [[0], [2, 3], [6]]
    assert coalesce(ids, sizes, 1) == [[i] for i in range(7)]  # oversized spans stand alone
    assert coalesce([], sizes, 10) == []


def test_coalesce_never_crosses_a_chunk() -> None:
    sizes = [4] * 8
    ids = [SpanId(i) for i in range(8)]
    chunks = [0, 0, 0, 1, 1, 2, 2, 2]
    assert coalesce(ids, sizes, 100, chunks) == [[0, 1, 2], [3, 4], [5, 6, 7]]
    assert coalesce(ids, sizes, 8, chunks) == [[0, 1], [2], [3, 4], [5, 6], [7]]


async def test_reader_requests_stay_inside_chunks(layer: Layer, tmp_path: Path) -> None:
    source = MemorySource(layer.blob)
    chunk = 200_000
    reader = RemoteLayerReader(
        layer.digest,
        layer.ztoc,
        source,
        SpanCache(tmp_path / "c"),
        config=ReadConfig(chunk_bytes=chunk, readahead_spans=8),
    )
    await read_all_files(reader, layer)
    await reader.prefetch_step(10 * 1024 * 1024)
    assert source.calls, "no requests made"
    span_map = reader.span_map
    ranges = [span_map.compressed_range(SpanId(i)) for i in range(span_map.span_count)]
    start_of_span_ending_at = {end: start for start, end in ranges}
    for start, end in source.calls:
        assert start in {s for s, _ in ranges}
        last = start_of_span_ending_at[end]  # the run's last span
        assert start // chunk == last // chunk, (start, end)
    assert len({start // chunk for start, _ in source.calls}) > 1


# -- reading --------------------------------------------------------------------------------------


async def test_reads_every_file_with_few_requests(layer: Layer, tmp_path: Path) -> None:
    source = MemorySource(layer.blob)
    reader = make_reader(layer, source, tmp_path)
    spans = reader.span_map.span_count
    assert spans >= 15
    await read_all_files(reader, layer)
    # sequential reads ride along read-ahead: far fewer requests than spans
    assert len(source.calls) <= spans // 3, source.calls
    assert reader.is_complete()
    progress = reader.progress()
    assert progress.percent > 99.0
    # every byte of every span was fetched exactly once
    fetched = sorted(source.calls)
    for (_, e1), (s2, _) in itertools.pairwise(fetched):
        assert s2 >= e1 - 1  # gzip spans may share the byte of a checkpoint's partial bits
    status = reader.status()
    assert status.states["unrequested"] == 0 and status.last_error == ""


async def test_one_large_read_is_coalesced(layer: Layer, tmp_path: Path) -> None:
    source = MemorySource(layer.blob)
    reader = make_reader(layer, source, tmp_path, readahead_spans=0)
    offset, size = UncompressedOffset(SPAN // 2), 8 * SPAN
    spans = [SpanId(i) for i in reader.span_map.spans_for_range(offset, size)]
    assert len(spans) >= 5
    got = await reader.read(offset, size)
    assert got == layer.tar[offset : offset + size]
    assert len(source.calls) == 1
    # with a one-span request limit the same read takes several requests (run in parallel)
    source2 = MemorySource(layer.blob)
    limit = max(reader.table.sizes[s] for s in spans)
    reader2 = make_reader(
        layer, source2, tmp_path / "b", readahead_spans=0, max_request_bytes=limit
    )
    source2.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader2.read, offset, size)
        await trio.testing.wait_all_tasks_blocked()
        in_flight = len(source2.calls)
        source2.gate.set()
    assert in_flight == len(coalesce(spans, reader2.table.sizes, limit)) >= 3
    assert await reader2.read(offset, size) == got


def span_start(reader: RemoteLayerReader, span: int) -> UncompressedOffset:
    return reader.span_map.uncompressed_range(SpanId(span))[0]


async def test_concurrent_readers_share_one_fetch(layer: Layer, tmp_path: Path) -> None:
    source = MemorySource(layer.blob)
    source.gate = trio.Event()
    reader = make_reader(layer, source, tmp_path, readahead_spans=0)
    results: list[bytes] = []
    at = span_start(reader, 3) + 100

    async def read() -> None:
        results.append(await reader.read(UncompressedOffset(at), 1000))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        assert reader.table.state(SpanId(3)) is SpanState.FETCHING
        source.gate.set()
    assert len(source.calls) == 1
    assert results == [layer.tar[at : at + 1000]] * 10
    assert reader.table.state(SpanId(3)) is SpanState.INFLATED


async def test_random_reads_do_not_read_ahead(layer: Layer, tmp_path: Path) -> None:
    source = MemorySource(layer.blob)
    reader = make_reader(layer, source, tmp_path, readahead_spans=3)
    await reader.read(span_start(reader, 10), 10)
    await reader.read(span_start(reader, 2), 10)
    assert len(source.calls) == 2
    assert reader.table.count(SpanState.UNREQUESTED) == len(reader.table) - 2
    # the next span after the last read is sequential: it brings 3 more along
    await reader.read(span_start(reader, 3), 10)
    assert len(source.calls) == 3
    assert [reader.table.state(SpanId(i)) for i in range(3, 8)] == [
        SpanState.INFLATED,
        SpanState.CACHED,
        SpanState.CACHED,
        SpanState.CACHED,
        SpanState.UNREQUESTED,
    ]


async def settle(reader: RemoteLayerReader) -> None:
    """Wait until no fetch and no inflation ahead of the reader is in flight (cache writes
    and inflation run in threads, so `wait_all_tasks_blocked` alone is not enough)."""
    await trio.testing.wait_all_tasks_blocked()
    with trio.fail_after(5):
        while reader.table.count(SpanState.FETCHING) or reader._inflating_ahead:
            await trio.sleep(0.005)


def crange(reader: RemoteLayerReader, first: int, last: int | None = None) -> tuple[int, int]:
    """The compressed range of spans `first..last` (a request for them)."""
    last = first if last is None else last
    return (
        reader.span_map.compressed_range(SpanId(first))[0],
        reader.span_map.compressed_range(SpanId(last))[1],
    )


async def test_pipelined_read_ahead_does_not_hold_up_the_read(layer: Layer, tmp_path: Path) -> None:
    source = MemorySource(layer.blob)
    async with open_task_scope("test") as root:
        scope = await root.open_child("layer")
        reader = make_reader(layer, source, tmp_path, scope, readahead_spans=4)
        await reader.read(span_start(reader, 0), 10)  # a first read: no read-ahead
        assert source.calls == [crange(reader, 0)]
        source.calls.clear()
        source.gate = trio.Event()
        with trio.move_on_after(5):
            async with trio.open_nursery() as inner:
                inner.start_soon(reader.read, span_start(reader, 1), 10)
                await trio.testing.wait_all_tasks_blocked()
                # moving on into span 1 is sequential: span 1 alone, and the window 2-5
                assert sorted(source.calls) == [crange(reader, 1), crange(reader, 2, 5)]
                source.gate.set()
        source.gate = None
        await settle(reader)
        states = [reader.table.state(SpanId(i)) for i in range(7)]
        # span 2, the one after the read's last, inflated ahead of the reader
        assert states == [SpanState.INFLATED] * 3 + [SpanState.CACHED] * 3 + [SpanState.UNREQUESTED]
        # reads inside the window start nothing new until the window's second half is reached
        await reader.read(span_start(reader, 2), 10)
        await reader.read(span_start(reader, 3), 10)
        await settle(reader)
        assert len(source.calls) == 2
        await reader.read(span_start(reader, 4), 10)
        await settle(reader)
        assert len(source.calls) == 3
        assert source.calls[-1] == crange(reader, 6, 8)
        # a random read does not read ahead
        await reader.read(span_start(reader, 15), 10)
        await settle(reader)
        assert reader.table.state(SpanId(16)) is SpanState.UNREQUESTED
        await scope.aclose()


@pytest.mark.parametrize("pipelined", [True, False])
async def test_read_ahead_stops_at_the_file_end(
    layer: Layer, tmp_path: Path, pipelined: bool
) -> None:
    source = MemorySource(layer.blob)
    async with open_task_scope("test") as root:
        scope = await root.open_child("layer")
        reader = make_reader(
            layer, source, tmp_path, scope if pipelined else None, readahead_spans=4
        )
        # a file from the middle of span 1 to the middle of span 2, read in two requests:
        # the second is sequential, but nothing after span 2 is fetched or inflated
        start = UncompressedOffset(span_start(reader, 1) + 100)
        file_end = span_start(reader, 2) + 100
        middle = UncompressedOffset(span_start(reader, 2) - 50)
        assert await reader.read(start, middle - start, file_end) == layer.tar[start:middle]
        got = await reader.read(middle, file_end - middle, file_end)
        assert got == layer.tar[middle:file_end]
        await settle(reader)
        assert sorted(source.calls) == [crange(reader, 1), crange(reader, 2)]
        assert reader.table.state(SpanId(3)) is SpanState.UNREQUESTED
        # the same reads without the file's end: read-ahead goes on to spans 3-6
        source.calls.clear()
        await reader.read(UncompressedOffset(span_start(reader, 9) - 50), 100)
        await reader.read(UncompressedOffset(span_start(reader, 10) - 50), 100)
        await settle(reader)
        assert max(source.calls)[1] >= crange(reader, 11)[1]
        await scope.aclose()


async def test_inflated_lru_is_bounded(layer: Layer, tmp_path: Path) -> None:
    reader = make_reader(layer, MemorySource(layer.blob), tmp_path, memory_cache_spans=2)
    for i in range(5):
        await reader.read(span_start(reader, i), 1)
    assert reader.table.count(SpanState.INFLATED) == 2
    assert reader.table.count(SpanState.CACHED) >= 3


async def test_read_past_the_end_and_empty(layer: Layer, tmp_path: Path) -> None:
    reader = make_reader(layer, MemorySource(layer.blob), tmp_path)
    total = layer.ztoc.uncompressed_archive_size
    assert await reader.read(UncompressedOffset(total), 10) == b""
    assert await reader.read(UncompressedOffset(total - 5), 100) == layer.tar[total - 5 : total]
    assert await reader.read(UncompressedOffset(0), 0) == b""


# -- failures and verification ------------------------------------------------------------------


async def test_corrupt_source_falls_through_to_the_next(layer: Layer, tmp_path: Path) -> None:
    bad = MemorySource(layer.blob, "bad")
    bad.always_corrupt = True
    good = MemorySource(layer.blob, "good")
    reader = make_reader(layer, ChainSource([bad, good]), tmp_path)
    assert await reader.read(UncompressedOffset(SPAN), 5000) == layer.tar[SPAN : SPAN + 5000]
    assert len(bad.calls) == 1 and len(good.calls) == 1


async def test_every_source_failing_is_a_read_error_and_nothing_is_cached(
    layer: Layer, tmp_path: Path
) -> None:
    bad = MemorySource(layer.blob, "bad")
    bad.always_corrupt = True
    down = MemorySource(layer.blob, "down")
    down.fail_next = 100
    reader = make_reader(layer, ChainSource([bad, down]), tmp_path)
    with pytest.raises(LayerReadError, match="every source failed") as info:
        await reader.read(UncompressedOffset(SPAN), 10)
    assert isinstance(info.value.__cause__, AllSourcesFailed)
    kinds = [type(e) for _, e in info.value.__cause__.errors]
    assert kinds == [ContentMismatch, SourceUnavailable]
    assert reader.table.state(SpanId(1)) is SpanState.UNREQUESTED
    assert "every source failed" in reader.status().last_error
    assert reader.cache.stats().entries == 0
    # the span is not stuck: when a source recovers, the same read succeeds
    down.fail_next = 0
    assert await reader.read(UncompressedOffset(SPAN), 10) == layer.tar[SPAN : SPAN + 10]


async def test_waiters_retry_after_the_fetch_they_waited_for_fails(
    layer: Layer, tmp_path: Path
) -> None:
    source = MemorySource(layer.blob)
    source.gate = trio.Event()
    source.fail_next = 1
    reader = make_reader(layer, source, tmp_path, readahead_spans=0)
    outcomes: list[object] = []
    at = span_start(reader, 5)

    async def read() -> None:
        try:
            outcomes.append(await reader.read(at, 10))
        except LayerReadError as e:
            outcomes.append(e)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        source.gate.set()
    # the first reader's fetch failed; the waiter fetched again and got the right bytes
    assert len(source.calls) == 2
    assert sum(isinstance(o, LayerReadError) for o in outcomes) == 1
    assert layer.tar[at : at + 10] in outcomes


class _BrokenInflate:
    """A span map whose span 2 never inflates (as if the zTOC's checkpoint were wrong)."""

    def __init__(self, inner: SpanMap) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def inflate(self, span: SpanId, data: bytes) -> bytes:
        if span == 2:
            raise SpanInflateError(f"span {span}: injected")
        return self._inner.inflate(span, data)


async def test_inflate_failure_is_a_plain_read_error(layer: Layer, tmp_path: Path) -> None:
    source = MemorySource(layer.blob)
    source.feed_chunk_bytes = 0  # answers read whole: the read inflates its spans itself
    reader = make_reader(layer, source, tmp_path)
    reader.inflater.span_map = _BrokenInflate(reader.span_map)  # type: ignore[assignment]
    start = span_start(reader, 1)
    with pytest.raises(LayerReadError, match="span 2: injected") as info:
        await reader.read(start, span_start(reader, 4) - start)  # spans 1-3, inflated in parallel
    assert isinstance(info.value.__cause__, SpanInflateError)
    assert "injected" in reader.status().last_error
    assert await reader.read(start, 10) == layer.tar[start : start + 10]


async def test_cached_spans_are_not_fetched_again(layer: Layer, tmp_path: Path) -> None:
    first = MemorySource(layer.blob)
    await read_all_files(make_reader(layer, first, tmp_path), layer)
    SpanCache(tmp_path).release_layer(layer.digest)  # image removed, then pulled again
    second = MemorySource(layer.blob)
    reader = make_reader(layer, second, tmp_path)
    assert not reader.cache.is_released(layer.digest)
    assert reader.is_complete() and reader.progress().percent > 99.0
    await read_all_files(reader, layer)
    assert second.calls == []


async def test_corrupt_cache_file_is_refetched(layer: Layer, tmp_path: Path) -> None:
    source = MemorySource(layer.blob)
    reader = make_reader(layer, source, tmp_path, readahead_spans=0, memory_cache_spans=1)
    at = span_start(reader, 2)
    await reader.read(at, 10)
    path = tmp_path / "spans" / f"sha256-{layer.digest.hex}" / "2"
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    fresh = make_reader(layer, source, tmp_path, readahead_spans=0)
    assert fresh.table.state(SpanId(2)) is SpanState.CACHED
    assert await fresh.read(at, 10) == layer.tar[at : at + 10]
    assert len(source.calls) == 2
    assert fresh.cache.stats().corrupt_dropped == 1
    assert path.read_bytes() == data


def test_read_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        ReadConfig(max_request_bytes=0)


# -- the inflated tier ----------------------------------------------------------------------------


def tier_reader(
    layer: Layer, source: MemorySource, cache_dir: Path, **config: int
) -> tuple[RemoteLayerReader, CountingSpanMap]:
    reader = RemoteLayerReader(
        layer.digest,
        layer.ztoc,
        source,
        SpanCache(cache_dir, CacheConfig(inflated_max_bytes=64 << 20)),
        config=ReadConfig(**config),
    )
    counting = count_inflations(reader)
    return reader, counting


async def test_inflated_spans_are_kept_on_disk_and_served_without_inflating(
    layer: Layer, tmp_path: Path
) -> None:
    first, counted = tier_reader(layer, MemorySource(layer.blob), tmp_path, memory_cache_spans=1)
    await read_all_files(first, layer)
    spans = first.span_map.span_count
    assert counted.total >= spans
    tier = first.cache.inflated
    assert tier is not None
    tier.flush()  # written behind the reads
    assert tier.stats().entries == spans
    for i in range(spans):
        start, end = first.span_map.uncompressed_range(SpanId(i))
        path = tmp_path / "inflated" / "spans" / f"sha256-{layer.digest.hex}" / str(start)
        assert path.read_bytes()[: end - start] == layer.tar[start:end]

    # a new reader (empty memory LRU), the compressed spans gone: served from the tier alone
    SpanCache(tmp_path).drop_layer(layer.digest)
    source = MemorySource(layer.blob)
    again, counted = tier_reader(layer, source, tmp_path, memory_cache_spans=1)
    await read_all_files(again, layer, chunk=4096)
    files = layer.files()
    offset = files[sorted(files)[3]][0] + 1000
    assert (
        await again.read(UncompressedOffset(offset), 3 * SPAN)
        == layer.tar[offset : offset + 3 * SPAN]
    )
    assert counted.total == 0 and source.calls == []
    assert again.cache.stats().hits == 0  # no compressed span was read or hashed
    assert again.cache.inflated is not None
    assert again.cache.inflated.stats().hits > 100


async def test_a_torn_inflated_file_falls_back_to_the_compressed_span(
    layer: Layer, tmp_path: Path
) -> None:
    source = MemorySource(layer.blob)
    reader, counted = tier_reader(layer, source, tmp_path, readahead_spans=0)
    at = span_start(reader, 2)
    assert await reader.read(at, 10) == layer.tar[at : at + 10]
    assert reader.cache.inflated is not None
    reader.cache.inflated.flush()
    path = tmp_path / "inflated" / "spans" / f"sha256-{layer.digest.hex}" / str(at)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # torn (e.g. written by a broken tool)
    fresh, counted = tier_reader(layer, source, tmp_path, readahead_spans=0)
    assert await fresh.read(UncompressedOffset(at + 5), 100) == layer.tar[at + 5 : at + 105]
    assert counted.total == 1 and len(source.calls) == 1  # re-inflated from the disk cache
    assert fresh.cache.inflated is not None
    assert fresh.cache.inflated.stats().corrupt_dropped == 1
    fresh.cache.inflated.flush()
    assert path.read_bytes() == whole  # written again, whole


async def test_reads_mixing_memory_tier_and_missing_spans(layer: Layer, tmp_path: Path) -> None:
    source = MemorySource(layer.blob)
    reader, counted = tier_reader(layer, source, tmp_path, readahead_spans=0, memory_cache_spans=2)
    for i in (1, 3):  # spans 1 and 3 local (tier; 3 also in memory), 2 never read
        await reader.read(span_start(reader, i), 1)
    start, end = span_start(reader, 1) + 7, span_start(reader, 4) - 3
    assert await reader.read(UncompressedOffset(start), end - start) == layer.tar[start:end]
    assert reader.table.state(SpanId(2)) in (SpanState.CACHED, SpanState.INFLATED)
    # now all three are local: served by the tier path in one go
    inflates = counted.total
    assert reader.cache.inflated is not None
    reader.cache.inflated.flush()
    fresh, counted = tier_reader(layer, source, tmp_path, readahead_spans=0)
    assert await fresh.read(UncompressedOffset(start), end - start) == layer.tar[start:end]
    assert counted.total == 0 and inflates >= 3


# -- the read-ahead policy --------------------------------------------------------------------


def test_read_ahead_policy() -> None:
    policy = ReadAhead(window=4, span_count=10)
    last = SpanId(9)
    assert policy.observe(SpanId(0), SpanId(0)) is None  # a first read is not sequential
    assert policy.observe(SpanId(0), SpanId(0)) is None  # reads inside one span are not
    assert policy.observe(SpanId(1), SpanId(1)) == last  # moving on into the next span is
    assert policy.observe(SpanId(1), SpanId(2)) == last  # so is a read crossing into the next span
    assert policy.observe(SpanId(7), SpanId(7)) is None  # a jump is not
    assert policy.ride_along(SpanId(7), last) == range(8, 10)  # clipped at the last span
    assert policy.ride_along(SpanId(2), SpanId(4)) == range(3, 5)  # and at `stop`
    assert policy.ride_along(SpanId(2), SpanId(2)) == range(0)
    missing = {3, 4, 5, 6}
    # started only when a span of the window's first half (3, 4) is missing
    assert policy.pipelined_window(SpanId(2), last, lambda s: s in missing) == range(3, 7)
    assert policy.pipelined_window(SpanId(2), SpanId(3), lambda s: s in missing) == range(3, 4)
    assert policy.pipelined_window(SpanId(2), SpanId(2), lambda s: s in missing) is None
    missing = {5, 6}
    assert policy.pipelined_window(SpanId(2), last, lambda s: s in missing) is None
    assert ReadAhead(window=0, span_count=10).observe(SpanId(0), SpanId(1)) is None


def test_read_ahead_stops_at_the_end_of_a_file_read_on_its_own() -> None:
    # spans of 100 bytes; a file's data [150, 260) in spans 1-2, read in two requests
    policy = ReadAhead(window=4, span_count=2000)
    assert policy.observe(SpanId(1), SpanId(1), start=150, end=200, file_end=260) is None
    two = SpanId(2)
    assert policy.observe(SpanId(1), two, start=200, end=260, file_end=260, file_last=two) == two
    # sequential, but nothing after the file's last span. The next file in tar order (its
    # header right after) is read: the reader goes through the layer, and read-ahead runs
    # past that file's end again
    three = SpanId(3)
    got = policy.observe(three, three, start=773, end=900, file_end=900, file_last=three)
    assert got == SpanId(1999)
    # a file further away than THROUGH_GAP is read on its own: its window stops at its end
    far = 900 + THROUGH_GAP + 1
    first, last = SpanId(far // 100), SpanId(far // 100 + 1)
    assert policy.observe(first, first, start=far, end=far + 10, file_end=far + 150) is None
    got = policy.observe(
        first, last, start=far + 10, end=far + 150, file_end=far + 150, file_last=last
    )
    assert got == last
    # a read that is no file's (None) is not cut
    assert policy.observe(SpanId(last + 1), SpanId(last + 1)) == SpanId(1999)


# -- the layer's task scope and errors at the reader boundary -------------------------------------


async def test_closing_the_layer_scope_cancels_its_read_ahead(layer: Layer, tmp_path: Path) -> None:
    source = MemorySource(layer.blob)
    async with open_task_scope("test") as root:
        scope = await root.open_child("layer")
        reader = make_reader(layer, source, tmp_path, scope, readahead_spans=4)
        await reader.read(span_start(reader, 0), 10)
        source.gate = trio.Event()
        results: list[bytes | LayerClosed] = []

        async def read_span_1() -> None:
            try:
                results.append(await reader.read(span_start(reader, 1), 10))
            except LayerClosed as e:
                results.append(e)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_span_1)
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(source.calls[1:]) == [crange(reader, 1), crange(reader, 2, 5)]
            assert reader.tracker.active == 2
            # the layer is unmounted: its read-ahead and the fetch of the read in flight are
            # cancelled (no retry or refetch can follow), the read raises LayerClosed
            await scope.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert source.cancelled == 2 and reader.tracker.active == 0
            assert reader.table.state(SpanId(1)) is SpanState.UNREQUESTED
            assert reader.table.state(SpanId(2)) is SpanState.UNREQUESTED
        assert len(results) == 1 and isinstance(results[0], LayerClosed), results
        calls = len(source.calls)
        # no further request for the layer: reads fail at once
        with pytest.raises(LayerClosed):
            await reader.read(span_start(reader, 2), 10)
        with pytest.raises(LayerClosed):
            await reader.prefetch_step(SPAN)
        assert len(source.calls) == calls == 3
        assert root.statistics().errors == 0


async def test_an_unexpected_read_ahead_error_is_counted_and_the_layer_goes_on(
    layer: Layer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = MemorySource(layer.blob)
    warm = make_reader(layer, source, tmp_path, readahead_spans=0)
    for span in (0, 1):  # spans 0 and 1 in the cache: the reads below make no request
        await warm.read(span_start(warm, span), 10)
    source.calls.clear()
    async with open_task_scope("test") as root:
        scope = await root.open_child("layer one")
        reader = make_reader(layer, source, tmp_path, scope, readahead_spans=4)
        # e.g. a hosts.toml whose `ca` file is missing: building the TLS context fails
        source.raise_next = [FileNotFoundError(2, "No such file or directory", "ca.pem")]
        await reader.read(span_start(reader, 0), 10)
        await reader.read(span_start(reader, 1), 10)  # sequential: read-ahead of 2-5 fails
        await settle(reader)
        assert source.calls == [crange(reader, 2, 5)]
        status = reader.status()
        assert status.errors == 1 and "FileNotFoundError" in status.last_error
        assert scope.statistics().errors == 1 and not scope.closed and not root.closed
        failed = [r for r in caplog.records if r.getMessage() == "task failed"]
        assert [getattr(r, "scope", None) for r in failed] == ["layer one"]
        # the layer keeps serving, and the spans the read-ahead held are fetched on demand
        at = span_start(reader, 2)
        assert await reader.read(at, 10) == layer.tar[at : at + 10]


async def test_an_unexpected_source_error_reaches_the_caller_bare(
    layer: Layer, tmp_path: Path
) -> None:
    source = MemorySource(layer.blob)
    source.raise_next = [RuntimeError("a bug")]
    reader = make_reader(layer, source, tmp_path)
    at = span_start(reader, 4)
    with pytest.raises(RuntimeError, match="a bug"):  # not in an ExceptionGroup
        await reader.read(at, 10)
    assert reader.table.state(SpanId(4)) is SpanState.UNREQUESTED
    assert await reader.read(at, 10) == layer.tar[at : at + 10]
