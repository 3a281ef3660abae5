"""The peer listener and its client on loopback: a real hypercorn listener (`bind_listener`,
`serve_listener`) over a `SpanServer` with a real span cache and a `MemorySource` upstream,
asked by the real `PeerClient` (and by plain httpx where the exact status matters).

Span-aligned ranges are answered 206 with exactly the blob's bytes, fetched upstream once and
then from the cache; unaligned ranges 416; a range not held without `fetch` 404; concurrent
requesters of one range share one upstream fetch (also with this node's own reader); a
non-member or a wrong token 403; the upload rate limit holds the transfer back; a request
past its budget, a failing upstream or zTOC and a full listener 503.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from index.digest import Digest
from index.model import CompressedOffset, SpanId, Ztoc
from index.zinfo import SpanMap
from snapshotter.lazy.cache import SpanCache
from snapshotter.lazy.demand import DemandTracker
from snapshotter.lazy.fetcher import LayerCounters, SpanFetcher
from snapshotter.lazy.sources import (
    AccessDenied,
    BadRange,
    BlobNotFound,
    FetchError,
    FetchTimeout,
    SourceUnavailable,
)
from snapshotter.lazy.table import SpanState, SpanTable
from snapshotter.peers import protocol
from snapshotter.peers.client import PeerClient, PeerDeclined
from snapshotter.peers.listener import (
    HEALTH_PATH,
    SEND_PIECE,
    PeerApp,
    TokenBucket,
    bind_listener,
    serve_listener,
)
from snapshotter.peers.serving import SpanServer
from tests.support.lazylayer import Layer, MemorySource
from tests.support.peers import (
    REF,
    REGISTRY,
    REPOSITORY,
    ZTOC_DIGEST,
    FakeMounted,
    Listener,
    open_listener,
    span_range,
)


@pytest.fixture(scope="module")
def layer() -> Layer:
    return Layer()


@pytest.fixture(scope="module")
def spans(layer: Layer) -> SpanMap:
    return SpanMap.from_ztoc(layer.ztoc)


@contextlib.asynccontextmanager
async def peer_client(token: str = "") -> AsyncIterator[PeerClient]:
    client = PeerClient(connect_timeout_sec=1.0, token=token)
    try:
        yield client
    finally:
        await client.aclose()


async def fetch(
    client: PeerClient,
    listener: Listener,
    start: int,
    end: int,
    *,
    fetch: bool = True,
    budget_sec: float = 5.0,
    ztoc: Digest = ZTOC_DIGEST,
) -> bytes:
    return await client.fetch_range(
        listener.address,
        registry=REGISTRY,
        repository=REPOSITORY,
        layer=listener.layer.digest,
        ztoc=ztoc,
        start=start,
        end=end,
        budget_sec=budget_sec,
        fetch=fetch,
    )


async def raw_get(
    listener: Listener,
    start: int,
    end: int,
    *,
    headers: dict[str, str] | None = None,
    path: str | None = None,
    ns: str = REGISTRY,
    method: str = "GET",
    timeout: float = 10.0,
) -> httpx.Response:
    """One request as a peer client makes it (fetch allowed, the zTOC named), `headers`
    overriding; the answer read whole."""
    sent = {
        "range": protocol.range_header(start, end),
        protocol.ZTOC_HEADER: str(ZTOC_DIGEST),
        protocol.FETCH_HEADER: "1",
        protocol.BUDGET_HEADER: "5000",
    }
    sent.update(headers or {})
    sent = {k: v for k, v in sent.items() if v}
    url = listener.url + (path or protocol.blob_path(REPOSITORY, str(listener.layer.digest)))
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as http:
        return await http.request(method, url, headers=sent, params={"ns": ns} if ns else None)


def mounted_fetcher(
    layer: Layer, spans: SpanMap, source: MemorySource, cache: SpanCache
) -> SpanFetcher:
    """A span fetcher as a mounted layer has one (this node's own reads go through it)."""
    sizes = [e - s for s, e in map(spans.compressed_range, map(SpanId, range(spans.span_count)))]
    return SpanFetcher(
        layer.digest,
        spans,
        source,
        cache,
        SpanTable(sizes),
        max_request_bytes=4 << 20,
        tracker=DemandTracker(),
        io_limiter=trio.CapacityLimiter(4),
        counters=LayerCounters(),
    )


# -- answers with bytes --------------------------------------------------------------------------


async def test_registry_api_check_answers_200(layer: Layer, tmp_path: Path) -> None:
    async with open_listener(layer, tmp_path) as lst, httpx.AsyncClient(trust_env=False) as http:
        got = await http.get(lst.url + "/v2/")
        assert got.status_code == 200
        assert got.headers["docker-distribution-api-version"] == "registry/2.0"
        assert (await http.head(lst.url + "/v2/")).status_code == 200
        assert (await http.post(lst.url + "/v2/")).status_code == 405


async def test_span_aligned_ranges_are_served_exactly(
    layer: Layer, spans: SpanMap, tmp_path: Path
) -> None:
    one = span_range(spans, 1)
    run = span_range(spans, 2, 5)
    async with open_listener(layer, tmp_path) as lst, peer_client() as client:
        assert await fetch(client, lst, *one) == layer.blob[one[0] : one[1]]
        assert await fetch(client, lst, *run) == layer.blob[run[0] : run[1]]
        # the upstream was asked exactly for those ranges, once each
        assert lst.upstream.calls == [one, run]
        assert lst.ztoc_loads == [ZTOC_DIGEST]
        # spans inside a fetched range are now served from the cache
        inner = span_range(spans, 3, 4)
        raw = await raw_get(lst, *inner, headers={protocol.FETCH_HEADER: ""})
        assert raw.status_code == 206
        assert raw.content == layer.blob[inner[0] : inner[1]]
        assert raw.headers["content-range"] == f"bytes {inner[0]}-{inner[1] - 1}/*"
        assert raw.headers["docker-content-digest"] == str(layer.digest)
        assert lst.upstream.calls == [one, run]
        # the last span, up to the blob's end
        last = span_range(spans, spans.span_count - 1)
        assert last[1] == len(layer.blob)
        assert await fetch(client, lst, *last) == layer.blob[last[0] :]
        assert lst.server.stats.served == 4
        assert lst.server.stats.bytes_served == sum(e - s for s, e in (one, run, inner, last))
        assert lst.server.stats.fetched_for_peers == 3


class SeenBody:
    """A `BodySink` that records what it saw."""

    def __init__(self) -> None:
        self.begun = 0
        self.body = bytearray()

    def begin(self) -> None:
        self.begun += 1
        self.body.clear()

    def feed(self, chunk: bytes) -> None:
        self.body += chunk


async def test_a_peer_answer_is_seen_as_it_arrives(
    layer: Layer, spans: SpanMap, tmp_path: Path
) -> None:
    run = span_range(spans, 0, 3)
    seen = SeenBody()
    async with open_listener(layer, tmp_path) as lst, peer_client() as client:
        got = await client.fetch_range(
            lst.address,
            registry=REGISTRY,
            repository=REPOSITORY,
            layer=lst.layer.digest,
            ztoc=ZTOC_DIGEST,
            start=run[0],
            end=run[1],
            budget_sec=5.0,
            sink=seen,
        )
        assert got == layer.blob[run[0] : run[1]]
        assert seen.begun == 1 and bytes(seen.body) == got
        # an answer refused (not held, no fetch) never begins
        refused = SeenBody()
        with pytest.raises(FetchError):
            await client.fetch_range(
                lst.address,
                registry=REGISTRY,
                repository=REPOSITORY,
                layer=lst.layer.digest,
                ztoc=ZTOC_DIGEST,
                start=span_range(spans, 4)[0],
                end=span_range(spans, 4)[1],
                budget_sec=5.0,
                fetch=False,
                sink=refused,
            )
        assert refused.begun == 0 and not refused.body


@pytest.mark.parametrize(
    "shape", ["start inside a span", "end inside a span", "before the first span", "past the end"]
)
async def test_unaligned_ranges_are_416(
    layer: Layer, spans: SpanMap, tmp_path: Path, shape: str
) -> None:
    s1, e1 = span_range(spans, 1)
    start, end = {
        "start inside a span": (s1 + 100, e1),
        "end inside a span": (s1, e1 - 100),
        "before the first span": (0, span_range(spans, 0)[1]),
        "past the end": (span_range(spans, spans.span_count - 1)[0], len(layer.blob) + 10),
    }[shape]
    async with open_listener(layer, tmp_path) as lst, peer_client() as client:
        raw = await raw_get(lst, start, end)
        assert raw.status_code == 416, raw.text
        with pytest.raises(BadRange) as err:
            await fetch(client, lst, start, end)
        assert "HTTP 416" in str(err.value)
        assert lst.upstream.calls == []


@pytest.mark.parametrize(
    ("what", "kwargs"),
    [
        ("not a blob path", {"path": "/v2/peers/layer/manifests/latest"}),
        ("bad digest", {"path": "/v2/peers/layer/blobs/sha256:zz"}),
        ("no ns", {"ns": ""}),
        ("HEAD", {"method": "HEAD"}),
        ("open range", {"headers": {"range": "bytes=10-"}}),
        ("suffix range", {"headers": {"range": "bytes=-100"}}),
        ("no range", {"headers": {"range": ""}}),
    ],
)
async def test_requests_that_are_not_span_reads_are_404(
    layer: Layer, spans: SpanMap, tmp_path: Path, what: str, kwargs: dict[str, object]
) -> None:
    async with open_listener(layer, tmp_path) as lst:
        raw = await raw_get(lst, *span_range(spans, 1), **kwargs)  # type: ignore[arg-type]
        assert raw.status_code == 404, what
        assert lst.upstream.calls == []


async def test_not_held_and_no_fetch_is_404(layer: Layer, spans: SpanMap, tmp_path: Path) -> None:
    one = span_range(spans, 1)
    two = span_range(spans, 2)
    async with open_listener(layer, tmp_path) as lst, peer_client() as client:
        with pytest.raises(BlobNotFound):
            await fetch(client, lst, *one, fetch=False)
        assert (await raw_get(lst, *one, headers={protocol.FETCH_HEADER: ""})).status_code == 404
        # no zTOC named: a registry-mirror read, and this listener has no mirror
        assert (await raw_get(lst, *one, headers={protocol.ZTOC_HEADER: ""})).status_code == 404
        assert lst.upstream.calls == [] and lst.ztoc_loads == []
        # once fetched for someone, span 1 is held; span 2 is still not
        await fetch(client, lst, *one)
        assert await fetch(client, lst, *one, fetch=False) == layer.blob[one[0] : one[1]]
        with pytest.raises(BlobNotFound):
            await fetch(client, lst, *two, fetch=False)
        assert lst.upstream.calls == [one]
        assert lst.server.stats.not_found == 3


async def test_a_layer_cached_before_start_is_held(
    layer: Layer, spans: SpanMap, tmp_path: Path
) -> None:
    one = span_range(spans, 1)
    async with open_listener(layer, tmp_path) as lst, peer_client() as client:
        await fetch(client, lst, *one)
    # a new listener over the same cache directory (a restarted node)
    async with open_listener(layer, tmp_path) as lst, peer_client() as client:
        # not mounted and never asked with `fetch`: it does not know the layer yet
        with pytest.raises(BlobNotFound):
            await fetch(client, lst, *one, fetch=False)
        # with `fetch` it loads the zTOC and finds the span in its cache: no upstream request
        assert await fetch(client, lst, *one) == layer.blob[one[0] : one[1]]
        assert lst.upstream.calls == []


# -- one upstream fetch for every requester ---------------------------------------------------


async def test_concurrent_requesters_share_one_upstream_fetch(
    layer: Layer, spans: SpanMap, tmp_path: Path
) -> None:
    run = span_range(spans, 3, 6)
    upstream = MemorySource(layer.blob, name="upstream")
    upstream.gate = trio.Event()
    results: list[bytes] = []
    async with open_listener(layer, tmp_path, upstream=upstream) as lst, peer_client() as client:

        async def one() -> None:
            results.append(await fetch(client, lst, *run))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(one)
            await trio.testing.wait_all_tasks_blocked(0.2)
            # every requester is waiting on the one upstream request
            assert upstream.calls == [run]
            assert results == []
            upstream.gate.set()
        assert results == [layer.blob[run[0] : run[1]]] * 8
        assert upstream.calls == [run]
        assert lst.ztoc_loads == [ZTOC_DIGEST]
        assert lst.server.stats.served == 8


async def test_peers_share_the_fetch_of_this_nodes_own_reader(
    layer: Layer, spans: SpanMap, tmp_path: Path
) -> None:
    """A layer mounted here: its fetcher serves the peers, and a span this node is reading
    is fetched once for the node and every peer."""
    run = span_range(spans, 2, 4)
    local = MemorySource(layer.blob, name="mounted")
    local.gate = trio.Event()
    async with open_listener(layer, tmp_path) as lst, peer_client() as client:
        fetcher = mounted_fetcher(layer, spans, local, lst.cache)
        lst.mounted.fetchers[layer.digest] = fetcher
        got: list[bytes] = []

        async def peer() -> None:
            got.append(await fetch(client, lst, *run))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetcher.ensure, [SpanId(2), SpanId(3), SpanId(4)])
            await trio.testing.wait_all_tasks_blocked(0.1)
            for _ in range(3):
                nursery.start_soon(peer)
            await trio.testing.wait_all_tasks_blocked(0.2)
            assert got == []
            local.gate.set()
        assert got == [layer.blob[run[0] : run[1]]] * 3
        assert local.calls == [run]
        # the mounted layer's fetcher was used: no zTOC load, the listener's upstream unused
        assert lst.ztoc_loads == [] and lst.upstream.calls == []


