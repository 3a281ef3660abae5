"""`ContentStore` against a real gRPC server speaking containerd's Content API on a unix socket
(the generated servicer, answering as containerd's content service does), and its pure parts.

The server can also answer the ways containerd never should (a misplaced or too long answer)
and stall (as a stopped containerd does), so these tests show: the error table (NOT_FOUND →
None or ContentNotFound, other codes → ContentStoreError naming the digest and code, one
line), exact ranges over several messages, answers that do not fit refused, deadlines for
`size`/`read` and the idle limit of `stream`, and that a caller cancelled or stopping early
cancels the gRPC call: the server sees it and the worker thread ends (the limiter's token is
only returned when it has), while the server is still stalling.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from index.digest import Digest
from snapshotter.api import content_pb2, content_pb2_grpc
from snapshotter.peers.content import (
    CONTENT_THREADS,
    ContentNotFound,
    ContentStore,
    ContentStoreError,
    _Chunks,
    error_for,
)

BLOB = bytes(range(10))
DIGEST = Digest.of(BLOB)
MISSING = Digest.of(b"not here")
STALL_LIMIT_SEC = 10.0
"""Longest the server stalls an answer (the tests end the call much sooner)."""


class Behaviour:
    STALL = "stall"  # answer nothing until the call ends
    STALL_AFTER_FIRST = "stall-after-first"  # one message, then nothing
    BAD_OFFSET = "bad-offset"  # the second message one byte off
    LONG = "long"  # one byte more than asked
    FAIL_AFTER_FIRST = "fail-after-first"  # one message, then UNAVAILABLE


@dataclass
class FakeContent(content_pb2_grpc.ContentServicer):  # type: ignore[misc]
    """containerd's content service over a dict of blobs, `chunk` bytes per Read message."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    behaviour: dict[str, str] = field(default_factory=dict)
    chunk: int = 3
    namespaces: list[str | None] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def _note(self, context: Any) -> None:
        self.namespaces.append(dict(context.invocation_metadata()).get("containerd-namespace"))

    def _watch(self, context: Any, mode: str | None) -> None:
        # A stalled call ends within the tests' waits only when the client ends it (cancel,
        # deadline, closed channel); grpc may end it before the handler runs again.
        if mode in (Behaviour.STALL, Behaviour.STALL_AFTER_FIRST):
            context.add_callback(self.cancelled.set)

    def _stall(self, context: Any) -> None:
        deadline = time.monotonic() + STALL_LIMIT_SEC
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)

    def Info(self, request: Any, context: Any) -> Any:
        self._note(context)
        mode = self.behaviour.get(request.digest)
        self._watch(context, mode)
        if mode == Behaviour.STALL:
            self._stall(context)
        blob = self.blobs.get(request.digest)
        if blob is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"content digest {request.digest}: not found")
            raise AssertionError("abort raises")
        info = content_pb2.Info(digest=request.digest, size=len(blob))
        return content_pb2.InfoResponse(info=info)

    def Read(self, request: Any, context: Any) -> Iterator[Any]:
        # As containerd's contentserver: Info first, offset clamped at 0, OUT_OF_RANGE past
        # the end, size 0 or past the end reads to the end, messages numbered from the start
        # of the read.
        self._note(context)
        blob = self.blobs.get(request.digest)
        if blob is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"content digest {request.digest}: not found")
            raise AssertionError("abort raises")
        mode = self.behaviour.get(request.digest)
        self._watch(context, mode)
        if mode == Behaviour.STALL:
            self._stall(context)
            return
        offset = max(request.offset, 0)
        if offset > len(blob):
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"read past object length {len(blob)}")
        size = request.size
        if size <= 0 or offset + size > len(blob):
            size = len(blob) - offset
        if mode == Behaviour.LONG:
            size += 1
        sent = 0
        while sent < size:
            n = min(self.chunk, size - sent)
            at = offset + sent
            data = (blob + b"!")[at : at + n]
            shown = sent + 1 if mode == Behaviour.BAD_OFFSET and sent else sent
            yield content_pb2.ReadContentResponse(offset=shown, data=data)
            sent += n
            if mode == Behaviour.STALL_AFTER_FIRST:
                self._stall(context)
                return
            if mode == Behaviour.FAIL_AFTER_FIRST:
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost\nto the store")


