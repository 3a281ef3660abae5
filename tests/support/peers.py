"""Peer data path helpers on loopback: a real peer listener (hypercorn) serving a
`tests.support.lazylayer.Layer` from a real span cache, a fake membership view, misbehaving
peers (raw trio TCP servers: wrong bytes, a fixed status, silence, a short body), a closed
port, span checks, and a search for a chunk whose owners come in a wanted order."""

from __future__ import annotations

import contextlib
import functools
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import trio

from index.digest import Digest
from index.model import CompressedOffset, SpanId, Ztoc
from index.oci.reference import Reference
from index.zinfo import SpanError, SpanMap
from snapshotter.lazy.cache import SpanCache
from snapshotter.lazy.demand import DemandTracker
from snapshotter.lazy.fetcher import SpanFetcher
from snapshotter.lazy.sources import BlobSource, Check, ContentMismatch
from snapshotter.mirror.serve import MirrorService
from snapshotter.peers.listener import PeerApp, bind_listener, serve_listener
from snapshotter.peers.members import Member
from snapshotter.peers.ownership import chunk_of, owners
from snapshotter.peers.serving import SpanServer
from tests.support.lazylayer import Layer, MemorySource

REGISTRY = "registry.test:5000"
REPOSITORY = "peers/layer"
REF = Reference(REGISTRY, REPOSITORY)
ZTOC_DIGEST = Digest("sha256:" + "7" * 64)
"""The zTOC digest requesters name (the fake loader returns the layer's zTOC for it)."""


def span_range(span_map: SpanMap, first: int, last: int | None = None) -> tuple[int, int]:
    """The compressed byte range `[start, end)` of spans `first..last` (inclusive)."""
    last = first if last is None else last
    return span_map.compressed_range(SpanId(first))[0], span_map.compressed_range(SpanId(last))[1]


def span_check(span_map: SpanMap, start: int, end: int) -> Check:
    """A `check` for the spans exactly covering `[start, end)`, as the span fetcher makes:
    raises ContentMismatch for wrong bytes or a wrong length."""
    spans = [
        SpanId(i)
        for i in range(span_map.span_count)
        if start <= span_map.compressed_range(SpanId(i))[0]
        and span_map.compressed_range(SpanId(i))[1] <= end
    ]
    assert spans and span_range(span_map, spans[0], spans[-1]) == (start, end), (start, end)

    def check(data: bytes) -> None:
        try:
            for span, view in zip(spans, span_map.split_compressed(spans, data), strict=True):
                span_map.verify(span, view)
        except SpanError as e:
            raise ContentMismatch(str(e), source="check") from e

    return check


# -- the membership seen by a PeerSource -----------------------------------------------------


@dataclass
class FakeView:
    """A `PeerView`: `members` are all live; records every mark_down / mark_up."""

    members: list[Member] = field(default_factory=list)
    down: list[tuple[Member, str]] = field(default_factory=list)
    up: list[Member] = field(default_factory=list)

    def live(self) -> Sequence[Member]:
        return list(self.members)

    def is_live(self, member: Member) -> bool:
        return member in self.members

    def mark_down(self, member: Member, reason: str) -> None:
        self.down.append((member, reason))

    def mark_up(self, member: Member) -> None:
        self.up.append(member)

    def downed(self) -> list[Member]:
        return [m for m, _ in self.down]


def member(address: str) -> Member:
    host, _, port = address.rpartition(":")
    return Member(host, int(port))


def arrange(
    layer: Digest,
    span_map: SpanMap,
    chunk_bytes: int,
    order: Sequence[str | None],
    count: int,
    only: SpanId | None = None,
) -> tuple[SpanId, str]:
    """A span (`only`, when given) and a `self_id` such that the owners of the span's chunk,
    among `order`'s peer ids and this node (None), are exactly `order`, best first (`count`
    owners). Raises AssertionError when no span and self id give that order (negligible for
    two peers)."""
    peers = [o for o in order if o is not None]
    for span in range(span_map.span_count) if only is None else [only]:
        chunk = chunk_of(span_map.compressed_range(SpanId(span))[0], chunk_bytes)
        ranked_peers = owners([(p, p) for p in peers], str(layer), chunk, len(peers))
        if ranked_peers != peers:
            continue
        for n in range(2000):
            self_id = f"10.254.{n // 250}.{n % 250 + 1}:8472"
            cands: list[tuple[str, str | None]] = [(p, p) for p in peers] + [(self_id, None)]
            if owners(cands, str(layer), chunk, count) == list(order):
                return SpanId(span), self_id
    raise AssertionError(f"no chunk of {layer} has owners in the order {order}")


# -- a real listener ---------------------------------------------------------------------------


class FakeMounted:
    """`MountedLayers`: the fetchers the test registers as mounted here."""

    def __init__(self) -> None:
        self.fetchers: dict[Digest, SpanFetcher] = {}

    def fetcher_for(self, layer: Digest) -> SpanFetcher | None:
        return self.fetchers.get(layer)