async def test_a_mounted_span_gone_from_the_disk_cache_is_refused_not_a_crash(
    layer: Layer, spans: SpanMap, tmp_path: Path
) -> None:
    """A span inflated in memory whose compressed copy was evicted from the span cache: the
    owner cannot send it; it answers 503 (or 404 without fetch), not an internal error."""
    one = span_range(spans, 1)
    async with open_listener(layer, tmp_path) as lst, peer_client() as client:
        fetcher = mounted_fetcher(layer, spans, MemorySource(layer.blob), lst.cache)
        lst.mounted.fetchers[layer.digest] = fetcher
        await fetcher.ensure([SpanId(1)])
        fetcher.table.set(SpanId(1), SpanState.INFLATED)  # the reader inflated it
        lst.cache.drop_layer(layer.digest)  # and the disk copy went (eviction)
        raw = await raw_get(lst, *one)
        assert raw.status_code == 503, raw.text
        assert (await raw_get(lst, *one, headers={protocol.FETCH_HEADER: ""})).status_code == 404
        with pytest.raises(PeerDeclined):
            await fetch(client, lst, *one)
        # a span only CACHED whose file vanished is fetched again
        await fetcher.ensure([SpanId(2)])
        lst.cache.drop_layer(layer.digest)
        two = span_range(spans, 2)
        assert await fetch(client, lst, *two) == layer.blob[two[0] : two[1]]


