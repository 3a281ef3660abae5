"""The discovery cache: image manifest → its SOCI index and zTOCs (`ImageArtifacts`).

`ImageCatalog.artifacts` finds an image's index and brings its zTOCs into the local store
(`discovery.fetch_artifacts`) once per image manifest: concurrent
Prepares of one image share one discovery (`SingleFlight`), and the result is kept for the
next layers of the image. Memory is bounded: at most `max_images` images are remembered
(least recently used dropped first), and "this image has no index" is remembered for
`no_index_ttl_sec` for at most `max_images` images. Dropping an entry only costs a
rediscovery (the zTOCs stay in the local store).

Given a task scope, discovery returns once the index is in and the zTOCs download there
(`ImageArtifacts.ztocs`); an image one of whose zTOCs failed is discovered again by its next
Prepare (the zTOCs already in the store are not fetched again).

As each zTOC of an image is in the local store, its tree is queued for pre-resolution
(`queue_tree(image, ztoc)`; `warm_trees(largest zTOC's size)` once the index is found, while
its zTOCs download),
limited to the layers containerd will ask for (those in
`cri.image-layers`, every layer of the index without that label). Use from the trio thread.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import trio

from index.digest import Digest
from index.manifest import ZtocDescriptor
from index.oci.client import AsyncRegistryClient
from index.oci.reference import Reference
from index.store import LocalStore, StoreError
from snapshotter.singleflight import SingleFlight
from snapshotter.tasks import TaskScope

from .discovery import DiscoveryModes, ImageArtifacts, fetch_artifacts
from .errors import IndexFetchError, NoIndex
from .labels import LayerLabels

NO_INDEX_TTL_SEC = 60.0
"""How long "this image has no index" is remembered before asking the registry again."""
V = TypeVar("V")

MAX_IMAGES = 64
"""Images whose artifacts (and no-index verdicts) are remembered at most."""


class ImageCatalog:
    """Per-image discovery results, shared and bounded (see the module doc)."""

    def __init__(
        self,
        client: AsyncRegistryClient,
        store: LocalStore,
        modes: DiscoveryModes,
        *,
        queue_tree: Callable[[Digest, Digest], object],
        warm_trees: Callable[[int], object] = lambda largest: None,
        tasks: TaskScope | None = None,
        max_images: int = MAX_IMAGES,
        no_index_ttl_sec: float = NO_INDEX_TTL_SEC,
    ) -> None:
        self._client = client
        self._store = store
        self._modes = modes
        self._queue_tree = queue_tree
        self._warm_trees = warm_trees
        self._tasks = tasks
        self._max_images = max(1, max_images)
        self._no_index_ttl_sec = no_index_ttl_sec
        self._images: OrderedDict[Digest, ImageArtifacts] = OrderedDict()
        self._no_index: OrderedDict[Digest, float] = OrderedDict()
        self._flights: SingleFlight[tuple[Digest, Digest | None], ImageArtifacts] = SingleFlight()

    def __repr__(self) -> str:
        return f"<ImageCatalog images={len(self._images)} no_index={len(self._no_index)}>"

    def __len__(self) -> int:
        return len(self._images) + len(self._no_index)

    async def artifacts(self, ll: LayerLabels, ref: Reference) -> ImageArtifacts:
        """The artifacts of the image of `ll` (cached, or discovered now), and its layer
        trees queued from this layer up.

        Raises NoIndex (also while a recent "no index" is remembered), IndexFetchError.
        """
        manifest = ll.manifest_digest
        cached = self._images.get(manifest)
        if (
            cached is not None
            and ll.index_digest in (None, cached.index_digest)
            and not cached.ztocs.failed
        ):
            self._images.move_to_end(manifest)
        else:
            cached = await self._flights.do(
                (manifest, ll.index_digest), functools.partial(self._discover, ll, ref)
            )
        self._queue_image(cached, ll)
        return cached

    async def _discover(self, ll: LayerLabels, ref: Reference) -> ImageArtifacts:
        manifest = ll.manifest_digest
        until = self._no_index.get(manifest, -math.inf)
        if ll.index_digest is None and until > trio.current_time():
            raise NoIndex(f"no SOCI index for image manifest {ref.name}@{manifest} (cached)")
        self._no_index.pop(manifest, None)
        try:
            artifacts = await fetch_artifacts(
                self._client,
                self._store,
                ref,
                manifest,
                ll.index_digest,
                self._modes,
                tasks=self._tasks,
                on_ztoc=functools.partial(self._ztoc_ready, ll),
            )
        except NoIndex:
            self._remember(self._no_index, manifest, trio.current_time() + self._no_index_ttl_sec)
            raise
        except (StoreError, OSError) as e:
            raise IndexFetchError(f"image {ref.name}@{manifest}: local store: {e}") from e
        self._warm_trees(max((z.size for z in artifacts.index.ztocs), default=0))
        self._remember(self._images, manifest, artifacts)
        return artifacts

    def _remember(self, table: OrderedDict[Digest, V], key: Digest, value: V) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self._max_images:
            table.popitem(last=False)

    def _ztoc_ready(self, ll: LayerLabels, z: ZtocDescriptor) -> None:
        """zTOC `z` of the image of `ll` is in the local store: queue its tree if containerd
        will ask for its layer (in `cri.image-layers`; every layer without that label)."""
        if not ll.image_layers or z.layer_digest in ll.image_layers:
            self._queue_tree(ll.manifest_digest, Digest(z.digest))

    def _queue_image(self, artifacts: ImageArtifacts, ll: LayerLabels) -> None:
        """Queue the trees of the image's layers from this one up, in containerd's order (for
        an index found by an earlier Prepare; zTOCs already queued are skipped there, and
        those still downloading are queued when they arrive)."""
        index = artifacts.index
        for layer in ll.image_layers or [Digest(z.layer_digest) for z in index.ztocs]:
            z = index.ztoc_for_layer(layer)
            if z is not None and artifacts.ztocs.ready(Digest(z.digest)):
                self._ztoc_ready(ll, z)
