"""Background fetch with a fake `BlobSource` at the seam: quiet period, rate limit, removal,
back-off, and the step's error boundary (one layer's failure never stops the fetcher)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import trio
import trio.testing

from index.model import SpanId, UncompressedOffset
from snapshotter.lazy import (
    BackgroundConfig,
    BackgroundFetcher,
    DemandTracker,
    ReadConfig,
    RemoteLayerReader,
)
from snapshotter.lazy.cache import SpanCache
from snapshotter.lazy.demand import MOUNT_PAUSE_SEC
from snapshotter.tasks import open_task_scope
from tests.support.lazylayer import SPAN, Layer, MemorySource


@pytest.fixture(scope="module")
def layer() -> Layer:
    return Layer()


def make_reader(layer: Layer, source: MemorySource, cache_dir: Path) -> RemoteLayerReader:
    return RemoteLayerReader(layer.digest, layer.ztoc, source, SpanCache(cache_dir))


async def test_background_fills_a_layer_after_the_quiet_period(
    layer: Layer, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    tracker = DemandTracker()
    source = MemorySource(layer.blob)
    reader = RemoteLayerReader(
        layer.digest, layer.ztoc, source, SpanCache(tmp_path), tracker=tracker
    )
    rate = 1024 * 1024
    fetcher = BackgroundFetcher(
        BackgroundConfig(quiet_period_ms=1000, rate_bytes_per_sec=rate, step_bytes=2 * SPAN),
        tracker,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.serve)
        start = trio.current_time()
        # an on-demand read now: background waits a quiet second after it
        await reader.read(UncompressedOffset(0), 10)
        fetcher.register(str(layer.digest), reader)
        await trio.sleep(0.5)
        assert len(source.calls) == 1
        while not reader.is_complete():
            await trio.sleep(0.1)
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert len(source.calls) > 2
    background_bytes = source.bytes_served - source.calls[0][1] + source.calls[0][0]
    assert elapsed >= 1.0 + (background_bytes - 2 * SPAN * 2) / rate  # rate-limited
    stats = fetcher.statistics()
    assert stats.errors == 0 and stats.bytes_fetched > 0
    # every span was fetched, none twice
    assert reader.progress().percent > 99.0
    assert source.bytes_served <= layer.ztoc.compressed_archive_size + len(source.calls)


async def test_background_is_disabled_and_stops_for_removed_layers(
    layer: Layer, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    for enabled in (False, True):
        source = MemorySource(layer.blob)
        reader = make_reader(layer, source, tmp_path / str(enabled))
        fetcher = BackgroundFetcher(
            BackgroundConfig(
                enabled=enabled, quiet_period_ms=0, rate_bytes_per_sec=SPAN, step_bytes=2 * SPAN
            )
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(fetcher.serve)
            fetcher.register("layer", reader)
            await trio.sleep(3.5)
            calls = len(source.calls)
            fetcher.unregister("layer")
            await trio.sleep(10)
            nursery.cancel_scope.cancel()
        if enabled:
            assert 0 < calls < reader.span_map.span_count
        else:
            assert calls == 0
        assert len(source.calls) <= calls + 1
        assert not reader.is_complete()


async def test_background_backs_off_a_failing_layer(
    layer: Layer, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    source = MemorySource(layer.blob)
    source.fail_next = 1
    reader = make_reader(layer, source, tmp_path)
    fetcher = BackgroundFetcher(
        BackgroundConfig(quiet_period_ms=0, rate_bytes_per_sec=0, error_backoff_sec=30)
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.serve)
        fetcher.register("layer", reader)
        await trio.sleep(29)
        assert len(source.calls) == 1 and fetcher.statistics().errors == 1
        await trio.sleep(2)
        while not reader.is_complete():
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert reader.progress().percent > 99.0


class Watched:
    """A reader whose completion by a background step sets `done` (an event to wait for:
    under the autojump clock, polling with sleeps would race the cache-writing threads)."""

    def __init__(self, reader: RemoteLayerReader) -> None:
        self.reader = reader
        self.done = trio.Event()

    async def prefetch_step(self, max_bytes: int) -> int:
        fetched = await self.reader.prefetch_step(max_bytes)
        if self.reader.is_complete():
            self.done.set()
        return fetched

    def is_complete(self) -> bool:
        return self.reader.is_complete()

    @property
    def last_demand(self) -> float:
        return self.reader.last_demand

    def record_error(self, message: str) -> None:
        self.reader.record_error(message)


async def test_an_unexpected_step_error_fails_that_layer_only(
    layer: Layer,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken_source = MemorySource(layer.blob, "broken")
    # e.g. a hosts.toml whose `ca` file is missing: building the TLS context fails
    broken_source.raise_next = [
        FileNotFoundError(2, "No such file or directory", "/etc/certs/ca.pem"),
        RuntimeError("a bug"),
    ]
    broken = Watched(make_reader(layer, broken_source, tmp_path / "broken"))
    good_source = MemorySource(layer.blob, "good")
    good = Watched(make_reader(layer, good_source, tmp_path / "good"))
    fetcher = BackgroundFetcher(
        BackgroundConfig(quiet_period_ms=0, rate_bytes_per_sec=0, error_backoff_sec=30)
    )
    with caplog.at_level(logging.WARNING, logger="snapshotter.lazy.background"):
        async with trio.open_nursery() as nursery:
            await nursery.start(fetcher.serve)
            fetcher.register("broken", broken)
            fetcher.register("good", good)
            await good.done.wait()  # the other layer is filled while "broken" backs off
            assert trio.current_time() < 30
            assert len(broken_source.calls) == 1 and not broken.is_complete()
            status = broken.reader.status()
            assert status.errors == 1
            assert "FileNotFoundError" in status.last_error and "ca.pem" in status.last_error
            await trio.sleep(31)  # backed off, then retried: the second failure
            status = broken.reader.status()
            assert status.errors == 2 and "RuntimeError: a bug" in status.last_error
            await broken.done.wait()  # the third try succeeds
            nursery.cancel_scope.cancel()
    stats = fetcher.statistics()
    assert stats.errors == 2
    assert good.reader.status().errors == 0
    failures = [r for r in caplog.records if r.getMessage() == "background fetch failed"]
    assert [getattr(r, "layer", None) for r in failures] == ["broken", "broken"]
    assert "FileNotFoundError" in getattr(failures[0], "error", "")


async def test_no_request_after_unregister_or_after_the_layer_scope_closes(
    layer: Layer, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    fetcher = BackgroundFetcher(
        BackgroundConfig(quiet_period_ms=0, rate_bytes_per_sec=SPAN, step_bytes=2 * SPAN)
    )
    async with open_task_scope("test") as root:
        await root.open_child("background")
        root_nursery_scope = await root.open_child("fetcher")
        root_nursery_scope.start_soon(fetcher.serve)
        # unregister while a step is in flight: the request is cancelled, none follows
        first = MemorySource(layer.blob)
        first.gate = trio.Event()
        reader1 = make_reader(layer, first, tmp_path / "1")
        fetcher.register("one", reader1)
        await trio.testing.wait_all_tasks_blocked()
        assert len(first.calls) == 1
        fetcher.unregister("one")
        await trio.testing.wait_all_tasks_blocked()
        assert first.cancelled == 1
        first.gate.set()
        await trio.sleep(60)
        assert len(first.calls) == 1
        # the layer's scope closed (unmounted) but still registered: dropped, no request
        second = MemorySource(layer.blob)
        scope = await root.open_child("layer two")
        reader2 = RemoteLayerReader(
            layer.digest, layer.ztoc, second, SpanCache(tmp_path / "2"), tasks=scope
        )
        await scope.aclose()
        fetcher.register("two", reader2)
        await trio.sleep(60)
        assert second.calls == []
        assert fetcher.statistics().layers == 0 and fetcher.statistics().errors == 0
        assert reader2.status().errors == 0


class Fake:
    """A layer that each step fetches one MiB of, in `step_sec` (cancellable);
    `complete_after` finished steps complete it. `steps` are the start times, `done` the end
    times of finished steps."""

    def __init__(
        self,
        last_demand: float = -math.inf,
        log: list[Fake] | None = None,
        *,
        step_sec: float = 0.0,
        complete_after: int = 10,
    ) -> None:
        self.steps: list[float] = []
        self.done: list[float] = []
        self.last_demand = last_demand
        self.log = log
        self.step_sec = step_sec
        self.complete_after = complete_after

    async def prefetch_step(self, max_bytes: int) -> int:
        self.steps.append(trio.current_time())
        if self.log is not None:
            self.log.append(self)
        if self.step_sec:
            await trio.sleep(self.step_sec)
        self.done.append(trio.current_time())
        return 1 << 20

    def is_complete(self) -> bool:
        return len(self.done) >= self.complete_after

    def record_error(self, message: str) -> None:
        raise AssertionError(message)


async def test_layers_are_filled_alongside_reads_that_fetch_a_lot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Reads fetched less than `stream_after_bytes` recently: background fetch waits for the
    quiet period (10 s). More: it fills every layer as soon as no read's fetch is in flight.
    Streaming off (0): it waits for the quiet period whatever they fetched. Never while a
    read's fetch is in flight."""
    for fetched, stream_after, expect_filled in (
        (10 << 20, 64 << 20, False),
        (100 << 20, 64 << 20, True),
        (100 << 20, 0, False),
    ):
        tracker = DemandTracker()
        fetcher = BackgroundFetcher(
            BackgroundConfig(quiet_period_ms=10_000, stream_after_bytes=stream_after), tracker
        )
        layers = [Fake(), Fake()]
        async with trio.open_nursery() as nursery:
            await nursery.start(fetcher.serve)
            for i, fake in enumerate(layers):
                fetcher.register(f"l{i}", fake)
            with tracker.demand():  # a read's fetch in flight
                tracker.record(fetched)
                await trio.sleep(2)
            during = [len(fake.steps) for fake in layers]
            await trio.sleep(3)  # 3 s after the read: within the quiet period
            nursery.cancel_scope.cancel()
        assert during == [0, 0], (fetched, stream_after)
        for fake in layers:
            assert fake.is_complete() is expect_filled, (fetched, stream_after, fake.steps)


