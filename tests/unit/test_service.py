"""SnapshotService over a real directory and both stores, with a fake LayerMounter.

The remote-layer seam is exercised here (the real mounter has its own tests); real
mounts and the gRPC wire are covered by tests/integration/test_conformance.py.
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest

from snapshotter.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from snapshotter.snapshots.metadata import MemoryStore, MetaStore, SqliteStore
from snapshotter.snapshots.model import LABEL_REMOTE, LABEL_TARGET_REF, Kind, Usage
from snapshotter.snapshots.mounts import OverlayFeatures
from snapshotter.snapshots.service import SnapshotService, disk_usage


class FakeMounter:
    def __init__(self, accept: bool = True, fail: bool = False) -> None:
        self.accept = accept
        self.fail = fail
        self.mounted: list[Path] = []
        self.unmounted: list[Path] = []
        self.restored: list[Path] = []
        self.unhealthy: set[Path] = set()
        self.waited: list[Path] = []
        self.unready: set[Path] = set()

    async def mount(self, mountpoint: Path, labels: Mapping[str, str]) -> bool:
        if self.fail:
            raise OSError("registry unreachable")
        if self.accept:
            self.mounted.append(mountpoint)
        return self.accept

    async def check(self, mountpoint: Path) -> None:
        if mountpoint in self.unhealthy:
            raise Unavailable(f"layer at {mountpoint} unavailable")

    async def ready(self, mountpoint: Path) -> None:
        self.waited.append(mountpoint)
        if mountpoint in self.unready:
            raise Unavailable(f"layer at {mountpoint} could not be mounted")
        await self.check(mountpoint)

    async def restore(self, mountpoint: Path, labels: Mapping[str, str]) -> None:
        self.restored.append(mountpoint)

    async def unmount(self, mountpoint: Path) -> None:
        self.unmounted.append(mountpoint)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> MetaStore:
    if request.param == "memory":
        return MemoryStore()
    return SqliteStore(tmp_path / "metadata.db")


@pytest.fixture
def mounter() -> FakeMounter:
    return FakeMounter()


@pytest.fixture
async def svc(
    store: MetaStore, tmp_path: Path, mounter: FakeMounter
) -> AsyncIterator[SnapshotService]:
    s = SnapshotService(
        store, tmp_path / "root", features=OverlayFeatures(index_off=True), mounter=mounter
    )
    await s.open()
    try:
        yield s
    finally:
        s.close()


async def test_layout_and_modes(svc: SnapshotService) -> None:
    assert stat.S_IMODE(svc.layout.snapshots.stat().st_mode) == 0o700
    m = await svc.prepare("a", "", {})
    fs = Path(m[0].source)
    assert fs == svc.layout.snapshots / "1" / "fs"
    assert stat.S_IMODE(fs.stat().st_mode) == 0o755
    assert stat.S_IMODE((fs.parent / "work").stat().st_mode) == 0o711
    await svc.commit("c", "a", {})
    v = await svc.view("v", "", {})
    assert not (Path(v[0].source).parent / "work").exists()  # views have no workdir
    assert [p.name for p in svc.layout.snapshots.iterdir() if p.name.startswith("new-")] == []


async def test_overlay_options_in_containerd_order(svc: SnapshotService) -> None:
    await svc.prepare("a", "", {})
    await svc.commit("c1", "a", {})
    m = await svc.prepare("b", "c1", {})
    snaps = svc.layout.snapshots
    assert m[0].options == (
        "index=off",
        f"workdir={snaps / '2' / 'work'}",
        f"upperdir={snaps / '2' / 'fs'}",
        f"lowerdir={snaps / '1' / 'fs'}",
    )


async def test_remote_handshake_commits_target_and_says_already_exists(
    svc: SnapshotService, mounter: FakeMounter
) -> None:
    labels = {LABEL_TARGET_REF: "sha256:chain1", "containerd.io/snapshot/cri.layer-digest": "d"}
    with pytest.raises(AlreadyExists, match="sha256:chain1"):
        await svc.prepare("extract-1 sha256:chain1", "", labels)
    assert len(mounter.mounted) == 1
    info = await svc.stat("sha256:chain1")
    assert info.kind is Kind.COMMITTED
    assert info.labels[LABEL_REMOTE] == "remote snapshot"
    assert info.labels[LABEL_TARGET_REF] == "sha256:chain1"
    found = await svc.list_snapshots(
        ['labels."containerd.io/snapshot.ref"==sha256:chain1,parent==""']
    )
    assert [i.name for i in found] == ["sha256:chain1"]
    assert await svc.usage("sha256:chain1") == Usage()  # remote layers use no local disk
    with pytest.raises(NotFound):
        await svc.stat("extract-1 sha256:chain1")


async def test_declined_or_failing_remote_falls_back_to_local(tmp_path: Path) -> None:
    for mounter in (FakeMounter(accept=False), FakeMounter(fail=True)):
        root = tmp_path / f"r{id(mounter)}"
        svc = SnapshotService(MemoryStore(), root, mounter=mounter)
        await svc.open()
        m = await svc.prepare("k", "", {LABEL_TARGET_REF: "sha256:x"})
        assert m[0].type == "bind"
        assert (await svc.stat("k")).kind is Kind.ACTIVE
        svc.close()


async def test_unhealthy_remote_lower_is_unavailable(
    svc: SnapshotService, mounter: FakeMounter
) -> None:
    with pytest.raises(AlreadyExists):
        await svc.prepare("x", "", {LABEL_TARGET_REF: "sha256:l1"})
    await svc.prepare("top", "sha256:l1", {})
    mounter.unhealthy.add(mounter.mounted[0])
    with pytest.raises(Unavailable):
        await svc.mounts("top")
    mounter.unhealthy.clear()
    assert (await svc.mounts("top"))[0].type == "overlay"


async def test_mounts_wait_for_the_chain_but_the_pull_does_not(
    svc: SnapshotService, mounter: FakeMounter
) -> None:
    with pytest.raises(AlreadyExists):
        await svc.prepare("x1", "", {LABEL_TARGET_REF: "sha256:l1"})
    lower = mounter.mounted[0]
    # the pull's next layer on it: checked, not waited for (its mount may be deferred)
    with pytest.raises(AlreadyExists):
        await svc.prepare("x2", "sha256:l1", {LABEL_TARGET_REF: "sha256:l2"})
    assert mounter.waited == []
    upper = mounter.mounted[1]
    # what is mounted right away waits for every layer of its chain
    await svc.prepare("container", "sha256:l2", {})
    assert mounter.waited == [upper, lower]
    mounter.waited.clear()
    await svc.view("view", "sha256:l2", {})
    assert mounter.waited == [upper, lower]
    mounter.waited.clear()
    await svc.mounts("container")
    assert mounter.waited[1:] == [upper, lower]
    # a layer of the pull that is declined is applied by containerd on its parents: waits
    mounter.waited.clear()
    mounter.accept = False
    m = await svc.prepare("x3", "sha256:l2", {LABEL_TARGET_REF: "sha256:l3"})
    assert m[0].type == "overlay" and mounter.waited == [upper, lower]
    # and when a parent's deferred mount fails, that snapshot is not left behind
    mounter.unready.add(lower)
    with pytest.raises(Unavailable):
        await svc.prepare("x4", "sha256:l2", {LABEL_TARGET_REF: "sha256:l4"})
    with pytest.raises(NotFound):
        await svc.stat("x4")


async def test_restore_called_for_remote_snapshots(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    first = FakeMounter()
    svc = SnapshotService(SqliteStore(db), tmp_path / "root", mounter=first)
    await svc.open()
    with pytest.raises(AlreadyExists):
        await svc.prepare("x", "", {LABEL_TARGET_REF: "sha256:l1"})
    await svc.prepare("local", "", {})
    svc.close()
    second = FakeMounter()
    svc = SnapshotService(SqliteStore(db), tmp_path / "root", mounter=second)
    await svc.open()
    assert second.restored == first.mounted
    svc.close()


async def test_mounts_and_commit_errors(svc: SnapshotService) -> None:
    await svc.prepare("a", "", {})
    await svc.commit("c", "a", {})
    with pytest.raises(FailedPrecondition, match="committed"):
        await svc.mounts("c")
    with pytest.raises(NotFound):
        await svc.mounts("a")


async def test_fs_chowned_to_parent_root_owner(svc: SnapshotService) -> None:
    if os.geteuid() != 0:
        pytest.skip("SKIPPED LOUDLY: chown to another uid needs root")
    m = await svc.prepare("a", "", {})
    os.chown(m[0].source, 4242, 4343)
    await svc.commit("c", "a", {})
    m2 = await svc.prepare("b", "c", {})
    upper = next(o for o in m2[0].options if o.startswith("upperdir="))[len("upperdir=") :]
    st = os.stat(upper)
    assert (st.st_uid, st.st_gid) == (4242, 4343)


async def test_usage_counts_unique_inodes(svc: SnapshotService) -> None:
    m = await svc.prepare("a", "", {})
    fs = Path(m[0].source)
    (fs / "f").write_bytes(b"x" * 10000)
    os.link(fs / "f", fs / "g")
    (fs / "d").mkdir()
    usage = await svc.usage("a")
    assert usage.inodes == 3
    assert usage == disk_usage(fs)
    assert usage.size_bytes == sum(os.lstat(p).st_blocks * 512 for p in (fs, fs / "f", fs / "d"))
    await svc.commit("c", "a", {})
    (fs / "late").write_bytes(b"ignored after commit")
    assert await svc.usage("c") == usage


async def test_cleanup_unmounts_and_removes_orphans(
    svc: SnapshotService, mounter: FakeMounter
) -> None:
    await svc.prepare("keep", "", {})
    m = await svc.prepare("drop", "", {})
    drop_dir = Path(m[0].source).parent
    await svc.remove("drop")
    (svc.layout.snapshots / "new-crashed").mkdir()
    (svc.layout.snapshots / "777").mkdir()
    reclaimed = await svc.cleanup()
    assert sorted(reclaimed) == sorted([drop_dir.name, "new-crashed", "777"])
    assert sorted(os.listdir(svc.layout.snapshots)) == ["1"]
    assert len(mounter.unmounted) == 3
    assert await svc.cleanup() == []


async def test_stale_dir_with_reused_uncommitted_id_is_moved_aside(
    svc: SnapshotService,
) -> None:
    # A crash between creating snapshots/<id> and committing the record leaves a
    # directory whose id the store may hand out again.
    (svc.layout.snapshots / "1" / "fs").mkdir(parents=True)
    (svc.layout.snapshots / "1" / "fs" / "junk").write_text("stale")
    m = await svc.prepare("a", "", {})
    assert Path(m[0].source) == svc.layout.snapshots / "1" / "fs"
    assert list(Path(m[0].source).iterdir()) == []
    await svc.cleanup()
    assert sorted(os.listdir(svc.layout.snapshots)) == ["1"]


async def test_blocking_reads_match_async_reads(svc: SnapshotService) -> None:
    import trio

    from snapshotter.errors import InvalidArgument

    await svc.prepare("a", "", {"x": "1"})
    await svc.commit("c", "a", {"y": "2"})
    await svc.view("v", "c", {})
    assert await trio.to_thread.run_sync(svc.stat_blocking, "c") == await svc.stat("c")
    got = await trio.to_thread.run_sync(svc.list_blocking, ["kind==view", "labels.y"])
    assert got == await svc.list_snapshots(["kind==view", "labels.y"])
    assert [i.name for i in got] == ["c", "v"]
    with pytest.raises(NotFound):
        await trio.to_thread.run_sync(svc.stat_blocking, "gone")
    with pytest.raises(InvalidArgument):
        await trio.to_thread.run_sync(svc.list_blocking, ["kind=="])


async def test_refused_view_or_prepare_creates_nothing(
    svc: SnapshotService, mounter: FakeMounter
) -> None:
    with pytest.raises(AlreadyExists):
        await svc.prepare("x", "", {LABEL_TARGET_REF: "sha256:l1"})
    mounter.unhealthy.add(mounter.mounted[0])
    before = sorted(os.listdir(svc.layout.snapshots))
    with pytest.raises(Unavailable):
        await svc.view("v", "sha256:l1", {})
    with pytest.raises(Unavailable):
        await svc.prepare("p", "sha256:l1", {})
    with pytest.raises(Unavailable):  # refused before the layer is mounted
        await svc.prepare("extract-2", "sha256:l1", {LABEL_TARGET_REF: "sha256:l2"})
    assert len(mounter.mounted) == 1
    assert [i.name for i in await svc.list_snapshots([])] == ["sha256:l1"]
    assert sorted(os.listdir(svc.layout.snapshots)) == before
    await svc.remove("sha256:l1")  # nothing left on it: image GC can go on
    assert await svc.list_snapshots([]) == []
    with pytest.raises(NotFound, match="parent"):  # a missing parent is still create's error
        await svc.view("v", "gone", {})


async def test_parent_made_again_during_the_check_is_checked_again(
    svc: SnapshotService, mounter: FakeMounter
) -> None:
    await svc.prepare("a", "", {})
    await svc.commit("base", "a", {})
    first_check = True
    check = mounter.check

    async def swap_parent(mountpoint: Path) -> None:
        # The parent is removed and committed again (a new id) right after it was checked,
        # and the new one is unhealthy.
        nonlocal first_check
        await check(mountpoint)
        if first_check:
            first_check = False
            await svc.remove("base")
            m = await svc.prepare("b", "", {})
            await svc.commit("base", "b", {})
            mounter.unhealthy.add(Path(m[0].source))

    mounter.check = swap_parent  # type: ignore[method-assign]
    with pytest.raises(Unavailable):
        await svc.view("v", "base", {})
    assert [i.name for i in await svc.list_snapshots([])] == ["base"]
    await svc.cleanup()
    assert sorted(os.listdir(svc.layout.snapshots)) == ["2"]
