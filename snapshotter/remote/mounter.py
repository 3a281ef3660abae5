"""`RemoteMounter`: the daemon's `LayerMounter` for lazily served layers, and its fallbacks.

On an unpack Prepare (labels with `containerd.io/snapshot.ref` and CRI's `cri.*` labels):

1. find the image's SOCI index and its zTOCs (`ImageCatalog`, shared per image manifest);
2. layer in the index: serve it lazily (`LazyLayers.mount`: tree, reader, FUSE directory
   `snap-<id>`, bind mount on the snapshot's `fs`, restore record). Result REMOTE.
3. layer not in the index (`no_ztoc`), its zTOC not fetched (`index_fetch`; the zTOCs
   download in the background), or a lazy mount that failed or timed out (`mount`): unpack
   it locally into `fs` (`local_unpack = true`). Result LOCAL; if that fails too (`unpack`)
   or local unpack is off, DECLINED.
4. no index (`no_index`), an index that cannot be fetched or took longer than
   `mount_timeout_sec` (`index_fetch`), no CRI labels (`no_cri_labels`): DECLINED,
   containerd pulls the layer.

Each fallback is logged once (per image for image-wide reasons, per layer otherwise; the
memory of what was logged is bounded) with the message `lazy layer fallback` and the stable
keys `reason`, `image`, `layer`, `error`. `DegradedMounter` stands in when lazy loading
could not start: every layer is declined (reason `degraded`) and a lazy layer of an earlier
run answers Unavailable.

Deferred mounts: with a task scope (`tasks`), a layer with a zTOC (unless its download
failed already) is answered REMOTE at once, and mounted by a task once its zTOC is in and
its tree built, so containerd's pull returns after the index, and the zTOCs arrive and the
trees are built while the container is created. Whatever returns a snapshot's mounts first
waits for the deferred layers of its chain (`ready`); a deferred mount that fails falls
back to a local unpack into `fs` (its restore record then says `local`: nothing to mount
after a restart); when that fails too, the layer answers Unavailable on `ready` and `check`
until its next `ready` tries again. Without `tasks`, a Prepare waits for its zTOC.

After a restart, `restore` re-mounts a lazy layer from its record (or rediscovers it); a
layer that cannot be restored is logged (`lazy layer restore failed`) and answers
Unavailable on `check`; the daemon still starts.

The mounter's seams are the small protocols below (`Catalog`, `Layers`, `Unpacker`,
`Records`); `snapshotter.remote.compose.open_remote_mounter` builds the real ones.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import trio

from index.digest import Digest
from index.oci.errors import OciError
from index.oci.reference import Reference
from snapshotter.errors import Unavailable
from snapshotter.lazy.demand import DemandTracker
from snapshotter.snapshots.service import MountResult
from snapshotter.tasks import TaskScope

from .discovery import ImageArtifacts
from .errors import (
    BadLabels,
    IndexFetchError,
    LazyUnavailable,
    MountError,
    NoIndex,
    NoZtoc,
    RemoteError,
    UnpackError,
)
from .labels import CRI_IMAGE_REF, TARGET_REF, LayerLabels
from .records import MOUNT_THREADS, LayerRecord, layer_name

log = logging.getLogger(__name__)

MAX_LOGGED = 4096
"""Fallbacks remembered as already logged (oldest forgotten first, then logged again)."""


class Catalog(Protocol):
    """Where the mounter gets an image's index (`ImageCatalog`)."""

    async def artifacts(self, ll: LayerLabels, ref: Reference) -> ImageArtifacts:
        """Raises NoIndex, IndexFetchError."""
        ...


class Layers(Protocol):
    """Where lazy layers are mounted (`LazyLayers`)."""

    async def mount(self, mountpoint: Path, name: str, record: LayerRecord) -> None:
        """Raises MountError, leaving nothing behind."""
        ...

    async def unmount(self, mountpoint: Path) -> None:
        """Never raises."""
        ...

    async def close(self) -> None: ...

    def statuses(self) -> dict[str, dict[str, object]]: ...


class Unpacker(Protocol):
    """The local-unpack fallback (`RegistryUnpacker`)."""

    async def unpack(self, ll: LayerLabels, ref: Reference, dest: Path) -> int:
        """Raises UnpackError."""
        ...


class Records(Protocol):
    """Restore records (`RecordStore`); blocking, called in worker threads."""

    def read(self, name: str) -> LayerRecord | None:
        """Raises OSError, ValueError, TypeError, KeyError."""
        ...

    def write(self, name: str, record: LayerRecord) -> None:
        """Raises OSError."""
        ...


