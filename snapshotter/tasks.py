"""Task scopes: every background task lives in a nursery owned by what it serves.

A `TaskScope` is a nursery with an owner and an error boundary. The daemon opens the root
scope with `open_task_scope`; owners open child scopes from it (`await parent.open_child(name)`,
e.g. one per mounted layer) and close them when what they serve goes away (`await
child.aclose()` cancels every task in it and waits for them). Closing a scope closes its
children.

Work an owner does in its caller's task on the scope's behalf (e.g. a read of a layer) can be
tied to the scope too: `with scope.cancelled_on_close() as cs:` runs the block so that closing
the scope cancels it (`cs.cancelled_caught` tells the caller).

The boundary: a task started with `start_soon` that raises an exception not listed in the
scope's `fatal` types is logged once with the scope's name (`task failed`, keys `scope`,
`task`, `error`), counted, and kept as `last_error` for status; its siblings and the parent go
on. `trio.Cancelled`, `KeyboardInterrupt` and the `fatal` types propagate and cancel the scope's
nursery, and so reach the owner of the root scope (the daemon), which stops.

See docs/architecture.md (the task tree).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import trio

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ScopeStatistics:
    """What a scope has seen: tasks running now, tasks that failed, the last failure."""

    name: str
    running: int
    errors: int
    last_error: str


class TaskScope:
    """A nursery owned by one object, with an error boundary (see the module doc).

    Not constructed directly: `open_task_scope` (root) or `TaskScope.open_child`.
    """

    def __init__(self, name: str, fatal: tuple[type[BaseException], ...] = ()) -> None:
        self.name = name
        self.fatal = fatal
        self.errors = 0
        self.last_error = ""
        self._running = 0
        self._nursery: trio.Nursery | None = None
        self._cancel = trio.CancelScope()
        self._borrowed: set[trio.CancelScope] = set()  # blocks of cancelled_on_close
        self._done = trio.Event()
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<TaskScope {self.name!r} {state} running={self._running} errors={self.errors}>"

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> ScopeStatistics:
        return ScopeStatistics(self.name, self._running, self.errors, self.last_error)

    def start_soon(
        self, fn: Callable[..., Awaitable[Any]], *args: Any, name: str | None = None
    ) -> bool:
        """Run `fn(*args)` in this scope behind the error boundary.

        Returns False (and starts nothing) when the scope is closed or closing: what the task
        would serve is going away.
        """
        if self._closed or self._nursery is None:
            return False
        what = name or str(getattr(fn, "__qualname__", repr(fn)))
        try:
            self._nursery.start_soon(self._guarded, fn, args, what, name=f"{self.name}: {what}")
        except RuntimeError:  # the nursery is closing
            return False
        return True

    async def _guarded(
        self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], what: str
    ) -> None:
        self._running += 1
        try:
            await fn(*args)
        except self.fatal:
            raise
        except Exception as e:
            self.errors += 1
            self.last_error = f"{what}: {type(e).__name__}: {e}"
            log.error(
                "task failed",
                extra={"scope": self.name, "task": what, "error": f"{type(e).__name__}: {e}"},
                exc_info=True,
            )
        finally:
            self._running -= 1

    async def open_child(
        self, name: str, fatal: tuple[type[BaseException], ...] | None = None
    ) -> TaskScope:
        """A new scope living inside this one until it (or this one) is closed.

        `fatal` defaults to this scope's. Raises RuntimeError when this scope is closed.
        """
        if self._closed or self._nursery is None:
            raise RuntimeError(f"task scope {self.name!r} is closed")
        child = TaskScope(name, self.fatal if fatal is None else fatal)
        await self._nursery.start(child._serve)
        return child

    async def _serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self._closed = True
            self._done.set()

    @contextmanager
    def cancelled_on_close(self) -> Iterator[trio.CancelScope]:
        """Run the block (in the caller's task) so that closing this scope cancels it; when
        the scope is closed already, the block is cancelled at its first checkpoint. Yields the
        block's CancelScope: `cancelled_caught` afterwards says it was cut short."""
        block = trio.CancelScope()
        if self._closed:
            block.cancel()
        self._borrowed.add(block)
        try:
            with block:
                yield block
        finally:
            self._borrowed.discard(block)

    async def aclose(self) -> None:
        """Cancel every task of this scope (and its children) and wait until they are gone.

        Idempotent; shielded, so it completes even when the caller is being cancelled.
        """
        self._closed = True
        self._cancel.cancel()
        for borrowed in self._borrowed:
            borrowed.cancel()
        if self._nursery is None:
            return
        with trio.CancelScope(shield=True):
            await self._done.wait()


@asynccontextmanager
async def open_task_scope(
    name: str, fatal: tuple[type[BaseException], ...] = ()
) -> AsyncIterator[TaskScope]:
    """The root scope, living in the caller's task; closed (all tasks cancelled) on exit."""
    scope = TaskScope(name, fatal)
    async with trio.open_nursery() as nursery:
        await nursery.start(scope._serve)
        try:
            yield scope
        finally:
            await scope.aclose()
