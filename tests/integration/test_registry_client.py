"""The registry client against real docker-registry (distribution 2.8) servers on loopback.

Anonymous, htpasswd and token-auth registries; pushes (monolithic and chunked, cross-repo
mount), resolve, manifests, verified blob fetches, Range reads, referrers through the
tag-schema fallback (distribution 2.8 has no referrers API), redirects to "storage" through a
proxy, and hosts.toml mirrors with a mirror that goes down.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trio

from index import gojson
from index.digest import Digest
from index.oci import mediatypes
from index.oci.client import AsyncRegistryClient
from index.oci.descriptor import Descriptor
from index.oci.dockerconfig import DockerConfig, StaticCredentials
from index.oci.errors import HostsConfigError, NotFoundError, TransportError, UnauthorizedError
from index.oci.reference import Reference
from index.oci.registry import RegistryClient, referrers_tag
from tests.support.registry import RegistryServer, TokenServer, start_proxy

_counter = itertools.count()


def unique_repo(prefix: str = "it") -> str:
    return f"{prefix}/repo{next(_counter)}-{os.getpid()}"


def client_for(server: RegistryServer, **kwargs: Any) -> RegistryClient:
    creds = StaticCredentials(server.username, server.password or "") if server.username else None
    return RegistryClient(credentials=creds, **kwargs)


def image_manifest(
    config: Descriptor, layers: list[Descriptor], subject: Descriptor | None = None
) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mediatypes.OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    if subject is not None:
        doc["subject"] = {
            "mediaType": subject.media_type,
            "digest": subject.digest,
            "size": subject.size,
        }
        doc["annotations"] = {mediatypes.ANNOTATION_BUILD_TOOL: "test"}
    return gojson.marshal(doc)


def push_image(
    client: RegistryClient, ref: Reference, layer_data: bytes
) -> tuple[Descriptor, Descriptor]:
    """Push config + one layer + manifest at ref's tag; returns (manifest, layer) descriptors."""
    config = client.push_blob(ref, b'{"architecture":"amd64","os":"linux"}', mediatypes.OCI_CONFIG)
    layer = client.push_blob(ref, layer_data, mediatypes.OCI_LAYER_GZIP)
    data = image_manifest(config, [layer])
    result = client.push_manifest(ref, data, mediatypes.OCI_MANIFEST)
    return result.descriptor, layer


@pytest.fixture(params=["registry", "basic_registry", "auth_registry"])
def any_registry(request: pytest.FixtureRequest) -> RegistryServer:
    server: RegistryServer = request.getfixturevalue(request.param)
    return server


def test_push_resolve_fetch_and_ranges(any_registry: RegistryServer, tmp_path: Path) -> None:
    ref = Reference.parse(any_registry.ref(unique_repo(), "v1"))
    layer_data = os.urandom(300_000)
    with client_for(any_registry) as client:
        manifest, layer = push_image(client, ref, layer_data)
        assert client.resolve(ref) == Descriptor(
            mediatypes.OCI_MANIFEST, manifest.digest, manifest.size
        )
        by_tag, data = client.get_manifest(ref)
        assert by_tag.digest == manifest.digest and Digest.of(data) == manifest.digest
        by_digest, data2 = client.get_manifest(ref, manifest.digest)
        assert data2 == data and by_digest.media_type == mediatypes.OCI_MANIFEST
        assert client.resolve(ref.with_digest(manifest.digest)).digest == manifest.digest

        dest = tmp_path / "layer"
        assert client.fetch_blob(ref, layer.digest, dest, layer.size).size == len(layer_data)
        assert dest.read_bytes() == layer_data
        assert client.read_blob(ref, layer.digest) == layer_data
        assert client.head_blob(ref, layer.digest).size == len(layer_data)
        assert (
            client.fetch_blob_range(ref, layer.digest, 12_345, 4096)
            == layer_data[12_345 : 12_345 + 4096]
        )
        tail = client.fetch_blob_range(ref, layer.digest, len(layer_data) - 10, 4096)
        assert tail == layer_data[-10:]

        missing = Digest.of(b"never pushed")
        assert not client.blob_exists(ref, missing)
        with pytest.raises(NotFoundError, match=missing):
            client.read_blob(ref, missing)
        with pytest.raises(NotFoundError):
            client.resolve(ref.with_tag("no-such-tag"))
        assert not list(tmp_path.glob(".layer.*"))


