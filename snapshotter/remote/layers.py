"""Mounting lazy layers: FUSE host, bind mount, the layer's task scope, background fetch.

`LazyLayers.mount(mountpoint, name, record)` takes the layer's tree (`LayerTrees`), makes a
`RemoteLayerReader` over the `RegistrySource` of the image's repository with the shared span
cache, adds it to the daemon's FUSE host as top-level directory `name` (`snap-<id>`),
bind-mounts that directory on the snapshot's `fs`, persists the restore record and registers
the layer with the background fetcher. Each layer gets its own child `TaskScope` (named
`layer snap-<id>`) from the mounter's scope; the reader runs its read-ahead there, so
`unmount` (or shutdown) cancels every task of the layer and nothing of it outlives it.

Error boundaries: a task of the layer's scope that raises something unexpected is logged,
counted and kept by that scope (`statuses()`: `taskErrors`, `lastTaskError`); a failed
background step is the fetcher's boundary, recorded on the reader (`errors`, `lastError` in
the layer's status file). Neither stops the other layers or the daemon.

When `unmount` removes the last mounted layer of an image repository (registry host and
repository of the records' `image_ref`), it awaits the optional `on_last_layer` callback with
that image's reference (the daemon forgets the credentials captured for the repository). A
layer restored after a restart counts as mounted; `close` (shutdown) calls nothing.

Restart survival: when the FUSE connection outlives the daemon (`snapshotter.fs.connection`),
`keep_mounts` is set and `close` leaves every bind mount in place; the next daemon adopts
them: `adopt` puts each layer whose bind mount is still there back into the FUSE host
(same slot, so the same inode numbers) before the connection is served again, and `mount`
of an adopted layer (the service's restore) finds it served already. A layer's bind mount
that is still there but whose layer could not be adopted is reused by `mount`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from index.digest import Digest
from index.oci.client import AsyncRegistryClient
from index.oci.errors import InvalidReferenceError, OciError
from index.oci.reference import Reference
from snapshotter.fs.errors import FsError
from snapshotter.lazy import DemandTracker, ReadConfig, RemoteLayerReader, default_inflate_limiter
from snapshotter.lazy.background import BackgroundFetcher
from snapshotter.lazy.cache import SpanCache
from snapshotter.lazy.fetcher import SpanFetcher
from snapshotter.lazy.sources import BlobSource, ChainSource, FetchConfig, RegistrySource
from snapshotter.peers.source import PeerSettings, PeerSource
from snapshotter.tasks import TaskScope

from . import bindmount
from .errors import MountError
from .records import MOUNT_THREADS, LayerRecord, RecordStore, layer_name
from .trees import LayerTrees

if TYPE_CHECKING:
    from snapshotter.fs.fuse import FuseMount

log = logging.getLogger(__name__)

ADOPT_PARALLEL = 8
"""Layers put back at once after a restart (each loads its zTOC and builds its tree)."""

MAX_SOURCES = 64
"""Registry sources (one per repository) kept for reuse; readers keep their own."""

SourceMeter = Callable[[BlobSource, str], BlobSource]
"""Wraps a source so that what it fetches is recorded under a kind (`registry`, `peer`):
`snapshotter.metrics.DaemonMetrics.metered`."""


class RegistrySources:
    """One `RegistrySource` per repository, shared by its layers; LRU-bounded. With `meter`,
    each is wrapped once (kind `registry`), so every fetch from a registry is recorded:
    the layers', and those made for peers and for the mirror."""

    def __init__(
        self,
        client: AsyncRegistryClient,
        config: FetchConfig,
        *,
        max_sources: int = MAX_SOURCES,
        meter: SourceMeter | None = None,
    ) -> None:
        self._client = client
        self._config = config
        self._max = max(1, max_sources)
        self.meter = meter
        self._sources: OrderedDict[str, BlobSource] = OrderedDict()

    def __repr__(self) -> str:
        return f"<RegistrySources {len(self._sources)}>"

    def get(self, ref: Reference) -> BlobSource:
        key = f"{ref.registry}/{ref.repository}"
        source = self._sources.get(key)
        if source is None:
            source = RegistrySource(self._client, ref, config=self._config)
            if self.meter is not None:
                source = self.meter(source, "registry")
            self._sources[key] = source
            while len(self._sources) > self._max:
                self._sources.popitem(last=False)
        self._sources.move_to_end(key)
        return source


