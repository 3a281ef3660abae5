"""The FUSE server: reads requests from the connection's `/dev/fuse` fd, answers them from a
`LayerHost`, translating calls and errors, nothing more. No libfuse: the kernel protocol is
spoken directly (`snapshotter.fs.protocol`), so every INIT flag and every reply is ours.

One trio task reads requests (the fd is non-blocking; it waits with `wait_readable`) and
answers every request but READ on the spot: the host's answers are in memory, so a LOOKUP,
GETATTR, GETXATTR or READDIRPLUS costs one read(2), one handler and one write(2) on the trio
thread, with no task. So is a READ whose bytes the layer has at hand (in memory, or a small
read from the inflated tier's page cache: `LayerHost.read_now`); any other READ gets a task
of its own in the server's nursery (it may wait for spans), at most `max_tasks` at a time
(the reader waits for one to end first). Without FUSE passthrough OPEN is answered
ENOSYS: the kernel then opens every file of the connection without asking, keeps its page
cache (`FOPEN_KEEP_CACHE`) and sends no RELEASE (Linux 3.14 and later), so reading a file costs
the READs alone. With it, OPEN and RELEASE are answered by `snapshotter.fs.passthrough`
(cached, or passed through to a local copy). OPENDIR is answered (not ENOSYS: a kernel that
opens directories itself caches their listings across opens, and the FUSE root's changes as
layers come and go). FLUSH is answered ENOSYS (sent no more). FORGET needs no answer (inodes
are computed, not allocated), INTERRUPT is ignored (every request ends on its own).

`FsError`s become errnos through ONE table (`ERRNO_TABLE`, most specific class first,
`errno_for`); any other exception is logged once here, with the layer the request touched,
and answered EIO (`fuse_error`), so no exception ever ends the server.

Caching: layer inodes are immutable, so entries and attributes get long timeouts and symlink
targets stay in the page cache (`CACHE_SYMLINKS`); the FUSE root, state directory and status
file (whose contents change) get zero timeouts, and the status file's mtime is the time it is
asked for, so the kernel drops its pages before each read (`AUTO_INVAL_DATA`). The mount's
read-ahead window (`/sys/class/bdi/<dev>/read_ahead_kb`, 128 KiB for a new FUSE mount, which
the INIT reply can only lower) is raised to `READ_AHEAD_KB` after INIT, so a sequential reader
keeps several 1 MiB READs in flight and spans inflate in parallel.

Connections (`snapshotter.fs.connection`) are mounted by this package: a fresh one is answered
INIT here; an adopted one (kept by the fd keeper across a restart) was answered by the previous
process, so the server only takes over the negotiated protocol from the stored INIT and asks
the kernel to resend the requests the previous process read but never answered. READs are
answered by the request's inode (`LayerHost`), so nothing per open file is lost with the
process; the backing ids of passed-through files are kept in a journal for the next one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import subprocess
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import trio

from snapshotter.fs import protocol as p
from snapshotter.fs.connection import KeptConnection, discard, mount_new
from snapshotter.fs.errors import (
    BadHandle,
    FsError,
    IsADirectory,
    LayerExists,
    LayerReadError,
    NoSuchAttribute,
    NotADirectory,
    NotASymlink,
    NotFound,
    PermissionDenied,
    ReadOnly,
    TreeBuildError,
)
from snapshotter.fs.host import LayerHost
from snapshotter.fs.inodes import FUSE_ROOT_INODE
from snapshotter.fs.passthrough import Passthrough, PassthroughConfig, discard_journal
from snapshotter.fs.push import DEFAULT_PUSH_BYTES, Pusher
from snapshotter.fs.readers import LayerReader
from snapshotter.fs.tree import Attr, LayerTree
from snapshotter.mountinfo import is_mountpoint, mount_at

log = logging.getLogger(__name__)

LONG_TIMEOUT_S: Final = 3600.0
"""Entry and attribute timeout of layer inodes, in seconds (layers never change)."""

ERRNO_TABLE: Final[tuple[tuple[type[FsError], int], ...]] = (
    (NotFound, errno.ENOENT),
    (NotADirectory, errno.ENOTDIR),
    (IsADirectory, errno.EISDIR),
    (NotASymlink, errno.EINVAL),
    (NoSuchAttribute, errno.ENODATA),
    (ReadOnly, errno.EROFS),
    (PermissionDenied, errno.EACCES),
    (BadHandle, errno.EBADF),
    (LayerExists, errno.EEXIST),
    (LayerReadError, errno.EIO),
    (TreeBuildError, errno.EIO),
    (FsError, errno.EIO),
)
"""Domain error → errno, most specific class first. Anything not listed is EIO."""

MOUNT_OPTIONS: Final = frozenset(
    {
        "fsname=sociable",
        "subtype=sociable",
        "ro",
        # overlayfs and containerd run as root, but pods may not: let others see the mount...
        "allow_other",
        # ...and let the kernel check mode bits, so a root-owned 0700 directory inside a layer
        # stays closed to other users who look at the FUSE mount directly.
        "default_permissions",
    }
)


READ_AHEAD_KB: Final = 1024
"""Read-ahead window of the mount in KiB (cold sequential reads: 1.5x over the default 128)."""


def set_read_ahead(mountpoint: Path, kb: int) -> bool:
    """Set the read-ahead window of the mount at `mountpoint` to `kb` KiB (needs root).

    Returns False, logged, when the device or its bdi cannot be found or written; the mount
    works either way (only cold sequential reads are slower).
    """
    path = Path("/sys/class/bdi/?/read_ahead_kb")
    try:
        mount = mount_at(mountpoint)
        if mount is None:
            raise FileNotFoundError(f"no mount at {mountpoint} in /proc/self/mountinfo")
        path = Path(f"/sys/class/bdi/{mount.device}/read_ahead_kb")
        path.write_text(f"{kb}\n")
    except OSError as e:
        log.warning("cannot set read-ahead of %s to %d KiB (%s): %s", mountpoint, kb, path, e)
        return False
    return True


def errno_for(exc: BaseException) -> int:
    """The errno a FUSE request failing with `exc` answers: `ERRNO_TABLE`, else EIO."""
    for cls, code in ERRNO_TABLE:
        if isinstance(exc, cls):
            return code
    return errno.EIO


_QUIET: Final = frozenset({errno.ENOENT, errno.ENODATA})

EIO_LOG_INTERVAL_SEC: Final = 10.0
"""A layer's EIO warnings are logged at most once per this many seconds, with the number of
failures left out since; a container reading thousands of files while every source fails
(credentials rejected, registry down) must not flood the log."""

MAX_LOGGED_LAYERS: Final = 1024


class _EioLog:
    """Rate-limits the EIO warning line per layer (see `EIO_LOG_INTERVAL_SEC`)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, op: str, layer: str, exc: Exception) -> None:
        now = self._clock()
        last, suppressed = self._last.get(layer, (-EIO_LOG_INTERVAL_SEC, 0))
        if now - last < EIO_LOG_INTERVAL_SEC:
            self._last[layer] = (last, suppressed + 1)
            return
        if len(self._last) >= MAX_LOGGED_LAYERS and layer not in self._last:
            self._last.clear()
        self._last[layer] = (now, 0)
        if suppressed:
            log.warning(
                "fuse %s failed in %s: %s (and %d more failures in this layer since the last line)",
                op,
                layer,
                exc,
                suppressed,
            )
        else:
            log.warning("fuse %s failed in %s: %s", op, layer, exc)


