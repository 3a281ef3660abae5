"""Spans inflated while their Range answer arrives (`snapshotter.lazy.arriving`), with a fake
`BlobSource` at the seam that feeds the answer in chunks as a registry's arrives: what is
kept is only ever inflated from the verified bytes, and anything else falls back to the
read's own inflation."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from index.model import CompressedOffset, SpanId, UncompressedOffset
from index.oci.responses import BodySink
from index.zinfo import SpanMap
from snapshotter.lazy import ReadConfig, RemoteLayerReader, SpanState
from snapshotter.lazy.arriving import ARRIVING_THREADS, MAX_ARRIVING_RUNS, open_arriving
from snapshotter.lazy.cache import CacheConfig, SpanCache
from snapshotter.lazy.sources import ChainSource, Check, SourceUnavailable
from tests.support.lazylayer import CountingSpanMap, Layer, MemorySource, count_inflations


@pytest.fixture(scope="module")
def layer() -> Layer:
    return Layer()


def counted_reader(
    layer: Layer, source: MemorySource | ChainSource, cache_dir: Path
) -> tuple[RemoteLayerReader, CountingSpanMap]:
    reader = RemoteLayerReader(
        layer.digest,
        layer.ztoc,
        source,
        SpanCache(cache_dir, CacheConfig(inflated_max_bytes=1 << 26)),
        config=ReadConfig(readahead_spans=0),
    )
    counting = count_inflations(reader)
    return reader, counting


def middle_of(reader: RemoteLayerReader, span: int) -> UncompressedOffset:
    start, end = reader.span_map.uncompressed_range(SpanId(span))
    return UncompressedOffset((start + end) // 2)


async def test_a_read_gets_its_span_inflated_as_the_answer_arrives(
    layer: Layer, tmp_path: Path
) -> None:
    source = MemorySource(layer.blob)
    source.feed_chunk_bytes = 4096
    reader, counting = counted_reader(layer, source, tmp_path)
    offset = middle_of(reader, 2)
    assert await reader.read(offset, 5000) == layer.tar[offset : offset + 5000]
    assert (counting.arriving, counting.inflates) == (1, 0)  # no inflation after the answer
    assert reader.table.state(SpanId(2)) is SpanState.INFLATED
    tier = reader.cache.inflated
    assert tier is not None
    tier.flush()
    start, end = reader.span_map.uncompressed_range(SpanId(2))
    assert tier.read(layer.digest, start, end - start, 0, end - start) == layer.tar[start:end]
    # another read of the span: from memory, nothing inflated again
    assert await reader.read(UncompressedOffset(start), 10) == layer.tar[start : start + 10]
    assert (counting.arriving, counting.inflates) == (1, 0)


async def test_an_answer_read_whole_is_inflated_by_the_read(layer: Layer, tmp_path: Path) -> None:
    source = MemorySource(layer.blob)
    source.feed_chunk_bytes = 0  # a source that does not feed the sink (a peer)
    reader, counting = counted_reader(layer, source, tmp_path)
    offset = middle_of(reader, 3)
    assert await reader.read(offset, 100) == layer.tar[offset : offset + 100]
    assert (counting.arriving, counting.inflates) == (0, 1)  # no thread for it: the read


async def test_an_answer_that_failed_over_is_inflated_by_the_read(
    layer: Layer, tmp_path: Path
) -> None:
    """The first source feeds half an answer and fails; the second feeds a whole one: two
    answers in one sink, so nothing inflated from them is kept."""

    class BreaksOff(MemorySource):
        async def fetch(
            self,
            digest: object,
            start: CompressedOffset,
            end: CompressedOffset,
            *,
            check: Check | None = None,
            sink: BodySink | None = None,
        ) -> bytes:
            if sink is not None:
                sink.begin()
                sink.feed(self.blob[start : (start + end) // 2])
            raise SourceUnavailable("broke off", source=self.name)

    chain = ChainSource([BreaksOff(layer.blob, "first"), MemorySource(layer.blob, "second")])
    reader, counting = counted_reader(layer, chain, tmp_path)
    offset = middle_of(reader, 1)
    assert await reader.read(offset, 100) == layer.tar[offset : offset + 100]
    assert counting.inflates == 1


async def test_a_corrupt_answer_is_never_kept(layer: Layer, tmp_path: Path) -> None:
    """A corrupt answer is fed whole, fails its check, and the next source's answer is
    verified: the span is inflated from the verified bytes only."""
    bad = MemorySource(layer.blob, "bad")
    bad.always_corrupt = True
    chain = ChainSource([bad, MemorySource(layer.blob, "good")])
    reader, counting = counted_reader(layer, chain, tmp_path)
    start, end = reader.span_map.uncompressed_range(SpanId(0))
    assert await reader.read(UncompressedOffset(start), end - start) == layer.tar[start:end]
    assert counting.inflates == 1


def test_only_the_verified_bytes_are_kept(layer: Layer) -> None:
    span_map = SpanMap.from_ztoc(layer.ztoc)
    c0, c1 = span_map.compressed_range(SpanId(1))
    good = layer.blob[c0:c1]
    kept: list[SpanId] = []

    def run(fed: bytes, verified: bytes | None) -> dict[SpanId, bytes]:
        arriving = open_arriving(span_map, [SpanId(1)], {SpanId(1)}, lambda s, _: kept.append(s))
        assert arriving is not None
        arriving.begin()
        arriving.feed(fed)
        arriving.finish(verified)
        return arriving.work()

    u0, u1 = span_map.uncompressed_range(SpanId(1))
    assert run(good, good) == {SpanId(1): layer.tar[u0:u1]} and kept == [SpanId(1)]
    kept.clear()
    corrupt = bytes([good[0] ^ 1]) + good[1:]
    assert run(corrupt, good) == {} and kept == []  # fed other bytes than were verified
    assert run(good, None) == {} and kept == []  # the fetch failed
    assert run(good[:100], good) == {} and kept == []  # an answer cut short


async def test_a_cancelled_read_leaves_no_thread_waiting(layer: Layer, tmp_path: Path) -> None:
    source = MemorySource(layer.blob)
    source.gate = trio.Event()
    reader, counting = counted_reader(layer, source, tmp_path)
    with trio.move_on_after(0.2) as scope:
        await reader.read(middle_of(reader, 4), 10)
    assert scope.cancelled_caught
    with trio.fail_after(5):
        while ARRIVING_THREADS.borrowed_tokens:
            await trio.sleep(0.01)
    assert reader.table.state(SpanId(4)) is SpanState.UNREQUESTED
    assert counting.inflates == 0


def test_at_most_a_few_runs_are_inflated_as_they_arrive(layer: Layer) -> None:
    """Each holds a copy of its bytes: beyond the cap, requests go the ordinary way."""
    span_map = SpanMap.from_ztoc(layer.ztoc)
    runs = [open_arriving(span_map, [SpanId(0)], {SpanId(0)}) for _ in range(MAX_ARRIVING_RUNS)]
    assert all(r is not None for r in runs)
    assert open_arriving(span_map, [SpanId(0)], {SpanId(0)}) is None
    for r in runs:
        assert r is not None
        r.finish(None)
    again = open_arriving(span_map, [SpanId(0)], {SpanId(0)})
    assert again is not None
    again.finish(None)


def test_read_ahead_riding_along_is_not_copied(layer: Layer) -> None:
    """A run of the wanted span and two spans of read-ahead keeps a copy of the first only,
    and what it inflated is kept when that part matches the verified answer."""
    span_map = SpanMap.from_ztoc(layer.ztoc)
    run = [SpanId(1), SpanId(2), SpanId(3)]
    start = span_map.compressed_range(run[0])[0]
    end = span_map.compressed_range(run[-1])[1]
    answer = layer.blob[start:end]
    arriving = open_arriving(span_map, run, {SpanId(1)})
    assert arriving is not None
    arriving.begin()
    for i in range(0, len(answer), 5000):
        arriving.feed(answer[i : i + 5000])
    assert "received=" + str(span_map.compressed_range(SpanId(1))[1] - start) in repr(arriving)
    arriving.finish(answer)
    u0, u1 = span_map.uncompressed_range(SpanId(1))
    assert arriving.work() == {SpanId(1): layer.tar[u0:u1]}
