"""FUSE connections that outlive the daemon: mounting `/dev/fuse` ourselves, the INIT
handshake, adoption through the fd keeper (`snapshotter.fs.keeper`). No pyfuse3 here.

A FUSE connection is one open `/dev/fuse` file mounted somewhere; the kernel sends FUSE_INIT
once per connection, and libfuse answers nothing before it has seen one. So:

- **fresh**: open `/dev/fuse`, `mount(2)` it (`fuse.sociable`, the options `mount_data`
  gives), read the kernel's INIT request ourselves (`read_init`), and store a duplicate of the
  fd in the keeper together with that request (`KeptConnection`). The adapter
  (`snapshotter.fs.fuse`) then hands libfuse one end of a socket pair carrying the INIT and,
  from libfuse's INIT handler, puts the real fd in its place (`os.dup2`), so libfuse's INIT
  reply reaches the kernel.
- **adopted**: a restarted daemon fetches the fd and the INIT request from the keeper and does
  the same with the request's `unique` replaced by `SYNTHETIC_UNIQUE` (odd: no request
  ever has it, so the kernel drops that reply with ENOENT, which libfuse ignores). Right after
  the swap it writes `FUSE_NOTIFY_RESEND` (Linux >= 6.9): the requests the dead daemon had
  read but not answered go back to the pending queue and are answered again (every request
  of this filesystem is idempotent: it is read-only).

Layouts are those of `<linux/fuse.h>` (protocol 7.x, little endian on every platform we run).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from snapshotter.mountcalls import MS_NODEV, MS_NOSUID, MS_RDONLY, detach, mount
from snapshotter.mountinfo import mount_at

from . import keeper

log = logging.getLogger(__name__)

FUSE_INIT: Final = 26
FUSE_NOTIFY_RESEND: Final = 7
IN_HEADER: Final = struct.Struct("<IIQQIIIHH")
"""fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding."""
INIT_IN: Final = struct.Struct("<IIIII44x")
"""fuse_init_in: major, minor, max_readahead, flags, flags2, unused[11]."""
OUT_HEADER: Final = struct.Struct("<IiQ")
"""fuse_out_header: len, error (a notify code when unique is 0), unique."""
SYNTHETIC_UNIQUE: Final = 1
"""The unique of a replayed INIT: odd, so it names no request (the kernel's are even)."""
KEEPER_NAME: Final = "fuse"
FSNAME: Final = "sociable"
FSTYPE: Final = "fuse.sociable"
READ_BUFFER_BYTES: Final = (1 << 20) + 8192


@dataclass(frozen=True, slots=True)
class InitRequest:
    """The fields of a FUSE_INIT request this module reads (the rest is kept as bytes)."""

    unique: int
    major: int
    minor: int
    flags: int
    flags2: int


def parse_init(request: bytes) -> InitRequest:
    """The INIT fields of `request` (a whole FUSE request). Raises ValueError when it is not
    a complete FUSE_INIT."""
    if len(request) < IN_HEADER.size + 16:
        raise ValueError(f"a FUSE_INIT request has at least {IN_HEADER.size + 16} bytes")
    length, opcode, unique, *_ = IN_HEADER.unpack_from(request)
    if opcode != FUSE_INIT or length != len(request):
        raise ValueError(f"not a FUSE_INIT request (opcode {opcode}, {length} bytes)")
    body = request[IN_HEADER.size :] + bytes(max(0, INIT_IN.size - (length - IN_HEADER.size)))
    major, minor, _readahead, flags, flags2 = INIT_IN.unpack_from(body)
    return InitRequest(unique, major, minor, flags, flags2)


def with_unique(request: bytes, unique: int) -> bytes:
    """`request` with its header's `unique` replaced."""
    return request[:8] + struct.pack("<Q", unique) + request[16:]


def init_request(*, unique: int, major: int, minor: int, flags: int, flags2: int = 0) -> bytes:
    """A FUSE_INIT request as the kernel writes it (for tests and tools)."""
    length = IN_HEADER.size + INIT_IN.size
    header = IN_HEADER.pack(length, FUSE_INIT, unique, 0, 0, 0, 0, 0, 0)
    return header + INIT_IN.pack(major, minor, 0, flags, flags2)


def resend_notification() -> bytes:
    """`FUSE_NOTIFY_RESEND`: the kernel queues again every request read but not answered."""
    return OUT_HEADER.pack(OUT_HEADER.size, FUSE_NOTIFY_RESEND, 0)


def mount_data(fd: int, options: frozenset[str]) -> str:
    """The `mount(2)` data string of a FUSE mount of `fd` as root, from libfuse-style
    `options` (`fsname=`, `subtype=` and `ro` are not data options: `mount_device` applies
    them)."""
    kept = sorted(
        o for o in options if o not in {"ro", "rw"} and not o.startswith(("fsname=", "subtype="))
    )
    return ",".join([f"fd={fd}", "rootmode=40000", "user_id=0", "group_id=0", *kept])


def mount_device(fd: int, mountpoint: Path, options: frozenset[str]) -> None:
    """Mount the FUSE connection of `/dev/fuse` fd `fd` on `mountpoint`. Raises OSError."""
    flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if "ro" in options else 0)
    data = mount_data(fd, options).encode()
    mount(FSNAME, mountpoint, FSTYPE, flags, data, what=f"mount {FSTYPE} on {mountpoint}")