_EIO_LOGS: Final[weakref.WeakKeyDictionary[LayerHost, _EioLog]] = weakref.WeakKeyDictionary()
"""One rate limiter per mounted host (each daemon has one; tests make many)."""


class FuseError(Exception):
    """A request's answer is errno `errno` (raised by handlers, answered by the server)."""

    def __init__(self, code: int) -> None:
        super().__init__(os.strerror(code))
        self.errno = code


def fuse_error(op: str, exc: Exception, layer: str, eio_log: _EioLog | None = None) -> FuseError:
    """The `FuseError` a request `op` failing with `exc` answers, logged once here.

    `layer` names what the request touched (`LayerHost.describe`). Domain errors get
    `errno_for(exc)`: EIO ones are logged as warnings (at most one line per layer every
    `EIO_LOG_INTERVAL_SEC`, counting the rest), the others at debug level (ENOENT and
    ENODATA, the common answers to lookups and xattr probes, not at all). Any other exception
    is a bug: logged with its traceback, answered EIO.
    """
    if isinstance(exc, FsError):
        code = errno_for(exc)
        if code == errno.EIO:
            if eio_log is None:
                log.warning("fuse %s failed in %s: %s", op, layer, exc)
            else:
                eio_log(op, layer, exc)
        elif code not in _QUIET:
            log.debug("fuse %s in %s: %s", op, layer, exc)
        return FuseError(code)
    log.error("fuse %s: unexpected error in %s, answering EIO", op, layer, exc_info=exc)
    return FuseError(errno.EIO)


class FuseOpRecorder(Protocol):
    """Where the boundary records one operation's answers (`snapshotter.metrics`)."""

    def done(self, seconds: float) -> None:
        """The op answered after `seconds`."""
        ...

    def failed(self, seconds: float, code: int) -> None:
        """The op answered errno `code` after `seconds`."""
        ...


class FuseMetrics(Protocol):
    """Gives the recorder of each op; asked once per op when the adapter is built."""

    def fuse_op(self, op: str) -> FuseOpRecorder: ...


