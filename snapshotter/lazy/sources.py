"""Where span bytes come from: the `BlobSource` seam and its registry and chain implementations.

A source fetches a byte range `[start, end)` of a blob named by its digest. The consumer (the
span reader, `snapshotter.lazy.reader`) passes a `check` callable that verifies what came back (span
digests); a source runs it on every answer, so corrupt bytes count as a failure of that source:
retried there, and then the next source of a chain is tried. Wrong bytes are never returned.

Errors are translated once, here, from `index.oci` errors into this tree::

    FetchError                  base: a range could not be fetched from a source
    ├── SourceUnavailable       transient: no answer, broken or short body, 5xx, 429 (retried)
    │   └── FetchTimeout        a request or a source's time budget ran out (retried)
    ├── ContentMismatch         the bytes failed the caller's check (retried, then next source)
    ├── BlobNotFound            the source does not have the blob (404)
    ├── AccessDenied            authentication or authorization failed (401/403)
    ├── BadRange                the source cannot serve the range (416, wrong Content-Range)
    └── AllSourcesFailed        every source of a chain failed; `.errors` has each one's error

Units: offsets and sizes in bytes, times in seconds unless the name says `_ms`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from index.digest import Digest
from index.model import CompressedOffset
from index.oci.client import AsyncRegistryClient
from index.oci.errors import (
    DigestMismatchError,
    NotFoundError,
    OciError,
    RangeNotSatisfiableError,
    RegistryError,
    TransportError,
    UnauthorizedError,
)
from index.oci.reference import Reference
from index.oci.responses import BodySink

log = logging.getLogger(__name__)

Check = Callable[[bytes], None]
"""Verifies fetched bytes; raises `ContentMismatch` when they are wrong. Runs in a worker
thread (it may hash megabytes), so it must be thread-safe."""

VERIFY_THREADS = trio.CapacityLimiter(2)
"""Worker threads the `RegistrySource`s given no `verify_limiter` run `check` in (shared by
all of them, process-wide)."""

PEER_SOURCE_NAME: Final = "peers"
"""The name of the peer source (`snapshotter.peers`) in a layer's chain; status counts its
bytes as `peers`, every other source's as `registry`."""

_TRANSIENT_STATUSES: Final = frozenset({408, 425, 429, 500, 502, 503, 504})


class FetchError(Exception):
    """A byte range could not be fetched from a source. `source` names it."""

    def __init__(self, message: str, *, source: str = "") -> None:
        super().__init__(message)
        self.source = source


class SourceUnavailable(FetchError):
    """Transient failure: no answer, a reset or short body, 5xx/429. Worth retrying.

    `retry_after_sec`: how long the source asked to be left alone (a 429's or 503's
    `Retry-After`), None when it did not say."""

    def __init__(
        self, message: str, *, source: str = "", retry_after_sec: float | None = None
    ) -> None:
        super().__init__(message, source=source)
        self.retry_after_sec = retry_after_sec


class FetchTimeout(SourceUnavailable):
    """A request exceeded its timeout, or a source exhausted its time budget in a chain."""


class ContentMismatch(FetchError):
    """The fetched bytes failed verification (a span digest). Retried, then next source."""


class BlobNotFound(FetchError):
    """The source answered that it does not hold the blob (404). Not retried there."""


class AccessDenied(FetchError):
    """The source refused us (401/403 after authenticating, no usable credentials)."""


class BadRange(FetchError):
    """The source cannot serve the range (416, or an answer for a different range)."""


class AllSourcesFailed(FetchError):
    """Every source of a chain failed; `errors` holds `(source name, error)` in order."""

    def __init__(self, message: str, errors: Sequence[tuple[str, FetchError]]) -> None:
        super().__init__(message, source="chain")
        self.errors = tuple(errors)


RETRYABLE: Final[tuple[type[FetchError], ...]] = (SourceUnavailable, ContentMismatch)
"""Errors a source retries itself (with backoff) before giving up."""


def translate_oci_error(e: OciError | OSError, what: str, source: str) -> FetchError:
    """The fetch error for an `index.oci` error raised while fetching `what` from `source`.

    The one table (most specific first): TransportError, or an OSError that escaped the client
    (it translates its own, so this is a safety net) → SourceUnavailable; NotFoundError →
    BlobNotFound; UnauthorizedError → AccessDenied; RangeNotSatisfiableError → BadRange;
    DigestMismatchError → ContentMismatch; any other RegistryError → SourceUnavailable when its
    status is transient (408/425/429/5xx) or absent, else BadRange (a 4xx we cannot use);
    anything else (HostsConfigError: an invalid hosts.toml, or a CA or client certificate
    file that cannot be loaded; CredentialsError) → plain FetchError (not retried).
    The caller chains the original (`raise translate_oci_error(e, ...) from e`).
    """
    message = f"{what} from {source}: {e}"
    if isinstance(e, (TransportError, OSError)):
        return SourceUnavailable(message, source=source)
    if isinstance(e, NotFoundError):
        return BlobNotFound(message, source=source)
    if isinstance(e, UnauthorizedError):
        return AccessDenied(message, source=source)
    if isinstance(e, RangeNotSatisfiableError):
        return BadRange(message, source=source)
    if isinstance(e, DigestMismatchError):
        return ContentMismatch(message, source=source)
    if isinstance(e, RegistryError):
        if e.status is None or e.status in _TRANSIENT_STATUSES or e.status >= 500:
            return SourceUnavailable(message, source=source, retry_after_sec=e.retry_after_sec)
        return BadRange(message, source=source)
    return FetchError(message, source=source)


