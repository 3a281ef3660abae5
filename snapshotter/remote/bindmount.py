"""Bind mounts of FUSE layer subtrees onto snapshot `fs` directories, and their removal.

Each call is a blocking syscall or file read. Paths inside the daemon's own FUSE mount
must never be touched from the trio thread that serves that mount (the kernel would wait
for an answer the blocked loop cannot give): call these from worker threads.
"""

from __future__ import annotations

from pathlib import Path

from snapshotter.mountcalls import MS_BIND, detach, mount
from snapshotter.mountinfo import mounts_under


def bind(source: Path, target: Path) -> None:
    """Bind-mount directory `source` on `target`. Raises OSError naming both."""
    mount(source, target, None, MS_BIND, None, what=f"bind mount {source} on {target}")


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


__all__ = ["bind", "detach", "detach_all_under"]