FUSE_OPS: Final = (
    "lookup",
    "forget",
    "getattr",
    "readlink",
    "open",
    "read",
    "flush",
    "release",
    "opendir",
    "readdir",
    "releasedir",
    "statfs",
    "getxattr",
    "listxattr",
    "access",
)
"""The requests the server counts (`FuseOpStats`) and records (metrics), by handler name:
`readdir` answers READDIR and READDIRPLUS, `forget` FORGET and BATCH_FORGET; `open` and
`flush` are answered ENOSYS (the kernel sends each once per connection), `release` only comes
for files a previous process opened."""


def _attr_bytes(attr: Attr) -> bytes:
    return p.attr_bytes(
        attr.inode,
        attr.mode,
        attr.nlink,
        attr.uid,
        attr.gid,
        attr.rdev,
        attr.size,
        attr.blocks,
        attr.blksize,
        attr.mtime_ns,
    )


def _timeout(attr: Attr) -> float:
    """How long the kernel may cache `attr` (and its entry): layers never change."""
    return LONG_TIMEOUT_S if attr.cacheable else 0.0


def entry_out(attr: Attr) -> bytes:
    """`attr` as a fuse_entry_out with the timeouts its cacheability allows."""
    return p.entry_out(attr.inode, _attr_bytes(attr), _timeout(attr))


def attr_out(attr: Attr) -> bytes:
    """`attr` as a fuse_attr_out with the timeout its cacheability allows."""
    return p.attr_out(_attr_bytes(attr), _timeout(attr))


def _groups(pid: int) -> tuple[int, ...]:
    """The supplementary groups of process `pid` (none when it is gone)."""
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"Groups:"):
                return tuple(int(g) for g in line.split()[1:])
    return ()


def _sized(data: bytes, size: int) -> bytes:
    """The answer to an xattr request for `data` with buffer `size` (0: only the length)."""
    if size == 0:
        return p.GETXATTR_OUT.pack(len(data), 0)
    if len(data) > size:
        raise FuseError(errno.ERANGE)
    return data


Handler = Callable[[int, memoryview], bytes | None]


