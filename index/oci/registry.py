"""The synchronous `RegistryClient` of the CLI: a thin facade over `AsyncRegistryClient`.

The policy (endpoints, auth, redirects, caches, errors) lives once, in the async client
(`index.oci.client` and the modules it composes). This facade owns a private asyncio event
loop running in a daemon thread (the portal); each method submits the async operation to it
and waits for the result, so any number of caller threads share one set of connection
pools and caches. `close()` closes the async client and stops the loop.

Errors are those of the async client, raised unchanged in the calling thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from index.digest import Digest
from index.oci import mediatypes
from index.oci.auth import Authenticator
from index.oci.blobs import FileSink
from index.oci.client import DEFAULT_READ_MAX_BYTES, AsyncRegistryClient
from index.oci.descriptor import Descriptor
from index.oci.dockerconfig import CredentialProvider
from index.oci.errors import TransportError
from index.oci.hosts import HostsConfig
from index.oci.reference import Reference
from index.oci.responses import referrers_tag
from index.oci.session import DEFAULT_TIMEOUT_SEC, USER_AGENT
from index.oci.uploads import DEFAULT_CHUNK_BYTES, DEFAULT_MONOLITHIC_MAX_BYTES, PushResult

__all__ = ["AsyncRegistryClient", "PushResult", "RegistryClient", "referrers_tag"]

T = TypeVar("T")


class _ThreadedTransport(httpx.AsyncBaseTransport):
    """Runs a synchronous-only transport in a worker thread (the body is read there)."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        def call() -> httpx.Response:
            response = self._inner.handle_request(request)
            try:
                body = response.read()
            finally:
                response.close()
            return httpx.Response(response.status_code, headers=response.headers, content=body)

        return await asyncio.to_thread(call)

    async def aclose(self) -> None:
        self._inner.close()


