"""Background fetch: fill the span cache of mounted layers while the link is idle.

After a quiet period with no on-demand fetches (`DemandTracker`), the fetcher takes the next
registered layer in round-robin order and fetches its next run of missing spans (at most
`step_bytes`, verified, cached compressed, not inflated), then sleeps long enough to keep the
average at `rate_bytes_per_sec`. On-demand reads preempt it: before every step it waits until
on-demand fetching has been quiet for `quiet_period_ms` (a layer mount pauses it too, for at
most `demand.MOUNT_PAUSE_SEC`: its container starts reading by then), and a read's fetch
that starts during a step stops that step (its request is cancelled), so a read never shares
the link with it; a step is at most `step_bytes`. Except while images are being read
through: when reads fetched at least `stream_after_bytes` on demand within the last quiet
period (all layers together), the workload reads most of what it has (an interpreter
importing everything, a full scan), so the steps go on without the quiet period, alongside
the reads, keeping the link busy while the readers work through what is local; they then go
to the layer reads fetched from last, from the span after that fetch on (`SpanFetcher.step`),
ahead of the reader instead of spread over every layer. The demand of starting containers (a
few files each) stays below that and is never competed with. Even then a step starts only
while no on-demand fetch is in flight: background fetch fills the gaps between the readers'
requests, it does not share the link with them. A layer that is unregistered (its image
removed, or unmounted) is dropped at once, cancelling its step in flight; a layer whose task
scope is closed is dropped too (its step raises `LayerClosed` before any request). Disabled,
`serve` just waits to be cancelled.

The step is an error boundary: a step that raises any `Exception` (a `FetchError`, or e.g. a
`FileNotFoundError` from building a TLS context for a `hosts.toml` whose `ca` file is missing)
fails that layer only: it is logged once (`background fetch failed`, keys `layer`, `error`),
counted (`BackgroundStatistics.errors`, and on the layer: `record_error`, which the reader's
status shows as `errors`/`last_error`), and the layer is retried after `error_backoff_sec`;
the other layers go on. `trio.Cancelled` and `KeyboardInterrupt` propagate.

Structured concurrency: `serve` runs in the task scope its owner (the mounter) gives it and
never returns; it starts no long-lived tasks: a step outside read-through runs beside its
watcher for reads in a nursery of the step's own.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import NoReturn, Protocol

import trio

from snapshotter.lazy.demand import DemandTracker
from snapshotter.lazy.reader import LayerClosed
from snapshotter.lazy.sources import FetchError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
_IDLE_POLL_SEC = 0.1
_STREAM_POLL_SEC = 0.25
"""How often a fetcher waiting for quiet looks whether reads fetch a lot."""
_STREAM_WINDOW_MIN_SEC = 2.0
"""The shortest window `stream_after_bytes` is counted in (a quiet period may be shorter)."""


@dataclass(frozen=True, slots=True)
class BackgroundConfig:
    """Background fetch settings (`[remote] background_*` keys;
    `RemoteConfig.background_config()`). `rate_bytes_per_sec` 0 means unlimited."""

    enabled: bool = True
    quiet_period_ms: int = 2000
    rate_bytes_per_sec: int = 64 * MiB
    step_bytes: int = 8 * MiB
    error_backoff_sec: float = 30.0
    stream_after_bytes: int = 64 * MiB

    def __post_init__(self) -> None:
        if (
            self.quiet_period_ms < 0
            or self.rate_bytes_per_sec < 0
            or self.step_bytes <= 0
            or self.stream_after_bytes < 0
        ):
            raise ValueError(f"bad background fetch config {self!r}")
        if self.error_backoff_sec < 0:
            raise ValueError(
                f"error_backoff_sec must not be negative, got {self.error_backoff_sec}"
            )


class Prefetchable(Protocol):
    """A layer the fetcher can fill (`RemoteLayerReader` is one)."""

    async def prefetch_step(self, max_bytes: int) -> int:
        """Fetch the next missing run (≤ `max_bytes` unless one span is larger); bytes fetched,
        0 when complete. Raises `LayerClosed` when the layer is gone; any other exception is
        a failed step."""
        ...

    def is_complete(self) -> bool: ...

    @property
    def last_demand(self) -> float:
        """Trio time of the layer's latest on-demand fetch (-inf: none)."""
        ...

    def record_error(self, message: str) -> None:
        """Count a failed step on the layer (for its status)."""
        ...