class FuseOperations:
    """The request handlers over a `LayerHost` (read-only: no write handlers).

    `handle` answers one request other than READ and INIT (a whole request as the kernel
    wrote it; returns the whole reply, None for requests that get none); `read` answers a
    READ. Each handler takes the request's inode and body and returns the reply's payload.
    """

    def __init__(self, host: LayerHost, metrics: FuseMetrics | None = None) -> None:
        self.host = host
        self.passthrough: Passthrough | None = None  # set once INIT negotiated it
        self._records: dict[str, FuseOpRecorder] = (
            {op: metrics.fuse_op(op) for op in FUSE_OPS} if metrics is not None else {}
        )
        self._eio_log = _EIO_LOGS.setdefault(host, _EioLog())
        self._caller = (0, 0, 0)
        self._handlers: dict[int, tuple[str, Handler]] = {
            p.LOOKUP: ("lookup", self.lookup),
            p.FORGET: ("forget", self.forget),
            p.BATCH_FORGET: ("forget", self.forget),
            p.GETATTR: ("getattr", self.getattr),
            p.READLINK: ("readlink", self.readlink),
            p.OPEN: ("open", self.open),
            p.FLUSH: ("flush", self.flush),
            p.RELEASE: ("release", self.release),
            p.OPENDIR: ("opendir", self.opendir),
            p.READDIR: ("readdir", self.readdir),
            p.READDIRPLUS: ("readdir", self.readdirplus),
            p.RELEASEDIR: ("releasedir", self.releasedir),
            p.STATFS: ("statfs", self.statfs),
            p.GETXATTR: ("getxattr", self.getxattr),
            p.LISTXATTR: ("listxattr", self.listxattr),
            p.ACCESS: ("access", self.access),
        }

    def handle(self, request: bytes | memoryview) -> bytes | None:
        """The reply to `request` (not a READ): ENOSYS for what no handler answers, nothing
        for FORGET, BATCH_FORGET and INTERRUPT."""
        length, opcode, unique, nodeid, uid, gid, pid, _, _ = p.IN_HEADER.unpack_from(request)
        entry = self._handlers.get(opcode)
        if entry is None:
            return None if opcode == p.INTERRUPT else p.error_reply(unique, errno.ENOSYS)
        op, handler = entry
        record = self._records.get(op)
        t0 = time.perf_counter() if record is not None else 0.0
        cpu0 = time.thread_time_ns()
        self._caller = (uid, gid, pid)
        code = 0
        try:
            payload = handler(nodeid, memoryview(request)[p.IN_HEADER.size : length])
        except Exception as e:
            code = self._failed(op, e, nodeid)
        FUSE_OP_STATS.count(op, time.thread_time_ns() - cpu0)
        if record is not None:
            if code:
                record.failed(time.perf_counter() - t0, code)
            else:
                record.done(time.perf_counter() - t0)
        if code:
            return p.error_reply(unique, code)
        return None if payload is None else p.reply(unique, payload)

    def _failed(self, op: str, exc: Exception, inode: int) -> int:
        """The errno a request failing with `exc` answers (`fuse_error` logs it)."""
        if isinstance(exc, FuseError):
            return exc.errno
        return fuse_error(op, exc, self.host.describe(inode=inode), self._eio_log).errno

    def read_now(self, request: bytes | memoryview) -> list[bytes] | None:
        """The reply to a READ request whose bytes the layer has at hand (`LayerHost.
        read_now`), as buffers to write together; None when `read` must answer it."""
        _, _, unique, nodeid, *_ = p.IN_HEADER.unpack_from(request)
        _fh, offset, size, *_ = p.READ_IN.unpack_from(request, p.IN_HEADER.size)
        record = self._records.get("read")
        t0 = time.perf_counter() if record is not None else 0.0
        cpu0 = time.thread_time_ns()
        try:
            data = self.host.read_now(nodeid, offset, size)
        except Exception:  # `read` answers it, through the error table, and logs it
            return None
        if data is None:
            return None
        FUSE_OP_STATS.count("read", time.thread_time_ns() - cpu0)
        if record is not None:
            record.done(time.perf_counter() - t0)
        return [p.OUT_HEADER.pack(p.OUT_HEADER.size + len(data), 0, unique), data]

    async def read(self, request: bytes) -> list[bytes]:
        """The reply to a READ request, as buffers to write together."""
        _, _, unique, nodeid, *_ = p.IN_HEADER.unpack_from(request)
        _fh, offset, size, *_ = p.READ_IN.unpack_from(request, p.IN_HEADER.size)
        record = self._records.get("read")
        t0 = time.perf_counter() if record is not None else 0.0
        task = FUSE_OP_STATS.enter("read")
        try:
            data = await self.host.read(nodeid, offset, size)
        except Exception as e:
            code = self._failed("read", e, nodeid)
            if record is not None:
                record.failed(time.perf_counter() - t0, code)
            return [p.error_reply(unique, code)]
        finally:
            FUSE_OP_STATS.exit("read", task)
        if record is not None:
            record.done(time.perf_counter() - t0)
        return [p.OUT_HEADER.pack(p.OUT_HEADER.size + len(data), 0, unique), data]

    # -- handlers: (inode, body) -> payload -----------------------------------------------

    def lookup(self, inode: int, body: memoryview) -> bytes:
        try:
            attr = self.host.lookup(inode, p.cstring(body))
        except NotFound:
            # The common miss (overlayfs and path searches probe names): answered at once,
            # without the error table and the description of the inode.
            raise FuseError(errno.ENOENT) from None
        return entry_out(attr)

    def forget(self, inode: int, body: memoryview) -> None:
        # Inodes are computed, not allocated: nothing to free, nothing to answer.
        return None

    def getattr(self, inode: int, body: memoryview) -> bytes:
        return attr_out(self.host.getattr(inode))

    def readlink(self, inode: int, body: memoryview) -> bytes:
        return self.host.readlink(inode)

    def open(self, inode: int, body: memoryview) -> bytes:
        if self.passthrough is None:
            # The kernel opens files without asking from now on (see the module doc).
            raise FuseError(errno.ENOSYS)
        return self.passthrough.open(inode)

    def flush(self, inode: int, body: memoryview) -> bytes:
        raise FuseError(errno.ENOSYS)

    def release(self, inode: int, body: memoryview) -> bytes:
        if self.passthrough is not None:
            self.passthrough.release(inode, body)
        return b""  # handles are inode numbers: nothing to free

    def opendir(self, inode: int, body: memoryview) -> bytes:
        return p.OPEN_OUT.pack(self.host.opendir(inode), 0, 0)

    def _listing(self, inode: int, body: memoryview, plus: bool) -> bytes:
        # By the request's inode (a directory's handle is its inode number anyway).
        _, offset, size, *_ = p.READ_IN.unpack_from(body)
        out: list[bytes] = []
        used = 0
        for item in self.host.readdir(inode, offset):
            attr = item.attr
            row = p.dirent(attr.inode, item.next_offset, attr.mode, item.name)
            if plus:
                row = entry_out(attr) + row
            if used + len(row) > size:
                break
            out.append(row)
            used += len(row)
        return b"".join(out)

    def readdir(self, inode: int, body: memoryview) -> bytes:
        return self._listing(inode, body, plus=False)

    def readdirplus(self, inode: int, body: memoryview) -> bytes:
        return self._listing(inode, body, plus=True)

    def releasedir(self, inode: int, body: memoryview) -> bytes:
        self.host.releasedir(int.from_bytes(body[:8], "little"))
        return b""

    def statfs(self, inode: int, body: memoryview) -> bytes:
        stats = self.host.statfs()
        return p.kstatfs(
            blocks=stats.blocks, files=stats.files, bsize=stats.block_size, namelen=stats.name_max
        )

    def getxattr(self, inode: int, body: memoryview) -> bytes:
        size, _ = p.GETXATTR_IN.unpack_from(body)
        name = p.cstring(body, p.GETXATTR_IN.size)
        # Most inodes have no xattrs, and overlayfs asks its lowers for trusted.overlay.*
        # on lookups: answer a miss without a domain exception and its message.
        if name not in self.host.listxattr(inode):
            raise FuseError(errno.ENODATA)
        return _sized(self.host.getxattr(inode, name), size)

    def listxattr(self, inode: int, body: memoryview) -> bytes:
        size, _ = p.GETXATTR_IN.unpack_from(body)
        return _sized(b"".join(name + b"\0" for name in self.host.listxattr(inode)), size)

    def access(self, inode: int, body: memoryview) -> bytes:
        mask, _ = p.ACCESS_IN.unpack_from(body)
        uid, gid, pid = self._caller
        self.host.access(inode, mask, uid, (gid, *_groups(pid)))
        return b""