@dataclass
class Server:
    service: FakeContent
    address: str


@pytest.fixture
def server() -> Iterator[Server]:
    # A short directory: unix socket paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="cs-", dir="/tmp") as tmp:
        address = str(Path(tmp) / "content.sock")
        service = FakeContent(blobs={DIGEST: BLOB})
        grpc_server = grpc.server(ThreadPoolExecutor(max_workers=8))
        content_pb2_grpc.add_ContentServicer_to_server(service, grpc_server)
        grpc_server.add_insecure_port(f"unix://{address}")
        grpc_server.start()
        try:
            yield Server(service, address)
        finally:
            grpc_server.stop(grace=None).wait()


@contextlib.contextmanager
def open_store(address: str, **kwargs: Any) -> Iterator[ContentStore]:
    store = ContentStore(address, **kwargs)
    try:
        yield store
    finally:
        store.close()


def add_blob(server: Server, data: bytes, behaviour: str | None = None) -> Digest:
    digest = Digest.of(data)
    server.service.blobs[digest] = data
    if behaviour is not None:
        server.service.behaviour[digest] = behaviour
    return digest


async def wait_idle(limiter: trio.CapacityLimiter, within_sec: float = 2.0) -> float:
    """Seconds until no worker thread holds a token of `limiter`; fails after `within_sec`."""
    start = time.monotonic()
    while limiter.statistics().borrowed_tokens:
        assert time.monotonic() - start < within_sec, "a worker thread is still blocked"
        await trio.sleep(0.01)
    return time.monotonic() - start


async def wait_event(event: threading.Event, within_sec: float = 3.0) -> bool:
    return await trio.to_thread.run_sync(event.wait, within_sec)


# ---------------------------------------------------------------------------------------------
# Pure parts


class FakeRpcError(grpc.RpcError):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_error_table() -> None:
    nf = error_for(DIGEST, "/run/c.sock", FakeRpcError(grpc.StatusCode.NOT_FOUND, "not found"))
    assert type(nf) is ContentNotFound
    assert nf.code is grpc.StatusCode.NOT_FOUND and nf.digest == DIGEST
    for code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.PERMISSION_DENIED,
    ):
        expected = f"content {DIGEST} from containerd at /run/c.sock: {code.name}: it failed badly"
        e = error_for(DIGEST, "/run/c.sock", FakeRpcError(code, "it failed\n  badly"))
        assert type(e) is ContentStoreError
        assert e.code is code
        assert str(e) == expected
    bare = error_for(DIGEST, "/s", grpc.RpcError())
    assert type(bare) is ContentStoreError and bare.code is grpc.StatusCode.UNKNOWN
    assert str(bare).endswith("UNKNOWN: no details")


def test_chunks_accepts_the_range_and_refuses_what_does_not_fit() -> None:
    def msg(offset: int, data: bytes) -> Any:
        return content_pb2.ReadContentResponse(offset=offset, data=data)

    relative = _Chunks(DIGEST, "/s", 4, 5)  # containerd's numbering: from the read's start
    assert relative.take(msg(0, b"abc")) == b"abc"
    assert relative.take(msg(3, b"de")) == b"de"
    relative.finish()

    absolute = _Chunks(DIGEST, "/s", 4, 5)  # from the blob's start
    assert absolute.take(msg(4, b"abc")) == b"abc"
    assert absolute.take(msg(7, b"de")) == b"de"
    absolute.finish()

    to_end = _Chunks(DIGEST, "/s", 0, 0)
    to_end.take(msg(0, b"abc"))
    to_end.finish()  # size 0: whatever the blob has

    misplaced = _Chunks(DIGEST, "/s", 4, 5)
    misplaced.take(msg(0, b"abc"))
    with pytest.raises(ContentStoreError, match="at offset 4 after 3 bytes read from offset 4"):
        misplaced.take(msg(4, b"de"))
    for wrong in (1, 5):
        with pytest.raises(ContentStoreError, match=f"at offset {wrong} after 0 bytes") as e:
            _Chunks(DIGEST, "/s", 4, 5).take(msg(wrong, b"abc"))
        assert e.value.code is None

    with pytest.raises(ContentStoreError, match="longer than the 5 bytes"):
        _Chunks(DIGEST, "/s", 0, 5).take(msg(0, b"abcdef"))

    short = _Chunks(DIGEST, "/s", 4, 5)
    short.take(msg(4, b"abc"))
    with pytest.raises(ContentStoreError, match=r"range \[4, 9\) asked, the blob ends at 7"):
        short.finish()


