"""The registry mirror serving a lazily pulled layer out of the span cache (`SpanBlobs`).

A real `SpanCache` filled with a `Layer`'s verified spans, the layer's real `SpanFetcher`
(mounted here through the real `SpanServer`), its head fetched from a `MemorySource` standing
in for the registry, checks run in a real task scope.

What it shows: the whole blob and every kind of range (inside the head, across the byte
neighbouring gzip spans share, single bytes at span edges, the end) come out byte-exact; the
head is fetched once per layer and the whole blob checked once; a layer with one span missing,
or one being fetched, is not offered (and costs no registry request); a head that does not
make the layer's digest is never served, remembered, and logged once; a head that could not be
fetched is tried again on the next lookup; a lookup that gives up waiting leaves the check
running so the next lookup finds it done; a span evicted after the check is fetched again
rather than cutting the answer; through `MirrorService` the layer is a `spans` source (also
for a member's local lookup), counted in `from_spans`, with no anonymous check for a layer;
and through a real peer listener containerd gets 200 and 206 answers with the right bytes.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from index.digest import Digest
from index.model import SpanId, Ztoc
from index.oci.client import AsyncRegistryClient
from index.oci.reference import Reference
from index.zinfo import SpanMap
from snapshotter.lazy.cache import SpanCache
from snapshotter.lazy.demand import DemandTracker
from snapshotter.lazy.fetcher import LayerCounters, SpanFetcher
from snapshotter.lazy.sources import BlobSource
from snapshotter.lazy.table import SpanState, SpanTable
from snapshotter.mirror.access import PublicRepositories
from snapshotter.mirror.serve import MirrorError, MirrorService
from snapshotter.mirror.spans import SpanBlobs
from snapshotter.peers.serving import SpanServer
from snapshotter.tasks import TaskScope, open_task_scope
from tests.support.lazylayer import Layer, MemorySource
from tests.support.peers import FakeMounted, open_listener

REF = Reference("registry.test:5000", "team/app")


@pytest.fixture(scope="module")
def layer() -> Layer:
    return Layer(files=6, size=90_000)


@pytest.fixture(scope="module")
def span_map(layer: Layer) -> SpanMap:
    return SpanMap.from_ztoc(layer.ztoc)


class CountingUpstream:
    """`upstream(ref)`: one `MemorySource` over `blob`, the refs it was asked for recorded."""

    def __init__(self, blob: bytes) -> None:
        self.source = MemorySource(blob, name="registry")
        self.refs: list[Reference] = []

    def __call__(self, ref: Reference) -> BlobSource:
        self.refs.append(ref)
        return self.source


@dataclass
class Node:
    layer: Layer
    span_map: SpanMap
    cache: SpanCache
    fetcher: SpanFetcher
    server: SpanServer
    mounted: FakeMounted
    upstream: CountingUpstream
    reader_source: MemorySource
    spans: SpanBlobs
    tasks: TaskScope


def fill(
    cache: SpanCache, layer: Layer, span_map: SpanMap, skip: frozenset[int] = frozenset()
) -> None:
    for i in range(span_map.span_count):
        if i in skip:
            continue
        start, end = span_map.compressed_range(SpanId(i))
        data = layer.blob[start:end]
        span_map.verify(SpanId(i), data)
        cache.put(layer.digest, SpanId(i), data)


@pytest.fixture
async def node(layer: Layer, span_map: SpanMap, tmp_path: Path) -> AsyncIterator[Node]:
    cache = SpanCache(tmp_path / "cache")
    fill(cache, layer, span_map)
    sizes = [
        e - s for s, e in map(span_map.compressed_range, map(SpanId, range(span_map.span_count)))
    ]
    reader_source = MemorySource(layer.blob, name="chain")
    tracker = DemandTracker()
    fetcher = SpanFetcher(
        layer.digest,
        span_map,
        reader_source,
        cache,
        SpanTable(sizes),
        max_request_bytes=1 << 20,
        tracker=tracker,
        io_limiter=trio.CapacityLimiter(2),
        counters=LayerCounters(),
    )
    mounted = FakeMounted()
    mounted.fetchers[layer.digest] = fetcher
    upstream = CountingUpstream(layer.blob)
    server = SpanServer(
        layers=mounted,
        cache=cache,
        load_ztoc=_no_ztoc,
        upstream=upstream,
        tracker=tracker,
        io_limiter=trio.CapacityLimiter(2),
        max_request_bytes=1 << 20,
    )
    async with open_task_scope("test") as root:
        tasks = await root.open_child("peers")
        spans = SpanBlobs(layers=server, cache=cache, upstream=upstream, tasks=tasks)
        yield Node(
            layer, span_map, cache, fetcher, server, mounted, upstream, reader_source, spans, tasks
        )


async def _no_ztoc(ref: Reference, digest: Digest) -> Ztoc:
    raise AssertionError("no zTOC is loaded for the mirror")


async def read(spans: SpanBlobs, layer: Digest, start: int, end: int) -> bytes:
    return b"".join([chunk async for chunk in spans.stream(layer, start, end)])


def first_start(span_map: SpanMap) -> int:
    return span_map.compressed_range(SpanId(0))[0]


# -- SpanBlobs ---------------------------------------------------------------------------------


def test_the_layer_is_gzip_with_a_head_and_shared_bytes(layer: Layer, span_map: SpanMap) -> None:
    # what the other tests rely on: bytes before the first span, neighbours sharing a byte,
    # and the last span running to the end of the blob (the gzip trailer)
    assert first_start(span_map) == 10
    assert span_map.span_count > 4
    shared = [
        i
        for i in range(1, span_map.span_count)
        if span_map.compressed_range(SpanId(i))[0]
        == span_map.compressed_range(SpanId(i - 1))[1] - 1
    ]
    assert shared
    last = span_map.compressed_range(SpanId(span_map.span_count - 1))[1]
    assert last == span_map.compressed_archive_size == len(layer.blob)


async def test_whole_blob_byte_exact_head_fetched_and_checked_once(node: Node) -> None:
    layer = node.layer
    assert await node.spans.size(REF, layer.digest) == len(layer.blob)
    assert await read(node.spans, layer.digest, 0, len(layer.blob)) == layer.blob
    # a second lookup and read: nothing fetched again, nothing checked again
    assert await node.spans.size(REF, layer.digest) == len(layer.blob)
    assert await read(node.spans, layer.digest, 0, len(layer.blob)) == layer.blob
    assert node.upstream.source.calls == [(0, first_start(node.span_map))]
    assert node.upstream.refs == [REF]
    assert node.spans.stats.checked == 1
    assert node.reader_source.calls == []  # the layer's own source (peers, registry) unused


async def test_ranges_byte_exact(node: Node) -> None:
    layer, span_map = node.layer, node.span_map
    size = len(layer.blob)
    assert await node.spans.size(REF, layer.digest) == size
    edges: set[int] = {0, 1, 9, 10, 11, size - 1, size}
    for i in range(span_map.span_count):
        s, e = span_map.compressed_range(SpanId(i))
        edges |= {s - 1, s, s + 1, e - 1, e, e + 1}
    edges = {x for x in edges if 0 <= x <= size}
    rng = random.Random(7)
    cases = [(a, b) for a in sorted(edges) for b in (a + 1, a + 2) if b <= size]
    cases += [(rng.randrange(size), rng.randrange(size)) for _ in range(60)]
    cases += [(0, 5), (3, 10), (5, 20_000), (size - 8, size), (0, size)]
    checked = 0
    for a, b in cases:
        a, b = min(a, b), max(a, b)
        if a == b:
            continue
        assert await read(node.spans, layer.digest, a, b) == layer.blob[a:b], (a, b)
        checked += 1
    assert checked > 100
    # an end past the blob is clipped to it
    assert await read(node.spans, layer.digest, size - 4, size + 100) == layer.blob[-4:]


async def test_a_missing_span_is_not_offered(
    layer: Layer, span_map: SpanMap, tmp_path: Path, node: Node
) -> None:
    node.cache.drop_layer(layer.digest)
    fill(node.cache, layer, span_map, skip=frozenset({span_map.span_count // 2}))
    node.cache.retain_layer(layer.digest)
    for i in range(span_map.span_count):  # the table forgets what drop_layer took
        if node.fetcher.table.state(SpanId(i)) is SpanState.CACHED:
            node.fetcher.table.set(SpanId(i), SpanState.UNREQUESTED)
    assert await node.spans.size(REF, layer.digest) is None
    assert node.upstream.source.calls == []  # no registry request for an incomplete layer
    with pytest.raises(Exception, match="not served from the span cache"):
        await read(node.spans, layer.digest, 0, 10)


async def test_a_span_being_fetched_is_not_complete(node: Node) -> None:
    span = SpanId(1)
    assert not node.fetcher.missing(span)  # listed in the cache: CACHED now
    node.fetcher.table.set(span, SpanState.UNREQUESTED)
    node.fetcher.table.set(span, SpanState.FETCHING)
    assert await node.spans.size(REF, node.layer.digest) is None
    node.fetcher.table.set(span, SpanState.CACHED)
    assert await node.spans.size(REF, node.layer.digest) == len(node.layer.blob)


async def test_an_unknown_layer_is_not_offered(node: Node) -> None:
    assert await node.spans.size(REF, Digest.of(b"something else")) is None
    assert node.upstream.refs == []


async def test_a_corrupted_head_is_never_served(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    layer = node.layer
    # the OS byte of the gzip header flipped: the spans are fine, the whole blob is not
    node.upstream.source.blob = layer.blob[:9] + bytes([layer.blob[9] ^ 0xFF]) + layer.blob[10:]
    assert node.upstream.source.blob != layer.blob
    with caplog.at_level(logging.WARNING, logger="snapshotter.mirror.spans"):
        assert await node.spans.size(REF, layer.digest) is None
        assert await node.spans.size(REF, layer.digest) is None  # remembered: not checked again
    warnings = [r for r in caplog.records if r.getMessage() == "mirror spans do not make the layer"]
    assert len(warnings) == 1
    assert warnings[0].__dict__["layer"] == str(layer.digest)
    assert node.upstream.source.calls == [(0, 10)]
    assert node.spans.stats.mismatched == 1 and node.spans.stats.checked == 0
    with pytest.raises(Exception, match="not served from the span cache"):
        await read(node.spans, layer.digest, 0, len(layer.blob))


async def test_a_head_that_could_not_be_fetched_is_tried_again(node: Node) -> None:
    node.upstream.source.fail_next = 1
    assert await node.spans.size(REF, node.layer.digest) is None
    assert await node.spans.size(REF, node.layer.digest) == len(node.layer.blob)
    assert node.upstream.source.calls == [(0, 10), (0, 10)]


async def test_a_lookup_that_gives_up_leaves_the_check_running(node: Node) -> None:
    gate = trio.Event()
    node.upstream.source.gate = gate
    with trio.move_on_after(0.2) as gave_up:
        await node.spans.size(REF, node.layer.digest)
    assert gave_up.cancelled_caught
    gate.set()
    with trio.fail_after(10):
        assert await node.spans.size(REF, node.layer.digest) == len(node.layer.blob)
    assert node.upstream.source.calls == [(0, 10)]  # one check, not one per lookup


async def test_a_span_evicted_after_the_check_is_fetched_again(node: Node) -> None:
    layer, span_map = node.layer, node.span_map
    assert await node.spans.size(REF, layer.digest) == len(layer.blob)
    victim = SpanId(span_map.span_count - 2)
    path = node.cache.root / "spans" / f"sha256-{layer.digest.hex}" / str(int(victim))
    path.unlink()
    assert await read(node.spans, layer.digest, 0, len(layer.blob)) == layer.blob
    assert node.reader_source.calls == [tuple(span_map.compressed_range(victim))]


async def test_a_layer_served_to_peers_but_not_mounted_is_offered(node: Node) -> None:
    # the SpanServer's own fetchers count too (layers this node owns chunks of for peers)
    fetcher = node.mounted.fetchers.pop(node.layer.digest)
    assert node.server.fetcher_for(node.layer.digest) is None
    node.server._owned[node.layer.digest] = fetcher
    assert node.server.fetcher_for(node.layer.digest) is fetcher
    assert await node.spans.size(REF, node.layer.digest) == len(node.layer.blob)


# -- through MirrorService and a real listener -------------------------------------------------


class PrivateRegistry:
    """Answers every anonymous check 401 (counted): a layer must not need one."""

    def __init__(self) -> None:
        self.requests = 0

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        return httpx.Response(401)


async def test_mirror_service_serves_spans_for_containerd_and_members(node: Node) -> None:
    registry = PrivateRegistry()
    async with AsyncRegistryClient(transport=httpx.MockTransport(registry.handle)) as client:
        mirror = MirrorService(
            content=None, peers=None, public=PublicRepositories(client), spans=node.spans
        )
        for local_only in (False, True):
            where = await mirror.locate(REF, node.layer.digest, local_only=local_only)
            assert where.source == "spans" and where.size == len(node.layer.blob)
        body = b"".join(
            [c async for c in mirror.body(REF, node.layer.digest, where, 0, where.size)]
        )
        assert body == node.layer.blob
        assert mirror.stats.from_spans == len(node.layer.blob)
        assert mirror.stats.from_content == mirror.stats.from_peers == 0
        with pytest.raises(MirrorError) as missing:
            await mirror.locate(REF, Digest.of(b"not here"), local_only=False)
        assert missing.value.status == 404
    assert registry.requests == 0


async def test_real_listener_answers_whole_and_ranges(layer: Layer, tmp_path: Path) -> None:
    span_map = SpanMap.from_ztoc(layer.ztoc)
    registry = PrivateRegistry()
    async with (
        open_listener(layer, tmp_path / "cache", is_local=lambda host: True) as listener,
        AsyncRegistryClient(transport=httpx.MockTransport(registry.handle)) as client,
        open_task_scope("test") as tasks,
        httpx.AsyncClient(trust_env=False, timeout=30.0) as http,
    ):
        fill(listener.cache, layer, span_map)
        listener.mounted.fetchers[layer.digest] = listener.server._make_fetcher(
            REF, layer.digest, span_map
        )
        upstream = CountingUpstream(layer.blob)
        listener.app.mirror = MirrorService(
            content=None,
            peers=None,
            public=PublicRepositories(client),
            spans=SpanBlobs(
                layers=listener.server, cache=listener.cache, upstream=upstream, tasks=tasks
            ),
        )
        url = f"{listener.url}/v2/{REF.repository}/blobs/{layer.digest}?ns={REF.registry}"
        whole = await http.get(url)
        assert whole.status_code == 200
        assert whole.content == layer.blob
        assert whole.headers["docker-content-digest"] == str(layer.digest)
        part = await http.get(url, headers={"Range": "bytes=5-70000"})
        assert part.status_code == 206
        assert part.content == layer.blob[5:70001]
        assert part.headers["content-range"] == f"bytes 5-70000/{len(layer.blob)}"
        head = await http.head(url)
        assert head.status_code == 200
        assert head.headers["content-length"] == str(len(layer.blob))
    assert upstream.source.calls == [(0, 10)]
    assert registry.requests == 0
