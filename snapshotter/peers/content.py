"""`ContentStore`: blobs out of containerd's content store, through its Content gRPC API.

What a node's containerd already holds (the layers and manifests of the images it pulled) can
be served to other nodes' containerd pulls. This module reads it the supported way: the
`containerd.services.content.v1.Content` service on containerd's socket, `Info` for a blob's
size and `Read` for its bytes, in the namespace the images live in (`k8s.io` for CRI's).
containerd answers only for committed blobs, each checked against its digest when it was
written.

grpcio is synchronous: every call waits in a worker thread behind a limiter
(`CONTENT_THREADS` unless the caller passes its own), one thread per call in flight, never
on the trio thread. A trio task cancelled while its thread waits on containerd cancels the
gRPC call, which ends the wait at once, so no thread is left blocked on a call nobody
awaits (the limiter's token is only returned when the thread has finished).

Deadlines (`timeout_sec`, seconds): `size` and `read` are each one call with that deadline;
`stream` has no deadline for the whole blob (a slow consumer may take long) but gives up when
containerd sends nothing for `timeout_sec`.

Errors: gRPC status codes are translated once, here (`error_for`):

    NOT_FOUND                       size() → None; read()/stream() → ContentNotFound
    UNAVAILABLE (containerd down),
    DEADLINE_EXCEEDED, any other    ContentStoreError naming the digest and the code
    a short or misplaced answer     ContentStoreError (code None)

Bad arguments (a negative offset or size, `read` of zero bytes) raise ValueError.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Final

import grpc
import trio

from index.digest import Digest
from snapshotter.api import content_pb2, content_pb2_grpc

CONTENT_THREADS: Final = trio.CapacityLimiter(4)
"""Worker threads waiting on containerd's Content API (every `ContentStore` by default)."""

DEFAULT_TIMEOUT_SEC: Final = 30.0
"""Deadline of one `size`/`read` call, and the longest a `stream` waits for one message."""

MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
"""Largest gRPC message received, in bytes (containerd sends at most 1 MiB of data in one)."""

NAMESPACE_HEADER: Final = "containerd-namespace"
"""The gRPC metadata key that names containerd's namespace."""


class ContentStoreError(Exception):
    """containerd's content store could not answer: it is down or too slow, refused the
    request, or sent an answer that does not fit it. The message is one line naming the
    blob; `code` is the gRPC status code (None when containerd's answer itself was wrong)."""

    def __init__(self, message: str, *, digest: str, code: grpc.StatusCode | None) -> None:
        super().__init__(message)
        self.digest = digest
        self.code = code


class ContentNotFound(ContentStoreError):
    """containerd holds no committed blob with this digest in the namespace."""


def one_line(text: str) -> str:
    """`text` on one line (containerd's details may hold newlines)."""
    return " ".join(text.split())


def error_for(digest: str, where: str, exc: grpc.RpcError) -> ContentStoreError:
    """The error for a failed call about `digest` to containerd at `where`: NOT_FOUND →
    ContentNotFound, anything else → ContentStoreError; the message is one line with the
    status code and containerd's details."""
    code_of = getattr(exc, "code", None)
    details_of = getattr(exc, "details", None)
    code = code_of() if callable(code_of) else None
    details = details_of() if callable(details_of) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    text = one_line(str(details or "")) or "no details"
    message = f"content {digest} from containerd at {where}: {code.name}: {text}"
    cls = ContentNotFound if code is grpc.StatusCode.NOT_FOUND else ContentStoreError
    return cls(message, digest=digest, code=code)


def _check_range(offset: int, size: int) -> None:
    if offset < 0:
        raise ValueError(f"offset must be >= 0, not {offset}")
    if size < 0:
        raise ValueError(f"size must be >= 0, not {size}")


def _next_message(
    call: grpc.Call,
) -> content_pb2.ReadContentResponse | None:
    """The next message of a Read call, None at its end (a worker thread runs this)."""
    return next(call, None)


class _Chunks:
    """Checks that a Read answer is the asked range: each message starts where the last one
    ended, and no more than `size` bytes come (0: to the end of the blob).

    containerd's content service numbers the messages of an answer from the start of the
    read, not of the blob (its `readResponseWriter` counts from 0 whatever the request's
    offset); a message numbered from the start of the blob is accepted as well."""

    def __init__(self, digest: str, where: str, offset: int, size: int) -> None:
        self.digest = digest
        self.where = where
        self.start = offset
        self.size = size
        self.received = 0

    def _error(self, what: str) -> ContentStoreError:
        return ContentStoreError(
            f"content {self.digest} from containerd at {self.where}: {what}",
            digest=self.digest,
            code=None,
        )

    def take(self, message: content_pb2.ReadContentResponse) -> bytes:
        """The message's bytes; raises ContentStoreError when they are not the next ones."""
        if message.offset not in (self.received, self.start + self.received):
            raise self._error(
                f"a Read answer at offset {message.offset} after {self.received} bytes "
                f"read from offset {self.start}"
            )
        data = bytes(message.data)
        self.received += len(data)
        if self.size and self.received > self.size:
            raise self._error(f"a Read answer longer than the {self.size} bytes asked for")
        return data

    def finish(self) -> None:
        """Raises ContentStoreError when fewer than the `size` bytes asked for came."""
        if self.size and self.received != self.size:
            end = self.start + self.size
            raise self._error(
                f"range [{self.start}, {end}) asked, the blob ends at {self.start + self.received}"
            )