@dataclass(frozen=True, slots=True)
class BackgroundStatistics:
    """Counters since start; `layers` = registered layers not yet complete."""

    layers: int
    bytes_fetched: int
    steps: int
    errors: int
    completed_layers: int


class BackgroundFetcher:
    """Round-robin, rate-limited filling of registered layers (see the module doc)."""

    def __init__(
        self, config: BackgroundConfig | None = None, tracker: DemandTracker | None = None
    ):
        self.config = config or BackgroundConfig()
        self.tracker = tracker or DemandTracker()
        self._layers: OrderedDict[str, Prefetchable] = OrderedDict()
        self._retry_at: dict[str, float] = {}
        self._work = trio.Event()
        self._current: tuple[str, trio.CancelScope] | None = None
        self._bytes = self._steps = self._errors = self._completed = self._yielded = 0
        self._reading_through = False

    def __repr__(self) -> str:
        return (
            f"<BackgroundFetcher enabled={self.config.enabled} layers={len(self._layers)} "
            f"bytes={self._bytes} steps={self._steps} errors={self._errors} "
            f"yielded={self._yielded}>"
        )

    def register(self, key: str, layer: Prefetchable) -> None:
        """Queue `layer` (named `key`, e.g. its digest) for background fetching."""
        self._layers[key] = layer
        self._retry_at.pop(key, None)
        self._work.set()

    def unregister(self, key: str) -> None:
        """Stop fetching `key` now (cancels its step in flight, so no further request for it
        reaches its source). Unknown keys are ignored."""
        self._layers.pop(key, None)
        self._retry_at.pop(key, None)
        if self._current is not None and self._current[0] == key:
            self._current[1].cancel()

    def statistics(self) -> BackgroundStatistics:
        return BackgroundStatistics(
            layers=len(self._layers),
            bytes_fetched=self._bytes,
            steps=self._steps,
            errors=self._errors,
            completed_layers=self._completed,
        )

    def _next(self) -> tuple[str, Prefetchable] | float | None:
        """The next layer to step, None when there is none, or the time of the next retry:
        round-robin, except while images are read through, when the layer reads fetched from
        last goes first (its steps follow the reader)."""
        now = trio.current_time()
        earliest = math.inf
        picked: tuple[str, Prefetchable] | None = None
        for key in list(self._layers):
            layer = self._layers[key]
            if layer.is_complete():
                del self._layers[key]
                self._retry_at.pop(key, None)
                self._completed += 1
                continue
            retry = self._retry_at.get(key, -math.inf)
            if retry > now:
                earliest = min(earliest, retry)
                continue
            if picked is None:
                picked = key, layer
                if not self._reading_through:
                    break
            elif layer.last_demand > picked[1].last_demand:
                picked = key, layer
        if picked is not None:
            self._layers.move_to_end(picked[0])
            return picked
        return None if earliest == math.inf else earliest

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Run until cancelled. Signals readiness at once through `task_status`."""
        task_status.started()
        if not self.config.enabled:
            await trio.sleep_forever()
        quiet = self.config.quiet_period_ms / 1000.0
        while True:
            period = 0.0 if self._read_through(quiet) else quiet
            if not await self._wait_quiet(period):
                continue  # look again whether reads are fetching a lot
            picked = self._next()
            if picked is None:
                self._work = trio.Event()
                await self._work.wait()
                continue
            if isinstance(picked, float):
                with trio.move_on_at(picked):
                    self._work = trio.Event()
                    await self._work.wait()
                continue
            key, layer = picked
            fetched = 0
            started = trio.current_time()
            with trio.CancelScope() as scope:
                self._current = (key, scope)
                try:
                    fetched = await self._step(layer)
                    self._steps += 1
                    log.debug(
                        "background step",
                        extra={
                            "layer": key,
                            "bytes": fetched,
                            "ms": round((trio.current_time() - started) * 1000),
                            "alongside_reads": self._reading_through,
                        },
                    )
                except LayerClosed:  # unmounted, not yet unregistered: drop it quietly
                    self._layers.pop(key, None)
                    self._retry_at.pop(key, None)
                except Exception as e:
                    self._failed(key, layer, e)
                finally:
                    self._current = None
            self._bytes += fetched
            if fetched and self.config.rate_bytes_per_sec:
                # the step's share of the rate, less the time the step itself took
                await trio.sleep_until(started + fetched / self.config.rate_bytes_per_sec)
            elif not fetched:
                # nothing to start (the missing spans are all in flight elsewhere): do not spin
                await trio.sleep(_IDLE_POLL_SEC)

    async def _step(self, layer: Prefetchable) -> int:
        """One step of `layer`; the bytes fetched. Outside read-through, a read's fetch that
        starts meanwhile stops the step (0 bytes: its request is cancelled) so the read has
        the link to itself; the fetcher then waits for quiet again."""
        if self._reading_through:
            return await layer.prefetch_step(self.config.step_bytes)
        fetched = 0
        error: Exception | None = None
        async with trio.open_nursery() as nursery:

            async def yield_to_reads() -> None:
                await self.tracker.wait_demand()
                self._yielded += 1
                log.debug("background step yields to a read")
                nursery.cancel_scope.cancel()

            nursery.start_soon(yield_to_reads)
            try:
                fetched = await layer.prefetch_step(self.config.step_bytes)
            except Exception as e:  # raised below as it is, not inside an exception group
                error = e
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        return fetched

    def _read_through(self, quiet: float) -> bool:
        """Whether images are being read through: reads fetched `stream_after_bytes` on demand
        within the last `quiet` seconds (at least `_STREAM_WINDOW_MIN_SEC`), all layers
        together. Once seen it holds until reads have fetched nothing for `quiet` seconds:
        background steps taking over their fetches lower what they fetch themselves."""
        threshold = self.config.stream_after_bytes
        if not threshold:
            return False
        tracker = self.tracker
        now = trio.current_time()
        was = self._reading_through
        if tracker.bytes_since(now - max(quiet, _STREAM_WINDOW_MIN_SEC)) >= threshold:
            self._reading_through = True
        elif not tracker.active and now - tracker.last_end >= quiet:
            self._reading_through = False
        if self._reading_through != was:
            log.info("background fetch %s", "alongside reads" if not was else "after quiet")
        return self._reading_through

    async def _wait_quiet(self, quiet: float) -> bool:
        """Wait for the quiet period; False when `_STREAM_POLL_SEC` passed first and streaming
        is on (the caller looks again whether reads fetch a lot)."""
        if not self.config.stream_after_bytes:
            await self.tracker.wait_quiet(quiet)
            return True
        with trio.move_on_after(_STREAM_POLL_SEC):
            await self.tracker.wait_quiet(quiet)
            return True
        return False

    def _failed(self, key: str, layer: Prefetchable, error: Exception) -> None:
        """The step boundary: count, record on the layer, log once, back the layer off."""
        self._errors += 1
        self._retry_at[key] = trio.current_time() + self.config.error_backoff_sec
        message = f"background fetch: {type(error).__name__}: {error}"
        layer.record_error(message)
        log.warning(
            "background fetch failed",
            extra={"layer": key, "error": f"{type(error).__name__}: {error}"},
            exc_info=not isinstance(error, FetchError),  # a traceback for the unexpected
        )
