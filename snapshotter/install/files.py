"""One file `install` writes: its old and new text, the diff, the write, the backup."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from index.fsutil import atomic_file

from ..mirror.hoststoml import Change
from .layout import BACKUP_SUFFIX

FILE_MODE = 0o644
DIR_MODE = 0o755


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_bytes(path: Path) -> bytes | None:
    """The bytes of `path`; None when it does not exist. Raises OSError."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


@dataclass(frozen=True, slots=True)
class FileChange:
    """`path` (under the prefix) goes from `old` (None: absent) to `new`.

    `backup`: keep the old bytes as `<path>.pre-sociable` before writing (a file we change,
    not one we create); an existing backup is never replaced, so it stays the original.
    """

    path: Path
    old: bytes | None
    new: bytes
    backup: bool = False
    mode: int = FILE_MODE

    @property
    def changed(self) -> bool:
        return self.old != self.new

    @property
    def backup_path(self) -> Path:
        return backup_path(self.path)

    def diff(self) -> str:
        """A unified diff (`/dev/null` for a new file); empty when nothing changes."""
        old = None if self.old is None else self.old.decode("utf-8", "replace")
        return Change(self.path, old, self.new.decode("utf-8", "replace")).diff()

    def describe(self) -> str:
        if self.old is None:
            return f"created {self.path}"
        backup = f" (original kept as {self.backup_path})" if self.backup else ""
        return f"updated {self.path}{backup}"


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + BACKUP_SUFFIX)


def make_dirs(directory: Path) -> list[Path]:
    """Create `directory` and missing parents (0755); return those created, outermost
    first. Raises OSError."""
    missing: list[Path] = []
    d = directory
    while not d.exists():
        missing.append(d)
        d = d.parent
    for m in reversed(missing):
        m.mkdir(mode=DIR_MODE)
        os.chmod(m, DIR_MODE)  # not narrowed by the umask
    return list(reversed(missing))


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` atomically (durable) with `data` and `mode`; a symbolic link is
    written through. Raises OSError."""
    target = Path(os.path.realpath(path))
    with atomic_file(target, durable=True) as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)


def existing_mode(path: Path, default: int = FILE_MODE) -> int:
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return default