async def test_arguments_and_repr() -> None:
    with pytest.raises(ValueError, match="timeout_sec"):
        ContentStore("/nowhere.sock", timeout_sec=0)
    with open_store("/nowhere.sock") as store:
        assert repr(store) == "<ContentStore /nowhere.sock namespace=k8s.io>"
        with pytest.raises(ValueError, match="offset"):
            await store.read(DIGEST, -1, 4)
        with pytest.raises(ValueError, match="size must be > 0"):
            await store.read(DIGEST, 0, 0)
        with pytest.raises(ValueError, match="size"):
            async for _ in store.stream(DIGEST, 0, -1):
                pass
    assert repr(store) == "<ContentStore /nowhere.sock namespace=k8s.io closed>"
    with pytest.raises(ContentStoreError, match="closed"):
        await store.size(DIGEST)
    assert CONTENT_THREADS.total_tokens == 4


# ---------------------------------------------------------------------------------------------
# Against the server


async def test_size_and_namespace(server: Server) -> None:
    with open_store(server.address) as store:
        assert await store.size(DIGEST) == len(BLOB)
        assert await store.size(MISSING) is None
    with open_store(f"unix://{server.address}", namespace="other") as store:
        assert await store.size(DIGEST) == len(BLOB)
    assert server.service.namespaces == ["k8s.io", "k8s.io", "other"]


async def test_read_exact_ranges_over_several_messages(server: Server) -> None:
    with open_store(server.address) as store:
        assert await store.read(DIGEST, 0, len(BLOB)) == BLOB
        assert await store.read(DIGEST, 2, 7) == BLOB[2:9]
        assert await store.read(DIGEST, 9, 1) == BLOB[9:]
        with pytest.raises(ContentStoreError, match=r"range \[8, 13\) asked, the blob ends at 10"):
            await store.read(DIGEST, 8, 5)
        with pytest.raises(ContentStoreError, match="OUT_OF_RANGE") as e:
            await store.read(DIGEST, 11, 1)
        assert e.value.code is grpc.StatusCode.OUT_OF_RANGE
        with pytest.raises(ContentNotFound, match=f"content {MISSING} .*: NOT_FOUND"):
            await store.read(MISSING, 0, 1)


async def test_stream_yields_the_messages_as_they_come(server: Server) -> None:
    with open_store(server.address) as store:
        assert [c async for c in store.stream(DIGEST)] == [
            BLOB[0:3],
            BLOB[3:6],
            BLOB[6:9],
            BLOB[9:],
        ]
        assert b"".join([c async for c in store.stream(DIGEST, 4)]) == BLOB[4:]
        assert b"".join([c async for c in store.stream(DIGEST, 4, 5)]) == BLOB[4:9]
        assert [c async for c in store.stream(DIGEST, len(BLOB))] == []
        with pytest.raises(ContentStoreError, match="the blob ends at 10"):
            async for _ in store.stream(DIGEST, 8, 5):
                pass
        got: list[bytes] = []
        with pytest.raises(ContentNotFound):
            async for chunk in store.stream(MISSING):
                got.append(chunk)
        assert got == []


async def test_answers_that_do_not_fit_are_refused(server: Server) -> None:
    bad = add_blob(server, b"0123456789", Behaviour.BAD_OFFSET)
    long = add_blob(server, b"abcdefghij", Behaviour.LONG)
    failing = add_blob(server, b"ABCDEFGHIJ", Behaviour.FAIL_AFTER_FIRST)
    with open_store(server.address) as store:
        with pytest.raises(ContentStoreError, match="at offset 4 after 3 bytes") as e:
            await store.read(bad, 0, 10)
        assert e.value.code is None
        with pytest.raises(ContentStoreError, match="at offset 4 after 3 bytes"):
            async for _ in store.stream(bad):
                pass
        with pytest.raises(ContentStoreError, match="longer than the 4 bytes"):
            await store.read(long, 0, 4)
        got: list[bytes] = []
        with pytest.raises(ContentStoreError, match="UNAVAILABLE: connection lost to the store"):
            async for chunk in store.stream(failing):
                got.append(chunk)
        assert got == [b"ABC"]
        with pytest.raises(ContentStoreError, match="UNAVAILABLE"):
            await store.read(failing, 0, 10)


