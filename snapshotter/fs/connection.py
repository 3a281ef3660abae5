"""FUSE connections that outlive the daemon: mounting `/dev/fuse` ourselves, the INIT
request, adoption through the fd keeper (`snapshotter.fs.keeper`).

A FUSE connection is one open `/dev/fuse` file mounted somewhere; the kernel sends FUSE_INIT
once per connection and queues every other request until it is answered. So:

- **new** (`mount_new`): open `/dev/fuse`, `mount(2)` it (`fuse.sociable`, the options
  `mount_data` gives) and read the kernel's INIT request (`read_init`); the server
  (`snapshotter.fs.fuse`) answers it when it starts.
- **fresh** (`mount_fresh`): the same, and a duplicate of the fd goes to the keeper together
  with that request (`KeptConnection`).
- **adopted** (`adopt`): a restarted daemon fetches the fd and the INIT request from the
  keeper. The INIT was answered by the first process; the server reads the protocol it
  settled from the request (the answer is a function of it) and writes
  `FUSE_NOTIFY_RESEND` (Linux >= 6.9): the requests the dead daemon had read but not answered
  go back to the pending queue and are answered again (every request of this filesystem is
  idempotent: it is read-only).

Layouts are in `snapshotter.fs.protocol`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from snapshotter.mountcalls import MS_NODEV, MS_NOSUID, MS_RDONLY, detach, mount
from snapshotter.mountinfo import mount_at

from . import keeper
from .protocol import READ_BUFFER_BYTES, parse_init

log = logging.getLogger(__name__)

KEEPER_NAME: Final = "fuse"
"""The keeper's name of the daemon's connection, mounted at `<root>/fuse`."""
PLAIN_KEEPER_NAME: Final = "fuse-plain"
"""The keeper's name of its second connection, the one that never answers OPEN, mounted at
`<root>/fuse-plain` (`snapshotter.fs.fuse.FuseMount.plain`)."""
FSNAME: Final = "sociable"
FSTYPE: Final = "fuse.sociable"


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
    """A FUSE connection the daemon serves: its fd (owned by whoever holds this), the kernel's
    INIT request, the mount's device (`major:minor`), and whether it was adopted from an
    earlier process (then the INIT was answered already and pending requests are resent)."""

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


def adopt(root: Path, mountpoint: Path, name: str = KEEPER_NAME) -> KeptConnection | None:
    """The connection the keeper holds for `root` as `name` when it still serves the mount at
    `mountpoint`; None (after telling the keeper to drop anything else) when there is none.
    Raises KeeperError."""
    fetched = keeper.fetch(root, name)
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
        keeper.drop(root, name)
        return None
    return kept


def mount_new(mountpoint: Path, options: frozenset[str]) -> KeptConnection:
    """Open `/dev/fuse`, mount it on `mountpoint` and read its INIT (the caller owns the fd).
    On any failure nothing stays mounted. Raises OSError, ValueError (no INIT came first)."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    mounted = False
    try:
        mount_device(fd, mountpoint, options)
        mounted = True
        init = read_init(fd)
        entry = mount_at(mountpoint)
        if entry is None:
            raise OSError(errno.ENOENT, f"{mountpoint}: mounted but not in mountinfo")
    except BaseException:
        discard(fd, mountpoint if mounted else None)
        raise
    return KeptConnection(fd, init, entry.device, adopted=False)


def discard(fd: int, mountpoint: Path | None) -> None:
    """Close a connection's fd; with `mountpoint`, lazily unmount it first. Never raises (an
    unmount that fails is logged)."""
    if mountpoint is not None:
        try:
            detach(mountpoint)
        except OSError as e:
            log.warning("cannot unmount %s: %s", mountpoint, e)
    with contextlib.suppress(OSError):
        os.close(fd)


def mount_fresh(
    root: Path, mountpoint: Path, options: frozenset[str], name: str = KEEPER_NAME
) -> KeptConnection:
    """`mount_new`, and the keeper gets a duplicate of the fd as `name`. On any failure
    nothing stays mounted. Raises OSError, ValueError, KeeperError."""
    kept = mount_new(mountpoint, options)
    try:
        keeper.store(root, name, kept.fd, kept.keeper_data())
    except BaseException:
        discard(kept.fd, mountpoint)
        raise
    return kept


def release(root: Path, mountpoint: Path, name: str = KEEPER_NAME) -> bool:
    """Full teardown: the keeper forgets the connection `name` and the mount is lazily
    unmounted (readers of it get ENOTCONN from then on). Returns whether something was
    unmounted."""
    keeper.drop(root, name)
    try:
        return detach(mountpoint)
    except OSError as e:
        log.warning(
            "cannot unmount the fuse host", extra={"path": str(mountpoint), "error": str(e)}
        )
        return False
