"""`ContentStore` against a real containerd (Debian's 1.6) holding an image pulled the ordinary
way (`ctr images pull` from a local registry into namespace `k8s.io`).

The image has a layer of about 3.5 MiB (containerd answers Read in 1 MiB messages, so reads
cross message boundaries) and a small one. The tests show: the size of every blob is its
descriptor's; ranges read equal the registry's bytes for the same Range; streaming a whole
blob hashes to its digest; content is per namespace; unknown digests are None or
ContentNotFound; a stopped (SIGSTOP) containerd costs one deadline, not a hang, and a stream
cancelled while it waits on it leaves no worker thread behind; a containerd that has exited
answers UNAVAILABLE at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import grpc
import httpx
import pytest
import trio

from index.digest import Digest
from snapshotter.peers import content
from snapshotter.peers.content import ContentNotFound, ContentStore, ContentStoreError
from tests.support import images
from tests.support.containerd import Containerd, require_containerd, start_containerd, stopped
from tests.support.registry import RegistryServer

pytestmark = [pytest.mark.root]

MIB = 1 << 20
REPO = "sociable-test/content-store"
NAMESPACE = "k8s.io"
MISSING = Digest.of(b"no containerd holds this")


@dataclass(frozen=True)
class Pushed:
    image: images.Image
    ref: str
    registry: RegistryServer

    @property
    def big(self) -> images.Layer:
        return self.image.layers[0]

    def blob_url(self, digest: str) -> str:
        return f"{self.registry.url}/v2/{REPO}/blobs/{digest}"


@pytest.fixture(scope="module")
def pushed(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    require_containerd()
    layout = tmp_path_factory.mktemp("content-image")
    image = images.write_oci_layout(
        layout,
        [
            [images.File(path="data/big.bin", data=b"B", size=6 * MIB + 5)],
            [images.File(path="data/small.txt", data=b"small layer\n")],
        ],
        cmd=("/data/none",),
    )
    assert image.layers[0].size > 3 * MIB, "the big layer must span several Read messages"
    return Pushed(image=image, ref=images.push(image, registry.host, REPO, "v1"), registry=registry)


@contextlib.contextmanager
def pulled_containerd(pushed: Pushed, base: Path) -> Iterator[Containerd]:
    """A private containerd (no proxy snapshotter) that has pulled `pushed` into k8s.io."""
    with start_containerd(
        base, proxy_address=None, cri_snapshotter="overlayfs", registry_hosts=[pushed.registry.host]
    ) as ctd:
        ctd.pull(pushed.ref, snapshotter="overlayfs", namespace=NAMESPACE)
        yield ctd


@pytest.fixture(scope="module")
def ctd(pushed: Pushed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    with pulled_containerd(pushed, tmp_path_factory.mktemp("content-ctd")) as running:
        yield running


@contextlib.contextmanager
def open_store(ctd: Containerd, **kwargs: object) -> Iterator[ContentStore]:
    store = ContentStore(str(ctd.address), **kwargs)  # type: ignore[arg-type]
    try:
        yield store
    finally:
        store.close()


def waiting_threads() -> list[str]:
    """Names of the threads now waiting inside a content-store call (a worker thread running
    one of the module's thread functions, or grpc's blocking result/next)."""
    mine = {"_next_message", "collect"}
    grpc_waits = {"result", "_next", "__next__"}
    found = []
    for ident, frame in sys._current_frames().items():
        f: FrameType | None = frame
        while f is not None:
            code = f.f_code
            if (code.co_filename == content.__file__ and code.co_name in mine) or (
                code.co_filename.endswith(os.path.join("grpc", "_channel.py"))
                and code.co_name in grpc_waits
            ):
                found.append(str(ident))
                break
            f = f.f_back
    return found


async def wait_no_thread_left(limiter: trio.CapacityLimiter, within_sec: float = 3.0) -> None:
    start = time.monotonic()
    while limiter.statistics().borrowed_tokens or waiting_threads():
        assert time.monotonic() - start < within_sec, (
            f"threads still waiting: {waiting_threads()}, limiter {limiter.statistics()}"
        )
        await trio.sleep(0.02)


# ---------------------------------------------------------------------------------------------


async def test_sizes_are_the_descriptor_sizes(pushed: Pushed, ctd: Containerd) -> None:
    image = pushed.image
    manifest = (image.layout / "blobs" / "sha256" / image.manifest_digest[7:]).read_bytes()
    config = (image.layout / "blobs" / "sha256" / image.config_digest[7:]).read_bytes()
    with open_store(ctd) as store:
        for layer in image.layers:
            assert await store.size(Digest(layer.digest)) == layer.size
        assert await store.size(Digest(image.manifest_digest)) == len(manifest)
        assert await store.size(Digest(image.config_digest)) == len(config)


async def test_ranges_equal_the_registry_bytes(pushed: Pushed, ctd: Containerd) -> None:
    big = pushed.big
    ranges = [
        (0, 100),
        (MIB - 10, 20),  # across containerd's first message boundary
        (12345, 2 * MIB + 77),  # three messages
        (big.size - 50, 50),  # the tail
        (0, big.size),
    ]
    async with httpx.AsyncClient() as http:
        with open_store(ctd) as store:
            for offset, size in ranges:
                answer = await http.get(
                    pushed.blob_url(big.digest),
                    headers={"Range": f"bytes={offset}-{offset + size - 1}"},
                    follow_redirects=True,
                )
                assert answer.status_code == 206
                assert len(answer.content) == size
                got = await store.read(Digest(big.digest), offset, size)
                assert got == answer.content, (offset, size)
            with pytest.raises(ContentStoreError, match="the blob ends at") as e:
                await store.read(Digest(big.digest), big.size - 10, 20)
            assert e.value.code is None
            with pytest.raises(ContentStoreError, match="OUT_OF_RANGE"):
                await store.read(Digest(big.digest), big.size + 1, 1)


async def test_stream_hashes_to_the_digest(pushed: Pushed, ctd: Containerd) -> None:
    with open_store(ctd) as store:
        for layer in pushed.image.layers:
            sha = hashlib.sha256()
            sizes = []
            async for chunk in store.stream(Digest(layer.digest)):
                sha.update(chunk)
                sizes.append(len(chunk))
            assert "sha256:" + sha.hexdigest() == layer.digest
            assert sum(sizes) == layer.size
            assert max(sizes) <= MIB
        sizes = [len(c) async for c in store.stream(Digest(pushed.big.digest))]
        assert len(sizes) == -(-pushed.big.size // MIB)  # as they come: one per message
        tail = b"".join([c async for c in store.stream(Digest(pushed.big.digest), MIB + 1, 999)])
        assert tail == pushed.big.path.read_bytes()[MIB + 1 : MIB + 1000]


async def test_unknown_digest_and_other_namespace(pushed: Pushed, ctd: Containerd) -> None:
    with open_store(ctd) as store:
        assert await store.size(MISSING) is None
        with pytest.raises(ContentNotFound, match=f"content {MISSING} .*NOT_FOUND"):
            await store.read(MISSING, 0, 10)
        chunks: list[bytes] = []
        with pytest.raises(ContentNotFound):
            async for chunk in store.stream(MISSING):
                chunks.append(chunk)
        assert chunks == []
    # containerd keeps content per namespace: the image is in k8s.io only.
    with open_store(ctd, namespace="default") as store:
        assert await store.size(Digest(pushed.big.digest)) is None


async def test_stopping_a_stream_early_leaves_no_thread(pushed: Pushed, ctd: Containerd) -> None:
    limiter = trio.CapacityLimiter(2)
    with open_store(ctd, limiter=limiter) as store:
        async with contextlib.aclosing(store.stream(Digest(pushed.big.digest))) as chunks:
            async for chunk in chunks:
                assert len(chunk) == MIB
                break
        await wait_no_thread_left(limiter)
        with trio.move_on_after(0.0001):  # cancelled at its first wait
            async for _ in store.stream(Digest(pushed.big.digest)):
                pass
        await wait_no_thread_left(limiter)
        assert await store.size(Digest(pushed.big.digest)) == pushed.big.size


async def test_stopped_containerd_costs_one_deadline(pushed: Pushed, tmp_path: Path) -> None:
    """SIGSTOP: every call fails with DEADLINE_EXCEEDED after `timeout_sec`; a stream cancelled
    while its worker thread waits for containerd ends that thread while containerd is still
    stopped (the gRPC call was cancelled, not left to a deadline a minute away). Afterwards
    (SIGCONT) the same store reads again."""
    digest = Digest(pushed.big.digest)
    limiter = trio.CapacityLimiter(2)
    with (
        pulled_containerd(pushed, tmp_path / "ctd") as ctd,
        open_store(ctd, timeout_sec=1.0, limiter=limiter) as store,
    ):
        assert await store.size(digest) == pushed.big.size
        with stopped(ctd):
            calls: dict[str, Callable[[], Awaitable[object]]] = {
                "size": lambda: store.size(digest),
                "read": lambda: store.read(digest, 0, 10),
            }
            for name, call in calls.items():
                start = time.monotonic()
                with pytest.raises(ContentStoreError, match="DEADLINE_EXCEEDED") as e:
                    await call()
                assert e.value.code is grpc.StatusCode.DEADLINE_EXCEEDED, name
                assert time.monotonic() - start < 5, name
            start = time.monotonic()
            with pytest.raises(ContentStoreError, match="DEADLINE_EXCEEDED: no data for 1 s"):
                async for _ in store.stream(digest):
                    pass
            assert time.monotonic() - start < 5
            await wait_no_thread_left(limiter)

        with open_store(ctd, timeout_sec=60.0, limiter=limiter) as patient, stopped(ctd):
            start = time.monotonic()
            with trio.move_on_after(1.0) as scope:
                async for _ in patient.stream(digest):
                    pass
            assert scope.cancelled_caught
            await wait_no_thread_left(limiter)
            assert time.monotonic() - start < 5
        assert await store.read(digest, 0, 10) == pushed.big.path.read_bytes()[:10]


async def test_exited_containerd_is_unavailable_at_once(pushed: Pushed, tmp_path: Path) -> None:
    digest = Digest(pushed.big.digest)
    with pulled_containerd(pushed, tmp_path / "ctd") as ctd, open_store(ctd) as store:
        assert await store.size(digest) == pushed.big.size
        ctd.stop()
        start = time.monotonic()
        with pytest.raises(ContentStoreError, match=f"content {digest} .*: UNAVAILABLE") as e:
            await store.size(digest)
        assert e.value.code is grpc.StatusCode.UNAVAILABLE
        assert "\n" not in str(e.value)
        with pytest.raises(ContentStoreError, match="UNAVAILABLE"):
            await store.read(digest, 0, 10)
        with pytest.raises(ContentStoreError, match="UNAVAILABLE"):
            async for _ in store.stream(digest):
                pass
        assert time.monotonic() - start < 5
