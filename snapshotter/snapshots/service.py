"""Snapshot semantics (Prepare ... Cleanup) over a metadata store and a layer mounter.

Plain async Python: no grpc here. Blocking work runs in worker threads behind
named CapacityLimiters: `metadata-write` (size 1: one sqlite writer at a time),
`metadata-read` (reads never queue behind a writer's fsync) and `disk` (walks,
rmtree).

Directory layout is containerd's overlay layout (`snapshots.Layout`); the mount
rules are in `snapshotter.snapshots.mounts`. Removal is asynchronous: Remove deletes the
record, Cleanup reclaims directories no record owns (including leftovers of a
crash).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from ..errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SnapshotterError,
)
from . import filters
from .metadata import MetaStore
from .model import (
    LABEL_REMOTE,
    LABEL_REMOTE_VALUE,
    LABEL_TARGET_REF,
    Info,
    Kind,
    Snapshot,
    SnapshotId,
    Usage,
    quote,
)
from .mounts import Layout, Mount, OverlayFeatures, mounts_for

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_LABEL_BYTES = 4096
"""Largest key+value of one label, in bytes (containerd's limit)."""


class MountResult(enum.Enum):
    """What a LayerMounter did with a layer on an unpack Prepare."""

    DECLINED = "declined"
    """Nothing: containerd unpacks the layer into the active snapshot."""
    REMOTE = "remote"
    """Mounted lazily on `fs`: committed with the remote label, usage zero."""
    LOCAL = "local"
    """Unpacked by the mounter into `fs`: committed as an ordinary layer, usage measured."""


class LayerMounter(Protocol):
    """The seam for lazily served layers (docs/snapshotter.md). Declared here, where it is used.

    All paths are a snapshot's `fs` directory.
    """

    async def mount(self, mountpoint: Path, labels: Mapping[str, str]) -> MountResult | bool:
        """Mount the layer described by `labels` on `mountpoint`.

        Return MountResult (True means REMOTE, False DECLINED). DECLINED leaves
        the layer to containerd. Any exception is logged and treated as a
        decline. On failure the mounter leaves nothing mounted and `mountpoint`
        empty.
        """
        ...

    async def check(self, mountpoint: Path) -> None:
        """Raise Unavailable if a layer this mounter serves at `mountpoint` is unhealthy.

        Called for every directory of a parent chain when a layer of containerd's pull is
        prepared on it; must return at once (a mount still in progress is not waited for)
        and at once for paths the mounter does not manage.
        """
        ...

    async def ready(self, mountpoint: Path) -> None:
        """Wait until a layer this mounter serves at `mountpoint` can be mounted (a mount it
        deferred has finished); raise Unavailable if it cannot.

        Called for every directory of a chain before its mounts are returned (a container's
        snapshot, a view, `Mounts`, a layer containerd applies itself); must return at once
        for paths the mounter does not manage.
        """
        ...

    async def restore(self, mountpoint: Path, labels: Mapping[str, str]) -> None:
        """Re-establish a remote layer after a restart. Raises Unavailable on failure."""
        ...

    async def unmount(self, mountpoint: Path) -> None:
        """Unmount whatever the mounter put on `mountpoint`; no-op if nothing. Never raises."""
        ...


class DeclineMounter:
    """A LayerMounter that serves nothing remotely: every layer is local."""

    def __repr__(self) -> str:
        return "<DeclineMounter>"

    async def mount(self, mountpoint: Path, labels: Mapping[str, str]) -> MountResult | bool:
        return MountResult.DECLINED

    async def check(self, mountpoint: Path) -> None:
        return None

    async def ready(self, mountpoint: Path) -> None:
        return None

    async def restore(self, mountpoint: Path, labels: Mapping[str, str]) -> None:
        return None

    async def unmount(self, mountpoint: Path) -> None:
        return None


def disk_usage(path: Path) -> Usage:
    """Usage of the tree at `path`: each distinct (st_dev, st_ino) counted once,
    size = sum of st_blocks * 512 bytes, including `path` itself.

    Entries that vanish during the walk are skipped. Raises OSError if `path`
    itself cannot be stat'ed.
    """
    seen: set[tuple[int, int]] = set()
    size = 0

    def visit(st: os.stat_result) -> None:
        nonlocal size
        ident = (st.st_dev, st.st_ino)
        if ident not in seen:
            seen.add(ident)
            size += st.st_blocks * 512

    visit(os.lstat(path))
    stack = [os.fspath(path)]
    while stack:
        top = stack.pop()
        try:
            it = os.scandir(top)
        except FileNotFoundError:
            continue
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                visit(st)
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return Usage(size_bytes=size, inodes=len(seen))


def _validate_labels(labels: Mapping[str, str]) -> None:
    for k, v in labels.items():
        if len(k.encode()) + len(v.encode()) > MAX_LABEL_BYTES:
            raise InvalidArgument(
                f"label {quote(k[:64])}: key and value exceed {MAX_LABEL_BYTES} bytes"
            )


def _validate_key(what: str, key: str) -> None:
    if not key:
        raise InvalidArgument(f"{what} must not be empty")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SnapshotService:
    """containerd snapshotter semantics over `store`, with the on-disk tree at `root`.

    Construct, then `await open()` before use; `close()` releases the store.
    Every method raises the domain errors of `snapshotter.errors` (each method's
    docstring names them).
    """

    def __init__(
        self,
        store: MetaStore,
        root: Path,
        *,
        features: OverlayFeatures | None = None,
        mounter: LayerMounter | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        sync_dirs: bool = True,
        disk_threads: int = 4,
    ) -> None:
        self.store = store
        self.layout = Layout(root)
        self.features = features if features is not None else OverlayFeatures()
        self.mounter: LayerMounter = mounter if mounter is not None else DeclineMounter()
        self._clock_ns = clock_ns
        self._sync_dirs = sync_dirs
        self._metadata_limiter = trio.CapacityLimiter(1)
        self._read_limiter = trio.CapacityLimiter(4)
        self._disk_limiter = trio.CapacityLimiter(disk_threads)

    def __repr__(self) -> str:
        return f"<SnapshotService root={str(self.layout.root)!r} store={self.store!r}>"

    async def _db(self, fn: Callable[[], T]) -> T:
        result: T = await trio.to_thread.run_sync(fn, limiter=self._metadata_limiter)
        return result

    async def _read(self, fn: Callable[[], T]) -> T:
        result: T = await trio.to_thread.run_sync(fn, limiter=self._read_limiter)
        return result

    async def _disk(self, fn: Callable[[], T]) -> T:
        result: T = await trio.to_thread.run_sync(fn, limiter=self._disk_limiter)
        return result

    # ---------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        """Create the layout (snapshots/ mode 0700) and restore remote layers.

        Raises OSError if the root cannot be created; Unavailable from the
        mounter propagates (a remote layer that cannot be restored).
        """
        self.layout.snapshots.mkdir(parents=True, exist_ok=True)
        os.chmod(self.layout.snapshots, 0o700)
        for info in await self._db(self.store.list_infos):
            if info.labels.get(LABEL_REMOTE):
                snap = await self._db(functools.partial(self.store.get_snapshot, info.name))
                await self.mounter.restore(self.layout.fs(snap.id), info.labels)

    def close(self) -> None:
        """Close the store. Idempotent."""
        self.store.close()

    # --------------------------------------------------------------- creation

    def _materialize(self, snap: Snapshot) -> None:
        """Build `snapshots/<id>` for a new snapshot; runs inside the store transaction."""
        snapshots = self.layout.snapshots
        tmp = Path(tempfile.mkdtemp(prefix="new-", dir=snapshots))
        try:
            (tmp / "fs").mkdir()
            os.chmod(tmp / "fs", 0o755)
            if snap.kind is Kind.ACTIVE:
                (tmp / "work").mkdir()
                os.chmod(tmp / "work", 0o711)
            if snap.parent_ids:
                st = os.stat(self.layout.fs(snap.parent_ids[0]))
                os.lchown(tmp / "fs", st.st_uid, st.st_gid)
            final = self.layout.dir(snap.id)
            if final.exists():
                # A leftover of a transaction that never committed: no record
                # owns it (we hold the write lock). Cleanup reclaims it.
                final.rename(snapshots / f"trash-{snap.id}-{time.time_ns()}")
            tmp.rename(final)
            if self._sync_dirs:
                _fsync_dir(snapshots)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    async def _create(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]
    ) -> Snapshot:
        """Record and materialize a new snapshot on `parent`, all or nothing: a chain the
        mounter refuses raises its Unavailable with nothing created (a refused snapshot
        left behind would keep its parent from ever being removed)."""
        _validate_key("key", key)
        _validate_labels(labels)
        # A layer of containerd's pull is prepared on a chain whose layers may still be
        # mounting; anything else is mounted right away, so it waits for them.
        wait = kind is Kind.VIEW or not labels.get(LABEL_TARGET_REF)
        checked = await self._check_chain(parent, wait=wait)
        snap = await self._record(kind, key, parent, labels)
        if snap.parent_ids != checked:
            # `parent` was removed and made again between the check and the record.
            await self._check_or_discard(snap, key, wait=wait)
        return snap

    async def _check_or_discard(self, snap: Snapshot, key: str, *, wait: bool) -> None:
        """`_check_dirs` of `snap`'s parents; when it raises, `snap` is removed first."""
        try:
            await self._check_dirs(snap.parent_ids, wait=wait)
        except BaseException:
            with trio.CancelScope(shield=True), contextlib.suppress(NotFound):
                await self._db(lambda: self.store.remove(key))
                await self._disk(functools.partial(self._discard_dir, snap.id))
            raise

    async def _check_chain(self, parent: str, *, wait: bool) -> tuple[SnapshotId, ...]:
        """The ids of `parent`'s chain (nearest first), each checked by the mounter (raises
        its Unavailable; `wait`: waiting for mounts in progress). A missing parent checks
        nothing: `create` reports it."""
        if not parent:
            return ()
        try:
            base = await self._read(lambda: self.store.get_snapshot(parent))
        except NotFound:
            return ()
        chain = (base.id, *base.parent_ids)
        await self._check_dirs(chain, wait=wait)
        return chain

    async def _check_dirs(self, ids: Sequence[SnapshotId], *, wait: bool = True) -> None:
        """The mounter's `ready` (`wait`) or `check` of each directory of `ids`."""
        for sid in ids:
            if wait:
                await self.mounter.ready(self.layout.fs(sid))
            else:
                await self.mounter.check(self.layout.fs(sid))

    async def _record(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]
    ) -> Snapshot:
        now = self._clock_ns()
        materialized: list[Snapshot] = []

        def materialize(snap: Snapshot) -> None:
            self._materialize(snap)
            materialized.append(snap)

        try:
            return await self._db(
                lambda: self.store.create(key, parent, kind, labels, now, materialize)
            )
        except BaseException:
            for snap in materialized:
                # The record was rolled back after the directory was made.
                await self._disk(functools.partial(self._discard_dir, snap.id))
            raise

    def _discard_dir(self, sid: SnapshotId) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.layout.dir(sid).rename(self.layout.snapshots / f"trash-{sid}-{time.time_ns()}")

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        return mounts_for(self.layout, snap.kind, snap.id, snap.parent_ids, self.features)

    async def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        """Create ACTIVE `key` on committed `parent` ("" for none); return its mounts.

        With label containerd.io/snapshot.ref and a mounter that accepts the
        layer, the layer is committed under that name and AlreadyExists is
        raised (containerd's remote-snapshot handshake).
        Raises AlreadyExists, NotFound (parent), InvalidArgument, Unavailable (a remote
        layer of the parent chain failed its check; nothing is created).
        """
        snap = await self._create(Kind.ACTIVE, key, parent, labels)
        target = labels.get(LABEL_TARGET_REF)
        if target:
            await self._try_remote(snap, key, target, labels)
            # declined: containerd applies the layer on its parents' mounts
            await self._check_or_discard(snap, key, wait=True)
        return self._mounts(snap)

    async def _try_remote(
        self, snap: Snapshot, key: str, target: str, labels: Mapping[str, str]
    ) -> None:
        fs = self.layout.fs(snap.id)
        try:
            result = await self.mounter.mount(fs, labels)
        except Exception as e:  # the mounter's failure means: pull it normally
            log.warning(
                "remote mount failed, layer handled locally",
                extra={"key": key, "target": target, "error": repr(e)},
            )
            result = MountResult.DECLINED
        if result is True:
            result = MountResult.REMOTE
        if result is False or result is MountResult.DECLINED:
            return
        if result is MountResult.REMOTE:
            commit_labels = {**labels, LABEL_REMOTE: LABEL_REMOTE_VALUE}
            usage = Usage()
        else:
            commit_labels = dict(labels)
            usage = await self._disk(lambda: disk_usage(fs))
        with contextlib.suppress(AlreadyExists):
            await self._db(
                lambda: self.store.commit(target, key, commit_labels, usage, self._clock_ns())
            )
        raise AlreadyExists(f"target snapshot {quote(target)}: already exists")

    async def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        """Create read-only VIEW `key` of committed `parent`; return its mounts.

        Raises AlreadyExists, NotFound (parent), InvalidArgument, Unavailable (a remote
        layer of the parent chain failed its check; nothing is created).
        """
        snap = await self._create(Kind.VIEW, key, parent, labels)
        return self._mounts(snap)

    async def mounts(self, key: str) -> list[Mount]:
        """Mounts of ACTIVE or VIEW `key`.

        Raises NotFound, FailedPrecondition (committed), Unavailable (a remote
        layer failed its check).
        """
        snap = await self._read(lambda: self.store.get_snapshot(key))
        if snap.kind is Kind.COMMITTED:
            raise FailedPrecondition(f"snapshot {quote(key)} is committed and cannot be mounted")
        await self._check_dirs((snap.id, *snap.parent_ids))
        return self._mounts(snap)

    async def commit(self, name: str, key: str, labels: Mapping[str, str]) -> Info:
        """Commit ACTIVE `key` as `name`, measuring and storing its usage.

        Raises AlreadyExists (name), NotFound (key), FailedPrecondition (not
        ACTIVE), InvalidArgument (empty name, oversized label).
        """
        _validate_key("name", name)
        _validate_labels(labels)
        snap = await self._read(lambda: self.store.get_snapshot(key))
        usage = Usage()
        if snap.kind is Kind.ACTIVE:
            usage = await self._disk(lambda: disk_usage(self.layout.fs(snap.id)))
        now = self._clock_ns()
        return await self._db(lambda: self.store.commit(name, key, labels, usage, now))

    async def remove(self, key: str) -> None:
        """Remove `key` (any kind). Its directory is reclaimed by `cleanup`.

        Raises NotFound, FailedPrecondition (has children).
        """
        await self._db(lambda: self.store.remove(key))

    async def stat(self, key: str) -> Info:
        """Info of `key`. Raises NotFound."""
        return await self._read(lambda: self.store.get_info(key))

    def stat_blocking(self, key: str) -> Info:
        """Stat for a worker thread (the gRPC pool): one metadata read, no trip
        through the trio loop. Never call it from the trio thread. Raises NotFound.

        Stat is containerd's hottest call (its Walk stats every snapshot, CRI's
        syncer every 10 s), so it skips the two thread hops of the async path.
        """
        return self.store.get_info(key)

    def list_blocking(self, filter_strings: Sequence[str]) -> list[Info]:
        """`list_snapshots` for a worker thread; same contract as `stat_blocking`.

        Raises InvalidArgument for a malformed filter.
        """
        match = filters.parse_all(filter_strings)
        return [i for i in self.store.list_infos() if match(i)]

    async def update(self, key: str, labels: Mapping[str, str], paths: Sequence[str]) -> Info:
        """Update labels of `key` (only labels are mutable; see metadata.apply_label_update).

        Raises NotFound, InvalidArgument (other field paths, oversized label).
        """
        _validate_labels(labels)
        now = self._clock_ns()
        return await self._db(lambda: self.store.update(key, labels, paths, now))

    async def list_snapshots(self, filter_strings: Sequence[str]) -> list[Info]:
        """Infos matching any of `filter_strings` (all when empty), ordered by name.

        A consistent copy: callers may stream it while other calls run.
        Raises InvalidArgument for a malformed filter.
        """
        match = filters.parse_all(filter_strings)
        infos = await self._read(self.store.list_infos)
        return [i for i in infos if match(i)]

    async def usage(self, key: str) -> Usage:
        """ACTIVE: measured now from the upper dir; others: stored. Raises NotFound."""
        snap = await self._read(lambda: self.store.get_snapshot(key))
        if snap.kind is Kind.ACTIVE:
            return await self._disk(lambda: disk_usage(self.layout.fs(snap.id)))
        return snap.usage

    async def cleanup(self) -> list[str]:
        """Delete every directory under snapshots/ that no record owns.

        Orphans are moved aside inside the store's write transaction (so a
        concurrent Prepare can never lose its directory), then unmounted
        through the mounter and deleted. Returns the names reclaimed.
        Raises OSError if snapshots/ cannot be listed.
        """
        moved: list[tuple[str, Path]] = []
        snapshots = self.layout.snapshots

        def reclaim(live: frozenset[SnapshotId]) -> None:
            live_names = {str(i) for i in live}
            for entry in sorted(os.listdir(snapshots)):
                if entry in live_names:
                    continue
                path = snapshots / entry
                if entry.startswith("trash-"):
                    moved.append((entry, path))
                    continue
                dest = snapshots / f"trash-{entry}-{time.time_ns()}"
                path.rename(dest)
                moved.append((entry, dest))

        await self._db(lambda: self.store.cleanup(reclaim))
        for _, path in moved:
            await self.mounter.unmount(path / "fs")
            await self._disk(functools.partial(shutil.rmtree, path, ignore_errors=True))
        names = [name for name, _ in moved]
        if names:
            log.info("cleanup reclaimed directories", extra={"count": len(names)})
        return names


__all__ = [
    "DeclineMounter",
    "LayerMounter",
    "MountResult",
    "SnapshotService",
    "SnapshotterError",
    "disk_usage",
]