@dataclass(frozen=True, slots=True)
class FuseOpStatistics:
    """Requests answered per handler since the process started, and the trio thread's CPU
    time spent running them, in seconds (handlers that await count only their own steps);
    `trio_thread_cpu_sec`: all the CPU time of the thread that serves the requests (the
    server's own work around each request and every other trio task included; 0 before a
    request)."""

    counts: Mapping[str, int]
    cpu_sec: Mapping[str, float]
    trio_thread_cpu_sec: float = 0.0

    def to_status(self) -> dict[str, dict[str, float]]:
        """`{op: {"count": n, "cpuSec": s}}` for the handlers that ran, for `status.json`."""
        return {
            op: {"count": n, "cpuSec": round(self.cpu_sec.get(op, 0.0), 4)}
            for op, n in sorted(self.counts.items())
        }


class FuseOpStats(trio.abc.Instrument):
    """Counts FUSE requests per handler and the trio thread's CPU time spent in them.

    A counted handler costs two reads of the thread's CPU clock and a few dict updates. The
    CPU time of a handler that awaits (a read waiting for its spans) is the sum of its own
    task steps: this object is also a trio instrument with one hook, added to the running
    trio loop by the first request, that times a step of a task inside a handler up to the
    start of the next task step (the scheduler's work in between is counted with it); the
    steps of other tasks cost a dict lookup each.
    """

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._cpu_ns: dict[str, int] = {}
        self._active: dict[object, str] = {}
        self._step_start_ns = 0
        self._running: str | None = None  # the handler whose task step runs now
        self._token: object = None
        self._trio_clock: int | None = None

    def __repr__(self) -> str:
        return f"<FuseOpStats requests={sum(self._counts.values())}>"

    def statistics(self) -> FuseOpStatistics:
        trio_cpu = 0.0
        if self._trio_clock is not None:
            with contextlib.suppress(OSError):  # the thread is gone
                trio_cpu = time.clock_gettime(self._trio_clock)
        return FuseOpStatistics(
            counts=dict(self._counts),
            cpu_sec={op: ns / 1e9 for op, ns in self._cpu_ns.items()},
            trio_thread_cpu_sec=trio_cpu,
        )

    def count(self, op: str, cpu_ns: int, n: int = 1) -> None:
        """`n` requests for handler `op` were answered without awaiting, in `cpu_ns` of CPU
        (op "push": `n` files pushed, `snapshotter.fs.push`)."""
        self._counts[op] = self._counts.get(op, 0) + n
        self._cpu_ns[op] = self._cpu_ns.get(op, 0) + cpu_ns
        if self._trio_clock is None:
            with contextlib.suppress(RuntimeError):
                self._trio_clock = time.pthread_getcpuclockid(threading.get_ident())

    def enter(self, op: str) -> object:
        """A request for handler `op` starts in the current task; returns the task."""
        token = trio.lowlevel.current_trio_token()
        if token is not self._token:
            self._token = token
            trio.lowlevel.add_instrument(self)
            self._trio_clock = time.pthread_getcpuclockid(threading.get_ident())
        task = trio.lowlevel.current_task()
        self._counts[op] = self._counts.get(op, 0) + 1
        self._active[task] = op
        self._running = op
        self._step_start_ns = time.thread_time_ns()
        return task

    def exit(self, op: str, task: object) -> None:
        """The request `enter` returned `task` for is answered."""
        self._cpu_ns[op] = self._cpu_ns.get(op, 0) + time.thread_time_ns() - self._step_start_ns
        del self._active[task]
        self._running = None

    def before_task_step(self, task: object) -> None:
        op = self._active.get(task)
        running = self._running
        if op is None and running is None:
            return
        now = time.thread_time_ns()
        if running is not None:
            self._cpu_ns[running] = self._cpu_ns.get(running, 0) + now - self._step_start_ns
        self._running = op
        self._step_start_ns = now