class BlobSource(Protocol):
    """Fetches byte ranges of content-addressed blobs (the reader's seam)."""

    @property
    def name(self) -> str:
        """A short label for logs and status (`registry:host/repo`, `chain[...]`)."""
        ...

    async def fetch(
        self,
        digest: Digest,
        start: CompressedOffset,
        end: CompressedOffset,
        *,
        check: Check | None = None,
        sink: BodySink | None = None,
    ) -> bytes:
        """Exactly the bytes `[start, end)` of blob `digest`, which passed `check`. A source
        that reads an answer as it arrives feeds it to `sink` (`index.oci.responses.BodySink`:
        `begin` at each answer, then its bytes in order); one that does not ignores it.

        Raises:
            FetchError: a subclass saying why (after this source's own retries).
            trio.Cancelled: as usual; nothing is left half-done.
        """
        ...


@dataclass(frozen=True, slots=True)
class FetchConfig:
    """Retry and timeout policy of a `RegistrySource`.

    `max_attempts` per range and source (1 = no retry); backoff doubles from
    `backoff_initial_ms` up to `backoff_max_ms`, each delay scaled by a random factor in
    [0.5, 1.0] (jitter); a 429 or 503 whose `Retry-After` asks for longer waits that long,
    at most `retry_after_max_sec` (a reader is waiting). `request_timeout_sec` bounds one
    Range request (including its wait for a gate slot and the check). How many requests run
    at once is the client's gate.
    """

    max_attempts: int = 4
    backoff_initial_ms: int = 50
    backoff_max_ms: int = 2000
    request_timeout_sec: float = 60.0
    retry_after_max_sec: float = 10.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.backoff_initial_ms < 0 or self.backoff_max_ms < self.backoff_initial_ms:
            raise ValueError(f"bad backoff {self.backoff_initial_ms}..{self.backoff_max_ms} ms")
        if self.request_timeout_sec <= 0:
            raise ValueError("request_timeout_sec must be positive")
        if self.retry_after_max_sec < 0:
            raise ValueError("retry_after_max_sec must not be negative")

    def backoff_sec(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before retry number `attempt` (1 = first retry), in seconds, with jitter."""
        base = min(self.backoff_max_ms, self.backoff_initial_ms << min(max(attempt - 1, 0), 30))
        factor: float = (rng or random).uniform(0.5, 1.0)
        return base / 1000.0 * factor


@dataclass(slots=True)
class SourceStatistics:
    """Counters of one source (a snapshot is returned by `statistics()`)."""

    requests: int = 0
    bytes_fetched: int = 0
    retries: int = 0
    failures: int = 0
    last_error: str = ""

    def copy(self) -> SourceStatistics:
        return SourceStatistics(
            self.requests, self.bytes_fetched, self.retries, self.failures, self.last_error
        )


class RegistrySource:
    """Range reads of the blobs of one image repository through an `AsyncRegistryClient`.

    Requests are native trio I/O: the client's gate (the daemon's one limiter of
    `max_parallel_requests`) bounds them, and `config.request_timeout_sec` cancels a request
    that has not finished (its connection is closed, its gate slot freed at once). Mirrors
    from `hosts.toml`, auth and blob locations are the client's business. Transient errors
    and bytes failing `check` are retried up to `config.max_attempts` with jittered
    exponential backoff. `check` (hashing megabytes) runs in a worker thread under
    `verify_limiter` on each endpoint's answer, so a mirror serving wrong bytes is skipped for
    the next endpoint within one attempt. The client is not closed here.
    """

    def __init__(
        self,
        client: AsyncRegistryClient,
        ref: Reference,
        *,
        config: FetchConfig | None = None,
        verify_limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        self._client = client
        self._ref = ref
        self.config = config or FetchConfig()
        self._verify_limiter = verify_limiter or VERIFY_THREADS
        self._stats = SourceStatistics()
        self._name = f"registry:{ref.registry}/{ref.repository}"

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        s = self._stats
        return (
            f"<RegistrySource {self._ref.registry}/{self._ref.repository} requests={s.requests} "
            f"bytes={s.bytes_fetched} retries={s.retries} failures={s.failures}>"
        )

    def statistics(self) -> SourceStatistics:
        """A copy of this source's counters."""
        return self._stats.copy()

    def _endpoint_check(self, check: Check) -> Callable[[bytes], Awaitable[None]]:
        """`check` as the client's per-endpoint check: in a worker thread, and a
        ContentMismatch becomes the DigestMismatchError that rejects that endpoint only (the
        client then tries the next hosts.toml mirror, and the upstream last)."""

        async def per_endpoint(data: bytes) -> None:
            try:
                await trio.to_thread.run_sync(check, data, limiter=self._verify_limiter)
            except ContentMismatch as e:
                raise DigestMismatchError(str(e)) from e

        return per_endpoint

    async def _attempt(
        self, digest: Digest, start: int, end: int, check: Check | None, sink: BodySink | None
    ) -> bytes:
        what = f"bytes {start}-{end} of {digest}"
        self._stats.requests += 1
        with trio.move_on_after(self.config.request_timeout_sec) as scope:
            try:
                data = await self._client.fetch_blob_range(
                    self._ref,
                    digest,
                    start,
                    end - start,
                    check=self._endpoint_check(check) if check else None,
                    sink=sink,
                )
            except (OciError, OSError) as e:
                raise translate_oci_error(e, what, self._name) from e
            if len(data) != end - start:
                raise SourceUnavailable(
                    f"{what} from {self._name}: got {len(data)} bytes, want {end - start}",
                    source=self._name,
                )
            self._stats.bytes_fetched += len(data)
            return data
        assert scope.cancelled_caught
        raise FetchTimeout(
            f"{what} from {self._name}: no answer within {self.config.request_timeout_sec} s",
            source=self._name,
        )

    async def fetch(
        self,
        digest: Digest,
        start: CompressedOffset,
        end: CompressedOffset,
        *,
        check: Check | None = None,
        sink: BodySink | None = None,
    ) -> bytes:
        """The bytes `[start, end)` of `digest`, verified by `check`. See `BlobSource.fetch`.

        Raises `BadRange` for an empty or negative range, else the last attempt's FetchError.
        """
        if not 0 <= start < end:
            raise BadRange(f"empty or negative range {start}-{end} of {digest}", source=self.name)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._attempt(digest, start, end, check, sink)
            except FetchError as e:
                self._stats.last_error = str(e)
                if not isinstance(e, RETRYABLE) or attempt >= self.config.max_attempts:
                    self._stats.failures += 1
                    raise
                self._stats.retries += 1
                delay = self.config.backoff_sec(attempt)
                if isinstance(e, SourceUnavailable) and e.retry_after_sec:
                    delay = max(delay, min(e.retry_after_sec, self.config.retry_after_max_sec))
                log.debug("retrying in %.3f s after: %s", delay, e)
                await trio.sleep(delay)


