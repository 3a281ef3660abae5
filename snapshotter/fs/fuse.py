"""A thin pyfuse3 adapter over `LayerHost`: it translates calls and errors, nothing more.

Every handler calls one host method. `FsError`s become `pyfuse3.FUSEError(errno)` through ONE
table (`ERRNO_TABLE`, most specific class first, `errno_for`); any other exception is logged
once here, with the layer the request touched, and becomes EIO (`fuse_error`), so no exception
ever escapes into pyfuse3's main loop (which would end it).

Caching: layer inodes are immutable, so entries and attributes get long
timeouts and files open with `keep_cache`; the FUSE root, state directory and status file
(whose contents change) get zero timeouts and direct I/O. The mount's read-ahead window
(`/sys/class/bdi/<dev>/read_ahead_kb`, 128 KiB for a new FUSE mount, which the FUSE init reply
can only lower) is raised to `READ_AHEAD_KB` after mounting, so a sequential reader keeps
several 128 KiB FUSE reads in flight and spans inflate in parallel.

Kept connections (`snapshotter.fs.connection`): given a `KeptConnection`, `open_fuse_host`
does not mount; libfuse reads the connection's INIT from one end of a socket pair and
`FuseOperations.init` then swaps the connection's `/dev/fuse` fd into that place, so a
connection that outlives this process (held by the fd keeper) is served again after a
restart. Handles are inode numbers (`LayerHost`), so nothing per open file is lost with the
process; `flush` is left unimplemented (ENOSYS, so the kernel stops sending it).

pyfuse3 keeps its session in module globals: one mount per process.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import pyfuse3
import trio

from snapshotter.fs.connection import KeptConnection, resend_notification
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


def fuse_error(op: str, exc: Exception, layer: str, eio_log: _EioLog | None = None) -> Any:
    """The `pyfuse3.FUSEError` a request `op` failing with `exc` answers, logged once here.

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
        return pyfuse3.FUSEError(code)
    log.error("fuse %s: unexpected error in %s, answering EIO", op, layer, exc_info=exc)
    return pyfuse3.FUSEError(errno.EIO)


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
"""The handlers of `FuseOperations` (pyfuse3's names): `FuseOpStats` counts every one, the
metrics record those that answer through `_translated` (`readdir` answers the kernel's
READDIRPLUS, the only listing request pyfuse3 registers; `forget` also BATCH_FORGET; `flush`
is pyfuse3's default answer)."""


@contextmanager
def _translated(
    op: str,
    host: LayerHost,
    *,
    inode: int | None = None,
    fh: int | None = None,
    record: FuseOpRecorder | None = None,
) -> Iterator[None]:
    """The error boundary of one request: everything but `FUSEError` goes through
    `fuse_error`; nothing else escapes into pyfuse3's main loop. With `record`, the
    request's latency and errno are recorded."""
    t0 = time.perf_counter() if record is not None else 0.0
    try:
        yield
    except pyfuse3.FUSEError as e:
        if record is not None:
            record.failed(time.perf_counter() - t0, e.errno)
        raise
    except Exception as e:
        eio_log = _EIO_LOGS.setdefault(host, _EioLog())
        error = fuse_error(op, e, host.describe(inode=inode, fh=fh), eio_log)
        if record is not None:
            record.failed(time.perf_counter() - t0, error.errno)
        raise error from e
    if record is not None:
        record.done(time.perf_counter() - t0)


