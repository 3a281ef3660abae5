"""Blob reads: size (HEAD), whole blobs (verified, streamed to a sink), and byte ranges.

Range reads use the session's blob-location cache: when the registry redirected a blob GET
to storage, the next Range read of that blob through the same endpoint goes straight to the
storage URL. Any failure through a cached location (non-2xx, transport error, short body,
bytes the caller's `check` rejects) drops it, and that endpoint asks the registry again once.
A location is cached only after bytes fetched through it passed `check`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Protocol

import httpx

from index.digest import Digest
from index.oci.descriptor import Descriptor
from index.oci.errors import (
    DigestMismatchError,
    RegistryError,
    TransportError,
    UnexpectedResponseError,
)
from index.oci.hosts import CAP_PULL, RegistryHost
from index.oci.reference import Reference
from index.oci.responses import BodySink, iter_raw, range_body, status_error
from index.oci.session import RegistrySession

log = logging.getLogger(__name__)

AsyncCheck = Callable[[bytes], Awaitable[None]]
"""Verifies one endpoint's answer; raises DigestMismatchError to reject it."""


class BlobSink(Protocol):
    """Where `Blobs.fetch` streams a blob. `reset` discards what was written (called before
    each endpoint is tried, so a retry on the next endpoint starts from byte 0)."""

    async def write(self, chunk: bytes) -> None: ...

    async def reset(self) -> None: ...


class MemorySink:
    """Collects a blob in memory, at most `max_bytes` (UnexpectedResponseError beyond)."""

    def __init__(self, what: str, max_bytes: int) -> None:
        self.buf = bytearray()
        self._what = what
        self._max = max_bytes

    async def write(self, chunk: bytes) -> None:
        self.buf += chunk
        if len(self.buf) > self._max:
            raise UnexpectedResponseError(f"{self._what} is larger than {self._max} bytes")

    async def reset(self) -> None:
        self.buf.clear()


class FileSink:
    """Writes a blob into an open binary file; the blocking writes run through `offload`
    (e.g. a worker thread of the running event loop's library, behind a limiter).

    The caller owns (opens and closes) the file.
    """

    def __init__(
        self, fd: int, offload: Callable[[Callable[[], object]], Awaitable[object]]
    ) -> None:
        self._fd = fd
        self._offload = offload

    async def write(self, chunk: bytes) -> None:
        def write_all() -> None:
            view = memoryview(chunk)
            while view:
                view = view[os.write(self._fd, view) :]

        await self._offload(write_all)

    async def reset(self) -> None:
        def truncate() -> None:
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)

        await self._offload(truncate)


