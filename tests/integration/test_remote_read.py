"""The remote read path against a real docker-registry behind the counting proxy.

A gzip layer of real files (the host's Python stdlib, several MB compressed) is pushed; every
file is read back through `RemoteLayerReader` and compared with `tarfile`. The proxy counts
requests (coalescing: far fewer than spans) and injects faults (5xx, connection resets,
truncated bodies, corrupt bytes): reads retry, never return wrong bytes, and fail with
`LayerReadError` only when every source fails. Also: a second reader over the same cache
fetches nothing, the cache size bound evicts, token auth, redirects to expiring storage URLs,
and background fetch to completion.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import tarfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from index.builder import build_ztoc
from index.digest import Digest
from index.model import UncompressedOffset, Ztoc
from index.oci.client import AsyncRegistryClient
from index.oci.dockerconfig import StaticCredentials
from index.oci.reference import Reference
from index.oci.registry import RegistryClient
from snapshotter.fs.errors import LayerReadError
from snapshotter.lazy import BackgroundConfig, BackgroundFetcher, ReadConfig, RemoteLayerReader
from snapshotter.lazy.cache import CacheConfig, SpanCache
from snapshotter.lazy.sources import BlobSource, ChainSource, FetchConfig, RegistrySource
from tests.support.images import MEDIA_LAYER_GZIP, TreeSource, python_stdlib_dir, write_layer
from tests.support.registry import CountingProxy, RegistryServer, start_proxy

T = TypeVar("T")

SPAN_SIZE = 256 * 1024
READ_CHUNK = 128 * 1024  # the FUSE request size (max_read of the mount)
FAST_RETRY = FetchConfig(max_attempts=4, backoff_initial_ms=5, backoff_max_ms=20)
_repo_counter = itertools.count()


@dataclass(frozen=True)
class PushedLayer:
    path: Path
    digest: Digest
    ztoc: Ztoc
    files: tuple[tuple[str, int, bytes], ...]  # name, data offset, content (tar order)

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> PushedLayer:
    stdlib = python_stdlib_dir()
    exclude = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "idlelib"})
    built = write_layer(
        [TreeSource(src=stdlib, dest="usr/lib/python3.11", exclude=exclude)],
        tmp_path_factory.mktemp("remote-layer"),
    )
    ztoc = build_ztoc(built.path, MEDIA_LAYER_GZIP, SPAN_SIZE)
    files = []
    with tarfile.open(built.path) as tf:
        for member in tf:
            if member.isreg():
                f = tf.extractfile(member)
                assert f is not None
                files.append((member.name, member.offset_data, f.read()))
    assert built.size > 3 * 1024 * 1024, "the test layer should be several MB"
    return PushedLayer(built.path, Digest(built.digest), ztoc, tuple(files))


def push_layer(server: RegistryServer, layer: PushedLayer) -> str:
    repo = f"remote-read/layer{next(_repo_counter)}-{os.getpid()}"
    creds = StaticCredentials(server.username, server.password or "") if server.username else None
    with RegistryClient(credentials=creds) as client:
        client.push_blob(Reference.parse(f"{server.host}/{repo}"), layer.path, MEDIA_LAYER_GZIP)
    return repo


@pytest.fixture(scope="module")
def pushed(registry: RegistryServer, layer: PushedLayer) -> str:
    """The repository on the shared anonymous registry that holds the layer."""
    return push_layer(registry, layer)


@contextlib.asynccontextmanager
async def registry_source(
    host: str, repo: str, *, config: FetchConfig = FAST_RETRY, **client_args: object
) -> AsyncIterator[RegistrySource]:
    async with AsyncRegistryClient(**client_args) as client:  # type: ignore[arg-type]
        yield RegistrySource(client, Reference.parse(f"{host}/{repo}"), config=config)


@contextlib.asynccontextmanager
async def _sync(cm: contextlib.AbstractContextManager[T]) -> AsyncIterator[T]:
    """A synchronous context manager usable in one `async with` with `registry_source`."""
    with cm as value:
        yield value


def make_reader(
    layer: PushedLayer,
    source: BlobSource,
    cache_dir: Path,
    *,
    max_bytes: int | None = None,
    read_config: ReadConfig | None = None,
) -> RemoteLayerReader:
    cache = SpanCache(cache_dir, CacheConfig(max_bytes=max_bytes) if max_bytes else None)
    return RemoteLayerReader(layer.digest, layer.ztoc, source, cache, config=read_config)


async def read_file(reader: RemoteLayerReader, offset: int, size: int) -> bytes:
    parts = []
    for pos in range(0, size, READ_CHUNK):
        parts.append(
            await reader.read(UncompressedOffset(offset + pos), min(READ_CHUNK, size - pos))
        )
    return b"".join(parts)


async def check_files(
    reader: RemoteLayerReader, files: Sequence[tuple[str, int, bytes]], parallel: int = 1
) -> None:
    """Read `files` through `reader` (with `parallel` tasks) and compare every byte."""
    queue = list(files)

    async def worker() -> None:
        while queue:
            name, offset, data = queue.pop(0)
            got = await read_file(reader, offset, len(data))
            assert got == data, f"{name}: wrong bytes"

    async with trio.open_nursery() as nursery:
        for _ in range(parallel):
            nursery.start_soon(worker)


def blob_requests(proxy: CountingProxy) -> int:
    return proxy.requests_to("/blobs/sha256:")


# -- correctness and coalescing -------------------------------------------------------------------


@pytest.mark.slow
async def test_every_file_reads_back_with_few_requests(
    registry: RegistryServer, layer: PushedLayer, pushed: str, tmp_path: Path
) -> None:
    async with _sync(start_proxy(registry)) as proxy, registry_source(proxy.host, pushed) as source:
        reader = make_reader(layer, source, tmp_path)
        spans = reader.span_map.span_count
        await check_files(reader, layer.files)
        requests = blob_requests(proxy)
        served = sum(n for path, n in proxy.bytes_sent.items() if "/blobs/" in path)
    assert spans >= 40
    assert requests <= spans // 3, f"{requests} requests for {spans} spans"
    # each byte crossed the wire once (plus the one-byte span overlaps)
    assert served <= layer.size + spans
    assert reader.is_complete() and reader.progress().percent > 99.9
    status = reader.status()
    assert status.requests == requests and status.last_error == ""
    print(
        f"\nread {len(layer.files)} files, {layer.size} B blob, {spans} spans: {requests} requests"
    )


async def test_concurrent_random_reads(
    registry: RegistryServer, layer: PushedLayer, pushed: str, tmp_path: Path
) -> None:
    files = random.Random(7).sample(layer.files, 300)
    async with _sync(start_proxy(registry)) as proxy, registry_source(proxy.host, pushed) as source:
        reader = make_reader(layer, source, tmp_path)
        await check_files(reader, files, parallel=8)
        assert blob_requests(proxy) <= reader.span_map.span_count


async def test_second_reader_over_the_same_cache_fetches_nothing(
    registry: RegistryServer, layer: PushedLayer, pushed: str, tmp_path: Path
) -> None:
    files = layer.files[::5]
    async with _sync(start_proxy(registry)) as proxy, registry_source(proxy.host, pushed) as source:
        await check_files(make_reader(layer, source, tmp_path), files)
        first = blob_requests(proxy)
        again = make_reader(layer, source, tmp_path)  # e.g. after a daemon restart
        await check_files(again, files)
        assert first > 0 and blob_requests(proxy) == first
        assert again.status().requests == 0 and again.cache.stats().hits > 0


async def test_cache_bound_evicts_and_refetches(
    registry: RegistryServer, layer: PushedLayer, pushed: str, tmp_path: Path
) -> None:
    bound = layer.size // 3
    async with _sync(start_proxy(registry)) as proxy, registry_source(proxy.host, pushed) as source:
        reader = make_reader(
            layer,
            source,
            tmp_path,
            max_bytes=bound,
            read_config=ReadConfig(memory_cache_spans=2),
        )
        await check_files(reader, layer.files)
        stats = reader.cache.stats()
        assert stats.bytes <= bound and stats.evictions > 0
        on_disk = sum(f.stat().st_size for f in (tmp_path / "spans").rglob("*") if f.is_file())
        assert on_disk == stats.bytes
        before = blob_requests(proxy)
        await check_files(reader, layer.files[:20])  # evicted long ago: fetched again
        assert blob_requests(proxy) > before


# -- faults ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["status", "reset", "truncate", "corrupt"])
async def test_faults_are_retried_and_never_served(
    registry: RegistryServer, layer: PushedLayer, pushed: str, tmp_path: Path, fault: str
) -> None:
    files = layer.files[: len(layer.files) // 4]
    async with _sync(start_proxy(registry)) as proxy, registry_source(proxy.host, pushed) as source:
        if fault == "status":
            proxy.fail_status, proxy.fail_count = 503, 2
        else:
            proxy.fault, proxy.fault_count = fault, 2  # type: ignore[assignment]
        reader = make_reader(layer, source, tmp_path)
        await check_files(reader, files)
        assert proxy.fail_count == 0 and proxy.fault_count == 0
        stats = source.statistics()
        assert stats.retries >= 2 and stats.failures == 0
        assert reader.status().last_error == ""


async def test_every_source_failing_is_eio_and_recoverable(
    registry: RegistryServer, layer: PushedLayer, pushed: str, tmp_path: Path
) -> None:
    _, offset, data = layer.files[len(layer.files) // 2]
    async with _sync(start_proxy(registry)) as proxy, registry_source(proxy.host, pushed) as source:
        proxy.fault, proxy.fault_count = "corrupt", -1
        reader = make_reader(layer, source, tmp_path)
        with pytest.raises(LayerReadError, match="digest mismatch"):
            await read_file(reader, offset, len(data))
        assert proxy.faults_injected == FAST_RETRY.max_attempts
        assert reader.cache.stats().entries == 0
        assert "digest mismatch" in reader.status().last_error
        proxy.fault = ""
        proxy.fail_count = 1000
        with pytest.raises(LayerReadError, match="503"):
            await read_file(reader, offset, len(data))
        proxy.fail_count = 0  # the registry comes back: the same reader works again
        assert await read_file(reader, offset, len(data)) == data


async def test_chain_falls_back_from_a_corrupt_mirror_to_the_registry(
    registry: RegistryServer, layer: PushedLayer, pushed: str, tmp_path: Path
) -> None:
    files = layer.files[:50]
    async with (
        _sync(start_proxy(registry, fault="corrupt", fault_count=-1)) as bad_mirror,
        registry_source(bad_mirror.host, pushed, config=FetchConfig(max_attempts=1)) as mirror,
        _sync(start_proxy(registry)) as upstream_proxy,
        registry_source(upstream_proxy.host, pushed) as upstream,
    ):
        reader = make_reader(layer, ChainSource([mirror, upstream]), tmp_path)
        await check_files(reader, files)
        assert bad_mirror.faults_injected > 0
        assert blob_requests(upstream_proxy) == bad_mirror.faults_injected


async def test_hosts_toml_mirror_with_corrupt_bytes_is_skipped_for_upstream(
    registry: RegistryServer, layer: PushedLayer, pushed: str, tmp_path: Path
) -> None:
    files = layer.files[:50]
    with (
        start_proxy(registry, fault="corrupt", fault_count=-1) as mirror,
        start_proxy(registry) as upstream,
    ):
        certs_d = tmp_path / "certs.d"
        host_dir = certs_d / (upstream.host.replace(":", "_") + "_")
        host_dir.mkdir(parents=True)
        (host_dir / "hosts.toml").write_text(
            f'server = "http://{upstream.host}"\n\n'
            f'[host."http://{mirror.host}"]\n  capabilities = ["pull", "resolve"]\n'
        )
        async with registry_source(upstream.host, pushed, hosts_dirs=[certs_d]) as source:
            reader = make_reader(layer, source, tmp_path / "cache")
            await check_files(reader, files)
            stats = source.statistics()
        assert mirror.faults_injected > 0
        assert blob_requests(upstream) == mirror.faults_injected
        assert stats.retries == 0 and stats.failures == 0  # skipped within each attempt


# -- auth, redirects, background --------------------------------------------------------------------


async def test_token_auth_registry(
    auth_registry: RegistryServer, layer: PushedLayer, tmp_path: Path
) -> None:
    repo = push_layer(auth_registry, layer)
    assert auth_registry.token_server is not None
    before = sum(auth_registry.token_server.requests.values())
    creds = StaticCredentials(auth_registry.username or "", auth_registry.password or "")
    async with registry_source(auth_registry.host, repo, credentials=creds) as source:
        reader = make_reader(layer, source, tmp_path)
        await check_files(reader, layer.files[::40], parallel=4)
    assert sum(auth_registry.token_server.requests.values()) > before
    async with registry_source(auth_registry.host, repo) as anonymous:
        reader = make_reader(layer, anonymous, tmp_path / "anon")
        _, offset, data = layer.files[0]
        with pytest.raises(LayerReadError, match="401"):
            await read_file(reader, offset, len(data))


async def test_redirects_to_expiring_storage_urls(
    registry: RegistryServer, layer: PushedLayer, pushed: str, tmp_path: Path
) -> None:
    async with (
        _sync(start_proxy(registry, redirect_blobs=True, expire_storage_urls=True)) as proxy,
        registry_source(proxy.host, pushed) as source,
    ):
        reader = make_reader(layer, source, tmp_path)
        await check_files(reader, layer.files[::10])
        assert proxy.requests_to("/_storage/") > 0


async def test_background_fetch_completes_the_layer(
    registry: RegistryServer, layer: PushedLayer, pushed: str, tmp_path: Path
) -> None:
    async with _sync(start_proxy(registry)) as proxy, registry_source(proxy.host, pushed) as source:
        reader = make_reader(layer, source, tmp_path)
        fetcher = BackgroundFetcher(
            BackgroundConfig(quiet_period_ms=50, rate_bytes_per_sec=0, step_bytes=2 * 1024 * 1024),
            reader.tracker,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(fetcher.serve)
            fetcher.register(str(layer.digest), reader)
            with trio.fail_after(60):
                while not reader.is_complete():
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        requests = blob_requests(proxy)
        assert requests <= layer.size // (1024 * 1024) + 2
        await check_files(reader, layer.files[::25])
        assert blob_requests(proxy) == requests  # everything was already local