class ChainSource:
    """Tries `sources` in order (peers, then the registry); the first success wins.

    Each source gets its time budget per fetch, its own retries included (`budgets`, seconds,
    one per source; default `budget_sec` for each); a source that fails, times out or
    serves bytes failing `check` moves the fetch to the next one. Raises `AllSourcesFailed`
    (chained from the last error) when none succeeds. `served()` counts the bytes each source
    delivered, by source name.
    """

    def __init__(
        self,
        sources: Sequence[BlobSource],
        *,
        budget_sec: float = 120.0,
        budgets: Sequence[float] | None = None,
    ) -> None:
        if not sources:
            raise ValueError("a ChainSource needs at least one source")
        budgets = tuple(budgets) if budgets is not None else (budget_sec,) * len(sources)
        if len(budgets) != len(sources) or any(b <= 0 for b in budgets):
            raise ValueError(f"need one positive budget per source, got {budgets}")
        self.sources = tuple(sources)
        self.budgets = budgets
        self._served: dict[str, int] = {}
        self._name = "chain[" + ", ".join(s.name for s in self.sources) + "]"

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"<ChainSource {self._name} budgets={self.budgets}>"

    def served(self) -> dict[str, int]:
        """Bytes delivered so far, by source name."""
        return dict(self._served)

    async def fetch(
        self,
        digest: Digest,
        start: CompressedOffset,
        end: CompressedOffset,
        *,
        check: Check | None = None,
        sink: BodySink | None = None,
    ) -> bytes:
        """The bytes from the first source that delivers them. Raises `AllSourcesFailed`."""
        errors: list[tuple[str, FetchError]] = []
        for source, budget in zip(self.sources, self.budgets, strict=True):
            with trio.move_on_after(budget) as scope:
                try:
                    data = await source.fetch(digest, start, end, check=check, sink=sink)
                except FetchError as e:
                    log.debug("source %s failed for %s: %s", source.name, digest, e)
                    errors.append((source.name, e))
                    continue
                self._served[source.name] = self._served.get(source.name, 0) + len(data)
                return data
            if scope.cancelled_caught:
                errors.append(
                    (
                        source.name,
                        FetchTimeout(
                            f"bytes {start}-{end} of {digest}: source {source.name} used up its "
                            f"{budget} s budget",
                            source=source.name,
                        ),
                    )
                )
        summary = "; ".join(f"{name}: {err}" for name, err in errors)
        raise AllSourcesFailed(
            f"bytes {start}-{end} of {digest}: every source failed ({summary})", errors
        ) from errors[-1][1]