FUSE_OP_STATS: Final = FuseOpStats()
"""The process's counters (a daemon serves one FUSE connection)."""


POLL_SEC: Final = 200e-6
"""How long the request loop polls `/dev/fuse` for the next request before it sleeps in trio's
epoll, while requests come back to back (the last one came within this time of the answer
before it: a reader working through files, each READ or GETXATTR waiting for the answer to
the one before). Going through epoll and the trio scheduler costs tens of microseconds a
request, as much as answering it; polling costs a `sched_yield` and a `readv` per turn, and
is never done for requests further apart (an idle or lightly used daemon sleeps at once).
Reading every file of the bench image from a warm span cache: 27.1 s without polling, 23.9 s
polling 50 us, 22.4 s 100 us, 20.8 s 200 us; the trio thread's CPU went down, not up."""

REQUESTS_PER_CHECKPOINT: Final = 32
"""Requests the reader answers in a row before it lets other tasks run (READ tasks, the
registry client): a busy connection must not starve what READs wait for."""

NOTIFY_THREADS: Final = trio.CapacityLimiter(1)
"""The worker thread that writes notifications: the kernel may hold a notification until a
request of the same directory is answered, which needs the trio thread free."""


def _write(fd: int, buffers: list[bytes]) -> None:
    """Write one reply or notification; a request the kernel gave up (interrupted, the
    connection ended) is no error."""
    try:
        os.writev(fd, buffers)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
            log.warning("fuse reply not written", extra={"error": str(e)})


async def _answer_read(
    ops: FuseOperations,
    fd: int,
    request: bytes,
    slots: trio.Semaphore,
    pusher: Pusher | None,
) -> None:
    try:
        _write(fd, await ops.read(request))
    finally:
        slots.release()
        if pusher is not None:
            pusher.read_ended(p.IN_HEADER.unpack_from(request)[3])
    if pusher is not None:
        _push_after(pusher, request)


def _push_after(pusher: Pusher, request: bytes | memoryview) -> None:
    cpu0 = time.thread_time_ns()
    files = pusher.after_read(request)
    if files:
        FUSE_OP_STATS.count("push", time.thread_time_ns() - cpu0, files)


def _read_request(fd: int, buffer: bytearray, poll_sec: float) -> int:
    """Read the next request into `buffer`, polling for up to `poll_sec` when none is there
    yet (see `POLL_SEC`); returns its length. Raises BlockingIOError when none came."""
    try:
        return os.readv(fd, [buffer])
    except BlockingIOError:
        if poll_sec <= 0:
            raise
    deadline = time.perf_counter() + poll_sec
    while True:
        os.sched_yield()  # the reader may be runnable on this CPU: let it make the request
        try:
            return os.readv(fd, [buffer])
        except BlockingIOError:
            if time.perf_counter() >= deadline:
                raise


async def _serve(ops: FuseOperations, fd: int, max_tasks: int, pusher: Pusher | None) -> None:
    """Answer requests on `fd` until the connection ends (unmounted or aborted) or the task
    is cancelled; requests read but unanswered at a cancellation are answered by nobody (a
    kept connection's next process gets them resent). After a READ, `pusher` may push the
    files that follow (`snapshotter.fs.push`)."""
    buffer = bytearray(p.READ_BUFFER_BYTES)
    view = memoryview(buffer)
    slots = trio.Semaphore(max_tasks)
    in_a_row = 0
    poll = 0.0  # POLL_SEC while requests come back to back
    answered = -math.inf  # when the last request was answered (perf_counter)
    async with trio.open_nursery() as nursery:
        if pusher is not None:
            nursery.start_soon(pusher.run)
        while True:
            try:
                n = _read_request(fd, buffer, poll)
            except BlockingIOError:
                in_a_row = 0
                await trio.lowlevel.wait_readable(fd)
                poll = POLL_SEC if time.perf_counter() - answered <= POLL_SEC else 0.0
                continue
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.EINTR):  # interrupted before it was read
                    continue
                if e.errno == errno.ENODEV:
                    log.info("fuse connection ended")
                    return
                raise
            if int.from_bytes(buffer[4:8], "little") == p.READ:
                now = ops.read_now(view[:n])
                if now is not None:
                    _write(fd, now)
                    if pusher is not None:
                        _push_after(pusher, view[:n])
                else:
                    await slots.acquire()
                    if pusher is not None:
                        pusher.read_started(p.IN_HEADER.unpack_from(buffer)[3])
                    nursery.start_soon(_answer_read, ops, fd, bytes(view[:n]), slots, pusher)
            else:
                answer = ops.handle(view[:n])
                if answer is not None:
                    _write(fd, [answer])
            answered = time.perf_counter()
            in_a_row += 1
            if in_a_row >= REQUESTS_PER_CHECKPOINT:
                in_a_row = 0
                await trio.lowlevel.checkpoint()


