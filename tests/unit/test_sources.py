"""Unit tests of the lazy read path's sources: the registry source and the chain."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from index.model import CompressedOffset, UncompressedOffset
from index.oci import errors as oci_errors
from index.oci.client import AsyncRegistryClient
from index.oci.reference import Reference
from snapshotter.lazy import RemoteLayerReader
from snapshotter.lazy.cache import SpanCache
from snapshotter.lazy.sources import (
    AccessDenied,
    AllSourcesFailed,
    BadRange,
    BlobNotFound,
    ChainSource,
    ContentMismatch,
    FetchConfig,
    FetchError,
    FetchTimeout,
    RegistrySource,
    SourceUnavailable,
    translate_oci_error,
)
from tests.support.lazylayer import Layer, MemorySource


@pytest.fixture(scope="module")
def layer() -> Layer:
    return Layer()


# -- fetch errors and sources --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (oci_errors.TransportError("reset"), SourceUnavailable),
        (oci_errors.NotFoundError("gone", status=404), BlobNotFound),
        (oci_errors.UnauthorizedError("no", status=401), AccessDenied),
        (oci_errors.RangeNotSatisfiableError("416", status=416), BadRange),
        (oci_errors.DigestMismatchError("bad"), ContentMismatch),
        (oci_errors.UnexpectedResponseError("boom", status=503), SourceUnavailable),
        (oci_errors.UnexpectedResponseError("slow down", status=429), SourceUnavailable),
        (oci_errors.UnexpectedResponseError("teapot", status=418), BadRange),
        (oci_errors.HostsConfigError("bad toml"), FetchError),
    ],
)
def test_oci_errors_translate_once(error: oci_errors.OciError, expected: type) -> None:
    got = translate_oci_error(error, "bytes 0-10 of x", "registry:r")
    assert type(got) is expected
    assert "bytes 0-10 of x from registry:r" in str(got) and got.source == "registry:r"


def _mock_registry(blob: bytes, plan: list[int | str]) -> tuple[AsyncRegistryClient, list[str]]:
    """An AsyncRegistryClient over MockTransport: each blob GET pops an action from `plan`
    (an HTTP status, "corrupt", or "ok" when the plan is empty)."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        action = plan.pop(0) if plan else "ok"
        seen.append(str(action))
        if isinstance(action, int):
            return httpx.Response(action, content=b"nope")
        first, last = map(int, request.headers["range"].removeprefix("bytes=").split("-"))
        body = blob[first : last + 1]
        if action == "corrupt":
            body = bytes([body[0] ^ 0x55]) + body[1:]
        return httpx.Response(
            206, content=body, headers={"Content-Range": f"bytes {first}-{last}/{len(blob)}"}
        )

    client = AsyncRegistryClient(transport=httpx.MockTransport(handler), plain_http=True)
    return client, seen


FAST = FetchConfig(max_attempts=3, backoff_initial_ms=1, backoff_max_ms=2)


async def test_registry_source_retries_transient_errors(layer: Layer, tmp_path: Path) -> None:
    client, seen = _mock_registry(layer.blob, [503, "corrupt"])
    async with client:
        source = RegistrySource(client, Reference.parse("127.0.0.1:1/test/layer"), config=FAST)
        reader = RemoteLayerReader(layer.digest, layer.ztoc, source, SpanCache(tmp_path))
        got = await reader.read(UncompressedOffset(0), 1000)
    assert got == layer.tar[:1000]
    assert seen == ["503", "corrupt", "ok"]
    stats = source.statistics()
    assert stats.retries == 2 and stats.failures == 0 and stats.requests == 3


async def test_registry_source_gives_up(layer: Layer) -> None:
    ref = Reference.parse("127.0.0.1:1/test/layer")
    client, seen = _mock_registry(layer.blob, [404])
    async with client:
        with pytest.raises(BlobNotFound) as info:
            await RegistrySource(client, ref, config=FAST).fetch(
                layer.digest, CompressedOffset(0), CompressedOffset(10)
            )
        assert isinstance(info.value.__cause__, oci_errors.NotFoundError)
        assert seen == ["404"]  # not retried
    client, seen = _mock_registry(layer.blob, [500, 502, 503, 504])
    async with client:
        with pytest.raises(SourceUnavailable):
            await RegistrySource(client, ref, config=FAST).fetch(
                layer.digest, CompressedOffset(0), CompressedOffset(10)
            )
        assert seen == ["500", "502", "503"]  # max_attempts


async def test_registry_source_times_out_slow_requests(
    layer: Layer, autojump_clock: trio.testing.MockClock
) -> None:
    cancelled: list[bool] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        try:
            await trio.sleep(1000)
        except trio.Cancelled:
            cancelled.append(True)
            raise
        return httpx.Response(503)

    config = FetchConfig(max_attempts=2, backoff_initial_ms=1, request_timeout_sec=5)
    async with AsyncRegistryClient(
        transport=httpx.MockTransport(handler), plain_http=True
    ) as client:
        source = RegistrySource(client, Reference.parse("127.0.0.1:1/t/l"), config=config)
        start = trio.current_time()
        with pytest.raises(FetchTimeout, match=r"no answer within 5 s"):
            await source.fetch(layer.digest, CompressedOffset(0), CompressedOffset(10))
        assert 10 <= trio.current_time() - start < 10.1
        assert source.statistics().requests == 2
    assert cancelled == [True, True]  # each request was cancelled, no thread left behind