def entry_attributes(attr: Attr) -> Any:
    """`attr` as a `pyfuse3.EntryAttributes` with the timeouts its cacheability allows."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = attr.inode
    entry.generation = 0
    timeout = LONG_TIMEOUT_S if attr.cacheable else 0.0
    entry.entry_timeout = timeout
    entry.attr_timeout = timeout
    entry.st_mode = attr.mode
    entry.st_nlink = attr.nlink
    entry.st_uid = attr.uid
    entry.st_gid = attr.gid
    entry.st_rdev = attr.rdev
    entry.st_size = attr.size
    entry.st_blksize = attr.blksize
    entry.st_blocks = attr.blocks
    entry.st_atime_ns = 0
    entry.st_ctime_ns = 0
    entry.st_mtime_ns = attr.mtime_ns
    return entry


class FuseOperations(pyfuse3.Operations):  # type: ignore[misc]
    """pyfuse3 handlers delegating to a `LayerHost` (read-only; no write handlers)."""

    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, host: LayerHost, metrics: FuseMetrics | None = None) -> None:
        super().__init__()
        self.host = host
        self._records: dict[str, FuseOpRecorder] = (
            {op: metrics.fuse_op(op) for op in FUSE_OPS} if metrics is not None else {}
        )

    def _boundary(
        self, op: str, *, inode: int | None = None, fh: int | None = None
    ) -> AbstractContextManager[None]:
        """The boundary (`_translated`) of one `op` request, recorded when metrics are on."""
        return _translated(op, self.host, inode=inode, fh=fh, record=self._records.get(op))

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        with self._boundary("lookup", inode=parent_inode):
            try:
                attr = self.host.lookup(parent_inode, name)
            except NotFound:
                # The common miss (overlayfs and path searches probe names): answered at
                # once, without the error table and the description of the inode.
                raise pyfuse3.FUSEError(errno.ENOENT) from None
            return entry_attributes(attr)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Inodes are computed, not allocated: nothing to free.
        return None

    takeover: tuple[int, int, bool] | None = None
    """(libfuse's fd, the kept connection's `/dev/fuse` fd, resend) until `init` swaps them."""
    initialized = False

    def init(self) -> None:
        """libfuse's INIT handler, called before the INIT reply is written. Serving a kept
        connection, it puts the connection's `/dev/fuse` fd in the place of the socket libfuse
        read the INIT from (so the reply and every later request use the connection) and,
        for an adopted connection, asks the kernel to resend the requests the previous
        process read but never answered. Never raises (pyfuse3 requires it)."""
        takeover, self.takeover = self.takeover, None
        if takeover is not None:
            target, fuse_fd, resend = takeover
            try:
                os.dup2(fuse_fd, target, inheritable=False)
                os.close(fuse_fd)
            except OSError as e:
                log.error("fuse connection takeover failed", extra={"error": str(e)})
            else:
                if resend:
                    try:
                        os.write(target, resend_notification())
                    except OSError as e:  # Linux < 6.9: requests in flight at a crash hang
                        log.warning(
                            "fuse requests of the previous process not resent",
                            extra={"error": str(e)},
                        )
        self.initialized = True

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        with self._boundary("getattr", inode=inode):
            return entry_attributes(self.host.getattr(inode))

    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        with self._boundary("readlink", inode=inode):
            return self.host.readlink(inode)

    async def opendir(self, inode: int, ctx: Any = None) -> int:
        with self._boundary("opendir", inode=inode):
            return self.host.opendir(inode)

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        with self._boundary("readdir", fh=fh):
            for item in self.host.readdir(fh, start_id):
                if not pyfuse3.readdir_reply(
                    token, item.name, entry_attributes(item.attr), item.next_offset
                ):
                    break

    async def releasedir(self, fh: int) -> None:
        with self._boundary("releasedir", fh=fh):
            self.host.releasedir(fh)

    async def open(self, inode: int, flags: int, ctx: Any = None) -> Any:
        with self._boundary("open", inode=inode):
            result = self.host.open(inode, flags)
            return pyfuse3.FileInfo(
                fh=result.fh, keep_cache=result.cacheable, direct_io=not result.cacheable
            )

    async def read(self, fh: int, off: int, size: int) -> bytes:
        with self._boundary("read", fh=fh):
            return await self.host.read(fh, off, size)

    async def release(self, fh: int) -> None:
        with self._boundary("release", fh=fh):
            self.host.release(fh)

    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        with self._boundary("getxattr", inode=inode):
            # Most inodes have no xattrs, and overlayfs asks its lowers for trusted.overlay.*
            # on lookups: answer a miss without a domain exception and its message.
            if name not in self.host.listxattr(inode):
                raise pyfuse3.FUSEError(errno.ENODATA)
            return self.host.getxattr(inode, name)

    async def listxattr(self, inode: int, ctx: Any = None) -> Sequence[bytes]:
        with self._boundary("listxattr", inode=inode):
            return list(self.host.listxattr(inode))

    async def statfs(self, ctx: Any = None) -> Any:
        with self._boundary("statfs"):
            stats = self.host.statfs()
            data = pyfuse3.StatvfsData()
            data.f_bsize = stats.block_size
            data.f_frsize = stats.block_size
            data.f_blocks = stats.blocks
            data.f_bfree = 0
            data.f_bavail = 0
            data.f_files = stats.files
            data.f_ffree = 0
            data.f_favail = 0
            data.f_namemax = stats.name_max
            return data

    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        with self._boundary("access", inode=inode):
            try:
                groups = tuple(pyfuse3.get_sup_groups(ctx.pid))
            except OSError:  # the caller may be gone already
                groups = ()
            self.host.access(inode, mode, ctx.uid, (ctx.gid, *groups))
            return True


@dataclass(frozen=True, slots=True)
class FuseOpStatistics:
    """Requests answered per handler since the process started, and the trio thread's CPU
    time spent running them, in seconds (handlers that await count only their own steps);
    `trio_thread_cpu_sec`: all the CPU time of the thread that serves the requests (pyfuse3's
    own work around each request and every other trio task included; 0 before a request)."""

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
"""The process's counters (pyfuse3 serves one mount per process)."""