# -- who may ask ---------------------------------------------------------------------------------


async def test_a_non_member_is_403(layer: Layer, spans: SpanMap, tmp_path: Path) -> None:
    asked: list[str] = []

    def is_allowed(host: str) -> bool:
        asked.append(host)
        return False

    async with (
        open_listener(layer, tmp_path, is_allowed=is_allowed) as lst,
        peer_client() as client,
    ):
        assert (await raw_get(lst, *span_range(spans, 1))).status_code == 403
        with pytest.raises(AccessDenied):
            await fetch(client, lst, *span_range(spans, 1))
        async with httpx.AsyncClient(trust_env=False) as http:
            assert (await http.get(lst.url + "/v2/")).status_code == 403
        assert lst.upstream.calls == [] and lst.ztoc_loads == []
        assert lst.app.forbidden == 3
        assert asked == ["127.0.0.1"] * 3


@pytest.mark.parametrize("sent", ["", "wrong", "s3cret-but-longer"])
async def test_a_missing_or_wrong_token_is_403(
    layer: Layer, spans: SpanMap, tmp_path: Path, sent: str
) -> None:
    one = span_range(spans, 1)
    async with open_listener(layer, tmp_path, token="s3cret") as lst:
        async with peer_client(token=sent) as client:
            with pytest.raises(AccessDenied):
                await fetch(client, lst, *one)
        raw = await raw_get(lst, *one, headers={protocol.TOKEN_HEADER: sent})
        assert raw.status_code == 403
        assert lst.upstream.calls == []
        async with peer_client(token="s3cret") as client:
            assert await fetch(client, lst, *one) == layer.blob[one[0] : one[1]]
        assert lst.app.forbidden == 2


