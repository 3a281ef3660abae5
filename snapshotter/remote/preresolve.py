"""Background resolution of an image's other lazy layers while the first one mounts.

containerd prepares an image's layers one after another, so a per-layer cost such as
decoding a zTOC and building the layer tree (`build_tree`, about a second per 50k entries)
adds up serially. On the first Prepare of an image, `Preresolver.start` queues the trees of
the layers containerd will ask for next (from `cri.image-layers`, or every layer of the
index) and builds them in worker threads under a bounded limiter (spec/soci.md §5.3-5.4:
SOCI pre-resolves the other zTOC-indexed layers of the image). When the Prepare for one of
them arrives, `Preresolver.take` waits for the resolution already done or in flight instead
of redoing it (singleflight); a background failure is forgotten and the layer is loaded
again in the Prepare, so fallbacks behave exactly as without pre-resolution.

Memory is bounded: only one image's resolved-but-not-yet-taken results are kept; they are
dropped when a different image starts, when every queued layer was taken, or `ttl_sec`
after the start. Use from the trio thread.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from index.digest import Digest

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PARALLEL = 2
"""Resolutions running at once (worker threads)."""
DEFAULT_TTL_SEC = 120.0
"""How long an image's untaken results are kept after its first Prepare, in seconds."""


@dataclass(eq=False)
class _Entry(Generic[T]):
    done: trio.Event = field(default_factory=trio.Event)
    outcome: tuple[T] | None = None
    """The background result, boxed (a result may itself be None)."""


class Preresolver(Generic[T]):
    """Per-image, singleflight background calls of `load(key)` (see the module doc).

    `load` is a blocking function run in a worker thread; whatever it raises in the
    background is logged at debug level and not kept. At most `parallel` calls run at once,
    in the order the keys were given. Background tasks run in `nursery`.
    """

    def __init__(
        self,
        load: Callable[[Digest], T],
        nursery: trio.Nursery,
        *,
        parallel: int = DEFAULT_PARALLEL,
        ttl_sec: float = DEFAULT_TTL_SEC,
    ) -> None:
        self._load = load
        self._nursery = nursery
        self._parallel = max(1, parallel)
        self._ttl_sec = ttl_sec
        self._image: Digest | None = None
        self._scope = trio.CancelScope()
        self._entries: dict[Digest, _Entry[T]] = {}

    def __repr__(self) -> str:
        return f"<Preresolver image={self._image} pending={len(self._entries)}>"

    @property
    def image(self) -> Digest | None:
        """The image whose layers are being (or were) resolved, None when nothing is kept."""
        return self._image

    def pending(self) -> list[Digest]:
        """Keys started and not yet taken, in start order."""
        return list(self._entries)

    def start(self, image: Digest, keys: Iterable[Digest]) -> bool:
        """Queue `load(key)` for each key (duplicates once) if `image` is not already the
        current one; a different current image is dropped first. Returns whether anything
        was queued. Never raises."""
        if image == self._image:
            return False
        self.drop()
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return False
        self._image = image
        self._scope = trio.CancelScope()
        queue: deque[tuple[Digest, _Entry[T]]] = deque()
        for key in wanted:
            entry: _Entry[T] = _Entry()
            self._entries[key] = entry
            queue.append((key, entry))
        self._nursery.start_soon(self._run, queue, self._scope)
        log.debug("layer pre-resolution started", extra={"image": image, "layers": len(wanted)})
        return True

    async def take(self, key: Digest) -> T:
        """The result of `load(key)`: the background one when it was started for the current
        image (waiting for it if in flight), else computed now in a worker thread. Each
        background result is handed out once. Raises what `load` raises when computed now."""
        entry = self._entries.get(key)
        if entry is not None:
            await entry.done.wait()
            if self._entries.get(key) is entry:
                del self._entries[key]
                if not self._entries:
                    self._forget()
            outcome, entry.outcome = entry.outcome, None
            if outcome is not None:
                return outcome[0]
        return await trio.to_thread.run_sync(self._load, key)

    def drop(self) -> None:
        """Cancel queued resolutions and forget every untaken result. Never raises."""
        self._scope.cancel()
        for entry in self._entries.values():
            entry.outcome = None
            entry.done.set()
        if self._entries:
            log.debug(
                "layer pre-resolution dropped",
                extra={"image": self._image, "layers": len(self._entries)},
            )
        self._entries.clear()
        self._forget()

    def _forget(self) -> None:
        self._image = None
        self._scope.cancel()

    async def _run(self, queue: deque[tuple[Digest, _Entry[T]]], scope: trio.CancelScope) -> None:
        """One image: `parallel` workers over `queue` and the expiry timer, all ended by
        `scope` (cancelled by `drop`, `_forget` or the timer)."""
        with scope:
            async with trio.open_nursery() as nursery:
                for _ in range(min(self._parallel, len(queue))):
                    nursery.start_soon(self._worker, queue)
                await trio.sleep(self._ttl_sec)
                self.drop()

    async def _worker(self, queue: deque[tuple[Digest, _Entry[T]]]) -> None:
        """Resolve queued keys in order (the order containerd will ask for them)."""
        while queue:
            key, entry = queue.popleft()
            if entry.done.is_set():
                continue
            begin = time.monotonic()
            try:
                result = await trio.to_thread.run_sync(self._load, key)
            except Exception as e:  # the Prepare loads it again and reports the failure
                log.debug("layer pre-resolution failed", extra={"ztoc": key, "error": repr(e)})
            else:
                if not entry.done.is_set():
                    entry.outcome = (result,)
                log.debug(
                    "layer pre-resolved",
                    extra={"ztoc": key, "ms": round((time.monotonic() - begin) * 1000)},
                )
            finally:
                entry.done.set()
