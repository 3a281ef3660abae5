"""The registry mirror's read API on a real peer listener (hypercorn on loopback), asked with
plain httpx as containerd asks it: `MirrorService` over a fake content store (containerd's),
fake or real other members (`PeerBlobClient` against a second real listener), and
`PublicRepositories` over a registry client whose transport answers the anonymous check.

What it shows: `GET /v2/` and every answer carry the registry API version; blobs are served
whole (200) or by one `Range` (206 with its `Content-Range`; open ends, ends past the blob
clipped; starts past it 416 with `bytes */SIZE`), `HEAD` with the same headers and no body;
misses are 404 at once, with no `ns` too; members' stores are asked only when this node lacks
a blob and never for a member's own request; JSON documents (manifests, configs) only for
repositories an anonymous client may read, with one remembered check per repository and none
for layers; manifests by digest with their media type (a mirror without an image store resolves no tag;
tests/unit/test_mirror_tags.py has tags); a stalled body is cut
after `stall_timeout_sec` and a hung lookup is a 404 after `lookup_timeout_sec`; who may ask
(members, this node's containerd without the token, others only with it).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import trio

from index.digest import Digest
from index.oci.client import AsyncRegistryClient
from index.oci.dockerconfig import StaticCredentials
from index.oci.reference import Reference
from snapshotter.mirror.access import PublicRepositories
from snapshotter.mirror.serve import MirrorService, PeerBlobs
from snapshotter.peers import protocol
from snapshotter.peers.client import PeerBlobClient, PeerClient
from snapshotter.peers.content import ContentNotFound, ContentStore, ContentStoreError
from tests.support.lazylayer import Layer
from tests.support.peers import FakeView, Listener, closed_port, open_fake_peer, open_listener
from tests.support.registry import RegistryServer

REGISTRY = "registry.test:5000"
PUBLIC = "team/public"
PRIVATE = "team/private"
TOKEN = "cluster-s3cret"
API_VERSION = ("docker-distribution-api-version", "registry/2.0")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=2).encode()


CONFIG = _json(
    {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "1" * 64]},
    }
)


def manifest_of(layer: Layer, media_type: str = OCI_MANIFEST) -> bytes:
    return _json(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": str(Digest.of(CONFIG)),
                "size": len(CONFIG),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": str(layer.digest),
                    "size": len(layer.blob),
                }
            ],
        }
    )


INDEX_WITHOUT_MEDIA_TYPE = _json({"schemaVersion": 2, "manifests": []})
"""An index that does not name its own media type (the mirror infers it)."""


@pytest.fixture(scope="module")
def layer() -> Layer:
    return Layer(files=3, size=60_000)


@pytest.fixture(scope="module")
def manifest(layer: Layer) -> bytes:
    return manifest_of(layer)


# -- fakes -----------------------------------------------------------------------------------


class FakeStore:
    """containerd's content store as `MirrorService` uses it (`size`, `stream`), in memory.

    `hang_size`: size() never answers; `size_error`: it raises ContentStoreError;
    `stall_at`: a stream stops sending (sleeps forever) at that blob offset; `fail_at`: it
    raises ContentStoreError there; `short_by`: it ends that many bytes early. Records every
    stream opened (`streams`) and how many are open now (`open`)."""

    def __init__(self, *blobs: bytes, chunk: int = 16 * 1024) -> None:
        self.blobs = {Digest.of(b): b for b in blobs}
        self.chunk = chunk
        self.hang_size = False
        self.size_error = False
        self.stall_at: int | None = None
        self.fail_at: int | None = None
        self.short_by = 0
        self.size_calls = 0
        self.streams: list[tuple[Digest, int, int]] = []
        self.open = 0

    async def size(self, digest: Digest) -> int | None:
        self.size_calls += 1
        if self.hang_size:
            await trio.sleep_forever()
        if self.size_error:
            raise ContentStoreError(f"{digest}: UNAVAILABLE", digest=str(digest), code=None)
        blob = self.blobs.get(digest)
        return None if blob is None else len(blob)

    async def stream(
        self, digest: Digest, offset: int = 0, size: int = 0
    ) -> AsyncGenerator[bytes, None]:
        self.streams.append((digest, offset, size))
        self.open += 1
        try:
            blob = self.blobs.get(digest)
            if blob is None:
                raise ContentNotFound(f"{digest}: not found", digest=str(digest), code=None)
            end = (len(blob) if size == 0 else offset + size) - self.short_by
            pos = offset
            while pos < end:
                if self.stall_at is not None and pos >= self.stall_at:
                    await trio.sleep_forever()
                if self.fail_at is not None and pos >= self.fail_at:
                    raise ContentStoreError(f"{digest}: broken", digest=str(digest), code=None)
                stop = min(end, pos + self.chunk)
                for limit in (self.stall_at, self.fail_at):
                    if limit is not None and pos < limit:
                        stop = min(stop, limit)
                await trio.sleep(0)
                yield blob[pos:stop]
                pos = stop
        finally:
            self.open -= 1


class FakePeers:
    """Other members' content stores (`PeerBlobs`): `held` maps a peer id to its blobs.
    `hang_find`: find() never answers. Records every find and stream."""

    def __init__(self, held: dict[str, list[bytes]] | None = None) -> None:
        self.held = {p: {Digest.of(b): b for b in blobs} for p, blobs in (held or {}).items()}
        self.hang_find = False
        self.finds: list[Digest] = []
        self.streams: list[tuple[str, Digest, int, int]] = []

    async def find(
        self, ref: Reference, digest: Digest, timeout_sec: float
    ) -> tuple[str, int] | None:
        self.finds.append(digest)
        if self.hang_find:
            await trio.sleep_forever()
        for peer, blobs in self.held.items():
            if digest in blobs:
                return peer, len(blobs[digest])
        return None

    async def stream(
        self, peer: str, ref: Reference, digest: Digest, start: int, end: int
    ) -> AsyncGenerator[bytes, None]:
        self.streams.append((peer, digest, start, end))
        blob = self.held[peer][digest]
        for pos in range(start, end, 10_000):
            await trio.sleep(0)
            yield blob[pos : min(end, pos + 10_000)]


@dataclass
class FakeRegistry:
    """The registries as an anonymous client sees them: `HEAD` of a blob or manifest in a
    `public` repository of REGISTRY is 200, anything else 401 (no challenge: no credentials
    help), another host refuses connections.
    `manifests_not_blobs`: digests the blobs endpoint does not know although the manifests
    endpoint does (distribution stores manifests apart from layers and configs). `requests`
    records each (method, path)."""

    public: set[str] = field(default_factory=lambda: {PUBLIC})
    manifests_not_blobs: set[str] = field(default_factory=set)
    requests: list[tuple[str, str]] = field(default_factory=list)

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.requests.append((request.method, path))
        if request.url.netloc.decode() != REGISTRY:
            raise httpx.ConnectError(f"no such host {request.url.netloc!r}", request=request)
        repository, kind, reference = _split(path)
        if repository not in self.public:
            return httpx.Response(401, json={"errors": [{"code": "UNAUTHORIZED"}]})
        if kind == "blobs" and reference in self.manifests_not_blobs:
            return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN"}]})
        headers = {"content-length": "10", "docker-content-digest": reference}
        if kind == "manifests":
            headers["content-type"] = OCI_MANIFEST
        return httpx.Response(200, headers=headers)

    def checks(self) -> int:
        return len(self.requests)


def _split(path: str) -> tuple[str, str, str]:
    rest = path.removeprefix("/v2/")
    for kind in ("blobs", "manifests"):
        repository, sep, reference = rest.rpartition(f"/{kind}/")
        if sep:
            return repository, kind, reference
    raise AssertionError(f"unexpected registry request {path}")


# -- a node ------------------------------------------------------------------------------------


@dataclass
class Node:
    """A peer listener with a registry mirror, and an HTTP client as containerd's."""

    listener: Listener
    mirror: MirrorService
    store: FakeStore
    peers: FakePeers
    registry: FakeRegistry
    http: httpx.AsyncClient

    def url(self, repository: str, kind: str, reference: str | Digest) -> str:
        return f"{self.listener.url}/v2/{repository}/{kind}/{reference}"

    async def blob(
        self,
        digest: Digest,
        *,
        repository: str = PUBLIC,
        method: str = "GET",
        ns: str | None = REGISTRY,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        return await self.http.request(
            method,
            self.url(repository, "blobs", digest),
            params={"ns": ns} if ns is not None else None,
            headers=headers,
        )

    async def manifest(
        self,
        reference: str | Digest,
        *,
        repository: str = PUBLIC,
        method: str = "GET",
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        return await self.http.request(
            method,
            self.url(repository, "manifests", reference),
            params={"ns": REGISTRY},
            headers=headers,
        )


@contextlib.asynccontextmanager
async def open_node(
    layer: Layer,
    tmp_path: Path,
    *,
    store: FakeStore | None = None,
    peers: PeerBlobs | None = None,
    registry: FakeRegistry | None = None,
    lookup_timeout_sec: float = 5.0,
    stall_timeout_sec: float = 5.0,
    token: str = "",
    is_allowed: Callable[[str], bool] = lambda host: True,
    is_local: Callable[[str], bool] = lambda host: False,
) -> AsyncIterator[Node]:
    """A node whose mirror reads `store` (empty by default) and `peers` (fake, holding
    nothing, by default), the anonymous check answered by `registry`."""
    store = store if store is not None else FakeStore()
    fake_peers = peers if isinstance(peers, FakePeers) else FakePeers()
    registry = registry if registry is not None else FakeRegistry()
    client = AsyncRegistryClient(transport=httpx.MockTransport(registry.handle))
    mirror = MirrorService(
        content=cast(ContentStore, store),
        peers=peers if peers is not None else fake_peers,
        public=PublicRepositories(client),
        lookup_timeout_sec=lookup_timeout_sec,
        stall_timeout_sec=stall_timeout_sec,
    )
    (tmp_path / "cache").mkdir(exist_ok=True)
    try:
        async with (
            open_listener(
                layer,
                tmp_path / "cache",
                mirror=mirror,
                token=token,
                is_allowed=is_allowed,
                is_local=is_local,
            ) as listener,
            httpx.AsyncClient(trust_env=False, timeout=30.0) as http,
        ):
            yield Node(listener, mirror, store, fake_peers, registry, http)
    finally:
        await client.aclose()


def assert_blob_headers(got: httpx.Response, digest: Digest, length: int) -> None:
    assert got.headers["content-length"] == str(length)
    assert got.headers["docker-content-digest"] == str(digest)
    assert got.headers["accept-ranges"] == "bytes"
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.headers[API_VERSION[0]] == API_VERSION[1]


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


# -- the API check and who may ask -------------------------------------------------------------


async def test_api_check_is_200_with_the_api_version(layer: Layer, tmp_path: Path) -> None:
    async with open_node(layer, tmp_path) as node:
        for method in ("GET", "HEAD"):
            got = await node.http.request(method, node.listener.url + "/v2/")
            assert got.status_code == 200
            assert got.headers[API_VERSION[0]] == API_VERSION[1]
        assert (await node.http.get(node.listener.url + "/v2")).status_code == 200


async def test_non_members_are_403_and_nothing_is_looked_up(
    layer: Layer, tmp_path: Path, manifest: bytes
) -> None:
    store = FakeStore(layer.blob, manifest)
    async with open_node(layer, tmp_path, store=store, is_allowed=lambda h: False) as node:
        assert (await node.http.get(node.listener.url + "/v2/")).status_code == 403
        assert (await node.blob(layer.digest)).status_code == 403
        assert (await node.blob(layer.digest, method="HEAD")).status_code == 403
        assert (await node.manifest(Digest.of(manifest))).status_code == 403
        assert store.size_calls == 0 and not node.peers.finds
        assert node.listener.app.forbidden == 4


# -- blobs from this node's content store ------------------------------------------------------


async def test_whole_blob_get_is_200_with_exact_bytes_and_headers(
    layer: Layer, tmp_path: Path
) -> None:
    store = FakeStore(layer.blob)
    async with open_node(layer, tmp_path, store=store) as node:
        got = await node.blob(layer.digest)
        assert got.status_code == 200
        assert got.content == layer.blob
        assert_blob_headers(got, layer.digest, len(layer.blob))
        assert "content-range" not in got.headers
        # counted once the last chunk is sent, a moment after the client has it all
        await until(lambda: node.mirror.stats.blobs == 1)
        assert node.mirror.stats.from_content == len(layer.blob)
        assert node.mirror.stats.from_peers == 0
        assert not node.peers.finds  # held here: the members are not asked


async def test_head_has_the_get_headers_and_no_body(layer: Layer, tmp_path: Path) -> None:
    store = FakeStore(layer.blob)
    async with open_node(layer, tmp_path, store=store) as node:
        got = await node.blob(layer.digest, method="HEAD")
        assert got.status_code == 200
        assert got.content == b""
        assert_blob_headers(got, layer.digest, len(layer.blob))
        ranged = await node.blob(layer.digest, method="HEAD", headers={"range": "bytes=10-19"})
        assert ranged.status_code == 206
        assert ranged.content == b""
        assert ranged.headers["content-range"] == f"bytes 10-19/{len(layer.blob)}"
        assert ranged.headers["content-length"] == "10"
        # only the few bytes that tell a layer from a document were read, never the body
        assert all(size <= 64 for _, _, size in store.streams)
        assert node.mirror.stats.bytes_served == 0


@pytest.mark.parametrize(
    ("header", "want"),
    [
        ("bytes=0-0", (0, 1)),
        ("bytes=1000-4999", (1000, 5000)),
        ("bytes=5000-", (5000, None)),
        ("bytes=0-", (0, None)),
        ("bytes=7-{last}", (7, None)),
        ("bytes=7-{past}", (7, None)),
        ("bytes={last}-{last}", (-1, None)),
    ],
)
async def test_ranges_are_206_with_content_range(
    layer: Layer, tmp_path: Path, header: str, want: tuple[int, int | None]
) -> None:
    size = len(layer.blob)
    header = header.format(last=size - 1, past=size + 100_000)
    start = want[0] % size
    end = size if want[1] is None else want[1]
    store = FakeStore(layer.blob)
    async with open_node(layer, tmp_path, store=store) as node:
        got = await node.blob(layer.digest, headers={"range": header})
        assert got.status_code == 206, got.text
        assert got.content == layer.blob[start:end]
        assert got.headers["content-range"] == f"bytes {start}-{end - 1}/{size}"
        assert_blob_headers(got, layer.digest, end - start)
        # the store was asked for exactly that range (after the sniff of the first bytes)
        assert store.streams[-1] == (layer.digest, start, end - start)


@pytest.mark.parametrize("start", ["{size}", "{past}"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_range_starting_past_the_end_is_416_with_the_size(
    layer: Layer, tmp_path: Path, start: str, method: str
) -> None:
    size = len(layer.blob)
    first = int(start.format(size=size, past=size + 5))
    async with open_node(layer, tmp_path, store=FakeStore(layer.blob)) as node:
        for header in (f"bytes={first}-", f"bytes={first}-{first + 10}"):
            got = await node.blob(layer.digest, method=method, headers={"range": header})
            assert got.status_code == 416
            assert got.headers["content-range"] == f"bytes */{size}"
            assert got.headers[API_VERSION[0]] == API_VERSION[1]
            assert got.content == b""
        assert node.mirror.stats.bytes_served == 0


async def test_an_empty_blob_is_200_and_any_range_416(layer: Layer, tmp_path: Path) -> None:
    empty = Digest.of(b"")
    async with open_node(layer, tmp_path, store=FakeStore(b"")) as node:
        got = await node.blob(empty)
        assert got.status_code == 200
        assert got.content == b""
        assert_blob_headers(got, empty, 0)
        ranged = await node.blob(empty, headers={"range": "bytes=0-"})
        assert ranged.status_code == 416
        assert ranged.headers["content-range"] == "bytes */0"


async def test_a_range_unit_other_than_bytes_is_ignored(layer: Layer, tmp_path: Path) -> None:
    async with open_node(layer, tmp_path, store=FakeStore(layer.blob)) as node:
        got = await node.blob(layer.digest, headers={"range": "items=0-5"})
        assert got.status_code == 200
        assert got.content == layer.blob
        assert "content-range" not in got.headers


async def test_a_suffix_range_is_the_blobs_last_bytes(layer: Layer, tmp_path: Path) -> None:
    size = len(layer.blob)
    async with open_node(layer, tmp_path, store=FakeStore(layer.blob)) as node:
        got = await node.blob(layer.digest, headers={"range": "bytes=-100"})
        assert got.status_code == 206
        assert got.content == layer.blob[-100:]
        assert got.headers["content-range"] == f"bytes {size - 100}-{size - 1}/{size}"
        longer = await node.blob(layer.digest, headers={"range": f"bytes=-{size + 10}"})
        assert longer.status_code == 206
        assert longer.content == layer.blob
        assert longer.headers["content-range"] == f"bytes 0-{size - 1}/{size}"
        zero = await node.blob(layer.digest, headers={"range": "bytes=-0"})
        assert zero.status_code == 416
        assert zero.headers["content-range"] == f"bytes */{size}"


async def test_unknown_digest_is_404_at_once(layer: Layer, tmp_path: Path) -> None:
    unknown = Digest.of(b"nobody holds this")
    async with open_node(layer, tmp_path, store=FakeStore(layer.blob)) as node:
        for method in ("GET", "HEAD"):
            t0 = time.monotonic()
            got = await node.blob(unknown, method=method)
            assert got.status_code == 404
            assert got.headers[API_VERSION[0]] == API_VERSION[1]
            assert time.monotonic() - t0 < 1.0  # a miss, not a 5 s lookup timeout
        assert node.peers.finds == [unknown, unknown]  # the members were asked, and said no
        assert node.mirror.stats.not_found == 2
        assert node.registry.checks() == 0


@pytest.mark.parametrize(
    ("what", "path", "params"),
    [
        ("no ns", "/v2/team/public/blobs/{digest}", None),
        ("empty ns", "/v2/team/public/blobs/{digest}", {"ns": ""}),
        ("bad digest", "/v2/team/public/blobs/sha256:xyz", {"ns": REGISTRY}),
        ("unknown algorithm", "/v2/team/public/blobs/md5:{hex}", {"ns": REGISTRY}),
        ("no repository", "/v2/blobs/{digest}", {"ns": REGISTRY}),
        ("upload path", "/v2/team/public/blobs/uploads/", {"ns": REGISTRY}),
        ("tag list", "/v2/team/public/tags/list", {"ns": REGISTRY}),
    ],
)
async def test_malformed_requests_are_404(
    layer: Layer,
    tmp_path: Path,
    what: str,
    path: str,
    params: dict[str, str] | None,
) -> None:
    store = FakeStore(layer.blob)
    async with open_node(layer, tmp_path, store=store) as node:
        url = node.listener.url + path.format(digest=layer.digest, hex=layer.digest.hex)
        got = await node.http.get(url, params=params)
        assert got.status_code == 404, what
        assert store.size_calls == 0 and not node.peers.finds


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH"])
async def test_writes_are_refused(layer: Layer, tmp_path: Path, method: str) -> None:
    store = FakeStore(layer.blob)
    async with open_node(layer, tmp_path, store=store) as node:
        got = await node.blob(layer.digest, method=method)
        assert 400 <= got.status_code < 500
        assert store.size_calls == 0
        assert store.blobs == {layer.digest: layer.blob}


async def test_a_failing_content_store_falls_back_to_the_members(
    layer: Layer, tmp_path: Path
) -> None:
    store = FakeStore(layer.blob)
    store.size_error = True
    peers = FakePeers({"10.0.0.2:8472": [layer.blob]})
    async with open_node(layer, tmp_path, store=store, peers=peers) as node:
        got = await node.blob(layer.digest)
        assert got.status_code == 200
        assert got.content == layer.blob
        await until(lambda: node.mirror.stats.from_peers == len(layer.blob))


# -- blobs from other members ------------------------------------------------------------------


async def test_a_blob_only_a_member_holds_is_streamed_through(layer: Layer, tmp_path: Path) -> None:
    peers = FakePeers({"10.0.0.2:8472": [], "10.0.0.3:8472": [layer.blob]})
    async with open_node(layer, tmp_path, peers=peers) as node:
        got = await node.blob(layer.digest)
        assert got.status_code == 200
        assert got.content == layer.blob
        assert_blob_headers(got, layer.digest, len(layer.blob))
        ranged = await node.blob(layer.digest, headers={"range": "bytes=100-"})
        assert ranged.status_code == 206
        assert ranged.content == layer.blob[100:]
        head = await node.blob(layer.digest, method="HEAD")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(layer.blob))
        bodies = [s for s in peers.streams if s[3] - s[2] > 64]
        assert bodies == [
            ("10.0.0.3:8472", layer.digest, 0, len(layer.blob)),
            ("10.0.0.3:8472", layer.digest, 100, len(layer.blob)),
        ]
        await until(lambda: node.mirror.stats.from_peers == 2 * len(layer.blob) - 100)
        assert node.mirror.stats.from_content == 0


async def test_a_members_own_request_never_asks_further(layer: Layer, tmp_path: Path) -> None:
    peers = FakePeers({"10.0.0.3:8472": [layer.blob]})
    async with open_node(layer, tmp_path, peers=peers) as node:
        local = {protocol.LOCAL_HEADER: "1"}
        assert (await node.blob(layer.digest, headers=local)).status_code == 404
        assert (await node.blob(layer.digest, method="HEAD", headers=local)).status_code == 404
        assert peers.finds == [] and peers.streams == []
        # without the header the same request is served from the member
        assert (await node.blob(layer.digest)).content == layer.blob


async def test_a_member_that_never_answers_is_a_404_after_the_lookup_bound(
    layer: Layer, tmp_path: Path
) -> None:
    peers = FakePeers()
    peers.hang_find = True
    async with open_node(layer, tmp_path, peers=peers, lookup_timeout_sec=0.3) as node:
        t0 = time.monotonic()
        got = await node.blob(layer.digest)
        elapsed = time.monotonic() - t0
        assert got.status_code == 404
        assert 0.3 <= elapsed < 2.0


@contextlib.asynccontextmanager
async def two_nodes(
    layer: Layer, tmp_path: Path, held: FakeStore, *, token: str = ""
) -> AsyncIterator[tuple[Node, Node]]:
    """`asker`, whose store is empty and whose members are [`holder`] through a real
    `PeerBlobClient`, and `holder`, whose store is `held` (its own members: fakes)."""
    (tmp_path / "holder").mkdir()
    (tmp_path / "asker").mkdir()
    async with open_node(layer, tmp_path / "holder", store=held, token=token) as holder:
        client = PeerClient(connect_timeout_sec=1.0, token=token)
        try:
            view = FakeView([holder.listener.member])
            peers = PeerBlobClient(client, view)
            async with open_node(layer, tmp_path / "asker", peers=peers, token=token) as asker:
                yield asker, holder
        finally:
            await client.aclose()


async def test_a_members_store_through_the_real_peer_client(
    layer: Layer, tmp_path: Path, manifest: bytes
) -> None:
    held = FakeStore(layer.blob, CONFIG, b"")
    async with two_nodes(layer, tmp_path, held, token=TOKEN) as (asker, holder):
        auth = {protocol.TOKEN_HEADER: TOKEN}
        got = await asker.blob(layer.digest, headers=auth)
        assert got.status_code == 200
        assert got.content == layer.blob
        ranged = await asker.blob(layer.digest, headers={**auth, "range": "bytes=10-99"})
        assert ranged.status_code == 206
        assert ranged.content == layer.blob[10:100]
        assert ranged.headers["content-range"] == f"bytes 10-99/{len(layer.blob)}"
        # the holder answered from its own store only, never asking its members
        assert holder.peers.finds == []
        await until(lambda: asker.mirror.stats.from_peers == len(layer.blob) + 90)
        assert holder.mirror.stats.from_content >= len(layer.blob) + 90
        # a public config and an empty blob, from the member
        config = await asker.blob(Digest.of(CONFIG), headers=auth)
        assert config.status_code == 200 and config.content == CONFIG
        empty = await asker.blob(Digest.of(b""), headers=auth)
        assert empty.status_code == 200 and empty.content == b""
        # a private config held by the member stays private
        private = await asker.blob(Digest.of(CONFIG), repository=PRIVATE, headers=auth)
        assert private.status_code == 404
        # unknown everywhere: a quick 404
        t0 = time.monotonic()
        assert (await asker.blob(Digest.of(b"?"), headers=auth)).status_code == 404
        assert time.monotonic() - t0 < 1.0


# -- privacy: documents only for public repositories -------------------------------------------


async def test_documents_of_a_private_repository_are_404(
    layer: Layer, tmp_path: Path, manifest: bytes
) -> None:
    store = FakeStore(manifest, CONFIG, layer.blob)
    async with open_node(layer, tmp_path, store=store) as node:
        for digest in (Digest.of(manifest), Digest.of(CONFIG)):
            for method in ("GET", "HEAD"):
                got = await node.blob(digest, repository=PRIVATE, method=method)
                assert got.status_code == 404
                assert got.content == b"" or b"not public" in got.content
        for method in ("GET", "HEAD"):
            got = await node.manifest(Digest.of(manifest), repository=PRIVATE, method=method)
            assert got.status_code == 404
        # a layer of the same private repository is served (members may share layers)
        assert (await node.blob(layer.digest, repository=PRIVATE)).content == layer.blob
        assert node.mirror.stats.private == 6
        # one anonymous check for the repository, remembered
        assert node.registry.checks() == 1
        assert all(PRIVATE in path for _, path in node.registry.requests)


async def test_documents_of_a_public_repository_are_served(
    layer: Layer, tmp_path: Path, manifest: bytes
) -> None:
    store = FakeStore(manifest, CONFIG)
    async with open_node(layer, tmp_path, store=store) as node:
        config = await node.blob(Digest.of(CONFIG))
        assert config.status_code == 200
        assert config.content == CONFIG
        through_blobs = await node.blob(Digest.of(manifest))
        assert through_blobs.status_code == 200
        assert through_blobs.content == manifest
        assert node.registry.checks() == 1
        assert node.registry.requests[0][0] == "HEAD"


@pytest.mark.parametrize(
    ("document", "media_type"),
    [
        ("oci manifest", OCI_MANIFEST),
        ("docker manifest", DOCKER_MANIFEST),
        ("oci index", OCI_INDEX),
        ("index without mediaType", OCI_INDEX),
    ],
)
async def test_manifests_by_digest_carry_their_media_type(
    layer: Layer, tmp_path: Path, document: str, media_type: str
) -> None:
    data = {
        "oci manifest": manifest_of(layer),
        "docker manifest": manifest_of(layer, DOCKER_MANIFEST),
        "oci index": _json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}),
        "index without mediaType": INDEX_WITHOUT_MEDIA_TYPE,
    }[document]
    digest = Digest.of(data)
    async with open_node(layer, tmp_path, store=FakeStore(data)) as node:
        got = await node.manifest(digest)
        assert got.status_code == 200
        assert got.content == data
        assert got.headers["content-type"] == media_type
        assert got.headers["content-length"] == str(len(data))
        assert got.headers["docker-content-digest"] == str(digest)
        assert got.headers[API_VERSION[0]] == API_VERSION[1]
        head = await node.manifest(digest, method="HEAD")
        assert head.status_code == 200
        assert head.content == b""
        assert {k: head.headers[k] for k in ("content-type", "content-length")} == {
            "content-type": media_type,
            "content-length": str(len(data)),
        }
        assert head.headers["docker-content-digest"] == str(digest)
        assert node.mirror.stats.manifests == 2
        assert node.peers.finds == []  # manifests come from this node's store only


async def test_the_anonymous_check_is_made_once_per_repository(
    layer: Layer, tmp_path: Path, manifest: bytes
) -> None:
    store = FakeStore(manifest, CONFIG, layer.blob)
    async with open_node(layer, tmp_path, store=store) as node:
        for _ in range(5):
            assert (await node.manifest(Digest.of(manifest))).status_code == 200
            assert (await node.blob(Digest.of(CONFIG))).status_code == 200
            assert (await node.manifest(Digest.of(manifest), repository=PRIVATE)).status_code == 404
            assert (await node.blob(Digest.of(CONFIG), repository=PRIVATE)).status_code == 404
        assert node.registry.checks() == 2
        assert sorted(p.split("/")[3] for _, p in node.registry.requests) == ["private", "public"]


async def test_layers_never_trigger_the_anonymous_check(layer: Layer, tmp_path: Path) -> None:
    store = FakeStore(layer.blob)
    async with open_node(layer, tmp_path, store=store) as node:
        for repository in (PUBLIC, PRIVATE):
            assert (await node.blob(layer.digest, repository=repository)).status_code == 200
            head = await node.blob(layer.digest, repository=repository, method="HEAD")
            assert head.status_code == 200
        assert node.registry.checks() == 0


async def test_a_manifest_the_registry_keeps_apart_from_blobs_is_public(
    layer: Layer, tmp_path: Path, manifest: bytes
) -> None:
    """A registry whose blobs endpoint does not know manifests (distribution's layout)."""
    registry = FakeRegistry(manifests_not_blobs={str(Digest.of(manifest))})
    store = FakeStore(manifest, CONFIG)
    async with open_node(layer, tmp_path, store=store, registry=registry) as node:
        got = await node.manifest(Digest.of(manifest))
        assert got.status_code == 200
        assert got.content == manifest
        # the repository is now known public: its config needs no further check
        assert (await node.blob(Digest.of(CONFIG))).content == CONFIG
        checks = node.registry.checks()
        assert (await node.manifest(Digest.of(manifest))).status_code == 200
        assert node.registry.checks() == checks


async def test_manifests_by_tag_are_404_without_a_lookup(
    layer: Layer, tmp_path: Path, manifest: bytes
) -> None:
    store = FakeStore(manifest)
    async with open_node(layer, tmp_path, store=store) as node:
        for method in ("GET", "HEAD"):
            got = await node.manifest("latest", method=method)
            assert got.status_code == 404
        assert store.size_calls == 0
        assert node.registry.checks() == 0


async def test_not_a_manifest_through_the_manifests_endpoint_is_404(
    layer: Layer, tmp_path: Path
) -> None:
    store = FakeStore(layer.blob, CONFIG)
    async with open_node(layer, tmp_path, store=store) as node:
        assert (await node.manifest(layer.digest)).status_code == 404
        assert (await node.manifest(Digest.of(CONFIG))).status_code == 404
        assert node.mirror.stats.manifests == 0


async def test_a_manifest_whose_bytes_do_not_match_its_digest_is_404(
    layer: Layer, tmp_path: Path, manifest: bytes
) -> None:
    store = FakeStore(manifest)
    wrong = Digest.of(b"something else")
    store.blobs[wrong] = manifest
    async with open_node(layer, tmp_path, store=store) as node:
        assert (await node.manifest(wrong)).status_code == 404


@pytest.mark.parametrize("ns", ["bad host name", "registry.test:notaport", "-"])
async def test_a_document_for_a_registry_that_cannot_be_named_is_404(
    layer: Layer, tmp_path: Path, manifest: bytes, ns: str
) -> None:
    store = FakeStore(manifest, layer.blob)
    async with open_node(layer, tmp_path, store=store) as node:
        url = node.url(PUBLIC, "manifests", Digest.of(manifest))
        assert (await node.http.get(url, params={"ns": ns})).status_code == 404
        got = await node.blob(Digest.of(manifest), ns=ns)
        assert got.status_code == 404
        # a layer needs no check: served whatever the registry's name
        assert (await node.blob(layer.digest, ns=ns)).content == layer.blob


async def test_a_manifest_by_digest_comes_from_a_member_and_is_checked(
    layer: Layer, tmp_path: Path, manifest: bytes
) -> None:
    """A node's first pull: the manifest is not here yet; a member holds it (public)."""
    peers = FakePeers({"10.0.0.3:8472": [manifest]})
    async with open_node(layer, tmp_path, peers=peers) as node:
        got = await node.manifest(Digest.of(manifest))
        assert got.status_code == 200 and got.content == manifest
        assert peers.finds == [Digest.of(manifest)]
    # a member whose bytes do not hash to the digest is not believed
    liar = FakePeers({"10.0.0.3:8472": [manifest]})
    liar.held["10.0.0.3:8472"][Digest.of(manifest)] = manifest.replace(b"{", b" {", 1)
    (tmp_path / "liar").mkdir()
    async with open_node(layer, tmp_path / "liar", peers=liar) as node:
        assert (await node.manifest(Digest.of(manifest))).status_code == 404


async def push_image(server: RegistryServer, repository: str, layer: Layer) -> bytes:
    """Push CONFIG, `layer` and their manifest to `repository`; the manifest's bytes."""
    ref = Reference(server.host, repository)
    creds = StaticCredentials(server.username, server.password or "") if server.username else None
    async with AsyncRegistryClient(credentials=creds) as client:
        await client.push_blob(ref, CONFIG, "application/vnd.oci.image.config.v1+json")
        await client.push_blob(ref, layer.blob, "application/vnd.oci.image.layer.v1.tar+gzip")
        data = manifest_of(layer)
        await client.push_manifest(ref, data, OCI_MANIFEST, tag="v1")
    return data


async def test_anonymous_check_against_a_real_registry(
    layer: Layer, registry: RegistryServer, basic_registry: RegistryServer
) -> None:
    """distribution keeps manifests apart from blobs: both kinds of document of an open
    registry are public, and none of one that wants credentials."""
    manifest = await push_image(registry, "mirror/open", layer)
    closed = await push_image(basic_registry, "mirror/closed", layer)
    async with AsyncRegistryClient() as anonymous:
        open_ref = Reference(registry.host, "mirror/open")
        assert await PublicRepositories(anonymous).is_public(open_ref, Digest.of(manifest))
        assert await PublicRepositories(anonymous).is_public(open_ref, Digest.of(CONFIG))
        unknown = Reference(registry.host, "mirror/never-pushed")
        assert not await PublicRepositories(anonymous).is_public(unknown, Digest.of(manifest))
        closed_ref = Reference(basic_registry.host, "mirror/closed")
        for digest in (Digest.of(closed), Digest.of(CONFIG)):
            assert not await PublicRepositories(anonymous).is_public(closed_ref, digest)


# -- bounds ------------------------------------------------------------------------------------


async def test_a_body_that_stalls_is_cut_after_the_stall_bound(
    layer: Layer, tmp_path: Path
) -> None:
    store = FakeStore(layer.blob)
    store.stall_at = 40_000
    async with open_node(layer, tmp_path, store=store, stall_timeout_sec=0.3) as node:
        t0 = time.monotonic()
        with pytest.raises(httpx.RemoteProtocolError):
            await node.blob(layer.digest)
        elapsed = time.monotonic() - t0
        assert 0.3 <= elapsed < 3.0
        await until(lambda: store.open == 0)  # the handler let go of the source
        assert node.mirror.stats.blobs == 0
        # the listener goes on serving
        store.stall_at = None
        assert (await node.blob(layer.digest)).content == layer.blob


async def test_a_source_that_sends_nothing_is_a_404_after_the_lookup_bound(
    layer: Layer, tmp_path: Path
) -> None:
    store = FakeStore(layer.blob)
    store.stall_at = 0
    async with open_node(layer, tmp_path, store=store, lookup_timeout_sec=0.3) as node:
        t0 = time.monotonic()
        got = await node.blob(layer.digest)
        assert got.status_code == 404
        assert 0.3 <= time.monotonic() - t0 < 3.0
        await until(lambda: store.open == 0)


async def test_a_content_store_that_never_answers_is_a_404_after_the_lookup_bound(
    layer: Layer, tmp_path: Path, manifest: bytes
) -> None:
    store = FakeStore(layer.blob, manifest)
    store.hang_size = True
    async with open_node(layer, tmp_path, store=store, lookup_timeout_sec=0.3) as node:
        for request in (node.blob(layer.digest), node.manifest(Digest.of(manifest))):
            t0 = time.monotonic()
            got = await request
            assert got.status_code == 404
            assert 0.3 <= time.monotonic() - t0 < 3.0


@pytest.mark.parametrize("fault", ["fails", "ends early"])
async def test_a_source_that_breaks_mid_body_cuts_the_answer(
    layer: Layer, tmp_path: Path, fault: str
) -> None:
    store = FakeStore(layer.blob)
    if fault == "fails":
        store.fail_at = 30_000
    else:
        store.short_by = 1000
    async with open_node(layer, tmp_path, store=store) as node:
        with pytest.raises(httpx.RemoteProtocolError):
            await node.blob(layer.digest)
        await until(lambda: store.open == 0)
        await trio.sleep(0.1)
        assert node.mirror.stats.blobs == (1 if fault == "ends early" else 0)
        assert (await node.http.get(node.listener.url + "/v2/")).status_code == 200


async def test_a_source_that_fails_before_the_body_is_a_404(
    layer: Layer, tmp_path: Path, manifest: bytes
) -> None:
    store = FakeStore(layer.blob, manifest)
    store.fail_at = 0
    async with open_node(layer, tmp_path, store=store) as node:
        assert (await node.blob(layer.digest)).status_code == 404
        assert (await node.blob(layer.digest, method="HEAD")).status_code == 404
        assert (await node.manifest(Digest.of(manifest))).status_code == 404


# -- the cluster token -------------------------------------------------------------------------


async def test_this_nodes_containerd_needs_no_token(layer: Layer, tmp_path: Path) -> None:
    store = FakeStore(layer.blob)
    async with open_node(
        layer, tmp_path, store=store, token=TOKEN, is_local=lambda h: h == "127.0.0.1"
    ) as node:
        assert (await node.http.get(node.listener.url + "/v2/")).status_code == 200
        got = await node.blob(layer.digest)
        assert got.status_code == 200
        assert got.content == layer.blob
        assert node.listener.app.forbidden == 0


async def test_others_need_the_token(layer: Layer, tmp_path: Path) -> None:
    store = FakeStore(layer.blob)
    async with open_node(layer, tmp_path, store=store, token=TOKEN) as node:
        assert (await node.http.get(node.listener.url + "/v2/")).status_code == 403
        assert (await node.blob(layer.digest)).status_code == 403
        wrong = {protocol.TOKEN_HEADER: TOKEN + "x"}
        assert (await node.blob(layer.digest, headers=wrong)).status_code == 403
        assert store.size_calls == 0
        right = {protocol.TOKEN_HEADER: TOKEN}
        got = await node.blob(layer.digest, headers=right)
        assert got.status_code == 200
        assert got.content == layer.blob
        assert node.listener.app.forbidden == 3


async def test_a_member_that_does_not_answer_a_lookup_is_marked_down(
    layer: Layer, tmp_path: Path
) -> None:
    """A silent member costs one lookup, then is skipped (marked down); a refused one is
    marked down at once; the live member that says no is not."""
    held = FakeStore(layer.blob, CONFIG, b"")
    async with (
        open_fake_peer(layer.blob, "silent") as silent,
        open_node(layer, tmp_path, store=held) as holder,
    ):
        gone = closed_port()
        ref = Reference(REGISTRY, PUBLIC)
        client = PeerClient(connect_timeout_sec=1.0)
        try:
            view = FakeView([silent.member, gone, holder.listener.member])
            peers = PeerBlobClient(client, view)
            t0 = time.monotonic()
            assert await peers.find(ref, Digest.of(b"nobody has this"), 0.5) is None
            # each member gets three quarters of the bound, so the silent one is seen
            assert 0.3 <= time.monotonic() - t0 < 0.5
            assert sorted(view.downed()) == sorted([silent.member, gone])
            found = await peers.find(ref, layer.digest, 0.5)
            assert found == (holder.listener.member.id, len(layer.blob))
        finally:
            await client.aclose()