async def test_healthz_answers_ok_without_a_token_and_nothing_more(
    layer: Layer, tmp_path: Path
) -> None:
    # kubelet probes a host-network pod at the node's own address, with no token: the probe
    # passes where a layer request from the same client without the token is refused
    async with (
        open_listener(layer, tmp_path, token="s3cret") as lst,
        httpx.AsyncClient(trust_env=False) as http,
    ):
        got = await http.get(lst.url + HEALTH_PATH)
        assert (got.status_code, got.content) == (200, b"ok\n")
        assert got.headers["content-type"] == "text/plain"
        assert "server" not in got.headers
        head = await http.head(lst.url + HEALTH_PATH)
        assert (head.status_code, head.content) == (200, b"")
        assert (await http.post(lst.url + HEALTH_PATH)).status_code == 405
        assert lst.app.forbidden == 0
        assert (await http.get(lst.url + "/v2/")).status_code == 403
        assert (await http.get(lst.url + HEALTH_PATH + "/x")).status_code == 403
        assert lst.app.forbidden == 2
        assert lst.upstream.calls == [] and lst.ztoc_loads == []


async def test_healthz_is_refused_to_a_non_member(layer: Layer, tmp_path: Path) -> None:
    async with (
        open_listener(layer, tmp_path, is_allowed=lambda host: False) as lst,
        httpx.AsyncClient(trust_env=False) as http,
    ):
        got = await http.get(lst.url + HEALTH_PATH)
        assert (got.status_code, got.content) == (403, b"not a member\n")
        assert lst.app.forbidden == 1


