"""FUSE passthrough: layer files that come back are copied to local backing files, and the
kernel then serves their reads and mmaps from the backing file's page cache, without the daemon.

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

The kernel fails an open that mixes modes on one inode (measured on 6.18: EIO): while an inode
is open with a backing file, every open of it must name the same backing file, also after
OPEN was answered ENOSYS once (the no-open protocol is no way out once a file is passed
through); and an inode open cached cannot be opened with one. So the answers are sticky: a
copy is first used by an open while the file has no cached open, and an id stays with its
inode for as long as its layer is mounted; when the layer goes the id is closed and the inode
is never given another one on this connection (its old backing file may still be open).

Ids outlive the process: each registration is appended to a journal in `directory` before the
OPEN is answered, and each close after it. A restarted daemon that adopts the connection
(`adopt`) answers the journaled inodes with their ids and every other file cached; it makes
no copies (it cannot know which files the first process left open cached). A fresh
connection starts with an empty directory and journal.

Copies come only from bytes already verified (spans checked against their zTOC digests, the
file's tar header checked), and are removed when their layer goes and when a fresh connection
starts.
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
from snapshotter.fs.tree import LayerTree

log = logging.getLogger(__name__)

FH_PLAIN: Final = 0
FH_CACHED: Final = 1
FH_PASSTHROUGH: Final = 2
"""OPEN answers' handles: what RELEASE must undo (READs go by inode, not handle)."""

COPY_CHUNK_BYTES: Final = 4 << 20
COPY_THREADS: Final = trio.CapacityLimiter(1)
"""The worker thread that writes backing files (one copy at a time: it is background work)."""


JOURNAL_NAME: Final = "ids"


@dataclass(frozen=True, slots=True)
class PassthroughConfig:
    """`directory`: where backing files and the id journal go (a local, unstacked filesystem);
    `enabled`: ask for passthrough on a fresh connection (an adopted one that has a journal is
    served by it either way); files of at least `min_file_bytes` are copied, within
    `max_bytes` of disk for all of them."""

    directory: Path
    enabled: bool = True
    min_file_bytes: int = 1 << 20
    max_bytes: int = 4 << 30

    @property
    def journal(self) -> Path:
        return self.directory / JOURNAL_NAME


@dataclass(slots=True)
class _Backing:
    file: LayerFile
    path: Path


