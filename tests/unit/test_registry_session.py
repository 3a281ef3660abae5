"""The async registry client at its seams (httpx.MockTransport, sync and async handlers):
the per-endpoint blob-location cache, hosts.toml reloads, certificate files, the gate,
cancellation, and the synchronous facade shared by threads."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from index.digest import Digest
from index.oci.client import AsyncRegistryClient
from index.oci.errors import DigestMismatchError, HostsConfigError, TransportError
from index.oci.lru import TtlLru
from index.oci.reference import Reference
from index.oci.registry import RegistryClient

REGISTRY = "reg.example"
REF = Reference.parse(f"{REGISTRY}/team/app:v1")
BLOB = bytes(range(256)) * 64
DIGEST = Digest.of(BLOB)
TOKEN_REALM = "https://auth.example/token"


def ranged(request: httpx.Request, body: bytes = BLOB) -> httpx.Response:
    """A 206 answer for the request's Range header (200 and all of `body` without one)."""
    if "range" not in request.headers:
        return httpx.Response(200, content=body)
    first, last = map(int, request.headers["range"].removeprefix("bytes=").split("-"))
    last = min(last, len(body) - 1)
    return httpx.Response(
        206,
        content=body[first : last + 1],
        headers={"Content-Range": f"bytes {first}-{last}/{len(body)}"},
    )


def write_hosts(root: Path, text: str) -> Path:
    d = root / REGISTRY
    d.mkdir(parents=True, exist_ok=True)
    path = d / "hosts.toml"
    path.write_text(text)
    return path


MIRROR_AND_UPSTREAM = f"""
server = "https://{REGISTRY}"
[host."https://mirror.example"]
capabilities = ["pull", "resolve"]
"""


async def check_equals(want: bytes) -> Callable[[bytes], Awaitable[None]]:
    async def check(data: bytes) -> None:
        if data != want:
            raise DigestMismatchError("wrong bytes")

    return check


# -- the blob-location cache ----------------------------------------------------------------------