class MountRecorder(Protocol):
    """Where results and fallbacks are counted (`snapshotter.metrics`)."""

    def mount_result(self, result: str) -> None:
        """A layer's Prepare ended `result` (`MountResult` value)."""
        ...

    def fallback(self, reason: str) -> None:
        """A layer fell back for `reason` (`RemoteError.reason`), every time."""
        ...


class _FallbackLog:
    """Logs each (key, reason) fallback once; remembers at most `MAX_LOGGED` of them. Counts
    every one in `record` when given."""

    def __init__(self, record: MountRecorder | None = None) -> None:
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._record = record

    def __call__(self, e: RemoteError, *, image: str, layer: str, once_key: str) -> None:
        if self._record is not None:
            self._record.fallback(e.reason)
        key = (once_key, e.reason)
        if key in self._seen:
            self._seen.move_to_end(key)
            return
        self._seen[key] = None
        while len(self._seen) > MAX_LOGGED:
            self._seen.popitem(last=False)
        log.warning(
            "lazy layer fallback",
            extra={"reason": e.reason, "image": image, "layer": layer, "error": str(e)},
        )


class RemoteMounter:
    """Serves lazy layers and decides every fallback (see the module doc).

    Use from the trio thread. Owns nothing that needs closing: its parts are owned by
    `open_remote_mounter`.
    """

    def __init__(
        self,
        *,
        catalog: Catalog,
        layers: Layers,
        unpacker: Unpacker,
        records: Records,
        mount_timeout_sec: float,
        local_unpack: bool = True,
        peers_status: Callable[[], dict[str, object]] | None = None,
        metrics: MountRecorder | None = None,
        tasks: TaskScope | None = None,
        demand: DemandTracker | None = None,
    ) -> None:
        self.catalog = catalog
        self.tasks = tasks
        self.demand = demand
        self.metrics = metrics
        self.peers_status = peers_status
        self.layers = layers
        self.unpacker = unpacker
        self.records = records
        self.mount_timeout_sec = mount_timeout_sec
        self.local_unpack = local_unpack
        self._broken: dict[str, str] = {}
        self._fallback = _FallbackLog(metrics)
        self._deferred: dict[str, trio.Event] = {}
        """Layers whose mount is deferred, by name: set when it has settled."""
        self._retry: dict[str, tuple[LayerLabels, Reference]] = {}
        """Deferred layers that could be neither mounted nor unpacked: `ready` tries again."""

    def __repr__(self) -> str:
        return (
            f"<RemoteMounter {self.layers!r} broken={len(self._broken)} "
            f"deferred={len(self._deferred)}>"
        )

    def status(self) -> dict[str, object]:
        """What `<root>/status.json` shows about lazy loading."""
        doc: dict[str, object] = {"lazyLayers": "enabled", "layers": self.layers.statuses()}
        if self._deferred:
            doc["mountsInProgress"] = sorted(self._deferred)
        if self._broken:
            doc["restoreFailed"] = dict(sorted(self._broken.items()))
        if self.peers_status is not None:
            doc["peers"] = self.peers_status()
        return doc

    async def _local(
        self, mountpoint: Path, ll: LayerLabels, ref: Reference, why: RemoteError
    ) -> MountResult:
        self._fallback(why, image=ll.image_ref, layer=ll.layer_digest, once_key=ll.layer_digest)
        if not self.local_unpack:
            return MountResult.DECLINED
        try:
            await self._unpack(mountpoint, ll, ref, why)
        except UnpackError as e:
            self._fallback(e, image=ll.image_ref, layer=ll.layer_digest, once_key=ll.layer_digest)
            return MountResult.DECLINED
        return MountResult.LOCAL

    async def _unpack(
        self,
        mountpoint: Path,
        ll: LayerLabels,
        ref: Reference,
        why: RemoteError,
        *,
        deferred: bool = False,
    ) -> None:
        """The local unpack of `ll` into `mountpoint` instead of a lazy mount (`why`), logged.
        Raises UnpackError."""
        size = await self.unpacker.unpack(ll, ref, mountpoint)
        log.info(
            "layer unpacked locally",
            extra={
                "image": ll.image_ref,
                "layer": ll.layer_digest,
                "bytes": size,
                "reason": why.reason,
                "deferred": deferred,
            },
        )

    # -- LayerMounter ------------------------------------------------------------------------

    async def mount(self, mountpoint: Path, labels: Mapping[str, str]) -> MountResult:
        """See `LayerMounter.mount` and the module doc. Never raises a RemoteError. The
        result is counted in `metrics` (an exception, which the service declines, is not)."""
        result = await self._mount(mountpoint, labels)
        if self.metrics is not None:
            self.metrics.mount_result(result.value)
        return result

    async def _mount(self, mountpoint: Path, labels: Mapping[str, str]) -> MountResult:
        try:
            ll = LayerLabels.parse(labels)
            ref = Reference.parse(ll.image_ref)
        except (BadLabels, OciError, ValueError) as e:
            err: RemoteError = (
                e if isinstance(e, BadLabels) else BadLabels(f"bad image reference: {e}")
            )
            self._fallback(
                err,
                image=labels.get(CRI_IMAGE_REF, ""),
                layer=labels.get(TARGET_REF, ""),
                once_key="labels",
            )
            return MountResult.DECLINED
        begin = time.monotonic()
        try:
            with trio.fail_after(self.mount_timeout_sec):
                artifacts = await self.catalog.artifacts(ll, ref)
        except (NoIndex, IndexFetchError, trio.TooSlowError) as e:
            err = (
                e
                if isinstance(e, RemoteError)
                else IndexFetchError(f"index discovery took over {self.mount_timeout_sec} s")
            )
            self._fallback(
                err, image=ll.image_ref, layer=ll.layer_digest, once_key=ll.manifest_digest
            )
            return MountResult.DECLINED
        discovered = time.monotonic()
        zdesc = artifacts.index.ztoc_for_layer(ll.layer_digest)
        if zdesc is None:
            why = NoZtoc(f"index {artifacts.index_digest} has no zTOC for {ll.layer_digest}")
            return await self._local(mountpoint, ll, ref, why)
        name = layer_name(mountpoint)
        digest = Digest(zdesc.digest)
        known_bad = artifacts.ztocs.settled(digest) and not artifacts.ztocs.ready(digest)
        if not known_bad and self._defer(mountpoint, ll, ref, name, artifacts):
            return MountResult.REMOTE
        try:
            await self._mount_lazily(
                mountpoint, ll, name, artifacts, discovery_ms=(discovered - begin) * 1000
            )
        except (NoZtoc, MountError, IndexFetchError) as e:
            return await self._local(mountpoint, ll, ref, e)
        return MountResult.REMOTE

    async def _mount_lazily(
        self,
        mountpoint: Path,
        ll: LayerLabels,
        name: str,
        artifacts: ImageArtifacts,
        *,
        discovery_ms: float = 0.0,
        deferred: bool = False,
    ) -> None:
        """Wait for the layer's zTOC and mount it (`LazyLayers.mount`) within
        `mount_timeout_sec`, logged. Raises NoZtoc, IndexFetchError, MountError (also for the
        timeout)."""
        begin = time.monotonic()
        zdesc = artifacts.index.ztoc_for_layer(ll.layer_digest)
        if zdesc is None:
            raise NoZtoc(f"index {artifacts.index_digest} has no zTOC for {ll.layer_digest}")
        try:
            with trio.fail_after(self.mount_timeout_sec):
                await artifacts.ztocs.wait(Digest(zdesc.digest))
                await self.layers.mount(mountpoint, name, _record(ll, artifacts, zdesc.digest))
        except trio.TooSlowError as e:
            raise MountError("mount timed out") from e
        log.info(
            "lazy layer mounted",
            extra={
                "image": ll.image_ref,
                "layer": ll.layer_digest,
                "fuse_dir": name,
                "index": artifacts.index_digest,
                "deferred": deferred,
                "discovery_ms": round(discovery_ms),
                "mount_ms": round((time.monotonic() - begin) * 1000),
            },
        )

    # -- deferred mounts ----------------------------------------------------------------------

    def _defer(
        self,
        mountpoint: Path,
        ll: LayerLabels,
        ref: Reference,
        name: str,
        artifacts: ImageArtifacts | None,
    ) -> bool:
        """Start the deferred mount of layer `name` in `tasks`; False without a task scope
        (or one closing)."""
        done = trio.Event()
        if self.tasks is None or not self.tasks.start_soon(
            self._settle, mountpoint, ll, ref, name, artifacts, done, name=f"mount {name}"
        ):
            return False
        self._deferred[name] = done
        return True

    async def _settle(
        self,
        mountpoint: Path,
        ll: LayerLabels,
        ref: Reference,
        name: str,
        artifacts: ImageArtifacts | None,
        done: trio.Event,
    ) -> None:
        """A deferred mount: wait for the zTOC (`artifacts`; None: discover them again) and
        mount, all within `mount_timeout_sec`; failing that, unpack locally. Sets `done`.
        Never raises a RemoteError."""
        mounting = self.demand.mount() if self.demand is not None else contextlib.nullcontext()
        try:
            try:
                with mounting:
                    if artifacts is None:
                        with trio.fail_after(self.mount_timeout_sec):
                            artifacts = await self.catalog.artifacts(ll, ref)
                    await self._mount_lazily(mountpoint, ll, name, artifacts, deferred=True)
            except (NoIndex, NoZtoc, IndexFetchError, MountError, trio.TooSlowError) as e:
                err = (
                    e
                    if isinstance(e, RemoteError)
                    else IndexFetchError("index discovery timed out")
                )
                await self._settle_locally(mountpoint, ll, ref, name, err)
                return
            except trio.Cancelled:  # the daemon stops: nothing may be mounted on it now
                self._broken[name] = "its mount was cancelled: the daemon is stopping"
                raise
            self._broken.pop(name, None)
            self._retry.pop(name, None)
        finally:
            if self._deferred.get(name) is done:
                del self._deferred[name]
            done.set()

    async def _settle_locally(
        self, mountpoint: Path, ll: LayerLabels, ref: Reference, name: str, why: RemoteError
    ) -> None:
        """A deferred mount failed with `why`: unpack the layer into `mountpoint` and record
        it as local; failing that, the layer is broken until `ready` tries again."""
        self._fallback(why, image=ll.image_ref, layer=ll.layer_digest, once_key=ll.layer_digest)
        local = LayerRecord(ll.image_ref, ll.manifest_digest, ll.layer_digest, "", "", local=True)
        try:
            if not self.local_unpack:
                raise UnpackError("local unpack is off (local_unpack = false)")
            await self._unpack(mountpoint, ll, ref, why, deferred=True)
            await trio.to_thread.run_sync(self.records.write, name, local, limiter=MOUNT_THREADS)
        except (UnpackError, OSError) as e:
            error = e if isinstance(e, UnpackError) else UnpackError(f"restore record: {e}")
            self._fallback(error, image=ll.image_ref, layer=ll.layer_digest, once_key=name)
            self._broken[name] = f"{why}; then {error}"
            self._retry[name] = (ll, ref)
            return
        self._broken.pop(name, None)
        self._retry.pop(name, None)

    async def ready(self, mountpoint: Path) -> None:
        """Wait for a deferred mount of the layer on `mountpoint` (a broken one is tried
        again first); raise Unavailable if the layer is broken."""
        name = _name(mountpoint)
        retry = self._retry.get(name)
        if retry is not None and name not in self._deferred:
            self._defer(mountpoint, *retry, name, None)
        done = self._deferred.get(name)
        if done is not None:
            await done.wait()
        _check(self._broken, mountpoint)

    async def check(self, mountpoint: Path) -> None:
        """Raise Unavailable if the lazy layer on `mountpoint` could not be restored, or a
        deferred mount of it failed."""
        _check(self._broken, mountpoint)

    async def restore(self, mountpoint: Path, labels: Mapping[str, str]) -> None:
        """Re-mount a lazy layer after a restart. Failures are logged and remembered for
        `check`; never raises (the daemon starts with the other layers)."""
        name = layer_name(mountpoint)
        try:
            record = await trio.to_thread.run_sync(self.records.read, name, limiter=MOUNT_THREADS)
            if record is not None and record.local:
                return  # unpacked into its directory when its deferred mount failed
            if record is None:
                record = await self._discover_record(labels)
            try:
                await self.layers.mount(mountpoint, name, record)
            except MountError as e:
                # e.g. the zTOC was removed from the local store: rediscover and refetch it
                log.info("lazy layer record unusable", extra={"fuse_dir": name, "error": str(e)})
                record = await self._discover_record(labels)
                await self.layers.mount(mountpoint, name, record)
        except (RemoteError, OciError, OSError, ValueError, KeyError, TypeError) as e:
            self._broken[name] = str(e)
            log.warning("lazy layer restore failed", extra={"fuse_dir": name, "error": str(e)})
            return
        log.info("lazy layer restored", extra={"fuse_dir": name, "layer": record.layer_digest})

    async def _discover_record(self, labels: Mapping[str, str]) -> LayerRecord:
        """A restore record rebuilt from the snapshot's labels (index discovery, zTOC fetch).

        Raises BadLabels, NoIndex, IndexFetchError (also after `mount_timeout_sec`), NoZtoc,
        OciError.
        """
        ll = LayerLabels.parse(labels)
        ref = Reference.parse(ll.image_ref)
        try:
            with trio.fail_after(self.mount_timeout_sec):
                artifacts = await self.catalog.artifacts(ll, ref)
        except trio.TooSlowError as e:
            raise IndexFetchError(f"index discovery took over {self.mount_timeout_sec} s") from e
        zdesc = artifacts.index.ztoc_for_layer(ll.layer_digest)
        if zdesc is None:
            raise NoZtoc(f"index {artifacts.index_digest} has no zTOC for {ll.layer_digest}")
        try:
            with trio.fail_after(self.mount_timeout_sec):
                await artifacts.ztocs.wait(zdesc.digest)
        except trio.TooSlowError as e:
            raise IndexFetchError(f"zTOC download took over {self.mount_timeout_sec} s") from e
        return _record(ll, artifacts, zdesc.digest)

    async def unmount(self, mountpoint: Path) -> None:
        """Unmount the lazy layer on `mountpoint`, if any (`LazyLayers.unmount`), once a
        deferred mount of it has settled. Never raises."""
        name = _name(mountpoint)
        done = self._deferred.get(name)
        if done is not None:
            await done.wait()
        self._broken.pop(name, None)
        self._retry.pop(name, None)
        await self.layers.unmount(mountpoint)


