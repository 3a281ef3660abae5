"""One daemon per root: an exclusive flock on `<root>/daemon.lock`, held for the daemon's life.

Two daemons on one root would share its metadata store, snapshot directories and FUSE mount
point, and the second would unmount the first one's mounts as "stale". The lock is taken
before anything under the root is touched; a second daemon is refused with one line naming
the holder's pid, which the holder writes into the lock file. The kernel drops the lock when
the holder exits, however it exits, so a stale lock file never blocks a restart. Once the lock
is held, temporaries of a write into the root that a killed predecessor left (the status
file's) are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from index.fsutil import remove_stale_temps

from .errors import SnapshotterError

LOCK_NAME: Final = "daemon.lock"


class RootLocked(SnapshotterError):
    """Another daemon holds the root's lock."""


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "a process that has not written its pid yet"


@contextlib.contextmanager
def lock_root(root: Path) -> Iterator[Path]:
    """Hold the exclusive lock of `root` (which must exist) for the duration; yields the path.

    Raises RootLocked when another process holds it, OSError when the lock file cannot be
    opened. The lock file is left in place (the flock, not the file, is the lock).
    """
    path = root / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RootLocked(
                f"root {root} is in use by another sociable-snapshotter ({_holder(fd)}; "
                f"lock {path})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        remove_stale_temps(root)
        yield path
    finally:
        os.close(fd)
