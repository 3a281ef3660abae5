"""`RemoteMounter`: the daemon's `LayerMounter` for lazily served layers (issue 4).

On an unpack Prepare (labels with `containerd.io/snapshot.ref` and CRI's `cri.*` labels):

1. find the image's SOCI index and bring its zTOCs into the local store (`discovery`),
   cached per image manifest digest for the daemon's lifetime;
2. layer in the index: build the layer tree from the zTOC (`ZtocView`, compact), make a
   `RemoteLayerReader` over a `RegistrySource` for the image's repository with the shared span
   cache, add it to the daemon's single FUSE host as top-level directory `snap-<id>`, and
   bind-mount that directory on the snapshot's `fs` (DESIGN.md D1: the overlay lowerdir is the
   snapshot's `fs`, as for local layers; the bind mount follows the snapshot directory). The
   layer is registered with the background fetcher. Result REMOTE.
3. layer not in the index (`no_ztoc`), or a lazy mount that failed (`mount`): unpack it
   locally into `fs` (`unpack`). Result LOCAL; if that fails too, DECLINED.
4. no index (`no_index`), an index that cannot be fetched (`index_fetch`), no CRI labels
   (`no_cri_labels`): DECLINED, containerd pulls the layer.

Each fallback is logged once (per image for image-wide reasons, per layer otherwise) with
the message `lazy layer fallback` and the stable keys `reason`, `image`, `layer`, `error`.

What restore needs is persisted in `<root>/remote/snap-<id>.json` (image ref, manifest,
layer, index and zTOC digests, FUSE slot); the zTOC itself is in the local store, so a
restart re-mounts without the registry. A layer that cannot be restored is logged
(`lazy layer restore failed`) and answers Unavailable on `check` (stargz's behaviour);
the daemon still starts.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import shutil
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import trio

from index.digest import Digest
from index.manifest import ZtocDescriptor
from index.model import FileMetadata, Ztoc
from index.oci.dockerconfig import DockerConfig
from index.oci.errors import OciError
from index.oci.reference import Reference
from index.oci.registry import RegistryClient
from index.store import LocalStore, StoreError
from index.ztoc_codec import ZtocError, ZtocView
from snapshotter.config import RemoteConfig
from snapshotter.errors import Unavailable
from snapshotter.fs import LayerHost, LayerTree, build_tree
from snapshotter.fs.errors import FsError
from snapshotter.lazy.background import BackgroundConfig, BackgroundFetcher
from snapshotter.lazy.cache import CacheConfig, SpanCache
from snapshotter.lazy.sources import FetchConfig, RegistrySource
from snapshotter.lazy.spans import DemandTracker, RemoteLayerReader, default_inflate_limiter
from snapshotter.snapshots.mounts import detect_overlay_features
from snapshotter.snapshots.service import DeclineMounter, LayerMounter, MountResult

from . import bindmount
from .discovery import DiscoveryModes, ImageArtifacts, fetch_artifacts
from .errors import (
    BadLabels,
    IndexFetchError,
    MountError,
    NoIndex,
    NoZtoc,
    RemoteError,
    UnpackError,
)
from .labels import TARGET_REF, LayerLabels
from .preresolve import Preresolver
from .unpack import unpack_layer

if TYPE_CHECKING:
    from snapshotter.daemon import Settings
    from snapshotter.fs.fuse import FuseMount

log = logging.getLogger(__name__)

NO_INDEX_TTL_SEC = 60.0
"""How long "this image has no index" is remembered before asking the registry again."""


@dataclass(frozen=True, slots=True)
class LayerRecord:
    """What restoring a lazy layer after a restart needs (persisted as JSON)."""

    image_ref: str
    manifest_digest: str
    layer_digest: str
    index_digest: str
    ztoc_digest: str
    slot: int = 0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> LayerRecord:
        """Raises ValueError/TypeError/KeyError for a malformed record."""
        doc = json.loads(data)
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__})


@dataclass(eq=False)
class _Mounted:
    name: str
    mountpoint: Path
    record: LayerRecord
    reader: RemoteLayerReader


def layer_name(mountpoint: Path) -> str:
    """FUSE directory name of the layer on snapshot dir `<id>/fs` (also `trash-<id>-<ns>/fs`).

    Raises ValueError when the path is not a snapshot's `fs` directory.
    """
    snap = mountpoint.parent.name
    if snap.startswith("trash-"):
        snap = snap.split("-")[1]
    if mountpoint.name != "fs" or not snap.isdigit():
        raise ValueError(f"{mountpoint} is not a snapshot fs directory")
    return f"snap-{snap}"


class RemoteMounter:
    """Serves lazy layers from one FUSE host (see the module doc). Use from the trio thread.

    Built by `open_remote_mounter`, which owns the FUSE mount, the background fetcher and the
    prefetch nursery; nothing here needs closing apart from `detach_all`.
    """

    def __init__(
        self,
        *,
        root: Path,
        config: RemoteConfig,
        fuse: FuseMount,
        client: RegistryClient,
        store: LocalStore,
        cache: SpanCache,
        background: BackgroundFetcher,
        tracker: DemandTracker,
        nursery: trio.Nursery,
        userxattr: bool = False,
    ) -> None:
        self.root = root
        self.config = config
        self.fuse = fuse
        self.client = client
        self.store = store
        self.cache = cache
        self.background = background
        self.tracker = tracker
        self.userxattr = userxattr
        self.records_dir = root / "remote"
        self.records_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.tmp_dir = root / "unpack"
        # Downloads a killed process left behind (never in use: this process just started).
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._nursery = nursery
        self._modes = DiscoveryModes(config.soci_v2, config.soci_v1, config.local_store)
        self._fetch_config = FetchConfig(
            request_timeout_sec=config.request_timeout_sec,
            max_parallel_requests=config.max_parallel_requests,
        )
        self._request_limiter = trio.CapacityLimiter(config.max_parallel_requests)
        self._inflate_limiter = default_inflate_limiter()
        self._io_limiter = trio.CapacityLimiter(4)
        self._images: dict[Digest, ImageArtifacts] = {}
        self._no_index: dict[Digest, float] = {}
        self._locks: dict[Digest, trio.Lock] = {}
        self._sources: dict[str, RegistrySource] = {}
        self._mounted: dict[str, _Mounted] = {}
        self._broken: dict[str, str] = {}
        self._logged: set[tuple[str, str]] = set()
        self._preresolver: Preresolver[tuple[Ztoc, LayerTree]] = Preresolver(
            self._load_tree, nursery
        )

    def __repr__(self) -> str:
        return (
            f"<RemoteMounter layers={len(self._mounted)} broken={len(self._broken)} "
            f"images={len(self._images)}>"
        )

    # -- helpers -----------------------------------------------------------------------------

    def _fallback(self, e: RemoteError, *, image: str, layer: str, once_key: str) -> None:
        if (once_key, e.reason) in self._logged:
            return
        self._logged.add((once_key, e.reason))
        log.warning(
            "lazy layer fallback",
            extra={"reason": e.reason, "image": image, "layer": layer, "error": str(e)},
        )

    def _source(self, ref: Reference) -> RegistrySource:
        key = f"{ref.registry}/{ref.repository}"
        source = self._sources.get(key)
        if source is None:
            source = RegistrySource(
                self.client, ref, config=self._fetch_config, limiter=self._request_limiter
            )
            self._sources[key] = source
        return source

    def _record_path(self, name: str) -> Path:
        return self.records_dir / f"{name}.json"

    async def _artifacts(self, ll: LayerLabels, ref: Reference) -> ImageArtifacts:
        manifest = ll.manifest_digest
        lock = self._locks.setdefault(manifest, trio.Lock())
        async with lock:
            cached = self._images.get(manifest)
            if cached is not None and (ll.index_digest in (None, cached.index_digest)):
                return cached
            if (
                ll.index_digest is None
                and self._no_index.get(manifest, -math.inf) > trio.current_time()
            ):
                raise NoIndex(f"no SOCI index for image manifest {ref.name}@{manifest} (cached)")
            token = trio.lowlevel.current_trio_token()

            def on_ztoc(z: ZtocDescriptor) -> None:
                trio.from_thread.run_sync(self._ztoc_ready, ll, z, trio_token=token)

            try:
                artifacts: ImageArtifacts = await trio.to_thread.run_sync(
                    functools.partial(
                        fetch_artifacts,
                        self.client,
                        self.store,
                        ref,
                        manifest,
                        ll.index_digest,
                        self._modes,
                        parallel=self.config.max_parallel_requests,
                        on_ztoc=on_ztoc,
                    ),
                    abandon_on_cancel=True,
                )
            except NoIndex:
                self._no_index[manifest] = trio.current_time() + NO_INDEX_TTL_SEC
                raise
            except (StoreError, OSError) as e:
                raise IndexFetchError(f"image {ref.name}@{manifest}: local store: {e}") from e
            self._images[manifest] = artifacts
            return artifacts

    def _load_tree(self, ztoc_digest: Digest) -> tuple[Ztoc, LayerTree]:
        """The reader's zTOC (no entries) and the layer tree. Raises MountError."""
        try:
            view = ZtocView(self.store.get_blob(ztoc_digest))
            tree = build_tree(cast(Sequence[FileMetadata], view), userxattr=self.userxattr)
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

    def _ztoc_ready(self, ll: LayerLabels, z: ZtocDescriptor) -> None:
        """zTOC `z` of the image of `ll` is in the local store: queue its tree (`preresolve`)
        if containerd will ask for its layer (in `cri.image-layers`, this layer to the top;
        every layer of the index without that label)."""
        if not ll.image_layers or z.layer_digest in ll.image_layers:
            self._preresolver.add(ll.manifest_digest, Digest(z.digest))

    def _preresolve(self, artifacts: ImageArtifacts, ll: LayerLabels) -> None:
        """Queue the trees of the image's layers from this one up (`_ztoc_ready`): for an
        index cached by an earlier Prepare or pull; zTOCs already queued are skipped."""
        index = artifacts.index
        for layer in ll.image_layers or [Digest(z.layer_digest) for z in index.ztocs]:
            z = index.ztoc_for_layer(layer)
            if z is not None:
                self._ztoc_ready(ll, z)

    async def _mount_lazy(self, mountpoint: Path, name: str, record: LayerRecord) -> None:
        """Add the layer to the FUSE host and bind it on `mountpoint`. Raises MountError."""
        t0 = time.monotonic()
        ztoc, tree = await self._preresolver.take(Digest(record.ztoc_digest))
        t1 = time.monotonic()
        layer = Digest(record.layer_digest)
        try:
            ref = Reference.parse(record.image_ref)
            reader = RemoteLayerReader(
                layer,
                ztoc,
                self._source(ref),
                self.cache,
                tracker=self.tracker,
                inflate_limiter=self._inflate_limiter,
                io_limiter=self._io_limiter,
                prefetch_nursery=self._nursery,
            )
        except (OciError, FsError) as e:
            raise MountError(f"layer {layer}: {e}") from e
        try:
            layer_dir = self.fuse.add_layer(
                name, tree, reader, slot=record.slot or None, digest=str(layer)
            )
        except (FsError, ValueError) as e:
            raise MountError(f"layer {layer} as {name}: {e}") from e
        t2 = time.monotonic()
        try:
            await trio.to_thread.run_sync(bindmount.bind, layer_dir, mountpoint)
        except OSError as e:
            self.fuse.remove_layer(name)
            raise MountError(f"layer {layer}: {e}") from e
        t3 = time.monotonic()
        slot = self.fuse.host.status(name).slot
        if slot != record.slot:
            record = LayerRecord(**{**asdict(record), "slot": slot})
        try:
            await trio.to_thread.run_sync(self._record_path(name).write_bytes, record.to_json())
        except OSError as e:
            await trio.to_thread.run_sync(bindmount.detach, mountpoint)
            self.fuse.remove_layer(name)
            raise MountError(f"layer {layer}: cannot persist its restore record: {e}") from e
        self.cache.retain_layer(layer)
        self._mounted[name] = _Mounted(name, mountpoint, record, reader)
        self._broken.pop(name, None)
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

    async def _local(
        self, mountpoint: Path, ll: LayerLabels, ref: Reference, why: RemoteError
    ) -> MountResult:
        self._fallback(why, image=ll.image_ref, layer=ll.layer_digest, once_key=ll.layer_digest)
        if not self.config.local_unpack:
            return MountResult.DECLINED
        try:
            size = await trio.to_thread.run_sync(
                functools.partial(
                    unpack_layer,
                    self.client,
                    ref,
                    ll.manifest_digest,
                    ll.layer_digest,
                    mountpoint,
                    self.tmp_dir,
                    userxattr=self.userxattr,
                )
            )
        except UnpackError as e:
            self._fallback(e, image=ll.image_ref, layer=ll.layer_digest, once_key=ll.layer_digest)
            return MountResult.DECLINED
        log.info(
            "layer unpacked locally",
            extra={
                "image": ll.image_ref,
                "layer": ll.layer_digest,
                "bytes": size,
                "reason": why.reason,
            },
        )
        return MountResult.LOCAL

    # -- LayerMounter ------------------------------------------------------------------------

    async def mount(self, mountpoint: Path, labels: Mapping[str, str]) -> MountResult:
        """See `LayerMounter.mount` and the module doc. Never raises a RemoteError."""
        try:
            ll = LayerLabels.parse(labels)
            ref = Reference.parse(ll.image_ref)
        except (BadLabels, OciError, ValueError) as e:
            err: RemoteError = (
                e if isinstance(e, BadLabels) else BadLabels(f"bad image reference: {e}")
            )
            target = labels.get(TARGET_REF, "")
            self._fallback(
                err,
                image=labels.get("containerd.io/snapshot/cri.image-ref", ""),
                layer=target,
                once_key="labels",
            )
            return MountResult.DECLINED
        begin = time.monotonic()
        try:
            with trio.fail_after(self.config.mount_timeout_sec):
                artifacts = await self._artifacts(ll, ref)
        except (NoIndex, IndexFetchError) as e:
            self._fallback(
                e, image=ll.image_ref, layer=ll.layer_digest, once_key=ll.manifest_digest
            )
            return MountResult.DECLINED
        except trio.TooSlowError:
            err = IndexFetchError(f"index discovery took over {self.config.mount_timeout_sec} s")
            self._fallback(
                err, image=ll.image_ref, layer=ll.layer_digest, once_key=ll.manifest_digest
            )
            return MountResult.DECLINED
        discovered = time.monotonic()
        self._preresolve(artifacts, ll)
        zdesc = artifacts.index.ztoc_for_layer(ll.layer_digest)
        if zdesc is None:
            return await self._local(
                mountpoint,
                ll,
                ref,
                NoZtoc(f"index {artifacts.index_digest} has no zTOC for {ll.layer_digest}"),
            )
        name = layer_name(mountpoint)
        record = LayerRecord(
            image_ref=ll.image_ref,
            manifest_digest=ll.manifest_digest,
            layer_digest=ll.layer_digest,
            index_digest=artifacts.index_digest,
            ztoc_digest=zdesc.digest,
        )
        try:
            with trio.fail_after(self.config.mount_timeout_sec):
                await self._mount_lazy(mountpoint, name, record)
        except (MountError, trio.TooSlowError) as e:
            err = e if isinstance(e, MountError) else MountError("mount timed out")
            await self.unmount(mountpoint)
            with contextlib.suppress(FsError):
                self.fuse.remove_layer(name)
            return await self._local(mountpoint, ll, ref, err)
        log.info(
            "lazy layer mounted",
            extra={
                "image": ll.image_ref,
                "layer": ll.layer_digest,
                "fuse_dir": name,
                "index": artifacts.index_digest,
                "discovery_ms": round((discovered - begin) * 1000),
                "mount_ms": round((time.monotonic() - discovered) * 1000),
            },
        )
        return MountResult.REMOTE

    async def check(self, mountpoint: Path) -> None:
        """Raise Unavailable if the lazy layer on `mountpoint` could not be restored."""
        try:
            name = layer_name(mountpoint)
        except ValueError:
            return
        why = self._broken.get(name)
        if why is not None:
            raise Unavailable(f"layer {str(mountpoint)!r} unavailable: {why}")

    async def restore(self, mountpoint: Path, labels: Mapping[str, str]) -> None:
        """Re-mount a lazy layer after a restart. Failures are logged and remembered for
        `check`; never raises (the daemon starts with the other layers)."""
        name = layer_name(mountpoint)
        try:
            record = await self._restore_record(name, labels)
            try:
                await self._mount_lazy(mountpoint, name, record)
            except MountError as e:
                # e.g. the zTOC was removed from the local store: rediscover and refetch it
                log.info("lazy layer record unusable", extra={"fuse_dir": name, "error": str(e)})
                record = await self._discover_record(labels)
                await self._mount_lazy(mountpoint, name, record)
        except (RemoteError, OSError, ValueError, KeyError, TypeError) as e:
            self._broken[name] = str(e)
            log.warning("lazy layer restore failed", extra={"fuse_dir": name, "error": str(e)})
            return
        log.info("lazy layer restored", extra={"fuse_dir": name, "layer": record.layer_digest})

    async def _restore_record(self, name: str, labels: Mapping[str, str]) -> LayerRecord:
        path = self._record_path(name)
        try:
            return LayerRecord.from_json(await trio.to_thread.run_sync(path.read_bytes))
        except FileNotFoundError:
            return await self._discover_record(labels)

    async def _discover_record(self, labels: Mapping[str, str]) -> LayerRecord:
        """A restore record rebuilt from the snapshot's labels (index discovery, zTOC fetch).

        Raises BadLabels, NoIndex, IndexFetchError, NoZtoc, OciError.
        """
        ll = LayerLabels.parse(labels)
        ref = Reference.parse(ll.image_ref)
        artifacts = await self._artifacts(ll, ref)
        zdesc = artifacts.index.ztoc_for_layer(ll.layer_digest)
        if zdesc is None:
            raise NoZtoc(f"index {artifacts.index_digest} has no zTOC for {ll.layer_digest}")
        return LayerRecord(
            ll.image_ref, ll.manifest_digest, ll.layer_digest, artifacts.index_digest, zdesc.digest
        )

    async def unmount(self, mountpoint: Path) -> None:
        """Detach the bind mount, drop the layer from the FUSE host and the background
        fetcher, mark its cached spans evictable first. Never raises."""
        try:
            name = layer_name(mountpoint)
        except ValueError:
            return
        with trio.CancelScope(shield=True):
            try:
                while await trio.to_thread.run_sync(bindmount.detach, mountpoint):
                    pass
            except OSError as e:
                log.warning("unmount failed", extra={"path": str(mountpoint), "error": str(e)})
            self._broken.pop(name, None)
            mounted = self._mounted.pop(name, None)
            if mounted is None:
                return
            self.background.unregister(name)
            with contextlib.suppress(FsError):
                self.fuse.remove_layer(name)
            with contextlib.suppress(OSError):
                await trio.to_thread.run_sync(self._record_path(name).unlink)
            digest = Digest(mounted.record.layer_digest)
            if not any(m.record.layer_digest == digest for m in self._mounted.values()):
                try:
                    await trio.to_thread.run_sync(self.cache.release_layer, digest)
                except Exception as e:  # a mark that cannot be written is not worth failing for
                    log.warning(
                        "cannot release cached spans", extra={"layer": digest, "error": repr(e)}
                    )
            log.info("lazy layer unmounted", extra={"fuse_dir": name, "layer": digest})

    async def detach_all(self) -> None:
        """Detach every bind mount of a served layer (daemon shutdown). Never raises."""
        with trio.CancelScope(shield=True):
            for m in list(self._mounted.values()):
                with contextlib.suppress(OSError):
                    await trio.to_thread.run_sync(bindmount.detach, m.mountpoint)

    def statuses(self) -> list[dict[str, object]]:
        """One status record per mounted layer (what the status files show)."""
        out: list[dict[str, object]] = []
        for name in sorted(self._mounted):
            st = self.fuse.host.status(name)
            out.append(json.loads(st.to_json()))
        return out


