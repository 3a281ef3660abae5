"""Bind mounts of FUSE layer subtrees onto snapshot `fs` directories, and their removal.

Each call is a blocking syscall or file read. Paths inside the daemon's own FUSE mount
must never be touched from the trio thread that serves that mount (the kernel would wait
for an answer the blocked loop cannot give): call these from worker threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

from snapshotter.mountinfo import mounts_under

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

    Errors on single mounts are ignored (a later pass or the caller notices); raises
    `OSError` only when `/proc/self/mountinfo` cannot be read or parsed.
    """
    count = 0
    for entry in mounts_under(base):
        try:
            if detach(Path(entry.mountpoint)):
                count += 1
        except OSError:
            continue
    return count