class Blobs:
    """Blob reads over a `RegistrySession` (which it does not own)."""

    def __init__(self, session: RegistrySession) -> None:
        self._s = session

    def _blob_url(self, ep: RegistryHost, ref: Reference, digest: Digest) -> httpx.URL:
        return self._s.url(ep, f"/{ref.repository}/blobs/{digest}", self._s.pull_params(ep, ref))

    async def head(self, ref: Reference, digest: Digest) -> Descriptor:
        """Size of a blob (HEAD). Raises NotFoundError when absent, other RegistryErrors."""

        async def op(ep: RegistryHost) -> Descriptor:
            url = self._blob_url(ep, ref, digest)
            response = await self._s.request(ep, ref.repository, "HEAD", url)
            await response.aclose()
            if not response.is_success:
                raise await status_error(response, f"head blob {ref.name}@{digest}")
            length = response.headers.get("content-length")
            if length is None:
                raise UnexpectedResponseError(
                    f"head blob {ref.name}@{digest}: no Content-Length ({url})", url=str(url)
                )
            return Descriptor("application/octet-stream", digest, int(length))

        return await self._s.each_endpoint(ref, CAP_PULL, f"head blob {ref.name}@{digest}", op)

    async def fetch(
        self, ref: Reference, digest: Digest, sink: BlobSink, size: int | None = None
    ) -> Descriptor:
        """Stream blob `digest` into `sink`, verified against the digest (and `size`).

        Each endpoint starts with `sink.reset()`. When this raises, what the sink holds is
        not the blob. Raises NotFoundError, DigestMismatchError, UnauthorizedError,
        TransportError, and whatever the sink raises (UnexpectedResponseError of MemorySink).
        """

        async def op(ep: RegistryHost) -> Descriptor:
            await sink.reset()
            hasher = hashlib.sha256()
            count = 0
            url = self._blob_url(ep, ref, digest)
            response = await self._s.request(
                ep, ref.repository, "GET", url, headers={"Accept-Encoding": "identity"}, stream=True
            )
            try:
                if not response.is_success:
                    raise await status_error(response, f"fetch blob {ref.name}@{digest}")
                async for chunk in iter_raw(response):
                    hasher.update(chunk)
                    await sink.write(chunk)
                    count += len(chunk)
            except httpx.HTTPError as e:
                raise TransportError(
                    f"fetch blob {ref.name}@{digest}: reading {response.url}: {e}",
                    url=str(response.url),
                ) from e
            finally:
                await response.aclose()
            got = Digest.from_hasher(hasher)
            if got != digest or (size is not None and count != size):
                raise DigestMismatchError(
                    f"blob {ref.name}@{digest} from {ep.base_url}: got {got} ({count} bytes)",
                    url=ep.base_url,
                )
            return Descriptor("application/octet-stream", digest, count)

        return await self._s.each_endpoint(ref, CAP_PULL, f"fetch blob {ref.name}@{digest}", op)

    async def read(self, ref: Reference, digest: Digest, max_bytes: int) -> bytes:
        """A whole blob in memory, verified. Raises as `fetch`, and UnexpectedResponseError
        when it is larger than `max_bytes`."""
        sink = MemorySink(f"blob {ref.name}@{digest}", max_bytes)
        await self.fetch(ref, digest, sink)
        return bytes(sink.buf)

    async def read_range(
        self,
        ref: Reference,
        digest: Digest,
        offset: int,
        length: int,
        *,
        check: AsyncCheck | None = None,
        sink: BodySink | None = None,
    ) -> bytes:
        """`length` bytes of a blob from byte `offset` (fewer only at the end of the blob).

        Uses `Range: bytes=offset-(offset+length-1)`; a 200 answer (range ignored) is sliced.
        The bytes are NOT verified here; `check` (e.g. against zTOC span digests) runs on each
        endpoint's answer and raises DigestMismatchError to reject it, which moves on to the
        next endpoint (mirror). `sink` sees each answer's body as it arrives (`range_body`).
        See the module doc for the location cache. Raises ValueError
        (bad range), RangeNotSatisfiableError (416, or a mismatching Content-Range),
        NotFoundError, UnauthorizedError, TransportError, DigestMismatchError.
        """
        if offset < 0 or length <= 0:
            raise ValueError(f"bad range offset={offset} length={length}")
        headers = {"Range": f"bytes={offset}-{offset + length - 1}", "Accept-Encoding": "identity"}
        s = self._s

        async def checked(response: httpx.Response) -> bytes:
            data = await range_body(response, ref, digest, offset, length, sink)
            if check is not None:
                await check(data)
            return data

        async def op(ep: RegistryHost) -> bytes:
            key = (ep.base_url, ref.repository, str(digest))
            cached = s.locations.get(key)
            if cached is not None:
                try:
                    response = await s.send(
                        ep, "GET", cached, {"User-Agent": s.user_agent, **headers}, stream=True
                    )
                    return await checked(response)
                except RegistryError as e:
                    s.locations.pop(key)
                    log.debug("cached location of %s via %s dropped: %s", digest, ep.base_url, e)
            url = self._blob_url(ep, ref, digest)
            response = await s.request(ep, ref.repository, "GET", url, headers=headers, stream=True)
            redirected = response.url.copy_with(query=None) != url.copy_with(query=None)
            location = response.url
            data = await checked(response)
            if redirected:
                s.locations.put(key, location)
            return data

        return await s.each_endpoint(ref, CAP_PULL, f"read range of blob {ref.name}@{digest}", op)