class DegradedMounter:
    """The mounter when lazy loading could not start (see the module doc): declines every
    layer (logged once, reason `degraded`); a lazy layer of an earlier run is not restored
    and answers Unavailable on `check`."""

    def __init__(self, component: str, error: str, *, metrics: MountRecorder | None = None) -> None:
        self.component = component
        self.error = error
        self.metrics = metrics
        self._broken: dict[str, str] = {}
        self._fallback = _FallbackLog(metrics)

    def __repr__(self) -> str:
        return f"<DegradedMounter {self.component}: {self.error}>"

    def status(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "lazyLayers": "degraded",
            "component": self.component,
            "error": self.error,
        }
        if self._broken:
            doc["restoreFailed"] = dict(sorted(self._broken.items()))
        return doc

    async def mount(self, mountpoint: Path, labels: Mapping[str, str]) -> MountResult:
        why = LazyUnavailable(f"lazy layers are disabled ({self.component}: {self.error})")
        self._fallback(
            why,
            image=labels.get(CRI_IMAGE_REF, ""),
            layer=labels.get(TARGET_REF, ""),
            once_key="degraded",
        )
        if self.metrics is not None:
            self.metrics.mount_result(MountResult.DECLINED.value)
        return MountResult.DECLINED

    async def check(self, mountpoint: Path) -> None:
        _check(self._broken, mountpoint)

    async def ready(self, mountpoint: Path) -> None:
        _check(self._broken, mountpoint)

    async def restore(self, mountpoint: Path, labels: Mapping[str, str]) -> None:
        name = layer_name(mountpoint)
        self._broken[name] = f"lazy layers are disabled ({self.component}: {self.error})"
        log.warning(
            "lazy layer restore failed", extra={"fuse_dir": name, "error": self._broken[name]}
        )

    async def unmount(self, mountpoint: Path) -> None:
        self._broken.pop(_name(mountpoint), None)


def _record(ll: LayerLabels, artifacts: ImageArtifacts, ztoc: str) -> LayerRecord:
    """The restore record of layer `ll` served lazily from zTOC `ztoc` of `artifacts`."""
    return LayerRecord(
        image_ref=ll.image_ref,
        manifest_digest=ll.manifest_digest,
        layer_digest=ll.layer_digest,
        index_digest=artifacts.index_digest,
        ztoc_digest=ztoc,
    )


def _name(mountpoint: Path) -> str:
    """The layer name of a snapshot `fs` directory, "" for any other path."""
    try:
        return layer_name(mountpoint)
    except ValueError:
        return ""


def _check(broken: Mapping[str, str], mountpoint: Path) -> None:
    why = broken.get(_name(mountpoint))
    if why is not None:
        raise Unavailable(f"layer {str(mountpoint)!r} unavailable: {why}")