@dataclass
class Listener:
    """A peer listener serving `layer` on loopback; `upstream` is its registry stand-in."""

    host: str
    port: int
    layer: Layer
    app: PeerApp
    server: SpanServer
    upstream: MemorySource
    cache: SpanCache
    mounted: FakeMounted
    ztoc_loads: list[Digest]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def member(self) -> Member:
        return Member(self.host, self.port)


@contextlib.asynccontextmanager
async def open_listener(
    layer: Layer,
    cache_dir: Path,
    *,
    upstream: MemorySource | None = None,
    is_allowed: Callable[[str], bool] = lambda host: True,
    token: str = "",
    max_uploads: int = 16,
    upload_rate_bytes_per_sec: int = 0,
    max_budget_sec: float = 10.0,
    max_request_bytes: int = 4 << 20,
    host: str = "127.0.0.1",
    mirror: MirrorService | None = None,
    is_local: Callable[[str], bool] = lambda host: False,
) -> AsyncIterator[Listener]:
    """A `PeerApp` over a `SpanServer` (real `SpanCache` in `cache_dir`, upstream a
    `MemorySource` of the layer's blob, zTOCs from a loader that counts its calls) served by
    `serve_listener` on a socket from `bind_listener(host, 0)`; cancelled on exit. `mirror`
    and `is_local` are handed to the `PeerApp` (no registry mirror by default)."""
    source = upstream if upstream is not None else MemorySource(layer.blob, name="upstream")
    cache = SpanCache(cache_dir)
    mounted = FakeMounted()
    loads: list[Digest] = []

    async def load_ztoc(ref: Reference, digest: Digest) -> Ztoc:
        loads.append(digest)
        await trio.sleep(0)
        if digest != ZTOC_DIGEST:
            raise LookupError(f"no zTOC {digest}")
        return layer.ztoc

    def upstream_of(ref: Reference) -> BlobSource:
        return source

    server = SpanServer(
        layers=mounted,
        cache=cache,
        load_ztoc=load_ztoc,
        upstream=upstream_of,
        tracker=DemandTracker(),
        io_limiter=trio.CapacityLimiter(4),
        max_request_bytes=max_request_bytes,
    )
    app = PeerApp(
        server,
        is_allowed=is_allowed,
        token=token,
        max_uploads=max_uploads,
        upload_rate_bytes_per_sec=upload_rate_bytes_per_sec,
        max_budget_sec=max_budget_sec,
        mirror=mirror,
        is_local=is_local,
    )
    sock = bind_listener(host, 0)
    port = sock.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_listener, app, sock)
        yield Listener(host, port, layer, app, server, source, cache, mounted, loads)
        nursery.cancel_scope.cancel()


# -- misbehaving peers -------------------------------------------------------------------------

Behaviour = Literal["corrupt", "status", "silent", "short"]


@dataclass
class FakePeer:
    """A raw HTTP/1.1 peer on loopback. `behaviour`: `corrupt` answers 206 with the right
    Content-Range and length but one byte flipped; `status` answers `status` with no body;
    `silent` accepts, reads the request and never answers; `short` sends the headers of the
    full range and half the body, then closes. `requests` counts requests read; `fetches`
    records, per request, whether it allowed the owner to fetch (`X-Sociable-Fetch: 1`)."""

    blob: bytes
    behaviour: Behaviour
    status: int = 404
    port: int = 0
    requests: int = 0
    fetches: list[bool] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def member(self) -> Member:
        return Member("127.0.0.1", self.port)

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head:
                data = await stream.receive_some(65536)
                if not data:
                    return
                head += data
            self.requests += 1
            self.fetches.append(b"\r\nx-sociable-fetch: 1\r\n" in head.lower())
            if self.behaviour == "silent":
                await trio.sleep_forever()
            if self.behaviour == "status":
                await stream.send_all(
                    f"HTTP/1.1 {self.status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode()
                )
                return
            start, end = _range_of(head)
            body = bytearray(self.blob[start:end])
            sent = body
            if self.behaviour == "corrupt":
                body[len(body) // 2] ^= 0xFF
            else:
                sent = body[: len(body) // 2]
            await stream.send_all(
                (
                    "HTTP/1.1 206 Partial Content\r\n"
                    f"content-range: bytes {start}-{end - 1}/*\r\n"
                    f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
                ).encode()
                + bytes(sent)
            )


def _range_of(head: bytes) -> tuple[int, int]:
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "range":
            first, _, last = value.strip().removeprefix("bytes=").partition("-")
            return int(first), int(last) + 1
    raise AssertionError(f"no Range in {head!r}")


@contextlib.asynccontextmanager
async def open_fake_peer(
    blob: bytes, behaviour: Behaviour, *, status: int = 404
) -> AsyncIterator[FakePeer]:
    peer = FakePeer(blob, behaviour, status)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, peer.handle, 0, host="127.0.0.1")
        )
        peer.port = listeners[0].socket.getsockname()[1]
        yield peer
        nursery.cancel_scope.cancel()


def closed_port() -> Member:
    """A loopback port nothing listens on (bound, then closed: connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return Member("127.0.0.1", port)


def offsets(start: int, end: int) -> tuple[CompressedOffset, CompressedOffset]:
    return CompressedOffset(start), CompressedOffset(end)