class LayerSources:
    """The `BlobSource` of each lazy layer: its repository's `RegistrySource` (hosts.toml
    mirrors, then the registry), behind the chunk owners (`PeerSource`) when peers are on,
    each with its own time budget: the peers `owners` x their budget (each owner one
    budget), the registry every attempt of its fetch policy."""

    def __init__(
        self,
        registry: RegistrySources,
        fetch_config: FetchConfig,
        peers: PeerSettings | None = None,
    ) -> None:
        self.registry = registry
        self.peers = peers
        self._registry_budget = fetch_config.max_attempts * (
            fetch_config.request_timeout_sec + fetch_config.backoff_max_ms / 1000.0
        )

    def __repr__(self) -> str:
        return f"<LayerSources {self.registry!r} peers={self.peers is not None}>"

    def for_layer(self, record: LayerRecord) -> BlobSource:
        ref = Reference.parse(record.image_ref)
        upstream = self.registry.get(ref)
        if self.peers is None:
            return upstream
        peer: BlobSource = PeerSource(
            self.peers, ref, Digest(record.layer_digest), Digest(record.ztoc_digest)
        )
        if self.registry.meter is not None:
            peer = self.registry.meter(peer, "peer")
        return ChainSource(
            [peer, upstream],
            budgets=[self.peers.budget_sec * self.peers.owners + 1.0, self._registry_budget],
        )


LastLayerCallback = Callable[[Reference], Awaitable[None]]
"""Called with an image's reference when the last mounted layer of its repository is
unmounted. What it raises is logged (`last layer callback failed`), never propagated."""


def released_repository(record: LayerRecord, remaining: Iterable[LayerRecord]) -> Reference | None:
    """The reference of `record`'s image when no record of `remaining` (the layers still
    mounted) is of the same registry host and repository; None when one is, or when
    `record.image_ref` does not parse."""
    try:
        ref = Reference.parse(record.image_ref)
    except InvalidReferenceError:
        return None
    for other in remaining:
        try:
            o = Reference.parse(other.image_ref)
        except InvalidReferenceError:
            continue
        if (o.registry, o.repository) == (ref.registry, ref.repository):
            return None
    return ref


@dataclass(eq=False)
class _Layer:
    name: str
    mountpoint: Path
    record: LayerRecord
    reader: RemoteLayerReader
    scope: TaskScope


