"""FUSE passthrough: layer files read once are copied to local backing files, and the kernel
then serves their reads and mmaps from the backing file's page cache, without the daemon.

Why: the kernel keeps a FUSE file's pages in 4 KiB folios, so a warm sequential read through
FUSE copies from 256 folios per MiB where ext4 (and containerd's overlayfs view of an unpacked
layer) uses folios of up to 2 MiB. A passthrough file reads like the ext4 file behind it.

How (Linux 6.9 and later, `CONFIG_FUSE_PASSTHROUGH`, root): the INIT answer asks for
FUSE_PASSTHROUGH (`snapshotter.fs.protocol.negotiate`); every OPEN is answered (no no-open
protocol), one of three ways:

- **plain**: the state directory's status file: no `FOPEN_KEEP_CACHE`, so each open rereads it;
- **cached**: a layer file not copied yet: `FOPEN_KEEP_CACHE`, READs as without passthrough.
  The last RELEASE of a file of at least `min_file_bytes` that was opened and released before
  (most files are read once: a starting container, an image read through; a copy is for a
  file that comes back: another container of the image, a restarted process) starts its copy
  to `directory` in the background when its bytes are all inflated at hand
  (`LayerHost.read_local`: nothing is fetched for a copy), within `max_bytes` of disk;
- **passthrough**: a copied file: its backing file is registered with the connection
  (`FUSE_DEV_IOC_BACKING_OPEN`) at its first such open and the id answers every later open.

The kernel's rules make the answers sticky: an inode open with a backing file must be opened
with the same one, and an inode open cached cannot be opened with one. So a copy is used only
by an open while the file has no cached open, and a registered id is never changed: it stays
with the inode while its layer is mounted. When its layer goes, the id is closed and the inode
is never passed through again on this connection. Whenever those rules cannot be kept (an
inode whose id was closed is opened again, registration failing) OPEN is answered ENOSYS: the
kernel then opens every file of the connection without asking, for good, which is always
consistent (the daemon without passthrough). A restarted daemon that adopts a connection
does that from its first OPEN: it does not know which inodes the previous process passed
through.

Copies come only from bytes already verified (spans checked against their zTOC digests, the
file's tar header checked), and are removed when their layer goes and when the daemon starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from snapshotter.fs import protocol as p
from snapshotter.fs.host import LayerFile, LayerHost
from snapshotter.fs.inodes import split_inode

log = logging.getLogger(__name__)

FH_PLAIN: Final = 0
FH_CACHED: Final = 1
FH_PASSTHROUGH: Final = 2
"""OPEN answers' handles: what RELEASE must undo (READs go by inode, not handle)."""

COPY_CHUNK_BYTES: Final = 4 << 20
COPY_THREADS: Final = trio.CapacityLimiter(1)
"""The worker thread that writes backing files (one copy at a time: it is background work)."""


@dataclass(frozen=True, slots=True)
class PassthroughConfig:
    """`directory`: where backing files go (a local, unstacked filesystem); files of at least
    `min_file_bytes` are copied, within `max_bytes` of disk for all of them."""

    directory: Path
    min_file_bytes: int = 1 << 20
    max_bytes: int = 4 << 30


@dataclass(slots=True)
class _Backing:
    file: LayerFile
    path: Path
    backing_id: int = 0


class PassthroughError(Exception):
    """An OPEN this connection can no longer answer with passthrough rules intact."""


