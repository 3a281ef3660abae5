"""The one parser of `/proc/self/mountinfo` (proc(5)), and the lookups built on it.

A line is `ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER`,
fields separated by single spaces. The kernel escapes space, tab, newline and backslash in
paths as the octal sequences `\\040`, `\\011`, `\\012` and `\\134` and writes every other byte
raw, so a path is: the field's bytes, octal escapes decoded, then `os.fsdecode` (UTF-8 with
surrogate escapes: `/var/lib/søciable dir` comes back exactly, and a name that is not UTF-8
round-trips through `os.fsencode`).

Used by the FUSE adapter (`snapshotter.fs.fuse`: is the layer host mounted, which device is it
for its read-ahead) and the bind mounts (`snapshotter.remote.bindmount`: what to detach).
Reading the file is a blocking syscall: call these from a worker thread in async code.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

MOUNTINFO: Final = Path("/proc/self/mountinfo")
_ESCAPE_RE: Final = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One mount: `root` is the path inside the source filesystem that is mounted (`/` for a
    whole filesystem, the subdirectory for a bind mount), `device` is `major:minor`."""

    mount_id: int
    parent_id: int
    device: str
    root: str
    mountpoint: str
    fstype: str
    source: str


def unescape(field: bytes) -> str:
    """A path field as the kernel wrote it, decoded: octal escapes, then `os.fsdecode`."""
    if b"\\" in field:
        field = _ESCAPE_RE.sub(lambda m: bytes((int(m.group(1), 8) & 0xFF,)), field)
    return os.fsdecode(field)


def parse_mountinfo(data: bytes) -> list[MountEntry]:
    """The mounts listed in mountinfo text `data`, in its order (mount order).

    Raises `ValueError` naming the line when a line does not have the mountinfo shape.
    """
    entries: list[MountEntry] = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-", 6)
            entries.append(
                MountEntry(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    device=fields[2].decode("ascii"),
                    root=unescape(fields[3]),
                    mountpoint=unescape(fields[4]),
                    fstype=unescape(fields[sep + 1]),
                    source=unescape(fields[sep + 2]),
                )
            )
        except (ValueError, IndexError) as e:
            raise ValueError(f"mountinfo line {number} is malformed: {line!r}") from e
    return entries


def mount_table(path: Path = MOUNTINFO) -> list[MountEntry]:
    """The mounts of this process's mount namespace, in mount order.

    Raises `OSError` when the file cannot be read or does not parse (EIO, the `ValueError`
    chained), so callers handle one exception.
    """
    data = path.read_bytes()
    try:
        return parse_mountinfo(data)
    except ValueError as e:
        raise OSError(errno.EIO, f"{path}: {e}") from e


def mounts_under(base: Path) -> list[MountEntry]:
    """Mounts at or below `base` (made absolute, not resolved), latest first (so the deepest
    and the most recently stacked come before what they cover). Raises `OSError` as
    `mount_table`."""
    prefix = os.path.abspath(base)
    under = prefix.rstrip("/") + "/"
    found = [m for m in mount_table() if m.mountpoint == prefix or m.mountpoint.startswith(under)]
    return found[::-1]


def mount_at(path: Path) -> MountEntry | None:
    """The topmost mount whose mountpoint is exactly `path` (made absolute), or None.

    Raises `OSError` as `mount_table`.
    """
    target = os.path.abspath(path)
    found = [m for m in mount_table() if m.mountpoint == target]
    return found[-1] if found else None


def is_mountpoint(path: Path) -> bool:
    """True if something is mounted at `path`, also a dead FUSE mount whose stat fails (the
    kernel still lists it). False when mountinfo cannot be read."""
    try:
        return mount_at(path) is not None
    except OSError:
        return False
