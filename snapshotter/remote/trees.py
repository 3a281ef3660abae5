"""Layer trees from zTOCs in the local store, pre-resolved in the background.

`LayerTrees.take(ztoc)` is what a lazy mount needs from a zTOC: the reader's zTOC without
its file entries (`Ztoc` with `files=()`, compact) and the layer's inode tree. Trees the
discovery cache queued (`queue(image, ztoc)`) are built ahead by a `Preresolver` in the
task scope the owner passes; `take` then waits for that result instead of redoing it.

Decoding a large zTOC peaks at several times the size of the tree it leaves (about 50 MB for
a layer of 100k files, whose tree keeps under 10 MB); the heap keeps what was freed, so
after each build the worker thread hands it back to the system (`release_free_memory`:
glibc's `malloc_trim`, at most once per `TRIM_INTERVAL_SEC`, nothing elsewhere). The first
`LayerTrees` also tunes the process's heap for the lazy path (`limit_heap_growth`): at most
`MALLOC_ARENAS` malloc arenas (by default glibc gives each new worker thread its own, up to 8
per CPU, and what is freed in one is not reused by the others), and a fixed mmap threshold,
so that inflated spans and other large buffers are mapped on their own and unmapped when
freed (by default the threshold grows up to 32 MiB after the first such free, and later spans
fragment the heap). Measured with `tests.bench.bench_memory` (10 layers of 100k files, 50
readers): peak RSS 493 MB without either, 308 MB with both.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final, cast

from index.digest import Digest
from index.model import FileMetadata, Ztoc
from index.store import LocalStore, StoreError
from index.ztoc_codec import ZtocError, ZtocView
from snapshotter.fs import LayerTree, build_tree
from snapshotter.fs.errors import FsError
from snapshotter.tasks import TaskScope

from .errors import MountError
from .preresolve import Preresolver

TRIM_INTERVAL_SEC: Final = 1.0
MALLOC_ARENAS: Final = 2
MMAP_THRESHOLD_BYTES: Final = 256 * 1024
_M_MMAP_THRESHOLD: Final = -3  # glibc's malloc.h
_M_ARENA_MAX: Final = -8


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None (another libc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return cast(Callable[[int], int], trim)


_malloc_trim = _load_malloc_trim()
_heap_limited = False


def limit_heap_growth() -> bool:
    """Once per process, glibc only: at most `MALLOC_ARENAS` arenas and an mmap threshold of
    `MMAP_THRESHOLD_BYTES` (see the module doc); an environment that sets `MALLOC_ARENA_MAX`
    or `MALLOC_MMAP_THRESHOLD_` itself keeps its value. Returns whether it was set now; never
    raises."""
    global _heap_limited
    if _heap_limited or _malloc_trim is None:
        return False
    _heap_limited = True
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(_M_ARENA_MAX, MALLOC_ARENAS)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    return True


_trim_lock = threading.Lock()
_last_trim = -TRIM_INTERVAL_SEC


def release_free_memory() -> bool:
    """Blocking: give the heap's free memory back to the system (every arena), unless that
    was done less than `TRIM_INTERVAL_SEC` ago or is under way in another thread. Returns
    whether it ran; never raises."""
    global _last_trim
    if _malloc_trim is None or not _trim_lock.acquire(blocking=False):
        return False
    try:
        now = time.monotonic()
        if now - _last_trim < TRIM_INTERVAL_SEC:
            return False
        _malloc_trim(0)
        _last_trim = time.monotonic()
        return True
    finally:
        _trim_lock.release()


class LayerTrees:
    """zTOC digest → (light `Ztoc`, `LayerTree`), built in worker threads (see module doc)."""

    def __init__(self, store: LocalStore, tasks: TaskScope, *, userxattr: bool = False) -> None:
        self._store = store
        self._userxattr = userxattr
        limit_heap_growth()
        self._pre: Preresolver[tuple[Ztoc, LayerTree]] = Preresolver(self._load, tasks)

    def __repr__(self) -> str:
        return f"<LayerTrees {self._pre!r}>"

    def queue(self, image: Digest, ztoc: Digest) -> None:
        """Build the tree of `ztoc` (a layer of `image`) in the background. Never raises."""
        self._pre.add(image, ztoc)

    async def take(self, ztoc: Digest) -> tuple[Ztoc, LayerTree]:
        """The zTOC's light `Ztoc` and tree. Raises MountError (zTOC missing or unusable)."""
        return await self._pre.take(ztoc)

    def _load(self, ztoc_digest: Digest) -> tuple[Ztoc, LayerTree]:
        """Blocking: read, decode and build, then give the freed heap back. Raises MountError."""
        try:
            return self._build(ztoc_digest)
        finally:
            release_free_memory()  # the decoded zTOC is garbage by now

    def _build(self, ztoc_digest: Digest) -> tuple[Ztoc, LayerTree]:
        try:
            view = ZtocView(self._store.get_blob(ztoc_digest))
            tree = build_tree(cast(Sequence[FileMetadata], view), userxattr=self._userxattr)
        except (StoreError, ZtocError, FsError) as e:
            raise MountError(f"zTOC {ztoc_digest}: {e}") from e
        light = Ztoc(
            version=view.version,
            build_tool_identifier=view.build_tool_identifier,
            compressed_archive_size=view.compressed_archive_size,
            uncompressed_archive_size=view.uncompressed_archive_size,
            files=(),
            compression=view.compression,
        )
        return light, tree
