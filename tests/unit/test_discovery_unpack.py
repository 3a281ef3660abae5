"""zTOC discovery and local unpack on the async registry client (httpx.MockTransport with
async handlers, a real LocalStore, a real temp directory): concurrency bounded by the gate,
first failure wins, downloads and applies that stop promptly and clean up when cancelled."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path

import httpx
import pytest
import trio

from index.digest import Digest
from index.manifest import ZtocDescriptor, new_index
from index.oci import mediatypes as mt
from index.oci import responses
from index.oci.client import AsyncRegistryClient
from index.oci.reference import Reference
from index.store import LocalStore
from snapshotter.remote import discovery
from snapshotter.remote.apply import apply_tar
from snapshotter.remote.discovery import DiscoveryModes, fetch_artifacts
from snapshotter.remote.errors import IndexFetchError, UnpackError
from snapshotter.remote.labels import LayerLabels
from snapshotter.remote.local import RegistryUnpacker
from snapshotter.remote.unpack import unpack_layer
from snapshotter.tasks import open_task_scope

REF = Reference.parse("reg.example/team/app:v1")
Handler = Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]


def blob_server(
    blobs: dict[str, bytes], delay: float = 0.0, peak: list[int] | None = None
) -> Handler:
    in_flight = [0]

    async def handler(request: httpx.Request) -> httpx.Response:
        in_flight[0] += 1
        if peak is not None:
            peak[0] = max(peak[0], in_flight[0])
        try:
            await trio.sleep(delay)
            name = request.url.path.rsplit("/", 1)[-1]
            data = blobs.get(name)
            if data is None:
                return httpx.Response(404)
            return httpx.Response(
                200,
                content=data,
                headers={"Content-Type": mt.OCI_MANIFEST, "Content-Length": str(len(data))},
            )
        finally:
            in_flight[0] -= 1

    return handler


def soci_image(
    count: int, repeats: list[int] | None = None
) -> tuple[dict[str, bytes], Digest, Digest]:
    """Blobs of an image manifest, its v2 SOCI index and `count` zTOCs (fake bytes: discovery
    stores them by digest, it does not decode them); zTOC i is `repeats[i]` (100) times a
    short text."""
    blobs: dict[str, bytes] = {}
    ztocs = []
    for i in range(count):
        data = f"ztoc {i}".encode() * (repeats[i] if repeats else 100)
        d = Digest.of(data)
        blobs[str(d)] = data
        ztocs.append(
            ZtocDescriptor(d, len(data), Digest.of(b"layer%d" % i), mt.OCI_LAYER_GZIP, 1 << 22)
        )
    index = new_index(ztocs, v2=True).to_json()
    index_digest = Digest.of(index)
    blobs[str(index_digest)] = index
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "layers": [],
            "annotations": {mt.ANNOTATION_INDEX_DIGEST: str(index_digest)},
        }
    ).encode()
    manifest_digest = Digest.of(manifest)
    blobs[str(manifest_digest)] = manifest
    return blobs, manifest_digest, index_digest


async def test_ztocs_are_fetched_concurrently_within_the_gate(tmp_path: Path) -> None:
    blobs, manifest, index_digest = soci_image(6)
    peak = [0]
    limiter = trio.CapacityLimiter(2)
    ready: list[Digest] = []
    store = LocalStore(tmp_path / "store")
    try:
        async with AsyncRegistryClient(
            transport=httpx.MockTransport(blob_server(blobs, 0.05, peak)), gate=lambda: limiter
        ) as client:
            artifacts = await fetch_artifacts(
                client,
                store,
                REF,
                manifest,
                None,
                DiscoveryModes(),
                on_ztoc=lambda z: ready.append(z.digest),
            )
        assert artifacts.index_digest == index_digest and artifacts.found_by == "v2"
        assert sorted(ready) == sorted(z.digest for z in artifacts.index.ztocs)
        assert all(store.has_blob(z.digest) for z in artifacts.index.ztocs)
        assert peak[0] == 2  # concurrent, and never more than the gate allows
    finally:
        store.close()


async def test_a_failing_ztoc_fails_discovery(tmp_path: Path) -> None:
    blobs, manifest, index_digest = soci_image(4)
    missing = json.loads(blobs[str(index_digest)])["layers"][2]["digest"]
    del blobs[missing]
    store = LocalStore(tmp_path / "store")
    try:
        async with AsyncRegistryClient(transport=httpx.MockTransport(blob_server(blobs))) as client:
            with pytest.raises(IndexFetchError, match=missing):
                await fetch_artifacts(client, store, REF, manifest, None, DiscoveryModes())
    finally:
        store.close()


async def test_ztocs_download_in_the_background_largest_first(tmp_path: Path) -> None:
    blobs, manifest, _ = soci_image(4, [100, 900, 300, 200])
    serve = blob_server(blobs)
    release = trio.Event()
    asked: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if "/blobs/" in request.url.path:
            asked.append(request.url.path.rsplit("/", 1)[-1])
            await release.wait()
        return await serve(request)

    store = LocalStore(tmp_path / "store")
    try:
        async with (
            open_task_scope("test") as tasks,
            AsyncRegistryClient(transport=httpx.MockTransport(handler)) as client,
        ):
            artifacts = await fetch_artifacts(
                client, store, REF, manifest, None, DiscoveryModes(), tasks=tasks
            )
            ztocs = artifacts.index.ztocs
            # returned with the index, before any zTOC is in
            assert not any(artifacts.ztocs.ready(Digest(z.digest)) for z in ztocs)
            await trio.sleep(0.05)
            largest = max(ztocs, key=lambda z: z.size)
            assert asked == [str(largest.digest)]  # the largest alone first
            release.set()
            for z in ztocs:
                await artifacts.ztocs.wait(Digest(z.digest))
            assert all(store.has_blob(z.digest) for z in ztocs)
            assert sorted(asked) == sorted(str(z.digest) for z in ztocs)
            assert not artifacts.ztocs.failed
    finally:
        store.close()


async def test_the_other_ztocs_are_asked_while_the_largest_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(discovery, "ZTOC_LEAD_BYTES", 1000)
    monkeypatch.setattr(responses, "IO_CHUNK_BYTES", 256)  # the body is read as it comes
    blobs, manifest, _ = soci_image(3, [900, 100, 200])
    serve = blob_server(blobs)
    last_bytes = trio.Event()
    asked: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        name = request.url.path.rsplit("/", 1)[-1]
        if "/blobs/" not in request.url.path:
            return await serve(request)
        asked.append(name)
        data = blobs[name]
        if len(asked) > 1:
            return await serve(request)

        async def body() -> AsyncIterator[bytes]:  # the largest: its last 500 bytes wait
            yield data[:-500]
            await last_bytes.wait()
            yield data[-500:]

        return httpx.Response(200, content=body(), headers={"Content-Length": str(len(data))})

    store = LocalStore(tmp_path / "store")
    try:
        async with (
            open_task_scope("test") as tasks,
            AsyncRegistryClient(transport=httpx.MockTransport(handler)) as client,
        ):
            artifacts = await fetch_artifacts(
                client, store, REF, manifest, None, DiscoveryModes(), tasks=tasks
            )
            ztocs = sorted(artifacts.index.ztocs, key=lambda z: z.size, reverse=True)
            with trio.fail_after(5):
                for z in ztocs[1:]:  # in while the largest still waits for its last bytes
                    await artifacts.ztocs.wait(Digest(z.digest))
            assert asked[0] == str(ztocs[0].digest) and len(asked) == 3
            assert not artifacts.ztocs.settled(Digest(ztocs[0].digest))
            last_bytes.set()
            await artifacts.ztocs.wait(Digest(ztocs[0].digest))
            assert all(store.has_blob(z.digest) for z in ztocs)
    finally:
        store.close()


async def test_a_failing_ztoc_fails_only_its_layer_in_the_background(tmp_path: Path) -> None:
    blobs, manifest, index_digest = soci_image(4)
    missing = json.loads(blobs[str(index_digest)])["layers"][2]["digest"]
    del blobs[missing]
    store = LocalStore(tmp_path / "store")
    try:
        async with (
            open_task_scope("test") as tasks,
            AsyncRegistryClient(transport=httpx.MockTransport(blob_server(blobs))) as client,
        ):
            artifacts = await fetch_artifacts(
                client, store, REF, manifest, None, DiscoveryModes(), tasks=tasks
            )
            with pytest.raises(IndexFetchError, match=missing):
                await artifacts.ztocs.wait(Digest(missing))
            for z in artifacts.index.ztocs:
                if z.digest != missing:
                    await artifacts.ztocs.wait(Digest(z.digest))
                    assert store.has_blob(z.digest)
            assert artifacts.ztocs.failed and not artifacts.ztocs.ready(Digest(missing))
    finally:
        store.close()


async def test_cancelled_ztoc_downloads_release_their_waiters(tmp_path: Path) -> None:
    blobs, manifest, _ = soci_image(2)
    serve = blob_server(blobs)

    async def handler(request: httpx.Request) -> httpx.Response:
        if "/blobs/" in request.url.path:
            await trio.sleep_forever()
        return await serve(request)

    store = LocalStore(tmp_path / "store")
    try:
        async with AsyncRegistryClient(transport=httpx.MockTransport(handler)) as client:
            async with open_task_scope("test") as tasks:
                artifacts = await fetch_artifacts(
                    client, store, REF, manifest, None, DiscoveryModes(), tasks=tasks
                )
            # the scope closed (daemon stopping): every waiter gets an error, none hangs
            for z in artifacts.index.ztocs:
                with trio.fail_after(1), pytest.raises(IndexFetchError, match="ended"):
                    await artifacts.ztocs.wait(Digest(z.digest))
    finally:
        store.close()


# -- local unpack ------------------------------------------------------------------------------------


def layer_image(files: int) -> tuple[dict[str, bytes], Digest, Digest]:
    """An image with one gzip layer of `files` small files."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(files):
            data = b"x" * 100
            info = tarfile.TarInfo(f"d{i % 10}/f{i}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    tar = raw.getvalue()
    layer = gzip.compress(tar, compresslevel=1)
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [str(Digest.of(tar))]}}).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "config": {
                "mediaType": mt.OCI_CONFIG,
                "digest": str(Digest.of(config)),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": mt.OCI_LAYER_GZIP,
                    "digest": str(Digest.of(layer)),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    blobs = {str(Digest.of(b)): b for b in (layer, config, manifest)}
    return blobs, Digest.of(manifest), Digest.of(layer)


async def test_unpack_layer_applies_and_cleans_up(tmp_path: Path) -> None:
    blobs, manifest, layer = layer_image(50)
    dest, tmp = tmp_path / "fs", tmp_path / "tmp"
    dest.mkdir()
    async with AsyncRegistryClient(transport=httpx.MockTransport(blob_server(blobs))) as client:
        size = await unpack_layer(client, REF, manifest, layer, dest, tmp)
    assert size == len(blobs[str(layer)])
    assert (dest / "d3" / "f13").read_bytes() == b"x" * 100
    assert list(tmp.iterdir()) == []


async def test_cancelled_download_empties_dest_and_frees_the_gate(tmp_path: Path) -> None:
    blobs, manifest, layer = layer_image(50)
    serve = blob_server(blobs)

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(str(layer)):

            async def trickle() -> AsyncIterator[bytes]:
                yield blobs[str(layer)][:100]
                await trio.sleep_forever()

            return httpx.Response(200, content=trickle())
        return await serve(request)

    limiter = trio.CapacityLimiter(1)
    dest, tmp = tmp_path / "fs", tmp_path / "tmp"
    dest.mkdir()
    async with AsyncRegistryClient(
        transport=httpx.MockTransport(handler), gate=lambda: limiter
    ) as client:
        with trio.move_on_after(0.5) as scope:
            await unpack_layer(client, REF, manifest, layer, dest, tmp)
    assert scope.cancelled_caught
    assert limiter.borrowed_tokens == 0
    assert list(tmp.iterdir()) == [] and list(dest.iterdir()) == []


async def test_cancelled_apply_stops_promptly_and_empties_dest(tmp_path: Path) -> None:
    blobs, manifest, layer = layer_image(30000)
    dest, tmp = tmp_path / "fs", tmp_path / "tmp"
    dest.mkdir()
    async with AsyncRegistryClient(transport=httpx.MockTransport(blob_server(blobs))) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(unpack_layer, client, REF, manifest, layer, dest, tmp)
            while not any(dest.iterdir()):  # the apply has started
                await trio.sleep(0.001)
            start = time.monotonic()
            nursery.cancel_scope.cancel()
        stopped_after = time.monotonic() - start
    assert stopped_after < 4.0  # the whole apply takes about 9 s; a cancelled one stops at once
    assert list(dest.iterdir()) == [] and list(tmp.iterdir()) == []


def test_apply_tar_stops_when_cancelled(tmp_path: Path) -> None:
    blobs, _, layer = layer_image(20)
    asked = [0]

    def cancelled() -> bool:
        asked[0] += 1
        return asked[0] > 5

    with pytest.raises(UnpackError, match="cancelled"):
        apply_tar(io.BytesIO(gzip.decompress(blobs[str(layer)])), tmp_path, cancelled=cancelled)
    assert asked[0] == 6
    assert sum(1 for _ in tmp_path.rglob("f*")) == 5


async def test_the_mounters_unpacker_times_out_into_unpack_error(tmp_path: Path) -> None:
    blobs, manifest, layer = layer_image(5)
    serve = blob_server(blobs)

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(str(layer)):
            await trio.sleep_forever()
        return await serve(request)

    dest = tmp_path / "fs"
    dest.mkdir()
    labels = LayerLabels.parse(
        {
            "containerd.io/snapshot.ref": "sha256:" + "0" * 64,
            "containerd.io/snapshot/cri.image-ref": str(REF),
            "containerd.io/snapshot/cri.manifest-digest": str(manifest),
            "containerd.io/snapshot/cri.layer-digest": str(layer),
        }
    )
    async with AsyncRegistryClient(transport=httpx.MockTransport(handler)) as client:
        unpacker = RegistryUnpacker(client, tmp_path / "tmp", userxattr=False, timeout_sec=0.3)
        with pytest.raises(UnpackError, match=r"not unpacked within 0\.3 s"):
            await unpacker.unpack(labels, REF, dest)
    assert list(dest.iterdir()) == [] and list((tmp_path / "tmp").iterdir()) == []
