"""`AsyncRegistryClient`: the one OCI distribution client, natively async (httpx.AsyncClient).

It runs on whatever event loop calls it (trio in the daemon, asyncio in the CLI's portal,
see `index.oci.registry`); cancelling a call cancels its HTTP request. The policy is split
by responsibility: `session` (endpoints from hosts.toml, auth, TLS, redirects, the blob
location cache), `manifests`, `blobs`, `uploads`, `referrers`.

The gate: `gate` is a factory of an async context manager entered around every public
operation that occupies the network (a manifest GET, one Range read, a whole streaming
blob download, a push with all its requests), exactly once per operation: internal calls
never re-enter it. The daemon passes `lambda: limiter` for one `trio.CapacityLimiter`, so
`max_parallel_requests` bounds every registry operation of the process. Cancellation
leaves the gate at once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import TracebackType

import httpx

from index.digest import Digest
from index.oci import mediatypes
from index.oci.blobs import AsyncCheck, Blobs, BlobSink
from index.oci.descriptor import Descriptor
from index.oci.dockerconfig import CredentialProvider
from index.oci.errors import NotFoundError
from index.oci.hosts import HostsConfig
from index.oci.hostscache import DEFAULT_RECHECK_SEC
from index.oci.manifests import Manifests
from index.oci.reference import Reference
from index.oci.referrers import Referrers
from index.oci.responses import BodySink
from index.oci.session import DEFAULT_TIMEOUT_SEC, USER_AGENT, RegistrySession
from index.oci.uploads import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MONOLITHIC_MAX_BYTES,
    PushResult,
    Uploads,
)

Gate = Callable[[], AbstractAsyncContextManager[object]]
DEFAULT_READ_MAX_BYTES = 64 * 1024 * 1024


def _no_gate() -> AbstractAsyncContextManager[object]:
    return contextlib.nullcontext()


class AsyncRegistryClient:
    """An async OCI distribution client. Close it with `await aclose()` (or `async with`).

    `credentials` is asked per endpoint host (None = anonymous only). `hosts_dirs` are
    containerd `config_path` roots for `hosts.toml` (empty = no mirrors), re-read when they
    change. `plain_http` forces http (True) or https (False) for registries without
    hosts.toml; None means http only for localhost/loopback. `skip_verify` disables TLS
    verification for those too. `transport` replaces the network (all requests go through
    it). `gate` wraps every public operation (see the module doc). `skip_mirrors`: hosts.toml
    mirrors (`HOST[:PORT]`) never to use (the daemon's own registry mirror). Sizes are bytes, timeouts
    seconds (`timeout_sec` bounds each connect, read, write and pool wait of a request).
    Use it from one event loop.
    """

    def __init__(
        self,
        *,
        credentials: CredentialProvider | None = None,
        hosts_dirs: Sequence[str | Path] = (),
        plain_http: bool | None = None,
        skip_verify: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout_sec: float = DEFAULT_TIMEOUT_SEC,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        monolithic_max_bytes: int = DEFAULT_MONOLITHIC_MAX_BYTES,
        user_agent: str = USER_AGENT,
        gate: Gate | None = None,
        hosts_recheck_sec: float = DEFAULT_RECHECK_SEC,
        skip_mirrors: Collection[str] = (),
    ) -> None:
        self.session = RegistrySession(
            credentials=credentials,
            hosts_dirs=hosts_dirs,
            plain_http=plain_http,
            skip_verify=skip_verify,
            transport=transport,
            timeout_sec=timeout_sec,
            user_agent=user_agent,
            hosts_recheck_sec=hosts_recheck_sec,
            skip_mirrors=skip_mirrors,
        )
        self._gate = gate or _no_gate
        self._manifests = Manifests(self.session)
        self._blobs = Blobs(self.session)
        self._referrers = Referrers(self.session, self._manifests)
        self._uploads = Uploads(
            self.session,
            self._referrers,
            chunk_bytes=chunk_bytes,
            monolithic_max_bytes=monolithic_max_bytes,
        )

    def __repr__(self) -> str:
        return f"<AsyncRegistryClient {self.session!r}>"

    async def aclose(self) -> None:
        """Close every connection pool. Idempotent."""
        await self.session.aclose()

    async def __aenter__(self) -> AsyncRegistryClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def hosts(self, registry: str) -> HostsConfig:
        """The current endpoint configuration of `registry`. Raises HostsConfigError."""
        return self.session.hosts(registry)

    # Every method below is one gated operation; see the module doc and the methods of
    # Manifests, Blobs, Referrers and Uploads for what each raises.

    async def resolve(self, ref: Reference) -> Descriptor:
        """The descriptor a reference points at. See `Manifests.resolve`."""
        async with self._gate():
            return await self._manifests.resolve(ref)

    async def get_manifest(
        self,
        ref: Reference,
        digest: Digest | None = None,
        *,
        accept: Sequence[str] = mediatypes.MANIFEST_ACCEPT,
    ) -> tuple[Descriptor, bytes]:
        """A manifest or index and its exact bytes. See `Manifests.get`."""
        async with self._gate():
            return await self._manifests.get(ref, digest, accept=accept)

    async def referrers(
        self, ref: Reference, subject: Digest, artifact_type: str | None = None
    ) -> list[Descriptor]:
        """Referrers of `subject` (API, then tag schema). See `Referrers.list_for`."""
        async with self._gate():
            return await self._referrers.list_for(ref, subject, artifact_type)

    async def head_blob(self, ref: Reference, digest: Digest) -> Descriptor:
        """Size of a blob. See `Blobs.head`."""
        async with self._gate():
            return await self._blobs.head(ref, digest)

    async def blob_exists(self, ref: Reference, digest: Digest) -> bool:
        """True if the blob is in the repository (on any pull endpoint)."""
        try:
            await self.head_blob(ref, digest)
        except NotFoundError:
            return False
        return True

    async def read_blob(
        self, ref: Reference, digest: Digest, max_bytes: int = DEFAULT_READ_MAX_BYTES
    ) -> bytes:
        """A whole blob in memory, verified. See `Blobs.read`."""
        async with self._gate():
            return await self._blobs.read(ref, digest, max_bytes)

    async def fetch_blob(
        self, ref: Reference, digest: Digest, sink: BlobSink, size: int | None = None
    ) -> Descriptor:
        """Stream a blob into `sink`, verified; one gate slot for the whole download.
        See `Blobs.fetch`."""
        async with self._gate():
            return await self._blobs.fetch(ref, digest, sink, size)

    async def fetch_blob_range(
        self,
        ref: Reference,
        digest: Digest,
        offset: int,
        length: int,
        *,
        check: AsyncCheck | None = None,
        sink: BodySink | None = None,
    ) -> bytes:
        """`length` bytes from `offset`, `check` run per endpoint, `sink` fed each answer's
        body as it arrives. See `Blobs.read_range`."""
        async with self._gate():
            return await self._blobs.read_range(ref, digest, offset, length, check=check, sink=sink)

    async def push_blob(
        self,
        ref: Reference,
        source: bytes | str | os.PathLike[str],
        media_type: str = "application/octet-stream",
        *,
        mount_from: str | None = None,
    ) -> Descriptor:
        """Upload a blob unless present. See `Uploads.push_blob`."""
        async with self._gate():
            return await self._uploads.push_blob(ref, source, media_type, mount_from=mount_from)

    async def push_manifest(
        self,
        ref: Reference,
        data: bytes,
        media_type: str,
        *,
        tag: str | None = None,
        update_referrers_tag: bool = True,
    ) -> PushResult:
        """PUT a manifest (and the referrers tag). See `Uploads.push_manifest`."""
        async with self._gate():
            return await self._uploads.push_manifest(
                ref, data, media_type, tag=tag, update_referrers_tag=update_referrers_tag
            )