async def test_registry_source_checks_in_a_worker_thread_and_skips_a_bad_mirror(
    layer: Layer, tmp_path: Path
) -> None:
    (tmp_path / "127.0.0.1:1").mkdir()
    (tmp_path / "127.0.0.1:1" / "hosts.toml").write_text(
        '[host."http://mirror.test"]\ncapabilities = ["pull"]\n'
    )
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        first, last = map(int, request.headers["range"].removeprefix("bytes=").split("-"))
        body = layer.blob[first : last + 1]
        if request.url.host == "mirror.test":
            body = body[::-1]
        return httpx.Response(
            206, content=body, headers={"Content-Range": f"bytes {first}-{last}/{len(layer.blob)}"}
        )

    threads: set[str] = set()

    def check(data: bytes) -> None:
        threads.add(threading.current_thread().name)
        if data != layer.blob[:100]:
            raise ContentMismatch("span digest")

    limiter = trio.CapacityLimiter(1)
    async with AsyncRegistryClient(
        transport=httpx.MockTransport(handler), hosts_dirs=[tmp_path], plain_http=True
    ) as client:
        source = RegistrySource(
            client, Reference.parse("127.0.0.1:1/t/l"), config=FAST, verify_limiter=limiter
        )
        got = await source.fetch(
            layer.digest, CompressedOffset(0), CompressedOffset(100), check=check
        )
    assert got == layer.blob[:100]
    assert seen == ["mirror.test", "127.0.0.1"]  # one attempt: the mirror, then upstream
    assert threading.current_thread().name not in threads and len(threads) >= 1
    assert source.statistics().retries == 0


async def test_registry_source_turns_a_bad_ca_file_into_a_fetch_error(
    layer: Layer, tmp_path: Path
) -> None:
    (tmp_path / "reg.test").mkdir()
    (tmp_path / "reg.test" / "hosts.toml").write_text(
        'server = "https://reg.test"\nca = "missing.pem"\n'
    )
    async with AsyncRegistryClient(
        transport=httpx.MockTransport(lambda r: httpx.Response(500)), hosts_dirs=[tmp_path]
    ) as client:
        source = RegistrySource(client, Reference.parse("reg.test/t/l"), config=FAST)
        with pytest.raises(FetchError, match=r"missing\.pem") as info:
            await source.fetch(layer.digest, CompressedOffset(0), CompressedOffset(10))
    assert isinstance(info.value.__cause__, oci_errors.HostsConfigError)


def test_backoff_grows_with_jitter() -> None:
    config = FetchConfig(backoff_initial_ms=100, backoff_max_ms=1000)
    for attempt, base in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        delays = {config.backoff_sec(attempt) for _ in range(20)}
        assert all(base * 0.5 <= d <= base for d in delays)
        assert len(delays) > 1


async def test_chain_moves_on_when_a_source_exceeds_its_budget(
    layer: Layer, autojump_clock: trio.testing.MockClock
) -> None:
    slow = MemorySource(layer.blob, "slow")
    slow.delay_sec = 100.0
    fast = MemorySource(layer.blob, "fast")
    chain = ChainSource([slow, fast], budget_sec=5.0)
    start = trio.current_time()
    data = await chain.fetch(layer.digest, CompressedOffset(0), CompressedOffset(100))
    assert data == layer.blob[:100]
    assert 5.0 <= trio.current_time() - start < 6.0
    slow2 = MemorySource(layer.blob, "slow2")
    slow2.delay_sec = 100.0
    with pytest.raises(AllSourcesFailed) as info:
        await ChainSource([slow, slow2], budget_sec=1.0).fetch(
            layer.digest, CompressedOffset(0), CompressedOffset(100)
        )
    assert [type(e) for _, e in info.value.errors] == [FetchTimeout, FetchTimeout]


def test_chain_and_config_reject_nonsense() -> None:
    with pytest.raises(ValueError):
        ChainSource([])
    with pytest.raises(ValueError):
        FetchConfig(max_attempts=0)


async def test_chain_budgets_per_source_and_bytes_served_by_each(
    layer: Layer, autojump_clock: trio.testing.MockClock
) -> None:
    slow = MemorySource(layer.blob, "peers")
    slow.delay_sec = 100.0
    registry = MemorySource(layer.blob, "registry")
    chain = ChainSource([slow, registry], budgets=[2.0, 50.0])
    start = trio.current_time()
    assert (
        await chain.fetch(layer.digest, CompressedOffset(0), CompressedOffset(64))
        == (layer.blob[:64])
    )
    assert 2.0 <= trio.current_time() - start < 3.0
    slow.delay_sec = 0.0
    await chain.fetch(layer.digest, CompressedOffset(64), CompressedOffset(96))
    assert chain.served() == {"registry": 64, "peers": 32}
    with pytest.raises(ValueError):
        ChainSource([slow, registry], budgets=[1.0])
    with pytest.raises(ValueError):
        ChainSource([slow], budgets=[0.0])