async def _notify(fd: int, message: bytes) -> None:
    await trio.to_thread.run_sync(_write, fd, [message], limiter=NOTIFY_THREADS)


class FuseMount:
    """A mounted host. Add and remove layers through it so the kernel's caches follow."""

    def __init__(self, mountpoint: Path, host: LayerHost) -> None:
        self.mountpoint = mountpoint
        self.host = host
        self._starter: Callable[[], Any] | None = None
        self._served_fd: int | None = None
        self._stop: Callable[[], None] | None = None
        self._nursery: trio.Nursery | None = None
        self._pusher: Pusher | None = None
        self.passthrough: Passthrough | None = None
        """The OPEN answers and backing files when the connection passes reads through."""
        self.plain: FuseMount | None = None
        """A second connection serving the same host with OPEN answered ENOSYS: no OPEN or
        RELEASE per file opened, and no passthrough. A connection answers OPEN for all its
        files or for none, and on a passthrough connection every open of every file is a
        round trip into the daemon (about 0.1 ms where waking the other CPU is slow), so
        layers of small files (`Passthrough.worth_opens`) are given out from here."""

    def __repr__(self) -> str:
        return f"<FuseMount {self.mountpoint} {self.host!r}>"

    async def start(self) -> None:
        """Begin answering requests, also on `plain` (idempotent); see `open_fuse_host`'s
        `start`."""
        if self._starter is not None:
            await self._starter()
        if self.plain is not None:
            await self.plain.start()

    def stop(self) -> None:
        """Stop answering requests now, also on `plain`: those in progress are cancelled
        unanswered (on a kept connection the next process gets them again). Idempotent."""
        if self._stop is not None:
            self._stop()
        if self._pusher is not None:
            self._pusher.close()
        if self.plain is not None:
            self.plain.stop()

    async def finish_pushes(self, timeout_sec: float = 2.0) -> None:
        """Stop pushing files into the page cache, on this connection and on `plain`, and
        wait (up to `timeout_sec` each) for a store being written (`Pusher.finish`): call it
        while requests are still answered, before `stop`."""
        for mount in (self, self.plain):
            if mount is None or mount._pusher is None:
                continue
            if not await mount._pusher.finish(timeout_sec):
                log.warning(
                    "fuse store still being written at shutdown",
                    extra={"mountpoint": str(mount.mountpoint)},
                )

    def push_statistics(self) -> dict[str, int] | None:
        """`Pusher.statistics` of this connection, None when it pushes nothing."""
        return None if self._pusher is None else self._pusher.statistics()

    @property
    def connection_fd(self) -> int | None:
        """The `/dev/fuse` fd this process serves (to hand to a keeper again; valid while the
        mount is served), None before it answers requests."""
        return self._served_fd

    def add_layer(
        self,
        name: str,
        tree: LayerTree,
        reader: LayerReader,
        *,
        slot: int | None = None,
        digest: str = "",
    ) -> Path:
        """`LayerHost.add_layer`, returning the layer's directory to give out: under this
        mountpoint, or under `plain`'s when this connection passes reads through and the
        layer is not worth an OPEN per file (`Passthrough.worth_opens`). The layer shows
        under both (one host)."""
        self.host.add_layer(name, tree, reader, slot=slot, digest=digest)
        if self.plain is not None and (
            self.passthrough is None or not self.passthrough.worth_opens(tree)
        ):
            return self.plain.mountpoint / name
        return self.mountpoint / name

    def remove_layer(self, name: str) -> None:
        """`LayerHost.remove_layer`, then drop the kernel's cached entry for the layer dir
        on this connection and on `plain` (notifications written from a worker thread)."""
        inode = self.host.layer_inode(name)
        slot = self.host.remove_layer(name)
        if self.passthrough is not None:
            self.passthrough.forget_layer(slot)
        self._forget_entry(name, inode, slot)
        if self.plain is not None:
            self.plain._forget_entry(name, inode, slot)

    def _forget_entry(self, name: str, inode: int, slot: int) -> None:
        if self._pusher is not None:
            self._pusher.forget_layer(slot)
        if self._nursery is not None and self._served_fd is not None:
            message = p.delete_notification(
                FUSE_ROOT_INODE, inode, name.encode("utf-8", "surrogateescape")
            )
            self._nursery.start_soon(_notify, self._served_fd, message)


