"""The FUSE kernel protocol as this filesystem speaks it: opcodes, the request and reply
layouts of `<linux/fuse.h>` (protocol 7.x, little endian on every platform we run), and the
INIT answer. Pure encoding and decoding: no I/O, no trio.

The daemon answers protocol 7.31 (`MINOR`), or the kernel's minor if that is lower (7.23 at
the least: older kernels expect shorter replies than these); 7.40 (`PASSTHROUGH_MINOR`) when it
asks for FUSE passthrough (`negotiate`). Only the requests of a read-only
filesystem are decoded; anything else is answered ENOSYS by the server (`snapshotter.fs.fuse`).
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass
from typing import Final

# -- opcodes (the requests a read-only filesystem sees) ----------------------------------------
LOOKUP: Final = 1
FORGET: Final = 2
GETATTR: Final = 3
READLINK: Final = 5
OPEN: Final = 14
READ: Final = 15
STATFS: Final = 17
RELEASE: Final = 18
GETXATTR: Final = 22
LISTXATTR: Final = 23
FLUSH: Final = 25
INIT: Final = 26
OPENDIR: Final = 27
READDIR: Final = 28
RELEASEDIR: Final = 29
ACCESS: Final = 34
INTERRUPT: Final = 36
DESTROY: Final = 38
BATCH_FORGET: Final = 42
READDIRPLUS: Final = 44

# -- notifications (written with unique 0; the error field names the notification) ------------
NOTIFY_STORE: Final = 4
NOTIFY_DELETE: Final = 6
NOTIFY_RESEND: Final = 7

# -- INIT flags -------------------------------------------------------------------------------
ASYNC_READ: Final = 1 << 0
EXPORT_SUPPORT: Final = 1 << 4
BIG_WRITES: Final = 1 << 5
AUTO_INVAL_DATA: Final = 1 << 12
DO_READDIRPLUS: Final = 1 << 13
ASYNC_DIO: Final = 1 << 15
NO_OPEN_SUPPORT: Final = 1 << 17
PARALLEL_DIROPS: Final = 1 << 18
MAX_PAGES: Final = 1 << 22
CACHE_SYMLINKS: Final = 1 << 23
INIT_EXT: Final = 1 << 30
"""The INIT answer's `flags2` word is valid (flags 32-63)."""
PASSTHROUGH2: Final = 1 << (37 - 32)
"""FUSE_PASSTHROUGH (flag 37, in `flags2`): OPEN answers may name a backing file whose page
cache serves the file's reads and mmaps in the kernel (Linux 6.9 and later)."""

WANTED_FLAGS: Final = (
    ASYNC_READ
    | EXPORT_SUPPORT
    | BIG_WRITES
    | AUTO_INVAL_DATA
    | DO_READDIRPLUS
    | ASYNC_DIO
    | PARALLEL_DIROPS
    | MAX_PAGES
    | CACHE_SYMLINKS
)
"""What the daemon asks for, of what the kernel offers: asynchronous read-ahead, every listing
as READDIRPLUS (entries and attributes in one answer), page cache dropped when a file's size or
mtime changes (the status file), concurrent lookups in one directory, READs of up to
`MAX_PAGES_WANTED` pages, symlink targets kept in the page cache (layers never change)."""

MAJOR: Final = 7
MINOR: Final = 31
PASSTHROUGH_MINOR: Final = 40
"""The protocol of FUSE passthrough (`fuse_open_out.backing_id`, `flags2`)."""
PASSTHROUGH_STACK_DEPTH: Final = 1
"""`max_stack_depth` of a passthrough connection: backing files must sit on a filesystem that
is not stacked (ext4, xfs: not overlayfs), and the mount counts as one level of stacking, so an
overlayfs over it is the last level the kernel allows (2)."""
OLDEST_MINOR: Final = 23
MAX_WRITE: Final = 1 << 20
READ_BUFFER_BYTES: Final = MAX_WRITE + 8192
"""A request buffer: the kernel refuses reads of `/dev/fuse` into less than max_write plus
the headers."""
MAX_PAGES_WANTED: Final = 256
"""1 MiB READs (with the mount's read-ahead window raised to 1 MiB)."""

FOPEN_DIRECT_IO: Final = 1 << 0
FOPEN_KEEP_CACHE: Final = 1 << 1
FOPEN_PASSTHROUGH: Final = 1 << 7

BACKING_MAP: Final = struct.Struct("<iIQ")
"""fuse_backing_map: fd, flags, padding."""
_IOC_WRITE: Final = 1
FUSE_DEV_IOC_BACKING_OPEN: Final = (_IOC_WRITE << 30) | (BACKING_MAP.size << 16) | (229 << 8) | 1
"""`_IOW(229, 1, struct fuse_backing_map)`: register a backing file; returns its id (>0)."""
FUSE_DEV_IOC_BACKING_CLOSE: Final = (_IOC_WRITE << 30) | (4 << 16) | (229 << 8) | 2
"""`_IOW(229, 2, uint32_t)`: forget a backing id (files opened with it keep their file)."""