INIT_TIMEOUT_SEC: Final = 10.0


def read_init(fd: int, timeout_sec: float = INIT_TIMEOUT_SEC) -> bytes:
    """Read the kernel's FUSE_INIT request from a freshly mounted `/dev/fuse` fd (the kernel
    queues it while mounting). Raises OSError (also none within `timeout_sec`), ValueError
    (something else came first)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if not poller.poll(int(timeout_sec * 1000)):
        raise OSError(errno.ETIMEDOUT, f"no FUSE_INIT from the kernel within {timeout_sec} s")
    request = os.read(fd, READ_BUFFER_BYTES)
    parse_init(request)
    return request


def alive(fd: int) -> bool:
    """Whether the FUSE connection of `fd` is up (not aborted, not unmounted)."""
    poller = select.poll()
    poller.register(fd, 0)
    return not any(
        mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, mask in poller.poll(0)
    )


@dataclass(frozen=True, slots=True)
class KeptConnection:
    """A FUSE connection the daemon serves: its fd (owned by whoever holds this), the INIT
    request to give libfuse, the mount's device (`major:minor`), and whether it was adopted
    from an earlier process (then the INIT is a replay and pending requests are resent)."""

    fd: int
    init: bytes
    device: str
    adopted: bool

    def keeper_data(self) -> bytes:
        return json.dumps({"device": self.device, "init": self.init.hex()}).encode()


def _from_keeper(fd: int, data: bytes) -> KeptConnection:
    doc = json.loads(data)
    init = bytes.fromhex(doc["init"])
    parse_init(init)
    return KeptConnection(fd, init, str(doc["device"]), adopted=True)


def adopt(root: Path, mountpoint: Path) -> KeptConnection | None:
    """The connection the keeper holds for `root` when it still serves the mount at
    `mountpoint`; None (after telling the keeper to drop anything else) when there is none.
    The INIT of the result is a replay (`SYNTHETIC_UNIQUE`). Raises KeeperError."""
    fetched = keeper.fetch(root, KEEPER_NAME)
    if fetched is None:
        return None
    fd, data = fetched
    try:
        kept = _from_keeper(fd, data)
        mount = mount_at(mountpoint)
        if mount is None or mount.device != kept.device or not alive(fd):
            raise ValueError(
                f"kept connection {kept.device} no longer serves {mountpoint} "
                f"(mounted there: {mount.device if mount else 'nothing'})"
            )
    except (ValueError, KeyError, TypeError, OSError) as e:
        os.close(fd)
        log.warning("fuse connection not adopted", extra={"error": str(e)})
        keeper.drop(root, KEEPER_NAME)
        return None
    return KeptConnection(fd, with_unique(kept.init, SYNTHETIC_UNIQUE), kept.device, True)


def mount_fresh(root: Path, mountpoint: Path, options: frozenset[str]) -> KeptConnection:
    """Open `/dev/fuse`, mount it on `mountpoint`, read its INIT and give the keeper a
    duplicate. On any failure nothing stays mounted. Raises OSError, KeeperError."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    mounted = False
    try:
        mount_device(fd, mountpoint, options)
        mounted = True
        init = read_init(fd)
        entry = mount_at(mountpoint)
        if entry is None:
            raise OSError(errno.ENOENT, f"{mountpoint}: mounted but not in mountinfo")
        kept = KeptConnection(fd, init, entry.device, adopted=False)
        keeper.store(root, KEEPER_NAME, fd, kept.keeper_data())
    except BaseException:
        if mounted:
            with contextlib.suppress(OSError):
                detach(mountpoint)
        os.close(fd)
        raise
    return kept


def release(root: Path, mountpoint: Path) -> bool:
    """Full teardown: the keeper forgets the connection and the mount is lazily unmounted
    (readers of it get ENOTCONN from then on). Returns whether something was unmounted."""
    keeper.drop(root, KEEPER_NAME)
    try:
        return detach(mountpoint)
    except OSError as e:
        log.warning(
            "cannot unmount the fuse host", extra={"path": str(mountpoint), "error": str(e)}
        )
        return False
