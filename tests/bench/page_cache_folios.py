"""Folio sizes of a file's pages in the kernel page cache (evidence for the warm-read gap).

Run (root): ``python -m tests.bench.page_cache_folios FILE...``

Maps each file read-only with ``MAP_POPULATE`` (which also reads in pages not cached yet: read
the file the way you want to inspect first), looks every page up in ``/proc/self/pagemap`` and
``/proc/kpageflags`` (compound head/tail bits) and prints how many folios of each size hold it.
ext4 builds large folios (up to 2 MiB) on sequential reads; a FUSE mount on Linux 6.18 holds
every page in its own 4 KiB folio, so a warm 1 MiB ``read`` walks 256 folios there.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import sys
from collections import Counter
from collections.abc import Sequence

PAGE = mmap.PAGESIZE
_PFN_MASK = (1 << 55) - 1
_KPF_COMPOUND_HEAD = 15
_KPF_COMPOUND_TAIL = 16
_MAP_POPULATE = 0x8000


def folio_sizes(path: str) -> tuple[int, dict[int, int]]:
    """(pages not mapped, {folio size in KiB: count}) for the pages of `path`.

    Raises OSError when the file, pagemap or kpageflags cannot be read (kpageflags needs root).
    """
    fd = os.open(path, os.O_RDONLY)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    try:
        size = os.fstat(fd).st_size
        pages = (size + PAGE - 1) // PAGE
        base = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED | _MAP_POPULATE, fd, 0)
        if base in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
            kflags = os.open("/proc/kpageflags", os.O_RDONLY)
            try:
                raw = os.pread(pagemap, 8 * pages, (base // PAGE) * 8)
                entries = struct.unpack(f"<{pages}Q", raw)
                sizes: Counter[int] = Counter()
                unmapped = run = 0
                for entry in entries:
                    if not entry >> 63:
                        unmapped += 1
                        continue
                    flags = struct.unpack("<Q", os.pread(kflags, 8, (entry & _PFN_MASK) * 8))[0]
                    if flags >> _KPF_COMPOUND_TAIL & 1:
                        run += 1
                        continue
                    if run:
                        sizes[run * PAGE // 1024] += 1
                    run = 1 if flags >> _KPF_COMPOUND_HEAD & 1 else 0
                    if not run:
                        sizes[PAGE // 1024] += 1
                if run:
                    sizes[run * PAGE // 1024] += 1
            finally:
                os.close(pagemap)
                os.close(kflags)
        finally:
            libc.munmap(ctypes.c_void_p(base), size)
    finally:
        os.close(fd)
    return unmapped, dict(sorted(sizes.items()))


def main(argv: Sequence[str] | None = None) -> int:
    paths = list(argv if argv is not None else sys.argv[1:])
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    for path in paths:
        unmapped, sizes = folio_sizes(path)
        text = ", ".join(f"{n} x {kib} KiB" for kib, n in sizes.items())
        print(f"{path}: {text} (not mapped: {unmapped} pages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def describe(path: str) -> str:
    """`folio_sizes` as text ("24415 x 4 KiB, ..."), or the error when it cannot be read."""
    try:
        unmapped, sizes = folio_sizes(path)
    except OSError as e:
        return f"unknown ({e})"
    text = ", ".join(f"{n} x {kib} KiB" for kib, n in sizes.items())
    return text + (f" ({unmapped} pages not mapped)" if unmapped else "")
