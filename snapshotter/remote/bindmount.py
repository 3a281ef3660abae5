"""Bind mounts of FUSE layer subtrees onto snapshot `fs` directories, and mount lookups.

Each call is a blocking syscall or file read. Paths inside the daemon's own FUSE mount
must never be touched from the trio thread that serves that mount (the kernel would wait
for an answer the blocked loop cannot give): call these from worker threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass
from pathlib import Path

MS_BIND = 4096
MS_REC = 16384
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of `/proc/self/mountinfo`: `root` is the path inside the source filesystem."""

    mount_id: int
    root: str
    mountpoint: str
    fstype: str


def _unescape(field: str) -> str:
    return (
        field.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "surrogateescape")
    )


def mount_table() -> list[MountEntry]:
    """The mounts of this process's namespace, in mount order. Raises OSError."""
    out: list[MountEntry] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            out.append(
                MountEntry(
                    int(fields[0]), _unescape(fields[3]), _unescape(fields[4]), fields[sep + 1]
                )
            )
    return out


def mounts_under(base: Path) -> list[MountEntry]:
    """Mounts at or below `base`, deepest (latest) first. Raises OSError."""
    prefix = os.path.abspath(base)
    found = [
        m for m in mount_table() if m.mountpoint == prefix or m.mountpoint.startswith(prefix + "/")
    ]
    return list(reversed(found))


def mount_at(path: Path) -> MountEntry | None:
    """The topmost mount whose mountpoint is exactly `path`, or None. Raises OSError."""
    target = os.path.abspath(path)
    found = [m for m in mount_table() if m.mountpoint == target]
    return found[-1] if found else None


def bind(source: Path, target: Path) -> None:
    """Bind-mount directory `source` on `target`. Raises OSError naming both."""
    if _libc.mount(os.fsencode(source), os.fsencode(target), None, MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bind mount {source} on {target}: {os.strerror(err)}")


def detach(target: Path) -> bool:
    """Lazily unmount `target` (MNT_DETACH). Returns False if nothing was mounted there.

    Raises OSError for other failures.
    """
    if _libc.umount2(os.fsencode(target), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return False
        raise OSError(err, f"unmount {target}: {os.strerror(err)}")
    return True


def detach_all_under(base: Path) -> int:
    """Lazily unmount every mount at or below `base`, deepest first; returns how many.

    Errors on single mounts are ignored (a later pass or the caller notices).
    """
    count = 0
    for entry in mounts_under(base):
        try:
            if detach(Path(entry.mountpoint)):
                count += 1
        except OSError:
            continue
    return count
