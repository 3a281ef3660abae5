"""Writing files so that a reader sees the old content or the new, never a torn one.

`atomic_file` is the one temp-file-then-rename writer of the project: the temporary file is
created in the target's directory (or `tmp_dir`, which must be on the same filesystem), and
renamed over the target only when the `with` body finished without an exception; on failure it
is removed and nothing is left behind. `durable=True` also fsyncs the file before the rename
and the directory after it, for state that must survive a power loss (restore records,
metadata); caches that can be rebuilt skip it. A process killed between creating the
temporary file and the rename leaves it behind: `remove_stale_temps` removes such files when
the directory's only writer starts.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync the directory `path` (makes a rename in it durable). Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike[str],
    *,
    tmp_dir: str | os.PathLike[str] | None = None,
    prefix: str = ".tmp-",
    durable: bool = False,
) -> Iterator[BinaryIO]:
    """A binary file to write; on a clean exit it replaces `path` atomically.

    Raises OSError from creating, writing, syncing or renaming (the temporary file is removed).
    The parent directory must exist.
    """
    target = Path(path)
    directory = Path(tmp_dir) if tmp_dir is not None else target.parent
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    if durable:
        fsync_dir(target.parent)


def remove_stale_temps(directory: str | os.PathLike[str], prefix: str = ".tmp-") -> int:
    """Remove `atomic_file` temporaries (names starting with `prefix`) that a killed writer
    left in `directory`; call only when no writer is running. Returns how many were removed.
    A missing directory or a file that cannot be removed is skipped; never raises."""
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        if name.startswith(prefix):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))
                removed += 1
    return removed


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    tmp_dir: str | os.PathLike[str] | None = None,
    durable: bool = False,
) -> None:
    """Replace `path` with `data` atomically (see `atomic_file`). Raises OSError."""
    with atomic_file(path, tmp_dir=tmp_dir, durable=durable) as f:
        f.write(data)