async def test_location_is_cached_per_endpoint_and_a_bad_one_never_reaches_others(
    tmp_path: Path,
) -> None:
    """The mirror redirects to storage serving wrong bytes, the upstream to good storage:
    every read succeeds through the upstream, and the mirror's location is never cached."""
    write_hosts(tmp_path, MIRROR_AND_UPSTREAM)
    hits: Counter[str] = Counter()

    def handler(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        hits[host] += 1
        if host in ("mirror.example", REGISTRY):
            target = "bad.storage" if host == "mirror.example" else "good.storage"
            return httpx.Response(307, headers={"Location": f"https://{target}/blob?sig=1"})
        if host == "bad.storage":
            corrupt = ranged(request).content[::-1]
            return httpx.Response(
                206,
                content=corrupt,
                headers={"Content-Range": ranged(request).headers["content-range"]},
            )
        return ranged(request)

    async with AsyncRegistryClient(
        transport=httpx.MockTransport(handler), hosts_dirs=[tmp_path]
    ) as client:
        for offset in (0, 100, 200):
            want = BLOB[offset : offset + 50]
            got = await client.fetch_blob_range(
                REF, DIGEST, offset, 50, check=await check_equals(want)
            )
            assert got == want
        locations = client.session.locations
        assert len(locations) == 1
        assert locations.get((f"https://{REGISTRY}/v2", "team/app", str(DIGEST))) is not None
    # the upstream registry was asked once; then its storage location served the rest
    assert hits[REGISTRY] == 1 and hits["good.storage"] == 3
    assert hits["mirror.example"] == 3 and hits["bad.storage"] == 3


@pytest.mark.parametrize("failure", ["404", "500", "reset", "wrong bytes", "short body"])
async def test_a_failing_cached_location_is_dropped_and_the_registry_asked_again(
    failure: str,
) -> None:
    issued: list[str] = []
    broken: set[str] = set()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == REGISTRY:
            url = f"https://storage.example/blob/{len(issued)}"
            issued.append(url)
            return httpx.Response(307, headers={"Location": url})
        if str(request.url) in broken:
            if failure == "reset":
                raise httpx.ReadError("connection reset", request=request)
            if failure == "wrong bytes":
                return ranged(request, BLOB[::-1])
            if failure == "short body":
                good = ranged(request)
                return httpx.Response(206, content=good.content[:-1], headers=dict(good.headers))
            return httpx.Response(int(failure), content=b"expired")
        return ranged(request)

    async with AsyncRegistryClient(transport=httpx.MockTransport(handler)) as client:
        assert await client.fetch_blob_range(REF, DIGEST, 0, 10) == BLOB[:10]
        assert len(issued) == 1
        broken.add(issued[0])  # the storage URL now fails
        check = await check_equals(BLOB[10:20])
        assert await client.fetch_blob_range(REF, DIGEST, 10, 10, check=check) == BLOB[10:20]
        assert len(issued) == 2  # the registry was asked again, once
        assert await client.fetch_blob_range(REF, DIGEST, 20, 10) == BLOB[20:30]
        assert len(issued) == 2  # and its new location is cached


def test_location_cache_is_bounded_and_expires() -> None:
    now = [0.0]
    cache: TtlLru[str, int] = TtlLru(2, 10.0, clock=lambda: now[0])
    assert cache.put("a", 1) == [] and cache.put("b", 2) == []
    assert cache.get("a") == 1  # a is now the most recently used
    assert cache.put("c", 3) == [2]  # b evicted
    assert cache.get("b") is None and len(cache) == 2
    now[0] = 10.0
    assert cache.get("a") is None and cache.get("c") is None and len(cache) == 0


# -- hosts.toml and certificate files ------------------------------------------------------------


async def test_hosts_toml_change_is_picked_up_without_restart(tmp_path: Path) -> None:
    path = write_hosts(tmp_path, '[host."https://one.example"]\ncapabilities = ["pull"]\n')
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return ranged(request)

    async with AsyncRegistryClient(
        transport=httpx.MockTransport(handler), hosts_dirs=[tmp_path], hosts_recheck_sec=0
    ) as client:
        await client.fetch_blob_range(REF, DIGEST, 0, 10)
        path.write_text('[host."https://two.example"]\ncapabilities = ["pull"]\n')
        await client.fetch_blob_range(REF, DIGEST, 0, 10)
        loads = client.session.hosts_cache.loads
        await client.fetch_blob_range(REF, DIGEST, 0, 10)
        assert client.session.hosts_cache.loads == loads  # unchanged file: not re-read
    assert seen == ["one.example", "two.example", "two.example"]


async def test_missing_ca_file_fails_that_endpoint_only(tmp_path: Path) -> None:
    hosts = write_hosts(
        tmp_path,
        f'server = "https://{REGISTRY}"\n[host."https://mirror.example"]\n'
        'capabilities = ["pull"]\nca = "no-such-ca.pem"\n',
    )
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return ranged(request)

    async with AsyncRegistryClient(
        transport=httpx.MockTransport(handler), hosts_dirs=[tmp_path]
    ) as client:
        assert await client.fetch_blob_range(REF, DIGEST, 0, 10) == BLOB[:10]
        assert seen == [REGISTRY]  # the mirror failed before sending, the upstream served
    write_hosts(tmp_path, f'server = "https://{REGISTRY}"\nca = "no-such-ca.pem"\n')
    async with AsyncRegistryClient(
        transport=httpx.MockTransport(handler), hosts_dirs=[tmp_path]
    ) as client:
        with pytest.raises(HostsConfigError) as info:
            await client.fetch_blob_range(REF, DIGEST, 0, 10)
    message = str(info.value)
    assert str(hosts) in message and "no-such-ca.pem" in message and REGISTRY in message
    assert "\n" not in message


# -- the gate --------------------------------------------------------------------------------------


def bearer_redirecting_registry(in_flight: list[int], peak: list[int]) -> httpx.MockTransport:
    """A registry demanding a bearer token, redirecting blobs to storage, with no referrers
    API (404) but a tag-schema index; an async handler that yields while "on the wire"."""

    async def handler(request: httpx.Request) -> httpx.Response:
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        try:
            await trio.sleep(0.01)
            host, path = request.url.host, request.url.path
            if host == "auth.example":
                return httpx.Response(200, json={"token": "t0k", "expires_in": 300})
            if host == "storage.example":
                return ranged(request)
            if request.headers.get("authorization") != "Bearer t0k":
                challenge = f'Bearer realm="{TOKEN_REALM}",service="svc"'
                return httpx.Response(401, headers={"WWW-Authenticate": challenge})
            if "/referrers/" in path:
                return httpx.Response(404)
            if "/manifests/sha256-" in path:
                return httpx.Response(
                    200,
                    json={"schemaVersion": 2, "manifests": []},
                    headers={"Content-Type": "application/vnd.oci.image.index.v1+json"},
                )
            if "/blobs/" in path:
                return httpx.Response(307, headers={"Location": "https://storage.example/b"})
            return httpx.Response(404)
        finally:
            in_flight[0] -= 1

    return httpx.MockTransport(handler)


async def test_gate_is_entered_once_per_operation_and_never_exceeded() -> None:
    limiter = trio.CapacityLimiter(1)
    in_flight, peak = [0], [0]
    async with AsyncRegistryClient(
        transport=bearer_redirecting_registry(in_flight, peak), gate=lambda: limiter
    ) as client:
        # nested acquisition by one task would raise RuntimeError in trio
        assert await client.referrers(REF, DIGEST) == []
        assert await client.fetch_blob_range(REF, DIGEST, 0, 10) == BLOB[:10]
        assert await client.read_blob(REF, DIGEST) == BLOB
        async with trio.open_nursery() as nursery:
            for offset in range(0, 400, 50):
                nursery.start_soon(client.fetch_blob_range, REF, DIGEST, offset, 50)
            nursery.start_soon(client.referrers, REF, DIGEST)
    assert peak[0] == 1
    assert limiter.borrowed_tokens == 0


async def test_cancelling_a_range_read_frees_its_gate_slot_at_once() -> None:
    limiter = trio.CapacityLimiter(1)
    entered = trio.Event()
    cancelled: list[bool] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        entered.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(True)
            raise
        raise AssertionError("unreachable")

    async with AsyncRegistryClient(
        transport=httpx.MockTransport(handler), gate=lambda: limiter
    ) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.fetch_blob_range, REF, DIGEST, 0, 10)
            await entered.wait()
            assert limiter.borrowed_tokens == 1
            nursery.cancel_scope.cancel()
        assert limiter.borrowed_tokens == 0
        assert cancelled == [True]  # the request itself was cancelled, not abandoned


