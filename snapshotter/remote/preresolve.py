"""Background resolution of an image's other lazy layers while the first one mounts.

containerd prepares an image's layers one after another, so a per-layer cost such as
decoding a zTOC and building the layer tree (`build_tree`, about a second per 50k entries)
adds up serially. On the first Prepare of an image, each zTOC of the layers containerd will
ask for (from `cri.image-layers`, or every layer of the index) is queued with
`Preresolver.add` as soon as it is in the local store, while the others still download, and
its tree is built in worker threads, at most `parallel` at once. When the Prepare for one of
them arrives, `Preresolver.take` waits for the resolution already done or in flight instead
of redoing it (singleflight); a background failure is forgotten and the layer is loaded
again in the Prepare, so fallbacks behave exactly as without pre-resolution.

Memory is bounded: only one image's resolved-but-not-yet-taken results are kept; they are
dropped when a different image starts, when every queued layer was taken, or `ttl_sec`
after the start. Use from the trio thread.

Tasks: the workers and the expiry timer run in the `TaskScope` the owner passes (the
mounter's `preresolve` scope); a worker's own boundary turns a failed `load` into a debug
line, anything else reaching the scope's boundary is logged and counted there.
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
from snapshotter.tasks import TaskScope

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


@dataclass(eq=False)
class _Image(Generic[T]):
    digest: Digest
    queue: deque[tuple[Digest, _Entry[T]]] = field(default_factory=deque)
    seen: set[Digest] = field(default_factory=set)
    scopes: list[trio.CancelScope] = field(default_factory=list)
    workers: int = 0


class Preresolver(Generic[T]):
    """Per-image, singleflight background calls of `load(key)` (see the module doc).

    `load` is a blocking function run in a worker thread; whatever it raises in the
    background is logged at debug level and not kept. At most `parallel` calls run at once,
    in the order the keys were added. Background tasks run in `tasks`; once it is closed,
    nothing new starts in the background and `take` computes results itself.
    """

    def __init__(
        self,
        load: Callable[[Digest], T],
        tasks: TaskScope,
        *,
        parallel: int = DEFAULT_PARALLEL,
        ttl_sec: float = DEFAULT_TTL_SEC,
    ) -> None:
        self._load = load
        self._tasks = tasks
        self._parallel = max(1, parallel)
        self._ttl_sec = ttl_sec
        self._state: _Image[T] | None = None
        self._entries: dict[Digest, _Entry[T]] = {}

    def __repr__(self) -> str:
        return f"<Preresolver image={self.image} pending={len(self._entries)}>"

    @property
    def image(self) -> Digest | None:
        """The image whose layers are being (or were) resolved, None when nothing is kept."""
        return None if self._state is None else self._state.digest

    def pending(self) -> list[Digest]:
        """Keys added and not yet taken, in order."""
        return list(self._entries)

    def add(self, image: Digest, key: Digest) -> bool:
        """Queue `load(key)` for `image` unless this image already queued `key`; a different
        current image is dropped first (its expiry timer starts with its first key). Returns
        whether `key` was queued. Never raises."""
        state = self._state
        if state is None or state.digest != image:
            self.drop()
            state = self._state = _Image(image)
            state.scopes.append(scope := trio.CancelScope())
            self._tasks.start_soon(self._expire, scope, name="preresolve expiry")
            log.debug("layer pre-resolution started", extra={"image": image})
        if key in state.seen:
            return False
        state.seen.add(key)
        entry: _Entry[T] = _Entry()
        self._entries[key] = entry
        state.queue.append((key, entry))
        if state.workers < self._parallel:
            state.workers += 1
            state.scopes.append(scope := trio.CancelScope())
            if not self._tasks.start_soon(self._worker, state, scope, name="preresolve worker"):
                state.workers -= 1
                self.drop()  # the scope is closed: `take` computes every result itself
        return True

    def start(self, image: Digest, keys: Iterable[Digest]) -> bool:
        """`add` each key in order; returns whether any was queued. Never raises."""
        return [self.add(image, key) for key in keys].count(True) > 0

    async def take(self, key: Digest) -> T:
        """The result of `load(key)`: the background one when it was added for the current
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
        for entry in self._entries.values():
            entry.outcome = None
            entry.done.set()
        if self._entries:
            log.debug(
                "layer pre-resolution dropped",
                extra={"image": self.image, "layers": len(self._entries)},
            )
        self._entries.clear()
        self._forget()

    def _forget(self) -> None:
        if self._state is not None:
            for scope in self._state.scopes:
                scope.cancel()
        self._state = None

    async def _worker(self, state: _Image[T], scope: trio.CancelScope) -> None:
        """Resolve the image's queued keys in order (the order containerd will ask for them)."""
        try:
            with scope:
                while state.queue:
                    key, entry = state.queue.popleft()
                    if entry.done.is_set():
                        continue
                    begin = time.monotonic()
                    try:
                        result = await trio.to_thread.run_sync(self._load, key)
                    except Exception as e:  # the Prepare loads it again and reports the failure
                        log.debug(
                            "layer pre-resolution failed", extra={"ztoc": key, "error": repr(e)}
                        )
                    else:
                        if not entry.done.is_set():
                            entry.outcome = (result,)
                        log.debug(
                            "layer pre-resolved",
                            extra={"ztoc": key, "ms": round((time.monotonic() - begin) * 1000)},
                        )
                    finally:
                        entry.done.set()
        finally:
            state.workers -= 1

    async def _expire(self, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep(self._ttl_sec)
            self.drop()