# -- load limits ---------------------------------------------------------------------------------


async def test_token_bucket_arithmetic(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(1000)
    t0 = trio.current_time()
    await bucket.take(500)  # the first bytes go at once
    assert trio.current_time() == t0
    await bucket.take(500)  # ... and the next wait for the first to have gone
    assert trio.current_time() == pytest.approx(t0 + 0.5)
    await bucket.take(1000)
    assert trio.current_time() == pytest.approx(t0 + 1.0)
    await trio.sleep(5)  # idle time is not saved up as a burst beyond one take
    t1 = trio.current_time()
    await bucket.take(2000)
    assert trio.current_time() == t1
    await bucket.take(1)
    assert trio.current_time() == pytest.approx(t1 + 2.0)
    unlimited = TokenBucket(0)
    await unlimited.take(10**9)
    await unlimited.take(10**9)
    assert trio.current_time() == pytest.approx(t1 + 2.0)


async def test_upload_rate_limit_slows_the_transfer(
    layer: Layer, spans: SpanMap, tmp_path: Path
) -> None:
    rate = 400_000
    last = next(i for i in range(spans.span_count) if span_range(spans, 0, i)[1] > 600_000)
    run = span_range(spans, 0, last)
    size = run[1] - run[0]
    async with (
        open_listener(layer, tmp_path, upload_rate_bytes_per_sec=rate) as lst,
        peer_client() as client,
    ):
        await lst.server.serve_range(
            REF, layer.digest, ZTOC_DIGEST, *run, fetch=True, budget_sec=5
        )  # cached first: the timing below is the transfer only
        started = time.monotonic()
        got = await fetch(client, lst, *run, budget_sec=10)
        elapsed = time.monotonic() - started
    assert got == layer.blob[run[0] : run[1]]
    # the first piece goes at once, the rest at `rate`
    expected = (size - SEND_PIECE) / rate
    assert expected > 0.5
    assert elapsed >= 0.8 * expected, (elapsed, expected)


async def test_a_request_past_its_budget_is_503(
    layer: Layer, spans: SpanMap, tmp_path: Path
) -> None:
    upstream = MemorySource(layer.blob, name="upstream")
    upstream.gate = trio.Event()  # the registry never answers
    one = span_range(spans, 1)
    async with open_listener(layer, tmp_path, upstream=upstream) as lst:
        started = time.monotonic()
        raw = await raw_get(lst, *one, headers={protocol.BUDGET_HEADER: "300"})
        elapsed = time.monotonic() - started
        assert raw.status_code == 503, raw.text
        assert 0.25 <= elapsed < 2.0
        assert upstream.cancelled == 1
        assert lst.server.stats.unavailable == 1
    # the listener's own cap bounds a larger budget
    async with open_listener(layer, tmp_path, upstream=upstream, max_budget_sec=0.3) as lst:
        started = time.monotonic()
        raw = await raw_get(lst, *one, headers={protocol.BUDGET_HEADER: "60000"})
        assert raw.status_code == 503
        assert time.monotonic() - started < 2.0


async def test_an_owner_out_of_time_answers_before_the_requester_gives_up(
    layer: Layer, spans: SpanMap, tmp_path: Path
) -> None:
    """The owner's registry is slow: the requester sees 503 (the owner is alive and honest),
    not its own timeout, which would mark a healthy owner down."""
    upstream = MemorySource(layer.blob, name="upstream")
    upstream.gate = trio.Event()
    async with open_listener(layer, tmp_path, upstream=upstream) as lst, peer_client() as client:
        started = time.monotonic()
        with pytest.raises(PeerDeclined):
            await fetch(client, lst, *span_range(spans, 1), budget_sec=0.5)
        assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("fault", ["upstream fails", "upstream lacks the blob", "no such zTOC"])
async def test_an_owner_that_cannot_fetch_is_503(
    layer: Layer, spans: SpanMap, tmp_path: Path, fault: str
) -> None:
    upstream = MemorySource(layer.blob, name="upstream")
    ztoc = ZTOC_DIGEST
    if fault == "upstream fails":
        upstream.raise_next = [SourceUnavailable("registry down")]
    elif fault == "upstream lacks the blob":
        upstream.raise_next = [BlobNotFound("no such blob")]
    else:
        ztoc = Digest("sha256:" + "8" * 64)
    async with open_listener(layer, tmp_path, upstream=upstream) as lst, peer_client() as client:
        with pytest.raises(PeerDeclined) as err:
            await fetch(client, lst, *span_range(spans, 1), ztoc=ztoc)
        assert "HTTP 503" in str(err.value)
        assert lst.server.stats.unavailable == 1
        # the next request, the fault gone, is served
        assert (
            await fetch(client, lst, *span_range(spans, 1))
            == layer.blob[slice(*span_range(spans, 1))]
        )


async def test_a_full_listener_answers_busy_within_the_budget(
    layer: Layer, spans: SpanMap, tmp_path: Path
) -> None:
    upstream = MemorySource(layer.blob, name="upstream")
    upstream.gate = trio.Event()
    async with open_listener(layer, tmp_path, upstream=upstream, max_uploads=1) as lst:
        async with trio.open_nursery() as nursery:
            first: list[httpx.Response] = []

            async def hold() -> None:
                first.append(await raw_get(lst, *span_range(spans, 1)))

            nursery.start_soon(hold)
            await trio.testing.wait_all_tasks_blocked(0.1)
            raw = await raw_get(lst, *span_range(spans, 2), headers={protocol.BUDGET_HEADER: "300"})
            assert raw.status_code == 503
            assert raw.text == "busy\n"
            assert upstream.calls == [span_range(spans, 1)]
            upstream.gate.set()
        assert first[0].status_code == 206


# -- the client side -----------------------------------------------------------------------------


async def test_client_maps_transport_failures(layer: Layer, spans: SpanMap) -> None:
    async with peer_client() as client:
        # nothing listens: refused at once
        with bind_listener("127.0.0.1", 0) as sock:
            port = sock.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(SourceUnavailable) as err:
            await client.fetch_range(
                f"127.0.0.1:{port}",
                registry=REGISTRY,
                repository=REPOSITORY,
                layer=layer.digest,
                ztoc=ZTOC_DIGEST,
                start=CompressedOffset(0),
                end=CompressedOffset(10),
                budget_sec=5,
            )
        assert not isinstance(err.value, FetchTimeout)
        assert time.monotonic() - started < 1.0
        # a listening socket that is never accepted from: no answer within the budget
        with bind_listener("127.0.0.1", 0) as sock:
            started = time.monotonic()
            with pytest.raises(FetchTimeout):
                await client.fetch_range(
                    "{}:{}".format(*sock.getsockname()),
                    registry=REGISTRY,
                    repository=REPOSITORY,
                    layer=layer.digest,
                    ztoc=ZTOC_DIGEST,
                    start=CompressedOffset(0),
                    end=CompressedOffset(10),
                    budget_sec=0.3,
                )
            assert time.monotonic() - started < 1.5


async def test_the_listening_socket_is_handed_to_the_server_and_closed_with_it(
    layer: Layer, tmp_path: Path
) -> None:
    server = SpanServer(
        layers=FakeMounted(),
        cache=SpanCache(tmp_path),
        load_ztoc=_no_ztoc,
        upstream=lambda ref: MemorySource(layer.blob),
        tracker=DemandTracker(),
        io_limiter=trio.CapacityLimiter(1),
        max_request_bytes=1 << 20,
    )
    app = PeerApp(
        server,
        is_allowed=lambda host: True,
        token="",
        max_uploads=1,
        upload_rate_bytes_per_sec=0,
        max_budget_sec=1.0,
    )
    sock = bind_listener("127.0.0.1", 0)
    port = sock.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_listener, app, sock)
        async with httpx.AsyncClient(trust_env=False) as http:
            assert (await http.get(f"http://127.0.0.1:{port}/v2/")).status_code == 200
        # the server owns the descriptor: closing `sock` later must not close a reused one
        assert sock.fileno() == -1
        nursery.cancel_scope.cancel()
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