# -- layouts ----------------------------------------------------------------------------------
IN_HEADER: Final = struct.Struct("<IIQQIIIHH")
"""fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding."""
OUT_HEADER: Final = struct.Struct("<IiQ")
"""fuse_out_header: len, error (a notify code when unique is 0), unique."""
INIT_IN: Final = struct.Struct("<IIIII44x")
"""fuse_init_in: major, minor, max_readahead, flags, flags2, unused[11]."""
INIT_OUT: Final = struct.Struct("<IIIIHHIIHHII24x")
"""fuse_init_out: major, minor, max_readahead, flags, max_background, congestion_threshold,
max_write, time_gran, max_pages, map_alignment, flags2, max_stack_depth, unused."""
ATTR: Final = struct.Struct("<QQQQQQIIIIIIIIII")
"""fuse_attr: ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode,
nlink, uid, gid, rdev, blksize, flags."""
ENTRY_OUT_HEAD: Final = struct.Struct("<QQQQII")
"""fuse_entry_out without its attr: nodeid, generation, entry_valid, attr_valid,
entry_valid_nsec, attr_valid_nsec."""
ATTR_OUT_HEAD: Final = struct.Struct("<QII")
"""fuse_attr_out without its attr: attr_valid, attr_valid_nsec, dummy."""
READ_IN: Final = struct.Struct("<QQIIQII")
"""fuse_read_in: fh, offset, size, read_flags, lock_owner, flags, padding."""
OPEN_OUT: Final = struct.Struct("<QIi")
"""fuse_open_out: fh, open_flags, backing_id (padding before 7.40)."""
RELEASE_IN: Final = struct.Struct("<QIIQ")
"""fuse_release_in: fh, flags, release_flags, lock_owner."""
GETXATTR_IN: Final = struct.Struct("<II")
"""fuse_getxattr_in: size, padding (the name follows, NUL-terminated)."""
GETXATTR_OUT: Final = struct.Struct("<II")
"""fuse_getxattr_out: size, padding."""
ACCESS_IN: Final = struct.Struct("<II")
"""fuse_access_in: mask, padding."""
DIRENT: Final = struct.Struct("<QQII")
"""fuse_dirent: ino, off, namelen, type (the name follows, padded to 8 bytes)."""
KSTATFS: Final = struct.Struct("<QQQQQIII4x24x")
"""fuse_kstatfs: blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, padding, spare."""
NOTIFY_DELETE_OUT: Final = struct.Struct("<QQII")
"""fuse_notify_delete_out: parent, child, namelen, padding (the name follows, NUL-terminated)."""
STORE_OUT: Final = struct.Struct("<QQII")
"""fuse_notify_store_out: nodeid, offset, size, padding (the data follows)."""
ENTRY_OUT_SIZE: Final = ENTRY_OUT_HEAD.size + ATTR.size


@dataclass(frozen=True, slots=True)
class InitRequest:
    """The fields of a FUSE_INIT request the server reads."""

    unique: int
    major: int
    minor: int
    max_readahead: int
    flags: int
    flags2: int


def parse_init(request: bytes) -> InitRequest:
    """The INIT fields of `request` (a whole FUSE request). Raises ValueError when it is not
    a complete FUSE_INIT."""
    if len(request) < IN_HEADER.size + 16:
        raise ValueError(f"a FUSE_INIT request has at least {IN_HEADER.size + 16} bytes")
    length, opcode, unique, *_ = IN_HEADER.unpack_from(request)
    if opcode != INIT or length != len(request):
        raise ValueError(f"not a FUSE_INIT request (opcode {opcode}, {length} bytes)")
    body = request[IN_HEADER.size :] + bytes(max(0, INIT_IN.size - (length - IN_HEADER.size)))
    major, minor, readahead, flags, flags2 = INIT_IN.unpack_from(body)
    return InitRequest(unique, major, minor, readahead, flags, flags2)