class LazyLayers:
    """The mounted lazy layers (see the module doc). Use from the trio thread."""

    def __init__(
        self,
        *,
        fuse: FuseMount,
        tasks: TaskScope,
        trees: LayerTrees,
        sources: LayerSources,
        records: RecordStore,
        cache: SpanCache,
        background: BackgroundFetcher,
        tracker: DemandTracker,
        read_config: ReadConfig | None = None,
        on_last_layer: LastLayerCallback | None = None,
    ) -> None:
        self.fuse = fuse
        self.tasks = tasks
        self.trees = trees
        self.sources = sources
        self.records = records
        self.cache = cache
        self.background = background
        self.tracker = tracker
        self.read_config = read_config or ReadConfig()
        self.on_last_layer = on_last_layer
        self._inflate_limiter = default_inflate_limiter(self.read_config)
        self._io_limiter = trio.CapacityLimiter(4)  # span-cache writes, all layers
        self._layers: dict[str, _Layer] = {}
        self.keep_mounts = False
        """Shutdown leaves the bind mounts (set when the FUSE connection outlives us)."""
        self._kept_binds: dict[Path, str] = {}
        """Bind mounts of an earlier process still in place: mountpoint -> layer name."""

    def __repr__(self) -> str:
        return f"<LazyLayers {len(self._layers)}>"

    async def adopt(self, binds: dict[Path, str], records: dict[str, LayerRecord]) -> int:
        """After a restart on a kept FUSE connection: serve again each layer of `records`
        (by FUSE directory name) whose bind mount `binds` (mountpoint -> name) still has,
        without binding again; returns how many. Layers that fail are logged (`lazy layer
        not adopted`) and left to the service's restore, which reuses their bind mounts.
        At most `ADOPT_PARALLEL` layers are put back at once (running containers wait for
        all of them: the connection is served once this returns)."""
        self._kept_binds = dict(binds)
        adopted = 0
        limiter = trio.CapacityLimiter(ADOPT_PARALLEL)

        async def adopt_one(mountpoint: Path, name: str, record: LayerRecord) -> None:
            nonlocal adopted
            async with limiter:
                try:
                    await self._mount(mountpoint, name, record, bind=False)
                except MountError as e:
                    log.warning("lazy layer not adopted", extra={"fuse_dir": name, "error": str(e)})
                    return
            adopted += 1

        async with trio.open_nursery() as nursery:
            for mountpoint, name in sorted(binds.items()):
                record = records.get(name)
                if record is not None:
                    nursery.start_soon(adopt_one, mountpoint, name, record)
        return adopted

    def __len__(self) -> int:
        return len(self._layers)

    async def mount(self, mountpoint: Path, name: str, record: LayerRecord) -> None:
        """Serve the layer of `record` as `name` on `mountpoint` (see the module doc).

        Raises MountError; on any failure or cancellation nothing of the layer is left
        (no FUSE directory, bind mount, record or task; a bind mount kept from an earlier
        process stays).
        """
        served = self._layers.get(name)
        if (
            served is not None
            and served.mountpoint == mountpoint
            and served.record.layer_digest == record.layer_digest
        ):
            return  # adopted after a restart: served already
        bind = self._kept_binds.get(mountpoint) != name
        await self._mount(mountpoint, name, record, bind=bind)

    async def _mount(self, mountpoint: Path, name: str, record: LayerRecord, *, bind: bool) -> None:
        t0 = time.monotonic()
        ztoc, tree = await self.trees.take(Digest(record.ztoc_digest))
        t1 = time.monotonic()
        layer = Digest(record.layer_digest)
        try:
            scope = await self.tasks.open_child(f"layer {name}")
        except RuntimeError as e:  # the mounter is shutting down
            raise MountError(f"layer {layer}: {e}") from e
        added = bound = False
        try:
            try:
                reader = RemoteLayerReader(
                    layer,
                    ztoc,
                    self.sources.for_layer(record),
                    self.cache,
                    config=self.read_config,
                    tracker=self.tracker,
                    inflate_limiter=self._inflate_limiter,
                    io_limiter=self._io_limiter,
                    tasks=scope,
                )
                layer_dir = self.fuse.add_layer(
                    name, tree, reader, slot=record.slot or None, digest=str(layer)
                )
                added = True
            except (OciError, FsError, ValueError) as e:
                raise MountError(f"layer {layer} as {name}: {e}") from e
            t2 = time.monotonic()
            try:
                if bind:
                    await trio.to_thread.run_sync(
                        bindmount.bind, layer_dir, mountpoint, limiter=MOUNT_THREADS
                    )
                    bound = True
                t3 = time.monotonic()
                record = record.with_slot(self.fuse.host.status(name).slot)
                await trio.to_thread.run_sync(
                    self.records.write, name, record, limiter=MOUNT_THREADS
                )
            except OSError as e:
                raise MountError(f"layer {layer}: {e}") from e
        except BaseException:
            with trio.CancelScope(shield=True):
                if bound:
                    with contextlib.suppress(OSError):
                        await trio.to_thread.run_sync(
                            bindmount.detach, mountpoint, limiter=MOUNT_THREADS
                        )
                if added:
                    with contextlib.suppress(FsError):
                        self.fuse.remove_layer(name)
                await scope.aclose()
            raise
        entry = _Layer(name, mountpoint, record, reader, scope)
        self._layers[name] = entry
        self.tracker.touch()
        self.background.register(name, reader)
        log.debug(
            "lazy layer mount timings",
            extra={
                "layer": str(layer),
                "tree_ms": round((t1 - t0) * 1000),
                "fuse_ms": round((t2 - t1) * 1000),
                "bind_ms": round((t3 - t2) * 1000),
                "record_ms": round((time.monotonic() - t3) * 1000),
            },
        )

    async def unmount(self, mountpoint: Path) -> None:
        """Detach the bind mount on `mountpoint`; if a layer was served there: stop its
        background fetch, drop it from the FUSE host, close its task scope (cancelling its
        read-ahead), remove its record and mark its cached spans evictable first; when it was
        the last mounted layer of its image's repository, await `on_last_layer`. A layer not
        served here (its snapshot was removed before a restart that found no mount to adopt)
        loses its record, and its cached spans are marked evictable first unless a mounted
        layer or another record is of the same blob (`_release_unserved`). Never raises;
        shielded from cancellation."""
        try:
            name = layer_name(mountpoint)
        except ValueError:
            return
        with trio.CancelScope(shield=True):
            try:
                while await trio.to_thread.run_sync(
                    bindmount.detach, mountpoint, limiter=MOUNT_THREADS
                ):
                    pass
            except OSError as e:
                log.warning("unmount failed", extra={"path": str(mountpoint), "error": str(e)})
            self._kept_binds.pop(mountpoint, None)
            layer = self._layers.pop(name, None)
            if layer is not None:
                self.background.unregister(name)
                with contextlib.suppress(FsError):
                    self.fuse.remove_layer(name)
                await layer.scope.aclose()
            else:
                await self._release_unserved(name)  # before its record, the only trace, goes
            try:
                await trio.to_thread.run_sync(self.records.remove, name, limiter=MOUNT_THREADS)
            except OSError as e:
                log.warning(
                    "cannot remove restore record", extra={"fuse_dir": name, "error": str(e)}
                )
            if layer is None:
                return
            digest = Digest(layer.record.layer_digest)
            if not any(m.record.layer_digest == digest for m in self._layers.values()):
                await self._release(digest)
            log.info("lazy layer unmounted", extra={"fuse_dir": name, "layer": digest})
            if self.on_last_layer is not None:
                released = released_repository(
                    layer.record, (m.record for m in self._layers.values())
                )
                if released is not None:
                    try:
                        await self.on_last_layer(released)
                    except Exception as e:
                        log.warning(
                            "last layer callback failed",
                            extra={"image": layer.record.image_ref, "error": repr(e)},
                        )

    async def _release(self, digest: Digest) -> None:
        """Mark the cached spans of blob `digest` evictable first. Never raises."""
        try:
            await trio.to_thread.run_sync(self.cache.release_layer, digest, limiter=MOUNT_THREADS)
        except Exception as e:  # a mark that cannot be written is not worth failing for
            log.warning("cannot release cached spans", extra={"layer": digest, "error": repr(e)})

    async def _release_unserved(self, name: str) -> None:
        """Release the cached spans of the blob `name`'s restore record names, a layer that is
        not served (its snapshot was removed before a restart that did not put it back): the
        record is all that still knows the blob. Kept when a mounted layer or another record
        is of the same blob; an unreadable record releases nothing. Never raises."""

        def unused_blob() -> Digest | None:
            try:
                record = self.records.read(name)
                if record is None:
                    return None
                digest = Digest(record.layer_digest)
                others = self.records.read_all()
            except (OSError, ValueError, TypeError, KeyError):
                return None
            others.pop(name, None)
            if any(r.layer_digest == digest for r in others.values()):
                return None
            return digest

        digest = await trio.to_thread.run_sync(unused_blob, limiter=MOUNT_THREADS)
        if digest is None or any(m.record.layer_digest == digest for m in self._layers.values()):
            return
        log.info("cached spans released", extra={"fuse_dir": name, "layer": digest})
        await self._release(digest)

    async def close(self) -> None:
        """Shutdown: detach every bind mount and close every layer's scope (the FUSE host and
        the records stay for the next start). With `keep_mounts` the bind mounts stay and
        the FUSE mount first stops answering (`FuseMount.stop`); pushes into the page cache
        end before either. Never raises; shielded."""
        with trio.CancelScope(shield=True):
            # no store may be left waiting for a READ nobody answers (fs/push.py)
            await self.fuse.finish_pushes()
            if self.keep_mounts:
                # Requests in flight are cancelled unanswered, to be resent to the next
                # daemon: answered now, reads of a closing layer would fail (EIO).
                self.fuse.stop()
            for layer in list(self._layers.values()):
                if not self.keep_mounts:
                    with contextlib.suppress(OSError):
                        await trio.to_thread.run_sync(
                            bindmount.detach, layer.mountpoint, limiter=MOUNT_THREADS
                        )
                self.background.unregister(layer.name)
                await layer.scope.aclose()
            self._layers.clear()

    def fetcher_for(self, layer: Digest) -> SpanFetcher | None:
        """The span fetcher of a mounted layer with blob `layer` (for peers), or None."""
        for entry in self._layers.values():
            if entry.reader.layer == layer:
                return entry.reader.fetcher
        return None

    def statuses(self) -> dict[str, dict[str, object]]:
        """Per mounted layer (by FUSE directory name): its digest and image, the unexpected
        errors of its task scope (`taskErrors`, `lastTaskError`) and the reader's failures,
        background steps included (`fetchErrors`, `lastFetchError`)."""
        out: dict[str, dict[str, object]] = {}
        for name in sorted(self._layers):
            layer = self._layers[name]
            stats = layer.scope.statistics()
            reader = layer.reader.status()
            doc: dict[str, object] = {
                "digest": layer.record.layer_digest,
                "image": layer.record.image_ref,
                "taskErrors": stats.errors,
                "fetchErrors": reader.errors,
                "bytesFrom": dict(reader.bytes_from),
            }
            if stats.last_error:
                doc["lastTaskError"] = stats.last_error
            if reader.last_error:
                doc["lastFetchError"] = reader.last_error
            out[name] = doc
        return out
