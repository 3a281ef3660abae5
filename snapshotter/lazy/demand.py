"""On-demand activity: whether reads are fetching now or did so recently (background fetch
yields to them), and how many bytes they fetched lately (background fetch joins reads that
fetch a lot). Times are trio clock seconds."""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Iterator

import trio

HISTORY_SEC = 60.0
"""How far back the tracker remembers on-demand fetches (`bytes_since`)."""
MOUNT_PAUSE_SEC = 0.5
"""How long a layer mount pauses background fetching at most (`touch`): long enough for a
container to start reading (its first read comes a few hundred ms after the pull); that read
then pauses it for the full quiet period and stops a step in flight (`wait_demand`). Longer
leaves the link idle while a workload that reads later (a scan that lists directories first,
an entrypoint that sets up) is starting: 2 s idled the link for 1.5-2 s of a read-every-file
run."""


class DemandTracker:
    """Knows whether on-demand fetches are running or ran recently (for background fetch).

    One per daemon, shared by every reader and the background fetcher.
    """

    def __init__(self) -> None:
        self.active = 0
        self.mounting = 0
        """Layer mounts in progress (deferred until their zTOC is in): a container waits."""
        self.last_end = -math.inf
        self.last_mount = -math.inf
        self._idle = trio.Event()
        self._idle.set()
        self._started = trio.Event()
        self._fetched: deque[tuple[float, int]] = deque()

    def __repr__(self) -> str:
        return f"<DemandTracker active={self.active} last_end={self.last_end:.3f}>"

    @contextlib.contextmanager
    def demand(self) -> Iterator[None]:
        """Wrap an on-demand fetch (a read's, or its read-ahead)."""
        if self.active == 0 and self.mounting == 0:
            self._idle = trio.Event()
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self.last_end = trio.current_time()
            if self.active == 0 and self.mounting == 0:
                self._idle.set()

    def record(self, nbytes: int) -> None:
        """An on-demand fetch of `nbytes` compressed bytes starts now (any layer)."""
        now = trio.current_time()
        self._started.set()
        self._started = trio.Event()
        self._fetched.append((now, nbytes))
        while self._fetched[0][0] < now - HISTORY_SEC:
            self._fetched.popleft()

    def bytes_since(self, since: float) -> int:
        """Compressed bytes of the on-demand fetches started at or after trio time `since`
        (at most `HISTORY_SEC` ago), all layers together."""
        return sum(n for t, n in self._fetched if t >= since)

    @contextlib.contextmanager
    def mount(self) -> Iterator[None]:
        """Wrap a layer mount that a container waits for (a deferred one): background
        fetching waits until no mount is in progress, then pauses as after any mount."""
        if self.active == 0 and self.mounting == 0:
            self._idle = trio.Event()
        self.mounting += 1
        try:
            yield
        finally:
            self.mounting -= 1
            self.touch()
            if self.active == 0 and self.mounting == 0:
                self._idle.set()

    def touch(self) -> None:
        """A layer was mounted now: its container is about to start reading, so background
        fetching pauses for the quiet period, but at most `MOUNT_PAUSE_SEC` (see `wait_quiet`).
        """
        self.last_mount = trio.current_time()

    async def wait_quiet(self, period_sec: float) -> None:
        """Return once no on-demand fetch has run for `period_sec` seconds and no layer was
        mounted for `min(period_sec, MOUNT_PAUSE_SEC)` (nor is being mounted)."""
        while True:
            if self.active or self.mounting:
                await self._idle.wait()
                continue
            quiet_at = max(
                self.last_end + period_sec,
                self.last_mount + min(period_sec, MOUNT_PAUSE_SEC),
            )
            remaining = quiet_at - trio.current_time()
            if remaining <= 0:
                return
            await trio.sleep(remaining)

    async def wait_demand(self) -> None:
        """Return when an on-demand fetch starts a request (`record`, after this call): not
        when a read waits for a request already in flight."""
        await self._started.wait()