class _Portal:
    """An asyncio event loop in a daemon thread; `run` executes a coroutine on it."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="registry-portal", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the portal loop and return its result (or raise its exception)."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


async def _in_thread(fn: Callable[[], object]) -> object:
    return await asyncio.to_thread(fn)


class RegistryClient:
    """A synchronous OCI distribution client. Close it (or use `with`) to release connections.

    Arguments as `AsyncRegistryClient` (a synchronous-only `transport` is run in worker
    threads). Safe to share between threads.
    """

    def __init__(
        self,
        *,
        credentials: CredentialProvider | None = None,
        hosts_dirs: Sequence[str | Path] = (),
        plain_http: bool | None = None,
        skip_verify: bool = False,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
        timeout_sec: float = DEFAULT_TIMEOUT_SEC,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        monolithic_max_bytes: int = DEFAULT_MONOLITHIC_MAX_BYTES,
        user_agent: str = USER_AGENT,
    ) -> None:
        if transport is not None and not isinstance(transport, httpx.AsyncBaseTransport):
            transport = _ThreadedTransport(transport)
        self._async = AsyncRegistryClient(
            credentials=credentials,
            hosts_dirs=hosts_dirs,
            plain_http=plain_http,
            skip_verify=skip_verify,
            transport=transport,
            timeout_sec=timeout_sec,
            chunk_bytes=chunk_bytes,
            monolithic_max_bytes=monolithic_max_bytes,
            user_agent=user_agent,
        )
        self._portal = _Portal()
        self._close_lock = threading.Lock()
        self._closed = False

    @property
    def auth(self) -> Authenticator:
        """The authentication state (replaceable, e.g. by one with a test clock)."""
        return self._async.session.auth

    @auth.setter
    def auth(self, value: Authenticator) -> None:
        self._async.session.auth = value

    def __repr__(self) -> str:
        return f"<RegistryClient {self._async.session!r}>"

    def close(self) -> None:
        """Close every connection pool and stop the portal thread. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._portal.run(self._async.aclose())
        finally:
            self._portal.stop()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the portal. Raises TransportError when the client is closed."""
        if self._closed:
            coro.close()
            raise TransportError("the registry client is closed")
        return self._portal.run(coro)

    def hosts(self, registry: str) -> HostsConfig:
        """The endpoint configuration of `registry`. Raises HostsConfigError."""

        async def get() -> HostsConfig:
            return self._async.hosts(registry)

        return self._run(get())

    def resolve(self, ref: Reference) -> Descriptor:
        """See `AsyncRegistryClient.resolve`."""
        return self._run(self._async.resolve(ref))

    def get_manifest(
        self,
        ref: Reference,
        digest: Digest | None = None,
        *,
        accept: Sequence[str] = mediatypes.MANIFEST_ACCEPT,
    ) -> tuple[Descriptor, bytes]:
        """See `AsyncRegistryClient.get_manifest`."""
        return self._run(self._async.get_manifest(ref, digest, accept=accept))

    def push_manifest(
        self,
        ref: Reference,
        data: bytes,
        media_type: str,
        *,
        tag: str | None = None,
        update_referrers_tag: bool = True,
    ) -> PushResult:
        """See `AsyncRegistryClient.push_manifest`."""
        return self._run(
            self._async.push_manifest(
                ref, data, media_type, tag=tag, update_referrers_tag=update_referrers_tag
            )
        )

    def referrers(
        self, ref: Reference, subject: Digest, artifact_type: str | None = None
    ) -> list[Descriptor]:
        """See `AsyncRegistryClient.referrers`."""
        return self._run(self._async.referrers(ref, subject, artifact_type))

    def head_blob(self, ref: Reference, digest: Digest) -> Descriptor:
        """See `AsyncRegistryClient.head_blob`."""
        return self._run(self._async.head_blob(ref, digest))

    def blob_exists(self, ref: Reference, digest: Digest) -> bool:
        """True if the blob is in the repository (on any pull endpoint)."""
        return self._run(self._async.blob_exists(ref, digest))

    def fetch_blob(
        self, ref: Reference, digest: Digest, dest: str | os.PathLike[str], size: int | None = None
    ) -> Descriptor:
        """Stream a blob into the file `dest` (replaced atomically), verified against `digest`.

        Nothing is left at `dest` on failure. Raises NotFoundError, DigestMismatchError,
        UnauthorizedError, TransportError.
        """
        dest_path = Path(dest)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest_path.name}.", dir=dest_path.parent)
        try:
            try:
                desc = self._run(
                    self._async.fetch_blob(ref, digest, FileSink(fd, _in_thread), size)
                )
            finally:
                os.close(fd)
            os.replace(tmp, dest_path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return desc

    def read_blob(
        self, ref: Reference, digest: Digest, max_bytes: int = DEFAULT_READ_MAX_BYTES
    ) -> bytes:
        """See `AsyncRegistryClient.read_blob`."""
        return self._run(self._async.read_blob(ref, digest, max_bytes))

    def fetch_blob_range(
        self,
        ref: Reference,
        digest: Digest,
        offset: int,
        length: int,
        *,
        check: Callable[[bytes], None] | None = None,
    ) -> bytes:
        """See `AsyncRegistryClient.fetch_blob_range`; `check` runs in a worker thread."""
        sync_check = check

        async def acheck(data: bytes) -> None:
            assert sync_check is not None
            await asyncio.to_thread(sync_check, data)

        return self._run(
            self._async.fetch_blob_range(
                ref, digest, offset, length, check=acheck if check is not None else None
            )
        )

    def push_blob(
        self,
        ref: Reference,
        source: bytes | str | os.PathLike[str],
        media_type: str = "application/octet-stream",
        *,
        mount_from: str | None = None,
    ) -> Descriptor:
        """See `AsyncRegistryClient.push_blob`."""
        return self._run(self._async.push_blob(ref, source, media_type, mount_from=mount_from))