def test_chunked_upload_and_cross_repo_mount(registry: RegistryServer, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(700_000))
    digest = Digest.of(src.read_bytes())
    a = Reference.parse(registry.ref(unique_repo("chunk")))
    b = Reference.parse(registry.ref(unique_repo("mount")))
    with RegistryClient(chunk_bytes=256 * 1024, monolithic_max_bytes=100_000) as client:
        desc = client.push_blob(a, src, mediatypes.OCI_LAYER_GZIP)
        assert desc.digest == digest and desc.size == 700_000
        assert client.read_blob(a, digest) == src.read_bytes()
        assert not client.blob_exists(b, digest)
        client.push_blob(b, src, mediatypes.OCI_LAYER_GZIP, mount_from=a.repository)
        assert client.head_blob(b, digest).size == 700_000


def test_referrers_tag_schema_fallback(auth_registry: RegistryServer) -> None:
    ref = Reference.parse(auth_registry.ref(unique_repo("soci"), "img"))
    with client_for(auth_registry) as client:
        image, _ = push_image(client, ref, os.urandom(1000))
        assert client.referrers(ref, image.digest) == []

        empty = client.push_blob(ref, mediatypes.EMPTY_CONFIG_DATA, mediatypes.SOCI_INDEX_V1)
        assert empty.digest == mediatypes.EMPTY_CONFIG_DIGEST
        ztoc = client.push_blob(ref, b"ztoc bytes", mediatypes.SOCI_ZTOC)
        index = image_manifest(empty, [ztoc], subject=image)
        pushed = client.push_manifest(ref, index, mediatypes.OCI_MANIFEST, tag="unused-by-digest")
        assert not pushed.subject_indexed and pushed.referrers_tag_updated

        other_config = client.push_blob(ref, b"{}", "application/vnd.example.other+json")
        other = image_manifest(other_config, [ztoc], subject=image)
        assert client.push_manifest(
            ref, other, mediatypes.OCI_MANIFEST, tag="other"
        ).referrers_tag_updated
        again = client.push_manifest(ref, other, mediatypes.OCI_MANIFEST, tag="other")
        assert not again.referrers_tag_updated

        found = client.referrers(ref, image.digest, mediatypes.SOCI_INDEX_V1)
        assert [d.digest for d in found] == [pushed.descriptor.digest]
        assert found[0].artifact_type == mediatypes.SOCI_INDEX_V1
        assert found[0].annotations == {mediatypes.ANNOTATION_BUILD_TOOL: "test"}
        assert len(client.referrers(ref, image.digest)) == 2
        tag_index, _ = client.get_manifest(ref.with_tag(referrers_tag(image.digest)))
        assert tag_index.media_type == mediatypes.OCI_INDEX


def test_auth_failures(basic_registry: RegistryServer, auth_registry: RegistryServer) -> None:
    blob = Digest.of(b"x")
    with RegistryClient() as anonymous:
        with pytest.raises(UnauthorizedError, match="no credentials"):
            anonymous.blob_exists(Reference.parse(basic_registry.ref("a/b")), blob)
        with pytest.raises(UnauthorizedError):
            anonymous.push_blob(Reference.parse(auth_registry.ref(unique_repo())), b"data")
    with RegistryClient(credentials=StaticCredentials("tester", "wrong")) as wrong:
        with pytest.raises(UnauthorizedError, match="401"):
            wrong.blob_exists(Reference.parse(basic_registry.ref("a/b")), blob)
        with pytest.raises(UnauthorizedError, match="token server"):
            wrong.blob_exists(Reference.parse(auth_registry.ref("a/b")), blob)


def test_token_cache_and_get_fallback(registry_factory: Callable[..., RegistryServer]) -> None:
    tokens = TokenServer(reject_post=True)
    server = registry_factory("token", token_server=tokens)
    ref = Reference.parse(server.ref(unique_repo("tok"), "t"))
    with client_for(server) as client:
        manifest, layer = push_image(client, ref, b"layer")
        before = dict(tokens.requests)
        for _ in range(5):
            client.fetch_blob_range(ref, layer.digest, 0, 3)
        assert client.resolve(ref).digest == manifest.digest
    assert before["POST"] >= 1 and before["GET"] >= 1  # OAuth form refused, GET + Basic used
    assert tokens.requests["GET"] - before["GET"] <= 1  # pull token fetched once, then cached


