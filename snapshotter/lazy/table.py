"""The span state table of one layer, and coalescing of missing spans into requests.

Every span of a lazily read layer is in one of four states; every transition is checked
(`SpanStateError` on an illegal one: a bug in the caller).

    state        meaning                                    edges out
    UNREQUESTED  not local                                  → FETCHING (a read, read-ahead or
                                                              background step starts a fetch),
                                                            → CACHED (found in the disk cache)
    FETCHING     one Range request in flight holds it       → CACHED (verified, stored),
                                                            → UNREQUESTED (failed/cancelled)
    CACHED       verified compressed bytes on disk          → INFLATED (inflated into memory),
                                                            → UNREQUESTED (disk copy evicted or
                                                              found corrupt)
    INFLATED     also inflated in the in-memory LRU         → CACHED (dropped from the LRU)

Sizes are compressed bytes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Final

from index.model import SpanId


class SpanState(enum.Enum):
    """Where a span's bytes are (see the module table)."""

    UNREQUESTED = "unrequested"
    FETCHING = "fetching"
    CACHED = "cached"
    INFLATED = "inflated"


TRANSITIONS: Final[Mapping[SpanState, frozenset[SpanState]]] = {
    # a read or prefetch starts a fetch; or the disk cache already has the span
    SpanState.UNREQUESTED: frozenset({SpanState.FETCHING, SpanState.CACHED}),
    # verified and stored; or every source failed / the fetch was cancelled
    SpanState.FETCHING: frozenset({SpanState.CACHED, SpanState.UNREQUESTED}),
    # inflated into the memory LRU; or the disk copy was evicted or found corrupt
    SpanState.CACHED: frozenset({SpanState.INFLATED, SpanState.UNREQUESTED}),
    # dropped from the memory LRU (the disk copy remains)
    SpanState.INFLATED: frozenset({SpanState.CACHED}),
}

LOCAL: Final = frozenset({SpanState.CACHED, SpanState.INFLATED})
"""States whose compressed bytes are on disk."""


class SpanStateError(Exception):
    """An illegal span state transition was attempted (a bug in the caller)."""


class SpanTable:
    """The state of every span of one layer, plus the compressed bytes held locally.

    `sizes[i]` is the compressed size of span i in bytes. Raises `SpanStateError` on any
    transition not in `TRANSITIONS`.
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        self.sizes = tuple(sizes)
        self._states = [SpanState.UNREQUESTED] * len(self.sizes)
        self._counts = {state: 0 for state in SpanState}
        self._counts[SpanState.UNREQUESTED] = len(self.sizes)
        self.local_bytes = 0

    def __len__(self) -> int:
        return len(self._states)

    def __repr__(self) -> str:
        counts = " ".join(f"{s.value}={n}" for s, n in self._counts.items())
        return f"<SpanTable spans={len(self)} {counts} local_bytes={self.local_bytes}>"

    def state(self, span: SpanId) -> SpanState:
        return self._states[span]

    def count(self, state: SpanState) -> int:
        return self._counts[state]

    def set(self, span: SpanId, new: SpanState) -> None:
        """Move `span` to `new`. Raises `SpanStateError` for an edge not in the table."""
        old = self._states[span]
        if new not in TRANSITIONS[old]:
            raise SpanStateError(f"span {span}: illegal transition {old.value} → {new.value}")
        self._states[span] = new
        self._counts[old] -= 1
        self._counts[new] += 1
        if (old in LOCAL) != (new in LOCAL):
            self.local_bytes += self.sizes[span] if new in LOCAL else -self.sizes[span]


def coalesce(
    spans: Sequence[SpanId],
    sizes: Sequence[int],
    max_bytes: int,
    chunks: Sequence[int] | None = None,
) -> list[list[SpanId]]:
    """Group sorted span ids into runs of consecutive ids of at most `max_bytes` each.

    A span larger than `max_bytes` is a run of its own. `sizes[i]` is span i's compressed size;
    `chunks[i]`, when given, its chunk (peer ownership): a run never spans two chunks.
    """
    runs: list[list[SpanId]] = []
    total = 0
    for span in spans:
        if (
            runs
            and span == runs[-1][-1] + 1
            and total + sizes[span] <= max_bytes
            and (chunks is None or chunks[span] == chunks[runs[-1][-1]])
        ):
            runs[-1].append(span)
            total += sizes[span]
        else:
            runs.append([span])
            total = sizes[span]
    return runs
