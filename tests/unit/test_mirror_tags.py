"""Manifests by tag on the registry mirror: a real peer listener (hypercorn on loopback) asked
with plain httpx as containerd asks it, `MirrorService` over a fake image store (the
`ImageTargets` seam: containerd's Images API), a fake content store, fake members and
`PublicRepositories` over a registry client whose transport answers the anonymous check.

What it shows: a tag of a public repository is answered with the manifest (or index) the
image of that name points at, its media type and `Docker-Content-Digest` the digest, for
`GET` and `HEAD`, and the name looked up is the one CRI stores (Docker Hub names
normalised); members are never asked; a private repository, `latest` (unless
`resolve_latest`), `resolve_tags = false`, a malformed tag, an unknown image, an image whose
manifest the content store lacks, a failing or hung image store are all 404, and the
misses that need no lookup make none.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import trio

from index.digest import Digest
from index.oci.client import AsyncRegistryClient
from index.oci.reference import Reference
from snapshotter.mirror.access import PublicRepositories
from snapshotter.mirror.serve import MirrorService
from snapshotter.peers.content import ContentNotFound, ContentStore
from snapshotter.peers.images import ImageStoreError, image_name
from tests.support.lazylayer import Layer
from tests.support.peers import Listener, open_listener

REGISTRY = "registry.test:5000"
PUBLIC = "team/public"
PRIVATE = "team/private"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=2).encode()


MANIFEST = _json(
    {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": "sha256:" + "c" * 64,
            "size": 100,
        },
        "layers": [],
    }
)
INDEX = _json(
    {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "d" * 64, "size": 500},
        ],
    }
)


@pytest.fixture(scope="module")
def layer() -> Layer:
    return Layer(files=2, size=20_000)


# -- fakes -----------------------------------------------------------------------------------


class FakeImages:
    """containerd's image store as the mirror sees it: `images` maps a name to the document
    its target is. `error`: target() raises ImageStoreError; `hang`: it never answers.
    Records every name asked for."""

    def __init__(self, images: dict[str, bytes] | None = None) -> None:
        self.images = dict(images or {})
        self.error = False
        self.hang = False
        self.asked: list[str] = []

    async def target(self, name: str) -> tuple[Digest, str, int] | None:
        self.asked.append(name)
        if self.hang:
            await trio.sleep_forever()
        if self.error:
            raise ImageStoreError(f"image {name}: UNAVAILABLE: gone", name=name, code=None)
        doc = self.images.get(name)
        if doc is None:
            return None
        media_type = json.loads(doc).get("mediaType", "")
        return Digest.of(doc), media_type, len(doc)


class FakeStore:
    """containerd's content store as `MirrorService` uses it (`size`, `stream`), in memory;
    counts the lookups."""

    def __init__(self, *blobs: bytes) -> None:
        self.blobs = {Digest.of(b): b for b in blobs}
        self.size_calls = 0

    async def size(self, digest: Digest) -> int | None:
        self.size_calls += 1
        blob = self.blobs.get(digest)
        return None if blob is None else len(blob)

    async def stream(
        self, digest: Digest, offset: int = 0, size: int = 0
    ) -> AsyncGenerator[bytes, None]:
        blob = self.blobs.get(digest)
        if blob is None:
            raise ContentNotFound(f"{digest}: not found", digest=str(digest), code=None)
        await trio.sleep(0)
        yield blob[offset : len(blob) if size == 0 else offset + size]


class FakePeers:
    """Members: hold nothing, record every lookup (the mirror must never ask them for a
    manifest)."""

    def __init__(self) -> None:
        self.finds: list[Digest] = []

    async def find(
        self, ref: Reference, digest: Digest, timeout_sec: float
    ) -> tuple[str, int] | None:
        self.finds.append(digest)
        return None

    async def stream(
        self, peer: str, ref: Reference, digest: Digest, start: int, end: int
    ) -> AsyncGenerator[bytes, None]:
        raise AssertionError("no member holds anything")
        yield b""  # pragma: no cover


@dataclass
class FakeRegistry:
    """The anonymous check: `HEAD` of anything in a `public` repository (any host) is 200,
    anything else 401. Records each (host, path)."""

    public: set[str] = field(default_factory=lambda: {PUBLIC})
    requests: list[tuple[str, str]] = field(default_factory=list)

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.requests.append((request.url.host, path))
        repository = path.removeprefix("/v2/").rpartition("/blobs/")[0]
        repository = repository or path.removeprefix("/v2/").rpartition("/manifests/")[0]
        if repository not in self.public:
            return httpx.Response(401, json={"errors": [{"code": "UNAUTHORIZED"}]})
        return httpx.Response(200, headers={"content-length": "10"})


@dataclass
class Node:
    listener: Listener
    mirror: MirrorService
    images: FakeImages
    store: FakeStore
    peers: FakePeers
    registry: FakeRegistry
    http: httpx.AsyncClient

    async def manifest(
        self,
        reference: str,
        *,
        repository: str = PUBLIC,
        ns: str = REGISTRY,
        method: str = "GET",
    ) -> httpx.Response:
        return await self.http.request(
            method,
            f"{self.listener.url}/v2/{repository}/manifests/{reference}",
            params={"ns": ns},
        )

    def lookups(self) -> tuple[int, int, int, int]:
        """(image store, content store, members, registry) lookups so far."""
        return (
            len(self.images.asked),
            self.store.size_calls,
            len(self.peers.finds),
            len(self.registry.requests),
        )


@contextlib.asynccontextmanager
async def open_node(
    layer: Layer,
    tmp_path: Path,
    images: FakeImages,
    *blobs: bytes,
    resolve_tags: bool = True,
    resolve_latest: bool = False,
    lookup_timeout_sec: float = 5.0,
) -> AsyncIterator[Node]:
    """A node whose mirror resolves tags with `images` and reads `blobs` from its content
    store; members hold nothing; the anonymous check says only PUBLIC is public."""
    store = FakeStore(*blobs)
    peers = FakePeers()
    registry = FakeRegistry()
    client = AsyncRegistryClient(transport=httpx.MockTransport(registry.handle))
    mirror = MirrorService(
        content=cast(ContentStore, store),
        peers=peers,
        public=PublicRepositories(client),
        lookup_timeout_sec=lookup_timeout_sec,
        images=images,
        resolve_tags=resolve_tags,
        resolve_latest=resolve_latest,
    )
    (tmp_path / "cache").mkdir(exist_ok=True)
    try:
        async with (
            open_listener(layer, tmp_path / "cache", mirror=mirror) as listener,
            httpx.AsyncClient(trust_env=False, timeout=30.0) as http,
        ):
            yield Node(listener, mirror, images, store, peers, registry, http)
    finally:
        await client.aclose()


# -- the name looked up ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("registry", "repository", "tag", "name"),
    [
        ("10.232.5.2:5000", "peers/data", "v1", "10.232.5.2:5000/peers/data:v1"),
        ("docker.io", "library/busybox", "1.36", "docker.io/library/busybox:1.36"),
        ("docker.io", "busybox", "1.36", "docker.io/library/busybox:1.36"),
        ("index.docker.io", "busybox", "1.36", "docker.io/library/busybox:1.36"),
        ("docker.io", "grafana/grafana", "11.0.0", "docker.io/grafana/grafana:11.0.0"),
        ("ghcr.io", "busybox", "v1.2_rc-3", "ghcr.io/busybox:v1.2_rc-3"),
        ("localhost:5000", "app", "latest", "localhost:5000/app:latest"),
    ],
)
def test_image_name_is_the_name_cri_stores(
    registry: str, repository: str, tag: str, name: str
) -> None:
    assert image_name(registry, repository, tag) == name
    # the same name a normalised reference of what was pulled gives
    parsed = Reference.parse(name)
    assert f"{parsed.name}:{parsed.tag}" == name


@pytest.mark.parametrize("tag", ["", "-v1", ".v1", "a" * 129, "v1:2", "v 1", "sha256:" + "a" * 64])
def test_image_name_refuses_what_is_not_a_tag(tag: str) -> None:
    with pytest.raises(ValueError, match="not a tag"):
        image_name(REGISTRY, PUBLIC, tag)


# -- through the listener ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "media_type"), [(MANIFEST, DOCKER_MANIFEST), (INDEX, OCI_INDEX)]
)
async def test_a_tag_of_a_public_repository_is_its_image_target(
    layer: Layer, tmp_path: Path, document: bytes, media_type: str
) -> None:
    digest = Digest.of(document)
    images = FakeImages({f"{REGISTRY}/{PUBLIC}:v1": document})
    async with open_node(layer, tmp_path, images, document) as node:
        got = await node.manifest("v1")
        assert got.status_code == 200
        assert got.content == document
        assert got.headers["content-type"] == media_type
        assert got.headers["content-length"] == str(len(document))
        assert got.headers["docker-content-digest"] == str(digest)
        head = await node.manifest("v1", method="HEAD")
        assert head.status_code == 200
        assert head.content == b""
        assert head.headers["docker-content-digest"] == str(digest)
        assert head.headers["content-type"] == media_type
        assert head.headers["content-length"] == str(len(document))
        assert images.asked == [f"{REGISTRY}/{PUBLIC}:v1"] * 2
        assert node.peers.finds == []  # members are never asked for a tag
        assert node.mirror.stats.manifests == 2
        # the same document by digest, as containerd asks next
        by_digest = await node.manifest(str(digest))
        assert by_digest.status_code == 200
        assert by_digest.content == document
        assert len(images.asked) == 2


async def test_a_docker_hub_tag_looks_up_the_normalised_name(layer: Layer, tmp_path: Path) -> None:
    images = FakeImages({"docker.io/library/busybox:1.36": MANIFEST})
    async with open_node(layer, tmp_path, images, MANIFEST) as node:
        node.registry.public = {"library/busybox"}
        got = await node.manifest("1.36", repository="library/busybox", ns="docker.io")
        assert got.status_code == 200
        assert got.content == MANIFEST
        assert got.headers["docker-content-digest"] == str(Digest.of(MANIFEST))
        assert images.asked == ["docker.io/library/busybox:1.36"]


async def test_a_tag_of_a_private_repository_is_404(layer: Layer, tmp_path: Path) -> None:
    images = FakeImages({f"{REGISTRY}/{PRIVATE}:v1": MANIFEST})
    async with open_node(layer, tmp_path, images, MANIFEST) as node:
        for method in ("GET", "HEAD"):
            got = await node.manifest("v1", repository=PRIVATE, method=method)
            assert got.status_code == 404
            assert got.headers.get("docker-content-digest") is None
        assert "not public" in (await node.manifest("v1", repository=PRIVATE)).text
        assert images.asked == [f"{REGISTRY}/{PRIVATE}:v1"] * 3
        assert node.mirror.stats.private == 3
        assert node.mirror.stats.manifests == 0
        assert node.registry.requests  # the anonymous check was made
        assert all(PRIVATE in path for _, path in node.registry.requests)


async def test_latest_is_404_unless_resolve_latest(layer: Layer, tmp_path: Path) -> None:
    images = FakeImages({f"{REGISTRY}/{PUBLIC}:latest": MANIFEST})
    async with open_node(layer, tmp_path, images, MANIFEST) as node:
        for method in ("GET", "HEAD"):
            assert (await node.manifest("latest", method=method)).status_code == 404
        assert node.lookups() == (0, 0, 0, 0)
    async with open_node(layer, tmp_path, images, MANIFEST, resolve_latest=True) as node:
        got = await node.manifest("latest")
        assert got.status_code == 200
        assert got.content == MANIFEST
        assert got.headers["docker-content-digest"] == str(Digest.of(MANIFEST))
        assert images.asked == [f"{REGISTRY}/{PUBLIC}:latest"]


async def test_resolve_tags_false_is_404_without_a_lookup(layer: Layer, tmp_path: Path) -> None:
    images = FakeImages({f"{REGISTRY}/{PUBLIC}:v1": MANIFEST})
    async with open_node(layer, tmp_path, images, MANIFEST, resolve_tags=False) as node:
        for method in ("GET", "HEAD"):
            got = await node.manifest("v1", method=method)
            assert got.status_code == 404
        assert "resolved at the registry" in (await node.manifest("v1")).text
        assert node.lookups() == (0, 0, 0, 0)
        # digests are still served
        assert (await node.manifest(str(Digest.of(MANIFEST)))).status_code == 200


async def test_an_unknown_tag_is_404_fast(layer: Layer, tmp_path: Path) -> None:
    images = FakeImages({f"{REGISTRY}/{PUBLIC}:v1": MANIFEST})
    async with open_node(layer, tmp_path, images, MANIFEST) as node:
        start = time.monotonic()
        for method in ("GET", "HEAD"):
            got = await node.manifest("v2", method=method)
            assert got.status_code == 404
        assert time.monotonic() - start < 1.0
        assert node.lookups() == (2, 0, 0, 0)  # only the image store was asked
        assert node.mirror.stats.not_found == 2


async def test_a_malformed_tag_is_404_without_a_lookup(layer: Layer, tmp_path: Path) -> None:
    async with open_node(layer, tmp_path, FakeImages()) as node:
        for reference in ("-v1", "sha256:abc", "a" * 200):
            assert (await node.manifest(reference)).status_code == 404
        assert node.lookups() == (0, 0, 0, 0)


async def test_an_image_whose_manifest_is_not_held_is_404(layer: Layer, tmp_path: Path) -> None:
    images = FakeImages({f"{REGISTRY}/{PUBLIC}:v1": MANIFEST})
    async with open_node(layer, tmp_path, images) as node:  # the content store is empty
        assert (await node.manifest("v1")).status_code == 404
        assert images.asked == [f"{REGISTRY}/{PUBLIC}:v1"]
        assert node.store.size_calls == 1
        assert node.peers.finds == []


async def test_a_failing_or_hung_image_store_is_404(layer: Layer, tmp_path: Path) -> None:
    images = FakeImages({f"{REGISTRY}/{PUBLIC}:v1": MANIFEST})
    async with open_node(layer, tmp_path, images, MANIFEST, lookup_timeout_sec=0.3) as node:
        images.error = True
        assert (await node.manifest("v1")).status_code == 404
        images.error, images.hang = False, True
        start = time.monotonic()
        got = await node.manifest("v1")
        elapsed = time.monotonic() - start
        assert got.status_code == 404
        assert 0.25 <= elapsed < 2.0
        assert node.lookups()[1:] == (0, 0, 0)
        images.hang = False
        assert (await node.manifest("v1")).status_code == 200  # the store is fine again