class ContentStore:
    """Reads committed blobs of containerd's content store at unix socket `address`, in
    `namespace`. Use from the trio thread; calls may run concurrently (each waits in its own
    worker thread, at most `limiter`'s size at once). Close with `close`."""

    def __init__(
        self,
        address: str,
        *,
        namespace: str = "k8s.io",
        limiter: trio.CapacityLimiter | None = None,
        timeout_sec: float = DEFAULT_TIMEOUT_SEC,
    ) -> None:
        if timeout_sec <= 0:
            raise ValueError(f"timeout_sec must be > 0, not {timeout_sec}")
        self._target = address if address.startswith("unix:") else f"unix://{address}"
        self._where = address.removeprefix("unix://").removeprefix("unix:")
        self._namespace = namespace
        self._limiter = limiter or CONTENT_THREADS
        self._timeout = timeout_sec
        self._metadata = ((NAMESPACE_HEADER, namespace),)
        self._channel = grpc.insecure_channel(
            self._target, options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        )
        self._stub = content_pb2_grpc.ContentStub(self._channel)
        self._closed = False

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<ContentStore {self._where} namespace={self._namespace}{state}>"

    def close(self) -> None:
        """Closes the channel; calls in flight end with ContentStoreError (CANCELLED), later
        calls raise ContentStoreError. Idempotent."""
        if not self._closed:
            self._closed = True
            self._channel.close()

    def _check_open(self, digest: str) -> None:
        if self._closed:
            raise ContentStoreError(
                f"content {digest}: the content store client for {self._where} is closed",
                digest=digest,
                code=None,
            )

    async def size(self, digest: Digest) -> int | None:
        """The size in bytes of the committed blob `digest`, None when containerd does not
        hold it. Raises ContentStoreError."""
        self._check_open(digest)
        future = self._stub.Info.future(
            content_pb2.InfoRequest(digest=str(digest)),
            timeout=self._timeout,
            metadata=self._metadata,
        )
        try:
            answer = await trio.to_thread.run_sync(
                future.result, limiter=self._limiter, abandon_on_cancel=True
            )
        except grpc.RpcError as e:
            if e.code() is grpc.StatusCode.NOT_FOUND:
                return None
            raise error_for(digest, self._where, e) from e
        finally:
            future.cancel()  # ends the thread's wait when this task was cancelled
        size = int(answer.info.size)
        if size < 0:
            raise ContentStoreError(
                f"content {digest} from containerd at {self._where}: size {size}",
                digest=digest,
                code=None,
            )
        return size

    def _start_read(
        self, digest: Digest, offset: int, size: int, timeout: float | None
    ) -> tuple[grpc.Call, _Chunks]:
        self._check_open(digest)
        call = self._stub.Read(
            content_pb2.ReadContentRequest(digest=str(digest), offset=offset, size=size),
            timeout=timeout,
            metadata=self._metadata,
        )
        return call, _Chunks(digest, self._where, offset, size)

    async def read(self, digest: Digest, offset: int, size: int) -> bytes:
        """Exactly the `size` bytes of blob `digest` from `offset` (size > 0), in one call
        within the deadline. Raises ContentNotFound when containerd does not hold the blob,
        ContentStoreError when it fails, or when the blob ends before the range does."""
        _check_range(offset, size)
        if size == 0:
            raise ValueError("size must be > 0 (stream reads a blob to its end)")
        call, chunks = self._start_read(digest, offset, size, self._timeout)

        def collect() -> bytes:
            parts = [chunks.take(message) for message in call]
            chunks.finish()
            return b"".join(parts)

        try:
            return await trio.to_thread.run_sync(
                collect, limiter=self._limiter, abandon_on_cancel=True
            )
        except grpc.RpcError as e:
            raise error_for(digest, self._where, e) from e
        finally:
            call.cancel()  # a no-op after the end; ends the thread's wait otherwise

    async def stream(
        self, digest: Digest, offset: int = 0, size: int = 0
    ) -> AsyncGenerator[bytes, None]:
        """The bytes of blob `digest` from `offset`, `size` of them (0: to the blob's end), in
        the chunks containerd sends (at most 1 MiB each), as they come: one worker thread
        waits for each. Iterate it inside `contextlib.aclosing` so that stopping early ends
        the gRPC call at once; a consumer that is cancelled ends it too.

        Raises ContentNotFound (before any bytes) when containerd does not hold the blob,
        ContentStoreError when it fails or sends nothing for `timeout_sec`, or when the blob
        ends before a range of `size` bytes does."""
        _check_range(offset, size)
        call, chunks = self._start_read(digest, offset, size, None)
        try:
            while True:
                with trio.move_on_after(self._timeout) as idle:
                    message = await trio.to_thread.run_sync(
                        _next_message, call, limiter=self._limiter, abandon_on_cancel=True
                    )
                if idle.cancelled_caught:
                    raise ContentStoreError(
                        f"content {digest} from containerd at {self._where}: "
                        f"DEADLINE_EXCEEDED: no data for {self._timeout:g} s",
                        digest=digest,
                        code=grpc.StatusCode.DEADLINE_EXCEEDED,
                    )
                if message is None:
                    break
                data = chunks.take(message)
                if data:
                    yield data
            chunks.finish()
        except grpc.RpcError as e:
            raise error_for(digest, self._where, e) from e
        finally:
            call.cancel()  # a no-op after the end; ends the call when the consumer stops