def _counted(op: str, handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(handler)
    async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        task = FUSE_OP_STATS.enter(op)
        try:
            return await handler(self, *args, **kwargs)
        finally:
            FUSE_OP_STATS.exit(op, task)

    return counted


for _op in FUSE_OPS:
    setattr(FuseOperations, _op, _counted(_op, getattr(FuseOperations, _op)))


class FuseMount:
    """A mounted host. Add and remove layers through it so the kernel's caches follow."""

    def __init__(self, mountpoint: Path, host: LayerHost) -> None:
        self.mountpoint = mountpoint
        self.host = host
        self._starter: Callable[[], Awaitable[None]] | None = None
        self._ops: FuseOperations | None = None
        self._served_fd: int | None = None
        self._stop: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"<FuseMount {self.mountpoint} {self.host!r}>"

    async def start(self) -> None:
        """Begin answering requests (idempotent); see `open_fuse_host`'s `start`."""
        if self._starter is not None:
            await self._starter()

    def stop(self) -> None:
        """Stop answering requests now: those in progress are cancelled unanswered (on a
        kept connection the next process gets them again). Idempotent."""
        if self._stop is not None:
            self._stop()

    @property
    def connection_fd(self) -> int | None:
        """The kept connection's `/dev/fuse` fd this process serves (to hand to a keeper
        again; valid while the mount is served), None before INIT or without a kept
        connection."""
        if self._ops is None or not self._ops.initialized:
            return None
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
        """`LayerHost.add_layer`, returning the layer's directory under the mountpoint."""
        self.host.add_layer(name, tree, reader, slot=slot, digest=digest)
        return self.mountpoint / name

    def remove_layer(self, name: str) -> None:
        """`LayerHost.remove_layer`, then drop the kernel's cached entry for the layer dir."""
        inode = self.host.layer_inode(name)
        self.host.remove_layer(name)
        pyfuse3.invalidate_entry_async(
            pyfuse3.ROOT_INODE, name.encode("utf-8", "surrogateescape"), inode, True
        )


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
) -> AsyncIterator[FuseMount]:
    """Mount `host` at `mountpoint` and serve it until the block exits; always unmount.

    With `connection` (already mounted at `mountpoint`, see `snapshotter.fs.connection`) it
    serves that connection instead, takes ownership of its fd and on exit only stops serving:
    the mount stays (whoever keeps the connection decides its fate). `start=False` answers
    nothing until `FuseMount.start()` (a restarted daemon first puts its layers back).

    `read_ahead_kb` (0 = leave the kernel default) is applied with `set_read_ahead`.
    `metrics`: where every request's latency and errno are recorded (None: nowhere).

    The pyfuse3 main loop runs in a nursery owned by this context manager; on exit (normal,
    error or cancellation) it is cancelled and the filesystem unmounted with
    `pyfuse3.close(unmount=True)`. Only one mount can exist per process.

    Raises:
        RuntimeError: pyfuse3 cannot mount (no /dev/fuse, bad mountpoint, already mounted in
            this process); the message names the mountpoint.
    """
    ops = FuseOperations(host, metrics)
    target = os.fspath(mountpoint)
    served_fd: int | None = None
    if connection is not None:
        # libfuse takes `/dev/fd/N` as an fd to serve, not a place to mount.
        inner, outer = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        with outer:
            outer.send(connection.init)
        ops.takeover = (inner.fileno(), connection.fd, connection.adopted)
        served_fd = inner.detach()
        target = f"/dev/fd/{served_fd}"
    try:
        pyfuse3.init(ops, target, set(MOUNT_OPTIONS | extra_options))
    except RuntimeError as e:
        if ops.takeover is not None:
            os.close(ops.takeover[0])
            os.close(ops.takeover[1])
        raise RuntimeError(f"cannot mount the layer host at {mountpoint}: {e}") from e
    try:
        async with trio.open_nursery() as nursery:
            started = False

            async def begin() -> None:
                nonlocal started
                if started:
                    return
                started = True
                nursery.start_soon(pyfuse3.main, 1, max_tasks)
                if read_ahead_kb and (connection is None or not connection.adopted):
                    # The kernel sets the window from the INIT reply: wait for it (a stat
                    # blocks until INIT is answered), then raise it.
                    with contextlib.suppress(OSError):
                        await trio.to_thread.run_sync(os.stat, mountpoint)
                    await trio.to_thread.run_sync(set_read_ahead, mountpoint, read_ahead_kb)

            mount = FuseMount(mountpoint, host)
            mount._starter = begin
            mount._ops, mount._served_fd = ops, served_fd
            mount._stop = nursery.cancel_scope.cancel
            if start:
                await begin()
            try:
                yield mount
            finally:
                nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=connection is None)
        if ops.takeover is not None:  # never served: INIT never swapped the fd in
            os.close(ops.takeover[1])


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