async def test_no_server_is_unavailable_at_once(tmp_path: Path) -> None:
    with open_store(str(tmp_path / "absent.sock"), timeout_sec=20) as store:
        start = time.monotonic()
        with pytest.raises(ContentStoreError, match="UNAVAILABLE") as e:
            await store.size(DIGEST)
        assert e.value.code is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(ContentStoreError, match="UNAVAILABLE"):
            await store.read(DIGEST, 0, 1)
        with pytest.raises(ContentStoreError, match="UNAVAILABLE"):
            async for _ in store.stream(DIGEST):
                pass
        assert time.monotonic() - start < 5


async def test_deadlines(server: Server) -> None:
    stalled = add_blob(server, b"stalled blob", Behaviour.STALL)
    slow = add_blob(server, b"one chunk then nothing", Behaviour.STALL_AFTER_FIRST)
    limiter = trio.CapacityLimiter(2)
    with open_store(server.address, timeout_sec=0.5, limiter=limiter) as store:
        for call in (store.size(stalled), store.read(stalled, 0, 4)):
            start = time.monotonic()
            with pytest.raises(ContentStoreError, match="DEADLINE_EXCEEDED") as e:
                await call
            assert e.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - start < 3
        got: list[bytes] = []
        start = time.monotonic()
        with pytest.raises(ContentStoreError, match=r"DEADLINE_EXCEEDED: no data for 0\.5 s"):
            async for chunk in store.stream(slow):
                got.append(chunk)
        assert got == [b"one"]
        assert time.monotonic() - start < 3
        assert await wait_event(server.service.cancelled)
        await wait_idle(limiter)


async def test_cancelled_calls_end_their_threads(server: Server) -> None:
    """Each call is cancelled while its worker thread waits on a stalled server: the call
    returns at once, the server sees the gRPC call cancelled and the thread ends long before
    the server would stop stalling or any deadline."""
    stalled = add_blob(server, b"stalled blob", Behaviour.STALL)
    slow = add_blob(server, b"one chunk then nothing", Behaviour.STALL_AFTER_FIRST)
    limiter = trio.CapacityLimiter(1)
    with open_store(server.address, timeout_sec=60, limiter=limiter) as store:

        async def size() -> None:
            await store.size(stalled)

        async def read() -> None:
            await store.read(stalled, 0, 4)

        async def stream_mid_way() -> None:
            async for _ in store.stream(slow):
                pass

        for call in (size, read, stream_mid_way):
            server.service.cancelled.clear()
            start = time.monotonic()
            with trio.move_on_after(0.3) as scope:
                await call()
            assert scope.cancelled_caught, call.__name__
            assert time.monotonic() - start < 1.5
            assert await wait_event(server.service.cancelled), call.__name__
            assert await wait_idle(limiter) < 2
        assert await store.read(DIGEST, 0, 10) == BLOB


async def test_stopping_early_cancels_the_call(server: Server) -> None:
    slow = add_blob(server, b"one chunk then nothing", Behaviour.STALL_AFTER_FIRST)
    limiter = trio.CapacityLimiter(1)
    with open_store(server.address, timeout_sec=60, limiter=limiter) as store:
        async with contextlib.aclosing(store.stream(slow)) as chunks:
            async for chunk in chunks:
                assert chunk == b"one"
                break
        assert await wait_event(server.service.cancelled)
        assert limiter.statistics().borrowed_tokens == 0


async def test_close_ends_calls_in_flight(server: Server) -> None:
    stalled = add_blob(server, b"stalled blob", Behaviour.STALL)
    limiter = trio.CapacityLimiter(1)
    store = ContentStore(server.address, timeout_sec=60, limiter=limiter)
    errors: list[ContentStoreError] = []

    async def size() -> None:
        try:
            await store.size(stalled)
        except ContentStoreError as e:
            errors.append(e)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(size)
            while not server.service.namespaces:
                await trio.sleep(0.01)
            store.close()
    assert [e.code for e in errors] == [grpc.StatusCode.CANCELLED]
    await wait_idle(limiter)
