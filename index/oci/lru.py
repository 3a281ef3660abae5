"""A bounded mapping with least-recently-used eviction and an optional time to live.

Pure data structure, no locking: the async registry client uses it from one event loop.
Times are seconds of the injected monotonic `clock`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class TtlLru(Generic[K, V]):
    """At most `max_entries` values; each expires `ttl_sec` after it was put (None = never).

    `get` returns None for a missing or expired key (and drops the expired one); `put` evicts
    the least recently used entry beyond the bound and returns what it evicted, so that the
    owner can close it.
    """

    def __init__(
        self,
        max_entries: int,
        ttl_sec: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self.ttl_sec = ttl_sec
        self._clock = clock
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"<TtlLru {len(self._data)}/{self.max_entries} ttl={self.ttl_sec}>"

    def get(self, key: K) -> V | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= self._clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> list[V]:
        expires = self._clock() + self.ttl_sec if self.ttl_sec is not None else float("inf")
        self._data[key] = (expires, value)
        self._data.move_to_end(key)
        evicted: list[V] = []
        while len(self._data) > self.max_entries:
            _, (_, old) = self._data.popitem(last=False)
            evicted.append(old)
        return evicted

    def pop(self, key: K) -> V | None:
        item = self._data.pop(key, None)
        return None if item is None else item[1]

    def values(self) -> list[V]:
        return [v for _, v in self._data.values()]

    def clear(self) -> list[V]:
        out = self.values()
        self._data.clear()
        return out