class Passthrough:
    """The OPEN and RELEASE answers of a passthrough connection, and the backing files.

    Not thread-safe: used from the trio thread (the request loop and the copy tasks).
    """

    def __init__(self, host: LayerHost, config: PassthroughConfig) -> None:
        self.host = host
        self.config = config
        self._fd = -1
        self._nursery: trio.Nursery | None = None
        self._cached: dict[int, int] = {}  # inode -> cached opens
        self._copies: dict[int, _Backing] = {}  # inode -> copied (registered or not)
        self._copying: set[int] = set()
        self._retired: set[int] = set()  # inodes whose backing id was closed
        self._read_before: dict[int, object] = {}  # inode -> layer: released once already
        self._bytes = 0
        self.off: str | None = None  # why OPEN is answered ENOSYS now
        self.copy_off: str | None = None  # why nothing more is copied
        self.opened = {"plain": 0, "cached": 0, "passthrough": 0}
        self.copied = 0

    def __repr__(self) -> str:
        return (
            f"<Passthrough copies={len(self._copies)} bytes={self._bytes} "
            f"off={self.off!r} copy_off={self.copy_off!r}>"
        )

    def clear(self) -> None:
        """Empty the backing directory (blocking: run it in a thread before `attach`). Copies
        of an earlier process are of no use: a kept connection is not passed through again
        (`adopted`), and a new one never knew their ids."""
        try:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self.config.directory)
            self.config.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._stop_copies(f"cannot empty or create {self.config.directory}: {e}")

    def attach(self, fd: int, nursery: trio.Nursery) -> None:
        """Serve connection `fd` (its INIT negotiated passthrough); copies run in `nursery`."""
        self._fd = fd
        self._nursery = nursery

    def adopted(self) -> None:
        """The connection was answered by an earlier process: never pass through on it."""
        self._turn_off("the connection was adopted from an earlier process")

    def statistics(self) -> dict[str, object]:
        """What `status.json`-style reporting shows: opens by answer, copies, bytes, state."""
        return {
            "opens": dict(self.opened),
            "copies": len(self._copies),
            "copying": len(self._copying),
            "copiedFiles": self.copied,
            "bytes": self._bytes,
            "off": self.off,
            "copyOff": self.copy_off,
        }

    # -- requests ---------------------------------------------------------------------------

    def open(self, inode: int) -> bytes:
        """The fuse_open_out for an OPEN of `inode`. Raises `PassthroughError` when the
        connection must leave passthrough for good (answer ENOSYS)."""
        if self.off is not None:
            raise PassthroughError(self.off)
        file = self.host.layer_file(inode)
        if file is None:
            self.opened["plain"] += 1
            return p.open_out(FH_PLAIN, 0)
        if inode in self._retired:
            self._turn_off(f"inode {inode} was passed through for a layer that is gone")
            raise PassthroughError(self.off or "")
        copy = self._copies.get(inode)
        if copy is not None and copy.file.layer is not file.layer:
            # A copy of a layer mounted in this slot before (its removal was not seen).
            self._drop(inode)
            if inode in self._retired:
                self._turn_off(f"inode {inode} was passed through for a layer that is gone")
                raise PassthroughError(self.off or "")
            copy = None
        if copy is not None and (copy.backing_id or not self._cached.get(inode)):
            if not copy.backing_id and not self._register(copy):
                self._drop(inode)  # tried once: it stays cached
                return self._open_cached(inode)
            self.opened["passthrough"] += 1
            return p.open_out(FH_PASSTHROUGH, p.FOPEN_PASSTHROUGH, copy.backing_id)
        return self._open_cached(inode)

    def release(self, inode: int, body: memoryview) -> None:
        """A RELEASE of `inode`: the last cached open of a file worth copying, released
        before, starts its copy."""
        fh = p.RELEASE_IN.unpack_from(body)[0]
        if fh != FH_CACHED:
            return
        left = self._cached.get(inode, 0) - 1
        if left > 0:
            self._cached[inode] = left
            return
        self._cached.pop(inode, None)
        self._maybe_copy(inode)

    def forget_layer(self, slot: int) -> None:
        """Layer `slot` was removed: close its backing ids, delete its copies."""
        for inode in [i for i in self._copies if split_inode(i)[0] == slot]:
            self._drop(inode)
        for inode in [i for i in self._read_before if split_inode(i)[0] == slot]:
            del self._read_before[inode]

    # -- inside -----------------------------------------------------------------------------

    def _open_cached(self, inode: int) -> bytes:
        self._cached[inode] = self._cached.get(inode, 0) + 1
        self.opened["cached"] += 1
        return p.open_out(FH_CACHED, p.FOPEN_KEEP_CACHE)

    def _register(self, copy: _Backing) -> bool:
        """Register `copy`'s backing file with the kernel; False (copies stop) when it
        refuses (no CAP_SYS_ADMIN, the directory on a stacked filesystem, ...)."""
        try:
            copy.backing_id = self.backing_open(copy.path)
        except OSError as e:
            self._stop_copies(f"the kernel refused a backing file ({copy.path}): {e}")
            return False
        return True

    def backing_open(self, path: Path) -> int:
        """Register `path` as a backing file of the connection; its id. Raises OSError."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            arg = bytearray(p.BACKING_MAP.pack(fd, 0, 0))
            backing_id: int = fcntl.ioctl(self._fd, p.FUSE_DEV_IOC_BACKING_OPEN, arg, True)
            return backing_id
        finally:
            os.close(fd)

    def backing_close(self, backing_id: int) -> None:
        """Forget backing id `backing_id` (files open with it keep it). Raises OSError."""
        fcntl.ioctl(self._fd, p.FUSE_DEV_IOC_BACKING_CLOSE, backing_id.to_bytes(4, "little"))

    def _drop(self, inode: int) -> None:
        copy = self._copies.pop(inode)
        self._bytes -= copy.file.size
        if copy.backing_id:
            self._retired.add(inode)
            with contextlib.suppress(OSError):  # the connection may be gone
                self.backing_close(copy.backing_id)
        with contextlib.suppress(OSError):
            copy.path.unlink()

    def _maybe_copy(self, inode: int) -> None:
        if self.copy_off is not None or self._nursery is None:
            return
        if inode in self._copies or inode in self._copying or inode in self._retired:
            return
        file = self.host.layer_file(inode)
        if file is None or file.size < self.config.min_file_bytes:
            return
        if self._read_before.get(inode) is not file.layer:
            # The first time through: most files are read once (a container starting, an
            # image read through); a copy is for a file that comes back.
            self._read_before[inode] = file.layer
            return
        if self._bytes + file.size > self.config.max_bytes:
            return
        self._copying.add(inode)
        self._bytes += file.size
        self._nursery.start_soon(self._copy, inode, file)

    async def _copy(self, inode: int, file: LayerFile) -> None:
        """Copy `file` to its backing file when every byte is local; else nothing."""
        path = self.config.directory / f"{inode:x}"
        tmp = path.with_name(path.name + ".tmp")
        kept = False
        try:
            fd = await trio.to_thread.run_sync(_create, tmp, limiter=COPY_THREADS)
            try:
                offset = 0
                started = trio.current_time()
                while offset < file.size:
                    data = await self.host.read_local(file, offset, COPY_CHUNK_BYTES)
                    if data is None:
                        log.debug(
                            "fuse passthrough: not copied, not local",
                            extra={"inode": inode, "offset": offset},
                        )
                        return  # not all local (any more): not worth a fetch
                    await trio.to_thread.run_sync(_write_at, fd, data, offset, limiter=COPY_THREADS)
                    offset += len(data)
                await trio.to_thread.run_sync(_settle, fd, limiter=COPY_THREADS)
            finally:
                os.close(fd)
            await trio.to_thread.run_sync(os.replace, tmp, path, limiter=COPY_THREADS)
            if file.layer.removed or self.off is not None:
                return
            self._copies[inode] = _Backing(file, path)
            self.copied += 1
            kept = True
            log.debug(
                "fuse passthrough: copied",
                extra={
                    "inode": inode,
                    "bytes": file.size,
                    "ms": round((trio.current_time() - started) * 1000),
                },
            )
        except OSError as e:
            self._stop_copies(f"cannot write a backing file in {self.config.directory}: {e}")
        finally:
            self._copying.discard(inode)
            if not kept:
                self._bytes -= file.size
                for left in (tmp, path):
                    with contextlib.suppress(OSError):
                        left.unlink()

    def _stop_copies(self, reason: str) -> None:
        if self.copy_off is None:
            self.copy_off = reason
            log.warning("fuse passthrough: no more backing files: %s", reason)

    def _turn_off(self, reason: str) -> None:
        if self.off is None:
            self.off = reason
            self._stop_copies(reason)
            log.info("fuse passthrough off for this connection: %s", reason)


def _create(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)


def _settle(fd: int) -> None:
    """Write the copy out and drop its pages: the pages of buffered writes sit in small folios,
    and the kernel's read-ahead of the backing file fills large ones (the point of the copy);
    nor need the file's bytes be in the page cache twice while the FUSE file's pages are."""
    os.fdatasync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


__all__ = [
    "FH_CACHED",
    "FH_PASSTHROUGH",
    "FH_PLAIN",
    "Passthrough",
    "PassthroughConfig",
    "PassthroughError",
]
