"""The page cache as tests need it: how much of a file is in memory (mincore(2), which reads
nothing), and evicting a file's pages with a check that they really left."""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.mincore.restype = ctypes.c_int


def resident_pages(path: Path) -> int:
    """How many of `path`'s pages are in the page cache now (0 for an empty file)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    pages = -(-size // mmap.PAGESIZE)
    vector = ctypes.create_string_buffer(pages)
    # a private map is writable for ctypes to take its address; nothing is written to it
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, mmap.MAP_PRIVATE, prot) as m:
        anchor = ctypes.c_char.from_buffer(m)
        try:
            if _libc.mincore(ctypes.addressof(anchor), size, vector) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore {path}: {os.strerror(err)}")
        finally:
            del anchor
    return sum(b & 1 for b in vector.raw)


def evict(path: Path, within_s: float = 5.0) -> None:
    """Write `path` back and drop its pages from the page cache, retrying while the kernel
    keeps some (a page still in a per-CPU batch or under writeback is skipped by
    POSIX_FADV_DONTNEED); as root, `drop_caches` is the last resort. Raises AssertionError when
    pages remain."""
    deadline = time.monotonic() + within_s
    while True:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if resident_pages(path) == 0:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if os.geteuid() == 0:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        if resident_pages(path) == 0:
            return
    raise AssertionError(f"{resident_pages(path)} pages of {path} stay in the page cache")