def test_redirect_to_storage_drops_auth_and_caches_url(auth_registry: RegistryServer) -> None:
    ref = Reference.parse(auth_registry.ref(unique_repo("redir")))
    data = os.urandom(200_000)
    with client_for(auth_registry) as pusher:
        layer = pusher.push_blob(ref, data, mediatypes.OCI_LAYER_GZIP)
    with start_proxy(auth_registry, redirect_blobs=True, expire_storage_urls=True) as proxy:
        via_proxy = Reference(proxy.host, ref.repository)
        creds = StaticCredentials(auth_registry.username or "", auth_registry.password or "")
        with RegistryClient(credentials=creds) as client:
            assert client.read_blob(via_proxy, layer.digest) == data
            for off in (0, 50_000, 150_000):
                assert (
                    client.fetch_blob_range(via_proxy, layer.digest, off, 1000)
                    == data[off : off + 1000]
                )
            blob_path = f"GET /v2/{ref.repository}/blobs/{layer.digest}"
            assert (
                proxy.requests[blob_path] == 3
            )  # 401 + full read + first range; later ranges cached
            # A newer redirect makes older storage URLs expire (403): the client re-resolves once.
            client.read_blob(via_proxy, layer.digest)
            assert client.fetch_blob_range(via_proxy, layer.digest, 7, 9) == data[7:16]
            assert proxy.requests[blob_path] == 5
        assert proxy.requests_to("/_storage/") >= 5
        assert proxy.bytes_sent[f"/_storage/v2/{ref.repository}/blobs/{layer.digest}"] >= len(data)


@pytest.fixture
def mirror_setup(
    registry_factory: Callable[..., RegistryServer], tmp_path: Path
) -> Iterator[tuple[RegistryServer, RegistryServer, Path]]:
    upstream = registry_factory()
    mirror = registry_factory()
    yield upstream, mirror, tmp_path / "certs.d"


def test_hosts_toml_mirror_first_then_upstream(
    mirror_setup: tuple[RegistryServer, RegistryServer, Path],
) -> None:
    upstream, mirror, certs_d = mirror_setup
    repo = unique_repo("mirrored")
    shared = os.urandom(5000)
    only_upstream = os.urandom(5000)
    up_ref = Reference.parse(upstream.ref(repo, "v1"))
    with RegistryClient() as direct:
        manifest, _ = push_image(direct, up_ref, shared)
        push_image(direct, Reference.parse(mirror.ref(repo, "v1")), shared)
        extra = direct.push_blob(up_ref, only_upstream)

    with start_proxy(mirror) as proxy:
        host_dir = certs_d / (upstream.host.replace(":", "_") + "_")
        host_dir.mkdir(parents=True)
        (host_dir / "hosts.toml").write_text(
            f'server = "http://{upstream.host}"\n\n[host."http://{proxy.host}"]\n  capabilities = ["pull", "resolve"]\n'
        )
        with RegistryClient(hosts_dirs=[certs_d]) as client:
            assert client.resolve(up_ref).digest == manifest.digest
            assert client.read_blob(up_ref, Digest.of(shared)) == shared
            assert proxy.requests_to("/manifests/v1") == 1
            assert proxy.requests_to(f"/blobs/{Digest.of(shared)}") == 1
            assert client.read_blob(up_ref, extra.digest) == only_upstream  # mirror 404 → upstream
            assert proxy.requests_to(f"/blobs/{extra.digest}") == 1
            pushed = client.push_blob(up_ref, b"pushed")  # push goes to upstream only
            assert proxy.requests_to("/uploads/") == 0 and pushed.size == 6
    # The proxy (mirror) is gone now: pulls still work through the upstream.
    with RegistryClient(hosts_dirs=[certs_d]) as client:
        assert client.read_blob(up_ref, Digest.of(shared)) == shared
        assert client.resolve(up_ref).digest == manifest.digest
    upstream.stop()
    with RegistryClient(hosts_dirs=[certs_d]) as client, pytest.raises(TransportError):
        client.resolve(up_ref)