async def _no_ztoc(ref: object, digest: Digest) -> Ztoc:
    raise LookupError(digest)


def test_bind_listener_on_a_port_in_use_raises() -> None:
    with bind_listener("127.0.0.1", 0) as first, pytest.raises(OSError):
        bind_listener("127.0.0.1", first.getsockname()[1]).close()


async def test_every_answer_is_logged_with_stable_keys(
    layer: Layer, spans: SpanMap, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="snapshotter.peers.listener")
    one = span_range(spans, 1)
    async with open_listener(layer, tmp_path) as lst, peer_client() as client:
        await fetch(client, lst, *one)
        await raw_get(lst, one[0] + 1, one[1])
        await trio.testing.wait_all_tasks_blocked(0.05)  # the line follows the answer
    records = [r for r in caplog.records if r.getMessage() == "peer request"]
    assert [r.status for r in records] == [206, 416]  # type: ignore[attr-defined]
    ok = records[0]
    assert ok.client == "127.0.0.1"  # type: ignore[attr-defined]
    assert ok.bytes == one[1] - one[0]  # type: ignore[attr-defined]
    assert ok.path == protocol.blob_path(REPOSITORY, str(layer.digest))  # type: ignore[attr-defined]
    assert isinstance(ok.ms, int)  # type: ignore[attr-defined]


def test_accepted_connections_give_up_on_a_silent_peer() -> None:
    """A peer that stops acknowledging (its link down) must not hold an answer, an upload
    slot or the daemon's shutdown for the kernel's retransmission limit."""
    with bind_listener("127.0.0.1", 0, send_timeout_sec=3.5) as sock:
        sock.setblocking(True)
        with socket.create_connection(sock.getsockname()[:2]):
            accepted, _ = sock.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 3500