async def test_request_timeout_is_real(autojump_clock: trio.testing.MockClock) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await trio.sleep(1000)
        return ranged(request)

    async with AsyncRegistryClient(transport=httpx.MockTransport(handler)) as client:
        start = trio.current_time()
        with trio.move_on_after(5) as scope:
            await client.fetch_blob_range(REF, DIGEST, 0, 10)
        assert scope.cancelled_caught
        assert trio.current_time() - start == pytest.approx(5)


# -- the synchronous facade -----------------------------------------------------------------------


def test_sync_facade_shared_by_threads() -> None:
    threads_seen: set[str] = set()

    def handler(request: httpx.Request) -> httpx.Response:
        threads_seen.add(threading.current_thread().name)
        return ranged(request)

    results: dict[int, bytes] = {}
    errors: list[BaseException] = []
    with RegistryClient(transport=httpx.MockTransport(handler)) as client:

        def work(i: int) -> None:
            try:
                got = b""
                for j in range(5):
                    offset = (i * 5 + j) * 37
                    got += client.fetch_blob_range(REF, DIGEST, offset, 37, check=lambda d: None)
                results[i] = got
            except BaseException as e:
                errors.append(e)

        workers = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert errors == []
    for i, got in results.items():
        assert got == BLOB[i * 185 : i * 185 + 185]
    assert len(results) == 8
    assert threads_seen == {"registry-portal"}  # one event loop served every thread
    with pytest.raises(TransportError, match="closed"):
        client.fetch_blob_range(REF, DIGEST, 0, 10)


def test_sync_facade_check_rejects_and_errors_cross_threads() -> None:
    def reject(data: bytes) -> None:
        raise DigestMismatchError("no")

    with (
        RegistryClient(transport=httpx.MockTransport(ranged)) as client,
        pytest.raises(DigestMismatchError),
    ):
        client.fetch_blob_range(REF, DIGEST, 0, 10, check=reject)


def test_sync_facade_accepts_a_synchronous_only_transport() -> None:
    class SyncOnly(httpx.BaseTransport):
        def __init__(self) -> None:
            self.threads: set[str] = set()

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            self.threads.add(threading.current_thread().name)
            return ranged(request)

    transport = SyncOnly()
    with RegistryClient(transport=transport) as client:
        assert client.fetch_blob_range(REF, DIGEST, 5, 10) == BLOB[5:15]
        assert client.read_blob(REF, DIGEST) == BLOB
    assert "registry-portal" not in transport.threads  # run in worker threads, off the loop