class Passthrough:
    """The OPEN and RELEASE answers of a passthrough connection, and the backing files.

    Not thread-safe: used from the trio thread (the request loop and the copy tasks).
    """

    def __init__(self, host: LayerHost, config: PassthroughConfig) -> None:
        self.host = host
        self.config = config
        self._fd = -1
        self._journal_fd = -1
        self._nursery: trio.Nursery | None = None
        self._cached: dict[int, int] = {}  # inode -> cached opens
        self._copies: dict[int, _Backing] = {}  # inode -> this process's copies
        self._ids: dict[int, tuple[str, int]] = {}  # inode -> (layer name, backing id)
        self._copying: set[int] = set()
        self._retired: set[int] = set()  # inodes whose backing id was closed
        self._read_before: dict[int, object] = {}  # inode -> layer: released once already
        self._bytes = 0
        self.copy_off: str | None = None  # why nothing more is copied
        self.opened = {"plain": 0, "cached": 0, "passthrough": 0}
        self.copied = 0

    def __repr__(self) -> str:
        return (
            f"<Passthrough ids={len(self._ids)} copies={len(self._copies)} "
            f"bytes={self._bytes} copy_off={self.copy_off!r}>"
        )

    def clear(self) -> None:
        """A fresh connection: empty the directory and start its journal (blocking: run it
        in a thread before `attach`). Copies and ids of an earlier connection are of no use."""
        try:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self.config.directory)
            self.config.directory.mkdir(parents=True, exist_ok=True)
            self._journal_fd = os.open(
                self.config.journal,
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC,
                0o600,
            )
        except OSError as e:
            self._stop_copies(f"cannot empty or create {self.config.directory}: {e}")

    def adopt(self) -> bool:
        """An adopted connection: take the ids of the journal (blocking: run it in a thread).
        False when there is none (the connection was not passed through); else OPEN is
        answered from the journal and nothing more is copied."""
        try:
            lines = self.config.journal.read_bytes().splitlines()
        except FileNotFoundError:
            return False
        except OSError as e:  # the ids are in the kernel still: answer what can be known
            log.warning("fuse passthrough: journal unreadable", extra={"error": str(e)})
            lines = []
        for line in lines:
            self._replay(line.split())
        try:
            self._journal_fd = os.open(
                self.config.journal, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
            )
        except OSError as e:
            log.warning("fuse passthrough: journal not reopened", extra={"error": str(e)})
        self.copy_off = "the connection was adopted from an earlier process"
        return True

    def _replay(self, fields: list[bytes]) -> None:
        """One journal line: `open INODE ID LAYER-NAME-HEX` or `close INODE`; a line cut
        short by a crash is skipped (its OPEN was never answered)."""
        try:
            if fields[0] == b"open" and len(fields) == 4:
                name = bytes.fromhex(fields[3].decode()).decode("utf-8", "surrogateescape")
                self._ids[int(fields[1])] = (name, int(fields[2]))
            elif fields[0] == b"close" and len(fields) == 2:
                self._ids.pop(int(fields[1]), None)
                self._retired.add(int(fields[1]))
        except (IndexError, ValueError, UnicodeDecodeError):
            pass

    def worth_opens(self, tree: LayerTree) -> bool:
        """Whether a layer of `tree` is worth an OPEN request per file opened: its files that
        may be copied (at least `min_file_bytes`) hold at least half of its file bytes.
        Otherwise most of what it serves would never be passed through, and every open of
        its many small files would cost a round trip into the daemon (see `FuseMount.plain`).
        """
        total = tree.total_file_bytes
        return (
            total > 0 and 2 * tree.bytes_in_files_of_at_least(self.config.min_file_bytes) >= total
        )

    def attach(self, fd: int, nursery: trio.Nursery) -> None:
        """Serve connection `fd` (passed through); copies run in `nursery`."""
        self._fd = fd
        self._nursery = nursery

    def close(self) -> None:
        """Close the journal (the connection is no longer served by this process)."""
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
            self._journal_fd = -1

    def statistics(self) -> dict[str, object]:
        """What `status.json` shows: opens by answer, ids, copies, bytes, why copies stopped."""
        return {
            "opens": dict(self.opened),
            "ids": len(self._ids),
            "copies": len(self._copies),
            "copying": len(self._copying),
            "copiedFiles": self.copied,
            "bytes": self._bytes,
            "copyOff": self.copy_off,
        }

    # -- requests ---------------------------------------------------------------------------

    def open(self, inode: int) -> bytes:
        """The fuse_open_out for an OPEN of `inode`."""
        file = self.host.layer_file(inode)
        if file is None:
            self.opened["plain"] += 1
            return p.open_out(FH_PLAIN, 0)
        kept = self._ids.get(inode)
        if kept is not None:
            name, backing_id = kept
            if name == file.layer.name:
                return self._open_passed(backing_id)
            return self._open_cached(inode)  # another layer in this slot: never its bytes
        copy = self._copies.get(inode)
        if (
            copy is not None
            and copy.file.layer is file.layer
            and inode not in self._retired
            and not self._cached.get(inode)
        ):
            backing_id = self._register(inode, copy)
            if backing_id:
                return self._open_passed(backing_id)
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
        for inode in [i for i in self._ids if split_inode(i)[0] == slot]:
            _, backing_id = self._ids.pop(inode)
            self._retired.add(inode)
            with contextlib.suppress(OSError):  # the connection may be gone
                self.backing_close(backing_id)
            self._write_journal(f"close {inode}\n")
        for inode in [i for i in self._copies if split_inode(i)[0] == slot]:
            self._drop(inode)
        for inode in [i for i in self._read_before if split_inode(i)[0] == slot]:
            del self._read_before[inode]

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

    # -- inside -----------------------------------------------------------------------------

    def _open_cached(self, inode: int) -> bytes:
        self._cached[inode] = self._cached.get(inode, 0) + 1
        self.opened["cached"] += 1
        return p.open_out(FH_CACHED, p.FOPEN_KEEP_CACHE)

    def _open_passed(self, backing_id: int) -> bytes:
        self.opened["passthrough"] += 1
        return p.open_out(FH_PASSTHROUGH, p.FOPEN_PASSTHROUGH, backing_id)

    def _register(self, inode: int, copy: _Backing) -> int:
        """Register `copy`'s backing file and journal its id before the OPEN is answered; the
        id, or 0 (the copy deleted, copies stopped) when the kernel refuses it (no
        CAP_SYS_ADMIN, the directory on a stacked filesystem) or the journal cannot take it."""
        name = copy.file.layer.name
        try:
            backing_id = self.backing_open(copy.path)
        except OSError as e:
            self._stop_copies(f"the kernel refused a backing file ({copy.path}): {e}")
            self._drop(inode)
            return 0
        line = f"open {inode} {backing_id} {name.encode('utf-8', 'surrogateescape').hex()}\n"
        if not self._write_journal(line):
            with contextlib.suppress(OSError):
                self.backing_close(backing_id)
            self._drop(inode)
            return 0
        self._ids[inode] = (name, backing_id)
        return backing_id

    def _write_journal(self, line: str) -> bool:
        try:
            os.write(self._journal_fd, line.encode())
        except OSError as e:
            self._stop_copies(f"cannot write the journal {self.config.journal}: {e}")
            return False
        return True

    def _drop(self, inode: int) -> None:
        copy = self._copies.pop(inode)
        self._bytes -= copy.file.size
        with contextlib.suppress(OSError):
            copy.path.unlink()

    def _maybe_copy(self, inode: int) -> None:
        if self.copy_off is not None or self._nursery is None:
            return
        if (
            inode in self._copies
            or inode in self._copying
            or inode in self._retired
            or inode in self._ids
        ):
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
            if file.layer.removed:
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


def discard_journal(config: PassthroughConfig) -> None:
    """A fresh connection without passthrough: a journal left by an earlier one must not be
    taken for this connection's after a restart (blocking)."""
    with contextlib.suppress(OSError):
        config.journal.unlink()


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
    "JOURNAL_NAME",
    "Passthrough",
    "PassthroughConfig",
    "discard_journal",
]
