"""mount(2) and umount2(2) through libc: the one place the daemon mounts and lazily unmounts.

Used by the FUSE connection (`snapshotter.fs.connection`: the layer host's `fuse` mount) and
the bind mounts of lazy layers (`snapshotter.remote.bindmount`). Blocking syscalls: call them
from a worker thread in async code.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path
from typing import Final

MS_RDONLY: Final = 1
MS_NOSUID: Final = 2
MS_NODEV: Final = 4
MS_BIND: Final = 4096
MNT_DETACH: Final = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount(
    source: str | Path,
    target: Path,
    fstype: str | None,
    flags: int,
    data: bytes | None,
    *,
    what: str,
) -> None:
    """mount(2). Raises OSError whose text is `what` and the errno's."""
    rc = _libc.mount(
        os.fsencode(source), os.fsencode(target), fstype and fstype.encode(), flags, data
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


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