def init_request(*, unique: int, major: int, minor: int, flags: int, flags2: int = 0) -> bytes:
    """A FUSE_INIT request as the kernel writes it (for tests and tools)."""
    length = IN_HEADER.size + INIT_IN.size
    header = IN_HEADER.pack(length, INIT, unique, 0, 0, 0, 0, 0, 0)
    return header + INIT_IN.pack(major, minor, 128 * 1024, flags, flags2)


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What a connection's INIT settled: the protocol minor, the flags both sides use, and
    whether OPEN answers may name backing files (FUSE passthrough)."""

    minor: int
    flags: int
    passthrough: bool = False


def offers_passthrough(init: InitRequest) -> bool:
    """Whether the kernel behind `init` can pass reads through to backing files."""
    return (
        init.minor >= PASSTHROUGH_MINOR
        and bool(init.flags & INIT_EXT)
        and bool(init.flags2 & PASSTHROUGH2)
    )


def negotiate(init: InitRequest, *, passthrough: bool = False) -> Negotiated:
    """The answer to `init`; with `passthrough`, FUSE passthrough when the kernel offers it.
    Raises ValueError for a kernel this server cannot speak to (another major version, or a
    minor older than `OLDEST_MINOR`)."""
    if init.major != MAJOR or init.minor < OLDEST_MINOR:
        raise ValueError(
            f"the kernel speaks FUSE {init.major}.{init.minor}; "
            f"{MAJOR}.{OLDEST_MINOR} or later is needed"
        )
    if passthrough and offers_passthrough(init):
        return Negotiated(
            min(init.minor, PASSTHROUGH_MINOR), (init.flags & WANTED_FLAGS) | INIT_EXT, True
        )
    return Negotiated(min(init.minor, MINOR), init.flags & WANTED_FLAGS)


def init_reply(init: InitRequest, negotiated: Negotiated) -> bytes:
    """The whole reply to `init` (header included)."""
    body = INIT_OUT.pack(
        MAJOR,
        negotiated.minor,
        init.max_readahead,
        negotiated.flags,
        0,  # max_background: the kernel's default
        0,  # congestion_threshold: the kernel's default
        MAX_WRITE,
        0,  # time_gran: the kernel's default
        MAX_PAGES_WANTED,
        0,
        PASSTHROUGH2 if negotiated.passthrough else 0,
        PASSTHROUGH_STACK_DEPTH if negotiated.passthrough else 0,
    )
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), 0, init.unique) + body


def resend_notification() -> bytes:
    """`FUSE_NOTIFY_RESEND`: the kernel queues again every request read but not answered."""
    return OUT_HEADER.pack(OUT_HEADER.size, NOTIFY_RESEND, 0)


def delete_notification(parent: int, child: int, name: bytes) -> bytes:
    """`FUSE_NOTIFY_DELETE`: entry `name` (inode `child`) of directory `parent` is gone; the
    kernel drops its dentry (and the entry, were it still in use, reads as deleted)."""
    body = NOTIFY_DELETE_OUT.pack(parent, child, len(name), 0) + name + b"\0"
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), NOTIFY_DELETE, 0) + body


def store_notification(nodeid: int, data: bytes) -> list[bytes]:
    """`FUSE_NOTIFY_STORE`: `data` is the start of inode `nodeid`'s contents; the kernel
    copies it into the inode's page cache (when it knows the inode; else the write fails with
    ENOENT), so reads of those bytes never reach the daemon. As buffers to write together."""
    head = OUT_HEADER.pack(OUT_HEADER.size + STORE_OUT.size + len(data), NOTIFY_STORE, 0)
    return [head, STORE_OUT.pack(nodeid, 0, len(data), 0), data]


def reply(unique: int, payload: bytes) -> bytes:
    """A successful reply carrying `payload`."""
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload


def error_reply(unique: int, code: int) -> bytes:
    """A reply failing with errno `code`."""
    return OUT_HEADER.pack(OUT_HEADER.size, -code, unique)


def _split_ns(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def attr_bytes(
    ino: int,
    mode: int,
    nlink: int,
    uid: int,
    gid: int,
    rdev: int,
    size: int,
    blocks: int,
    blksize: int,
    mtime_ns: int,
) -> bytes:
    """A fuse_attr (atime and ctime 0)."""
    mtime, mtime_nsec = divmod(mtime_ns, 1_000_000_000)
    return ATTR.pack(
        ino, size, blocks, 0, mtime, 0, 0, mtime_nsec, 0, mode, nlink, uid, gid, rdev, blksize, 0
    )


def entry_out(nodeid: int, attr: bytes, timeout: float) -> bytes:
    """A fuse_entry_out for `nodeid` with `attr` (from `attr_bytes`), cached for `timeout` s."""
    sec, nsec = _split_ns(timeout)
    return ENTRY_OUT_HEAD.pack(nodeid, 0, sec, sec, nsec, nsec) + attr


def attr_out(attr: bytes, timeout: float) -> bytes:
    """A fuse_attr_out with `attr`, cached for `timeout` s."""
    sec, nsec = _split_ns(timeout)
    return ATTR_OUT_HEAD.pack(sec, nsec, 0) + attr


def dirent(ino: int, next_offset: int, mode: int, name: bytes) -> bytes:
    """One fuse_dirent, padded to 8 bytes."""
    raw = DIRENT.pack(ino, next_offset, len(name), stat.S_IFMT(mode) >> 12) + name
    return raw + bytes(-len(raw) % 8)


def kstatfs(*, blocks: int, files: int, bsize: int, namelen: int) -> bytes:
    """A fuse_statfs_out of a full, read-only filesystem."""
    return KSTATFS.pack(blocks, 0, 0, files, 0, bsize, namelen, bsize)


def open_out(fh: int, flags: int, backing_id: int = 0) -> bytes:
    """A fuse_open_out: handle `fh`, FOPEN_* `flags`, the backing id of a passthrough open."""
    return OPEN_OUT.pack(fh, flags, backing_id)


def cstring(body: bytes | memoryview, start: int = 0) -> bytes:
    """The NUL-terminated string at `start` of `body` (all of the rest when there is no NUL)."""
    data = bytes(body[start:])
    end = data.find(b"\0")
    return data if end < 0 else data[:end]
