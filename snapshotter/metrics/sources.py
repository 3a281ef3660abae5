"""`MeteredSource`: a `BlobSource` that records what the source it wraps fetched.

Each fetch of a run of spans is timed; its verified bytes are counted under the source's
kind (`registry` or `peer`), a failure under its kind of error (`FETCH_ERROR_KINDS`). The
wrapper changes nothing else: same name (status and the chain's `served()` key by it), same
bytes, same exceptions.
"""

from __future__ import annotations

import time
from typing import Final

from index.digest import Digest
from index.model import CompressedOffset
from index.oci.responses import BodySink
from snapshotter.lazy.sources import (
    AccessDenied,
    AllSourcesFailed,
    BadRange,
    BlobNotFound,
    BlobSource,
    Check,
    ContentMismatch,
    FetchError,
    FetchTimeout,
    SourceUnavailable,
)

from .instruments import SourceRecorder

FETCH_ERROR_KINDS: Final[tuple[tuple[type[FetchError], str], ...]] = (
    (FetchTimeout, "timeout"),
    (SourceUnavailable, "unavailable"),
    (ContentMismatch, "content_mismatch"),
    (BlobNotFound, "not_found"),
    (AccessDenied, "access_denied"),
    (BadRange, "bad_range"),
    (AllSourcesFailed, "all_failed"),
    (FetchError, "other"),
)
"""Fetch error class → the `kind` label, most specific class first (a peer that declined,
`PeerDeclined`, is `unavailable`)."""


def error_kind(exc: BaseException) -> str:
    """The `kind` label of a failed fetch: `FETCH_ERROR_KINDS`, else `unexpected`."""
    for cls, kind in FETCH_ERROR_KINDS:
        if isinstance(exc, cls):
            return kind
    return "unexpected"


class MeteredSource:
    """`inner`, with its fetches recorded in `recorder` (see the module doc)."""

    __slots__ = ("inner", "recorder")

    def __init__(self, inner: BlobSource, recorder: SourceRecorder) -> None:
        self.inner = inner
        self.recorder = recorder

    @property
    def name(self) -> str:
        return self.inner.name

    def __repr__(self) -> str:
        return f"<MeteredSource {self.inner!r}>"

    async def fetch(
        self,
        digest: Digest,
        start: CompressedOffset,
        end: CompressedOffset,
        *,
        check: Check | None = None,
        sink: BodySink | None = None,
    ) -> bytes:
        """`inner.fetch`, recorded. Raises what it raises; a cancelled fetch is not counted."""
        t0 = time.perf_counter()
        try:
            data = await self.inner.fetch(digest, start, end, check=check, sink=sink)
        except Exception as e:
            self.recorder.failed(error_kind(e), time.perf_counter() - t0)
            raise
        self.recorder.fetched(len(data), time.perf_counter() - t0)
        return data