@asynccontextmanager
async def open_fuse_host(
    mountpoint: Path,
    host: LayerHost,
    *,
    extra_options: frozenset[str] = frozenset(),
    max_tasks: int = 64,
    read_ahead_kb: int = READ_AHEAD_KB,
    metrics: FuseMetrics | None = None,
    connection: KeptConnection | None = None,
    start: bool = True,
    passthrough: PassthroughConfig | None = None,
    push_bytes: int = DEFAULT_PUSH_BYTES,
) -> AsyncIterator[FuseMount]:
    """Serve `host` at `mountpoint` until the block exits.

    Without `connection` it mounts a new FUSE connection there and unmounts it on exit. With
    `connection` (already mounted at `mountpoint`, see `snapshotter.fs.connection`) it serves
    that connection instead, takes ownership of its fd and on exit only stops serving: the
    mount stays (whoever keeps the connection decides its fate). `start=False` answers
    nothing until `FuseMount.start()` (a restarted daemon first puts its layers back).

    `passthrough`: where FUSE passthrough keeps its copies and id journal, and whether to ask
    the kernel for it on a fresh connection (`snapshotter.fs.passthrough`); an adopted
    connection with a journal is answered from it either way.

    `read_ahead_kb` (0 = leave the kernel default) is applied with `set_read_ahead` once INIT
    is answered. `metrics`: where every request's latency and errno are recorded (None:
    nowhere). `max_tasks`: READs answered at once. `push_bytes`: bytes of the small files
    that follow a file pushed into the page cache when a READ starts it (0: none;
    `snapshotter.fs.push`).

    The server runs in a nursery owned by this context manager; on exit (normal, error or
    cancellation) it is cancelled.

    Raises:
        RuntimeError: the mount failed (no /dev/fuse, bad mountpoint, the kernel's INIT
            unusable); the message names the mountpoint.
    """
    ops = FuseOperations(host, metrics)
    mounted_here = connection is None
    if connection is None:
        try:
            connection = await trio.to_thread.run_sync(
                mount_new, mountpoint, MOUNT_OPTIONS | extra_options
            )
        except (OSError, ValueError) as e:
            raise RuntimeError(f"cannot mount the layer host at {mountpoint}: {e}") from e
    fd = connection.fd
    try:
        init = p.parse_init(connection.init)
        negotiated = p.negotiate(init, passthrough=passthrough is not None and passthrough.enabled)
    except ValueError as e:
        discard(fd, mountpoint if mounted_here else None)
        raise RuntimeError(f"cannot serve the layer host at {mountpoint}: {e}") from e
    os.set_blocking(fd, False)
    try:
        async with trio.open_nursery() as nursery:
            mount = FuseMount(mountpoint, host)
            started = False

            async def begin() -> None:
                nonlocal started
                if started:
                    return
                started = True
                if passthrough is not None:
                    pt = Passthrough(host, passthrough)
                    if connection.adopted:
                        # Passed through by the previous process (it left a journal): its
                        # ids answer, whatever the setting says now.
                        served_by = pt if await trio.to_thread.run_sync(pt.adopt) else None
                    elif negotiated.passthrough:
                        await trio.to_thread.run_sync(pt.clear)
                        served_by = pt
                    else:
                        if passthrough.enabled:
                            log.info("fuse passthrough: the kernel does not offer it")
                        await trio.to_thread.run_sync(discard_journal, passthrough)
                        served_by = None
                    if served_by is not None:
                        served_by.attach(fd, nursery)
                    ops.passthrough = mount.passthrough = served_by
                if connection.adopted:
                    # Answered by the previous process; ask for what it left unanswered.
                    try:
                        os.write(fd, p.resend_notification())
                    except OSError as e:  # Linux < 6.9: requests in flight at a crash hang
                        log.warning(
                            "fuse requests of the previous process not resent",
                            extra={"error": str(e)},
                        )
                else:
                    _write(fd, [p.init_reply(init, negotiated)])
                mount._served_fd = fd
                if push_bytes > 0:
                    mount._pusher = Pusher(host, fd, push_bytes)
                nursery.start_soon(_serve, ops, fd, max_tasks, mount._pusher)
                if read_ahead_kb and not connection.adopted:
                    await trio.to_thread.run_sync(set_read_ahead, mountpoint, read_ahead_kb)

            mount._starter = begin
            mount._stop = nursery.cancel_scope.cancel
            mount._nursery = nursery
            if start:
                await begin()
            try:
                yield mount
            finally:
                mount._served_fd = None
                nursery.cancel_scope.cancel()
                if mount.passthrough is not None:
                    mount.passthrough.close()
                if mount._pusher is not None:
                    mount._pusher.close()
    finally:
        discard(fd, mountpoint if mounted_here else None)


def cleanup_stale_mount(path: Path) -> bool:
    """Lazily unmount whatever is mounted at `path` (e.g. left by a crashed server).

    Tries `fusermount3 -u -z`, then `umount -l`. Returns True if something was unmounted;
    raises `OSError` if `path` stays mounted.
    """
    if not is_mountpoint(path):
        return False
    for cmd in (["fusermount3", "-u", "-z", os.fspath(path)], ["umount", "-l", os.fspath(path)]):
        try:
            subprocess.run(cmd, check=False, capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if not is_mountpoint(path):
            return True
    raise OSError(errno.EBUSY, f"{path} is still mounted after fusermount3 -u -z and umount -l")
