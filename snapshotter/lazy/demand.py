"""On-demand activity: whether reads are fetching now or did so recently (background fetch
yields to them). Times are trio clock seconds."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import trio


class DemandTracker:
    """Knows whether on-demand fetches are running or ran recently (for background fetch).

    One per daemon, shared by every reader and the background fetcher.
    """

    def __init__(self) -> None:
        self.active = 0
        self.last_end = -math.inf
        self._idle = trio.Event()
        self._idle.set()

    def __repr__(self) -> str:
        return f"<DemandTracker active={self.active} last_end={self.last_end:.3f}>"

    @contextlib.contextmanager
    def demand(self) -> Iterator[None]:
        """Wrap an on-demand fetch (a read's, or its read-ahead)."""
        if self.active == 0:
            self._idle = trio.Event()
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self.last_end = trio.current_time()
            if self.active == 0:
                self._idle.set()

    def touch(self) -> None:
        """Count now as on-demand activity: a new layer mount pauses background fetching for
        a full quiet period, as the container that needs it is about to start reading."""
        self.last_end = max(self.last_end, trio.current_time())

    async def wait_quiet(self, period_sec: float) -> None:
        """Return once no on-demand fetch has run for `period_sec` seconds."""
        while True:
            if self.active:
                await self._idle.wait()
                continue
            remaining = self.last_end + period_sec - trio.current_time()
            if remaining <= 0:
                return
            await trio.sleep(remaining)
