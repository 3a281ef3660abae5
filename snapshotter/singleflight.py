"""Singleflight: concurrent callers asking for the same key share one piece of work.

`SingleFlight.do(key, fn)`: the first caller for `key` (the leader) runs `fn()` in its own
task; callers arriving while it runs wait and get its result, or its exception re-raised. Once
the work is done the key is forgotten (results are not cached here; cache them where they are
used). When the leader is cancelled, the waiters do not inherit its cancellation: one of them
becomes the new leader and runs `fn` again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import trio

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Call(Generic[V]):
    __slots__ = ("done", "error", "ok", "value")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.ok = False
        self.value: V | None = None
        self.error: BaseException | None = None


class SingleFlight(Generic[K, V]):
    """Shares in-flight work per key (see the module doc). Use from one trio thread."""

    def __init__(self) -> None:
        self._calls: dict[K, _Call[V]] = {}

    def __repr__(self) -> str:
        return f"<SingleFlight in_flight={len(self._calls)}>"

    def __len__(self) -> int:
        return len(self._calls)

    def __contains__(self, key: object) -> bool:
        return key in self._calls

    async def do(self, key: K, fn: Callable[[], Awaitable[V]]) -> V:
        """`fn()`'s result for `key`, computed once for all concurrent callers.

        Raises what `fn` raised (to every caller that shared the call).
        """
        while True:
            call = self._calls.get(key)
            if call is None:
                break
            await call.done.wait()
            if call.ok:
                return call.value  # type: ignore[return-value]
            if call.error is not None:
                raise call.error
            # the leader was cancelled: try again (possibly as the new leader)
        call = self._calls[key] = _Call()
        try:
            value = await fn()
        except trio.Cancelled:
            raise
        except BaseException as e:
            call.error = e
            raise
        else:
            call.ok = True
            call.value = value
            return value
        finally:
            del self._calls[key]
            call.done.set()
