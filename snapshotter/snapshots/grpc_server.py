"""The Snapshots gRPC service: grpcio's thread-pool server bridged into trio.

Each handler runs in a grpcio worker thread: it decodes the request, calls the
`SnapshotService` coroutine on the trio thread with `trio.from_thread.run`, and
encodes the result. The pure metadata reads Stat and List call the service's
thread-safe `*_blocking` methods directly from the worker thread instead (no
trio round trip: about a third less latency on containerd's hottest call). Domain errors become status codes through ONE table,
`STATUS_FOR_ERROR`, and a root that is read-only or full through `STATUS_FOR_ERRNO` (and
its sqlite twins); anything unexpected is logged once and answered UNKNOWN (what
containerd maps unknown errors to).
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
import trio
from google.protobuf import empty_pb2, timestamp_pb2

from ..api import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from ..errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SnapshotterError,
    Unavailable,
    Unimplemented,
)
from .model import Info
from .mounts import Mount
from .service import SnapshotService

log = logging.getLogger(__name__)

T = TypeVar("T")

LIST_BATCH_SIZE = 100
"""Infos per ListSnapshotsResponse message (containerd's reference server uses 100)."""

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Largest gRPC message sent or received, in bytes (containerd dials with 16 MiB)."""

STATUS_FOR_ERROR: Mapping[type[SnapshotterError], grpc.StatusCode] = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
}
"""The one mapping from domain errors to gRPC status codes (docs/architecture.md, error tables)."""

STATUS_FOR_ERRNO: Mapping[int, grpc.StatusCode] = {
    errno.EROFS: grpc.StatusCode.FAILED_PRECONDITION,
    errno.ENOSPC: grpc.StatusCode.FAILED_PRECONDITION,
    errno.EDQUOT: grpc.StatusCode.FAILED_PRECONDITION,
}
"""An `OSError` the root's file system raised, by errno: the node's state has to change before
the call can work, and containerd's errdefs have no "read-only" or "full". FAILED_PRECONDITION
(`errdefs.ErrFailedPrecondition` on containerd's side) because containerd's snapshot garbage
collector (`pruneBranch` in metadata/snapshot.go) logs a Remove failing with it and goes on
with the other snapshots, while any other code (UNAVAILABLE included) stops the whole
collection; gRPC also documents FAILED_PRECONDITION as "do not retry until the system is
fixed", which a read-only or full disk is. Other errnos stay UNKNOWN."""

SQLITE_CODES: Mapping[int, int] = {
    sqlite3.SQLITE_READONLY: errno.EROFS,
    sqlite3.SQLITE_FULL: errno.ENOSPC,
}
"""The metadata store's (primary) sqlite result codes that mean the same: its errno."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Status code and message for an exception raised by the service.

    Domain errors map through STATUS_FOR_ERROR (most specific class first); an
    OSError through STATUS_FOR_ERRNO, with the errno's text and the path (a sqlite error
    of SQLITE_CODES as its errno, with the store's message); a trio run that is shutting
    down maps to UNAVAILABLE; anything else to UNKNOWN with the exception's type in the
    message.
    """
    for cls in type(exc).__mro__:
        code = STATUS_FOR_ERROR.get(cls)
        if code is not None:
            return code, str(exc)
    disk = _disk_condition(exc)
    if disk is not None:
        return disk
    if isinstance(exc, trio.RunFinishedError | trio.Cancelled):
        return grpc.StatusCode.UNAVAILABLE, "snapshotter is shutting down"
    return grpc.StatusCode.UNKNOWN, f"internal error: {type(exc).__name__}: {exc}"


def _disk_condition(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status of an OSError or sqlite error STATUS_FOR_ERRNO names, else None."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno in STATUS_FOR_ERRNO:
        num = exc.errno
        paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
        where = f": {' -> '.join(paths)}" if paths else ""
        return STATUS_FOR_ERRNO[num], f"{os.strerror(num)} ({errno.errorcode[num]}){where}"
    if isinstance(exc, sqlite3.Error):
        code = SQLITE_CODES.get(getattr(exc, "sqlite_errorcode", -1) & 0xFF)
        if code is not None and code in STATUS_FOR_ERRNO:
            name = errno.errorcode[code]
            return STATUS_FOR_ERRNO[code], f"metadata store: {exc} ({name})"
    return None


def timestamp(ns: int) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp from nanoseconds since the epoch."""
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def info_to_pb(info: Info) -> snapshots_pb2.Info:
    """Encode an Info; the kind is always set explicitly."""
    return snapshots_pb2.Info(
        name=info.name,
        parent=info.parent,
        kind=int(info.kind),
        created_at=timestamp(info.created_ns),
        updated_at=timestamp(info.updated_ns),
        labels=dict(info.labels),
    )


def mounts_to_pb(mounts: Sequence[Mount]) -> list[mount_pb2.Mount]:
    """Encode mounts; `target` stays empty as containerd expects."""
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


class CallRecorder(Protocol):
    """Where each call's answer is recorded (`snapshotter.metrics`). Called from grpcio's
    worker threads: must be thread-safe."""

    def grpc_call(self, method: str, code: str, seconds: float) -> None:
        """`method` answered status `code` (`OK`, `NOT_FOUND`, ...) after `seconds`."""
        ...


class SnapshotsServicer(snapshots_pb2_grpc.SnapshotsServicer):  # type: ignore[misc]
    """gRPC handlers over one SnapshotService living on a trio loop; every call's method,
    status code and latency go to `calls` when given."""

    def __init__(
        self,
        service: SnapshotService,
        token: trio.lowlevel.TrioToken,
        calls: CallRecorder | None = None,
    ) -> None:
        self._service = service
        self._token = token
        self._calls = calls

    def __repr__(self) -> str:
        return f"<SnapshotsServicer {self._service!r}>"

    def _call(
        self, context: grpc.ServicerContext, method: str, fn: Callable[[], Awaitable[T]]
    ) -> T:
        t0 = time.perf_counter()
        try:
            result: T = trio.from_thread.run(fn, trio_token=self._token)
        except BaseException as exc:
            self._abort(context, method, exc, t0)
        if self._calls is not None:
            self._calls.grpc_call(method, "OK", time.perf_counter() - t0)
        return result

    def _call_blocking(self, context: grpc.ServicerContext, method: str, fn: Callable[[], T]) -> T:
        t0 = time.perf_counter()
        try:
            result = fn()
        except BaseException as exc:
            self._abort(context, method, exc, t0)
        if self._calls is not None:
            self._calls.grpc_call(method, "OK", time.perf_counter() - t0)
        return result

    def _abort(
        self, context: grpc.ServicerContext, method: str, exc: BaseException, t0: float
    ) -> NoReturn:
        code, message = status_for(exc)
        if self._calls is not None:
            self._calls.grpc_call(method, code.name, time.perf_counter() - t0)
        if code is grpc.StatusCode.UNKNOWN:
            log.error(
                "unexpected error", exc_info=exc, extra={"method": method, "error": repr(exc)}
            )
        elif _disk_condition(exc) is not None:
            log.warning(
                "request failed: the root cannot be written",
                extra={"method": method, "code": code.name, "error": message},
            )
        else:
            log.debug(
                "request failed", extra={"method": method, "code": code.name, "error": message}
            )
        context.abort(code, message)
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:
        labels = dict(request.labels)
        mounts = self._call(
            context,
            "Prepare",
            lambda: self._service.prepare(request.key, request.parent, labels),
        )
        return snapshots_pb2.PrepareSnapshotResponse(mounts=mounts_to_pb(mounts))

    def View(self, request: Any, context: grpc.ServicerContext) -> Any:
        labels = dict(request.labels)
        mounts = self._call(
            context, "View", lambda: self._service.view(request.key, request.parent, labels)
        )
        return snapshots_pb2.ViewSnapshotResponse(mounts=mounts_to_pb(mounts))

    def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self._call(context, "Mounts", lambda: self._service.mounts(request.key))
        return snapshots_pb2.MountsResponse(mounts=mounts_to_pb(mounts))

    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:
        labels = dict(request.labels)
        self._call(
            context, "Commit", lambda: self._service.commit(request.name, request.key, labels)
        )
        return empty_pb2.Empty()

    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._call(context, "Remove", lambda: self._service.remove(request.key))
        return empty_pb2.Empty()

    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:
        info = self._call_blocking(
            context, "Stat", lambda: self._service.stat_blocking(request.key)
        )
        return snapshots_pb2.StatSnapshotResponse(info=info_to_pb(info))

    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
        labels = dict(request.info.labels)
        paths = list(request.update_mask.paths)
        info = self._call(
            context, "Update", lambda: self._service.update(request.info.name, labels, paths)
        )
        return snapshots_pb2.UpdateSnapshotResponse(info=info_to_pb(info))

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        filters = list(request.filters)
        infos = self._call_blocking(context, "List", lambda: self._service.list_blocking(filters))
        for start in range(0, len(infos), LIST_BATCH_SIZE):
            batch = infos[start : start + LIST_BATCH_SIZE]
            yield snapshots_pb2.ListSnapshotsResponse(info=[info_to_pb(i) for i in batch])

    def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:
        usage = self._call(context, "Usage", lambda: self._service.usage(request.key))
        return snapshots_pb2.UsageResponse(size=usage.size_bytes, inodes=usage.inodes)

    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._call(context, "Cleanup", self._service.cleanup)
        return empty_pb2.Empty()


def build_server(
    service: SnapshotService,
    token: trio.lowlevel.TrioToken,
    *,
    threads: int,
    calls: CallRecorder | None = None,
) -> grpc.Server:
    """A grpcio server (not yet bound or started) serving `service`, recording every call
    in `calls` when given.

    `threads` bounds concurrent requests. The caller binds it
    (`add_insecure_port("unix:...")`), starts it, and stops it while the trio
    loop that owns `token` is still running.
    """
    server = grpc.server(
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"),
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(
        SnapshotsServicer(service, token, calls), server
    )
    return server