def test_tls_registry_with_hosts_toml_ca(
    registry_factory: Callable[..., RegistryServer], tmp_path: Path
) -> None:
    server = registry_factory(tls=True)
    assert server.ca_cert is not None and server.url.startswith("https://")
    ref = Reference.parse(server.ref(unique_repo("tls")))
    with (
        RegistryClient(plain_http=False) as untrusted,
        pytest.raises(TransportError, match="CERTIFICATE"),
    ):
        untrusted.push_blob(ref, b"data")
    with RegistryClient(plain_http=False, skip_verify=True) as insecure:
        pushed = insecure.push_blob(ref, b"data")
    host_dir = tmp_path / "certs.d" / (server.host.replace(":", "_") + "_")
    host_dir.mkdir(parents=True)
    (host_dir / "ca.pem").write_bytes(server.ca_cert.read_bytes())
    (host_dir / "hosts.toml").write_text(
        f'server = "https://{server.host}"\n\n[host."https://{server.host}"]\n  ca = "ca.pem"\n'
    )
    with RegistryClient(hosts_dirs=[tmp_path / "certs.d"]) as trusted:
        assert trusted.read_blob(ref, pushed.digest) == b"data"
    # A mirror whose ca file does not exist fails on its own; the upstream still serves.
    (host_dir / "hosts.toml").write_text(
        f'server = "https://{server.host}"\nca = "ca.pem"\n\n'
        f'[host."https://mirror.invalid"]\n  ca = "missing-ca.pem"\n'
    )
    with RegistryClient(hosts_dirs=[tmp_path / "certs.d"]) as client:
        assert client.read_blob(ref, pushed.digest) == b"data"
    (host_dir / "hosts.toml").write_text(
        f'server = "https://{server.host}"\nca = "missing-ca.pem"\n'
    )
    with (
        RegistryClient(hosts_dirs=[tmp_path / "certs.d"]) as client,
        pytest.raises(HostsConfigError, match=r"missing-ca\.pem of host"),
    ):
        client.read_blob(ref, pushed.digest)


def test_docker_config_credentials_against_basic_registry(
    basic_registry: RegistryServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = base64.b64encode(
        f"{basic_registry.username}:{basic_registry.password}".encode()
    ).decode()
    (tmp_path / "config.json").write_text(
        json.dumps({"auths": {basic_registry.host: {"auth": secret}}})
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    ref = Reference.parse(basic_registry.ref(unique_repo("dockercfg")))
    with RegistryClient(credentials=DockerConfig()) as client:
        desc = client.push_blob(ref, b"with docker config")
        assert client.read_blob(ref, desc.digest) == b"with docker config"


def test_one_client_shared_by_threads(auth_registry: RegistryServer) -> None:
    """The daemon calls fetch_blob_range from worker threads through one client."""
    ref = Reference.parse(auth_registry.ref(unique_repo("threads")))
    data = os.urandom(1 << 20)
    with client_for(auth_registry) as client:
        layer = client.push_blob(ref, data, mediatypes.OCI_LAYER_GZIP)
        offsets = [i * 7919 for i in range(64)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            chunks = list(
                pool.map(lambda off: client.fetch_blob_range(ref, layer.digest, off, 5000), offsets)
            )
    assert all(chunk == data[off : off + 5000] for off, chunk in zip(offsets, chunks, strict=True))


async def test_async_client_on_trio_with_a_gate(auth_registry: RegistryServer) -> None:
    """The daemon's path: native trio I/O, token auth, one gate slot per operation."""
    ref = Reference.parse(auth_registry.ref(unique_repo("async")))
    data = os.urandom(1 << 20)
    with client_for(auth_registry) as sync_client:
        layer = sync_client.push_blob(ref, data, mediatypes.OCI_LAYER_GZIP)
    limiter = trio.CapacityLimiter(2)
    creds = StaticCredentials(auth_registry.username or "", auth_registry.password or "")
    got: dict[int, bytes] = {}
    async with AsyncRegistryClient(credentials=creds, gate=lambda: limiter) as client:

        async def read(offset: int) -> None:
            got[offset] = await client.fetch_blob_range(ref, layer.digest, offset, 5000)

        async with trio.open_nursery() as nursery:
            for i in range(32):
                nursery.start_soon(read, i * 7919)
        assert await client.read_blob(ref, layer.digest, max_bytes=2 << 20) == data
    assert limiter.borrowed_tokens == 0
    assert all(chunk == data[off : off + 5000] for off, chunk in got.items()) and len(got) == 32
