"""Layer trees from zTOCs in the local store, pre-resolved in the background.

`LayerTrees.take(ztoc)` is what a lazy mount needs from a zTOC: the reader's zTOC without
its file entries (`Ztoc` with `files=()`, compact) and the layer's inode tree. Trees the
discovery cache queued (`queue(image, ztoc)`) are built ahead by a `Preresolver` in the
task scope the owner passes; `take` then waits for that result instead of redoing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from index.digest import Digest
from index.model import FileMetadata, Ztoc
from index.store import LocalStore, StoreError
from index.ztoc_codec import ZtocError, ZtocView
from snapshotter.fs import LayerTree, build_tree
from snapshotter.fs.errors import FsError
from snapshotter.tasks import TaskScope

from .errors import MountError
from .preresolve import Preresolver


class LayerTrees:
    """zTOC digest → (light `Ztoc`, `LayerTree`), built in worker threads (see module doc)."""

    def __init__(self, store: LocalStore, tasks: TaskScope, *, userxattr: bool = False) -> None:
        self._store = store
        self._userxattr = userxattr
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
        """Blocking: read, decode and build. Raises MountError."""
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