@asynccontextmanager
async def open_remote_mounter(settings: Settings) -> AsyncIterator[LayerMounter]:
    """The daemon's MounterFactory: a `RemoteMounter` with its FUSE host at `<root>/fuse`.

    Mounts left by a previous process (bind mounts under `<root>/snapshots`, the FUSE mount)
    are lazily unmounted first. When lazy layers are disabled in the config or FUSE cannot
    be mounted (logged with `reason`), every layer is declined instead.
    """
    cfg = settings.config.remote
    root = settings.root
    if not cfg.enable:
        yield DeclineMounter()
        return
    from snapshotter.fs.fuse import cleanup_stale_mount, open_fuse_host

    fuse_dir = root / "fuse"
    await trio.to_thread.run_sync(bindmount.detach_all_under, root / "snapshots")
    try:
        await trio.to_thread.run_sync(cleanup_stale_mount, fuse_dir)
        fuse_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as e:
        log.error("lazy layers disabled", extra={"reason": "fuse", "error": str(e)})
        yield DeclineMounter()
        return
    try:
        store = LocalStore(root)
    except StoreError as e:
        log.error("lazy layers disabled", extra={"reason": "store", "error": str(e)})
        yield DeclineMounter()
        return
    hosts_dirs = [cfg.hosts_dir] if cfg.hosts_dir else []
    client = RegistryClient(
        credentials=DockerConfig(cfg.docker_config or None), hosts_dirs=hosts_dirs
    )
    try:
        cache = SpanCache(
            root / "cache",
            CacheConfig(
                max_bytes=cfg.cache_max_bytes, inflated_max_bytes=cfg.inflated_cache_max_bytes
            ),
        )
        tracker = DemandTracker()
        background = BackgroundFetcher(
            BackgroundConfig(
                enabled=cfg.background_fetch,
                quiet_period_ms=cfg.background_quiet_period_ms,
                rate_bytes_per_sec=cfg.background_rate_bytes_per_sec,
            ),
            tracker,
        )
        host = LayerHost()
        async with contextlib.AsyncExitStack() as stack:
            try:
                fuse = await stack.enter_async_context(open_fuse_host(fuse_dir, host))
            except RuntimeError as e:
                log.error("lazy layers disabled", extra={"reason": "fuse", "error": str(e)})
                yield DeclineMounter()
                return
            nursery = await stack.enter_async_context(trio.open_nursery())
            await nursery.start(background.serve)
            mounter = RemoteMounter(
                root=root,
                config=cfg,
                fuse=fuse,
                client=client,
                store=store,
                cache=cache,
                background=background,
                tracker=tracker,
                nursery=nursery,
                userxattr=detect_overlay_features().userxattr,
            )
            try:
                yield mounter
            finally:
                await mounter.detach_all()
                nursery.cancel_scope.cancel()
    finally:
        client.close()
        store.close()