async def test_reading_through_steps_go_to_the_layer_read_last(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """While reads fetch a lot, the layer whose reads fetched last is filled first (the
    reader's), the others after it; otherwise layers take turns."""
    for fetched, reading_through in ((100 << 20, True), (0, False)):
        tracker = DemandTracker()
        fetcher = BackgroundFetcher(
            BackgroundConfig(quiet_period_ms=1000, rate_bytes_per_sec=0), tracker
        )
        log: list[Fake] = []
        layers = {"other": Fake(1.0, log), "read": Fake(2.0, log)}
        async with trio.open_nursery() as nursery:
            await nursery.start(fetcher.serve)
            for key, fake in layers.items():
                fetcher.register(key, fake)
            with tracker.demand():
                tracker.record(fetched)
                await trio.sleep(0.5)
            await trio.sleep(30)
            nursery.cancel_scope.cancel()
        order = ["read" if fake is layers["read"] else "other" for fake in log]
        if reading_through:
            assert order == ["read"] * 10 + ["other"] * 10
        else:
            assert order[:4] in (["other", "read"] * 2, ["read", "other"] * 2)  # turns
        assert all(f.is_complete() for f in layers.values())


async def test_a_step_continues_after_the_last_on_demand_fetch(
    layer: Layer, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    source = MemorySource(layer.blob)
    reader = RemoteLayerReader(
        layer.digest,
        layer.ztoc,
        source,
        SpanCache(tmp_path),
        config=ReadConfig(readahead_spans=0),
    )
    spans = reader.span_map.span_count
    assert spans >= 6
    await reader.prefetch_step(1)  # background starts at span 0
    assert source.calls[-1][0] == reader.span_map.compressed_range(SpanId(0))[0]
    middle = SpanId(spans // 2)
    await reader.read(reader.span_map.uncompressed_range(middle)[0], 10)  # a reader is there
    await reader.prefetch_step(1)
    assert source.calls[-1][0] == reader.span_map.compressed_range(SpanId(middle + 1))[0]
    await reader.prefetch_step(1)  # and goes on from there
    assert source.calls[-1][0] == reader.span_map.compressed_range(SpanId(middle + 2))[0]
    assert reader.last_demand > -math.inf


async def test_a_mount_pauses_background_fetch_briefly_a_read_for_the_quiet_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tracker = DemandTracker()
    fetcher = BackgroundFetcher(BackgroundConfig(quiet_period_ms=10_000), tracker)
    slow = Fake(step_sec=1, complete_after=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.serve)
        start = trio.current_time()
        tracker.touch()  # a layer mounted: its container starts reading soon, or never
        fetcher.register("l", slow)
        await trio.sleep(MOUNT_PAUSE_SEC + 0.5)
        assert [t - start for t in slow.steps] == [MOUNT_PAUSE_SEC]
        with tracker.demand():  # a read's fetch starts: the step in flight gives way
            tracker.record(1 << 20)
            await trio.sleep(0.1)
        assert slow.done == [] and fetcher.statistics().steps == 1
        read_end = trio.current_time()
        await trio.sleep(9)
        assert len(slow.steps) == 1  # the full quiet period after a read
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert slow.steps[1] - read_end == pytest.approx(10.0, abs=0.01)
    assert len(slow.done) >= 5


async def test_no_step_while_a_layer_is_being_mounted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tracker = DemandTracker()
    fetcher = BackgroundFetcher(BackgroundConfig(quiet_period_ms=10_000), tracker)
    slow = Fake(step_sec=1, complete_after=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.serve)
        fetcher.register("l", slow)  # an earlier layer of the image, mounted
        with tracker.mount():  # the next layer waits for its zTOC: its container too
            await trio.sleep(30)
            assert slow.steps == []
            mounted = trio.current_time()
        await trio.sleep(MOUNT_PAUSE_SEC + 0.5)
        nursery.cancel_scope.cancel()
    # then the pause after any mount, for the container to start reading
    assert slow.steps[0] - mounted == pytest.approx(MOUNT_PAUSE_SEC, abs=0.01)


async def test_reads_do_not_stop_steps_while_images_are_read_through(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tracker = DemandTracker()
    fetcher = BackgroundFetcher(BackgroundConfig(quiet_period_ms=10_000), tracker)
    slow = Fake(step_sec=1, complete_after=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.serve)
        fetcher.register("l", slow)
        with tracker.demand():
            tracker.record(100 << 20)  # reads fetch a lot: read-through
            await trio.sleep(1)
        await trio.sleep(0.5)
        assert len(slow.steps) == 1
        tracker.record(1 << 20)  # another read's fetch starts during the step
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert len(slow.done) >= 1  # not stopped
