"""Layer trees from zTOCs in the local store, pre-resolved in the background.

`LayerTrees.take(ztoc)` is what a lazy mount needs from a zTOC: the reader's zTOC without
its file entries (`Ztoc` with `files=()`, compact) and the layer's inode tree. Trees the
discovery cache queued (`queue(image, ztoc)`) are built ahead by a `Preresolver` in the
task scope the owner passes; `take` then waits for that result instead of redoing it.

Builds of zTOCs of `PROCESS_WAIT_ZTOC_BYTES` and more run in the `TreeProcesses` the owner
passes (`treeprocs`: off the daemon's interpreter), started by `warm` when the catalog found
an index with a zTOC of `PROCESS_MIN_ZTOC_BYTES` or more; such zTOCs below the first bound
go to a worker only when one is started and idle. The others, all of them without workers,
and those the workers cannot do run in a worker thread here, which then gives the freed heap
back (`heap.release_free_memory`). While the workers run, a task in the
same scope stops them once they were idle for their `idle_sec`. The first `LayerTrees` also
tunes the process's heap for the lazy path (`heap.limit_heap_growth`).
"""

from __future__ import annotations

from typing import Final

import trio

from index.digest import Digest
from index.model import Ztoc
from index.store import LocalStore, StoreError
from index.ztoc_codec import ZtocError
from snapshotter.fs import LayerTree
from snapshotter.fs.errors import FsError
from snapshotter.tasks import TaskScope

from .errors import MountError
from .heap import limit_heap_growth, release_free_memory
from .preresolve import Preresolver
from .treeprocs import TreeProcesses, build_light

PROCESS_MIN_ZTOC_BYTES: Final = 1 << 20
"""Smaller zTOCs are built here: their tree takes under about 30 ms."""
PROCESS_WAIT_ZTOC_BYTES: Final = 4 << 20
"""Smaller zTOCs go to a worker only when one is started and idle, else they are built here
(about 0.12 s at most) rather than wait for a worker to start (0.15-0.4 s) or finish."""
IDLE_CHECK_MIN_SEC = 0.05
"""Shortest sleep of the task that stops idle workers."""


class LayerTrees:
    """zTOC digest → (light `Ztoc`, `LayerTree`), built in worker threads (see module doc)."""

    def __init__(
        self,
        store: LocalStore,
        tasks: TaskScope,
        *,
        userxattr: bool = False,
        processes: TreeProcesses | None = None,
    ) -> None:
        self._store = store
        self._tasks = tasks
        self._userxattr = userxattr
        self._processes = processes
        limit_heap_growth()
        self._pre: Preresolver[tuple[Ztoc, LayerTree]] = Preresolver(self._load, tasks)
        if processes is not None:
            tasks.start_soon(self._stop_idle, processes, name="tree workers idle")

    def __repr__(self) -> str:
        return f"<LayerTrees {self._pre!r}>"

    def queue(self, image: Digest, ztoc: Digest) -> None:
        """Build the tree of `ztoc` (a layer of `image`) in the background. Never raises."""
        self._pre.add(image, ztoc)

    def warm(self, largest: int) -> None:
        """Trees of zTOCs up to `largest` bytes will be built soon: start the worker
        processes in the background when one of them will go there. Never raises."""
        if self._processes is not None and largest >= PROCESS_MIN_ZTOC_BYTES:
            self._tasks.start_soon(
                trio.to_thread.run_sync, self._processes.start, name="tree workers start"
            )

    async def take(self, ztoc: Digest) -> tuple[Ztoc, LayerTree]:
        """The zTOC's light `Ztoc` and tree. Raises MountError (zTOC missing or unusable)."""
        return await self._pre.take(ztoc)

    def _load(self, ztoc_digest: Digest) -> tuple[Ztoc, LayerTree]:
        """Blocking: read, then build in the workers or here. Raises MountError."""
        try:
            data = self._store.get_blob(ztoc_digest)
            if self._processes is not None and len(data) >= PROCESS_MIN_ZTOC_BYTES:
                wait = len(data) >= PROCESS_WAIT_ZTOC_BYTES
                built = self._processes.build(data, userxattr=self._userxattr, wait=wait)
                if built is not None:
                    return built
            try:
                return build_light(data, userxattr=self._userxattr)
            finally:
                del data
                release_free_memory()  # the decoded zTOC is garbage by now
        except (StoreError, ZtocError, FsError, MountError) as e:
            raise MountError(f"zTOC {ztoc_digest}: {e}") from e

    @staticmethod
    async def _stop_idle(processes: TreeProcesses) -> None:
        """Until the scope closes: stop the workers whenever they were idle long enough."""
        while True:
            wait = processes.seconds_to_idle()
            if wait is None or (
                wait <= 0 and await trio.to_thread.run_sync(processes.close_if_idle)
            ):  # in a thread: stopping waits for the workers to exit
                wait = processes.idle_sec
            await trio.sleep(max(wait, IDLE_CHECK_MIN_SEC))
