"""The mounter's fallback matrix, table-driven over fakes at its seams (catalog, layers,
unpacker, records), with trio's autojump clock for `mount_timeout_sec`; and the start-up
policy of `open_remote_mounter` (a broken span cache degrades, it does not stop the daemon).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from index.digest import Digest
from index.manifest import SociIndex, ZtocDescriptor
from index.oci import mediatypes as mt
from index.oci.reference import Reference
from snapshotter.config import Config, RemoteConfig
from snapshotter.daemon import Settings
from snapshotter.errors import Unavailable
from snapshotter.lazy.demand import DemandTracker
from snapshotter.remote import labels as L
from snapshotter.remote.compose import open_remote_mounter
from snapshotter.remote.discovery import ImageArtifacts, ZtocDownloads
from snapshotter.remote.errors import IndexFetchError, MountError, NoIndex, UnpackError
from snapshotter.remote.labels import LayerLabels
from snapshotter.remote.mounter import DegradedMounter, RemoteMounter
from snapshotter.remote.records import LayerRecord, RecordStore
from snapshotter.remote.status import read_daemon_status
from snapshotter.snapshots.service import MountResult
from snapshotter.tasks import TaskScope, open_task_scope

MANIFEST = Digest("sha256:" + "1" * 64)
LAYER = Digest("sha256:" + "2" * 64)
UNINDEXED = Digest("sha256:" + "3" * 64)
INDEX = Digest("sha256:" + "4" * 64)
ZTOC = Digest("sha256:" + "5" * 64)
TIMEOUT = 30.0

ARTIFACTS = ImageArtifacts(
    MANIFEST,
    INDEX,
    SociIndex(mt.SOCI_INDEX_V2, (ZtocDescriptor(ZTOC, 10, LAYER, mt.OCI_LAYER_GZIP, 1 << 22),)),
    "v2",
)


def labels(layer: Digest = LAYER) -> dict[str, str]:
    return {
        L.TARGET_REF: "sha256:chain",
        L.CRI_IMAGE_REF: "registry.test/app:1",
        L.CRI_MANIFEST_DIGEST: MANIFEST,
        L.CRI_LAYER_DIGEST: layer,
    }


@dataclass
class FakeCatalog:
    """Answers with ARTIFACTS, raises `error`, or hangs (`hang`); counts calls."""

    error: Exception | None = None
    hang: bool = False
    calls: int = 0
    ztocs: ZtocDownloads | None = None
    """The image's zTOC downloads (default: every zTOC present)."""

    async def artifacts(self, ll: LayerLabels, ref: Reference) -> ImageArtifacts:
        self.calls += 1
        if self.hang:
            await trio.sleep_forever()
        if self.error is not None:
            raise self.error
        if self.ztocs is not None:
            return dataclasses.replace(ARTIFACTS, ztocs=self.ztocs)
        return ARTIFACTS


def failed_download(error: str) -> ZtocDownloads:
    downloads = ZtocDownloads([ZTOC])
    downloads.done(ZTOC, error)
    return downloads


@dataclass
class FakeLayers:
    error: Exception | None = None
    mounted: list[str] = field(default_factory=list)
    unmounted: list[Path] = field(default_factory=list)

    async def mount(self, mountpoint: Path, name: str, record: LayerRecord) -> None:
        if self.error is not None:
            raise self.error
        self.mounted.append(name)

    async def unmount(self, mountpoint: Path) -> None:
        self.unmounted.append(mountpoint)

    async def close(self) -> None:
        pass

    def statuses(self) -> dict[str, dict[str, object]]:
        return {n: {} for n in self.mounted}


@dataclass
class FakeUnpacker:
    error: Exception | None = None
    calls: list[Digest] = field(default_factory=list)

    async def unpack(self, ll: LayerLabels, ref: Reference, dest: Path) -> int:
        self.calls.append(ll.layer_digest)
        if self.error is not None:
            raise self.error
        return 123


@dataclass
class Row:
    name: str
    labels: Mapping[str, str] = field(default_factory=labels)
    catalog: FakeCatalog = field(default_factory=FakeCatalog)
    layers: FakeLayers = field(default_factory=FakeLayers)
    unpacker: FakeUnpacker = field(default_factory=FakeUnpacker)
    local_unpack: bool = True
    result: MountResult = MountResult.REMOTE
    reasons: tuple[str, ...] = ()
    mounted: bool = False
    unpacked: bool = False


ROWS = [
    Row("lazy", mounted=True),
    Row("labels missing", labels={L.TARGET_REF: "x"}, result=MountResult.DECLINED, reasons=("no_cri_labels",)),
    Row("no index", catalog=FakeCatalog(NoIndex("none")), result=MountResult.DECLINED, reasons=("no_index",)),
    Row("index fetch error", catalog=FakeCatalog(IndexFetchError("503")), result=MountResult.DECLINED, reasons=("index_fetch",)),
    Row("index timeout", catalog=FakeCatalog(hang=True), result=MountResult.DECLINED, reasons=("index_fetch",)),
    Row("no ztoc: local", labels=labels(UNINDEXED), result=MountResult.LOCAL, reasons=("no_ztoc",), unpacked=True),
    Row("no ztoc, unpack fails", labels=labels(UNINDEXED), unpacker=FakeUnpacker(UnpackError("gunzip")), result=MountResult.DECLINED, reasons=("no_ztoc", "unpack"), unpacked=True),
    Row("ztoc fetch fails: local", catalog=FakeCatalog(ztocs=failed_download("zTOC: 503")), result=MountResult.LOCAL, reasons=("index_fetch",), unpacked=True),
    Row("lazy mount fails: local", layers=FakeLayers(MountError("bind")), result=MountResult.LOCAL, reasons=("mount",), unpacked=True),
    Row("no ztoc, local unpack off", labels=labels(UNINDEXED), local_unpack=False, result=MountResult.DECLINED, reasons=("no_ztoc",)),
]  # fmt: skip


def fallback_reasons(caplog: pytest.LogCaptureFixture) -> tuple[str, ...]:
    return tuple(
        getattr(r, "reason", "") for r in caplog.records if r.getMessage() == "lazy layer fallback"
    )


def make(row: Row, tmp_path: Path, tasks: TaskScope | None = None) -> RemoteMounter:
    """The mounter of `row`'s fakes; with `tasks` it defers mounts (and tracks demand)."""
    return RemoteMounter(
        catalog=row.catalog,
        layers=row.layers,
        unpacker=row.unpacker,
        records=RecordStore(tmp_path / "remote"),
        mount_timeout_sec=TIMEOUT,
        local_unpack=row.local_unpack,
        tasks=tasks,
        demand=DemandTracker() if tasks is not None else None,
    )


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
async def test_fallback_matrix(
    row: Row,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    mounter = make(row, tmp_path)
    start = trio.current_time()
    assert await mounter.mount(tmp_path / "snapshots" / "7" / "fs", row.labels) is row.result
    assert fallback_reasons(caplog) == row.reasons
    assert row.layers.mounted == (["snap-7"] if row.mounted else [])
    assert bool(row.unpacker.calls) is row.unpacked
    if row.catalog.hang:
        assert trio.current_time() - start == pytest.approx(TIMEOUT)


async def test_prepare_waits_for_its_ztoc_download(tmp_path: Path) -> None:
    downloads = ZtocDownloads([ZTOC])
    row = Row("lazy", catalog=FakeCatalog(ztocs=downloads))
    mounter = make(row, tmp_path)
    results: list[MountResult] = []

    async def prepare() -> None:
        results.append(await mounter.mount(tmp_path / "snapshots" / "7" / "fs", labels()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(prepare)
        await trio.testing.wait_all_tasks_blocked()
        assert results == [] and row.layers.mounted == []  # waiting for the zTOC
        downloads.done(ZTOC)
    assert results == [MountResult.REMOTE] and row.layers.mounted == ["snap-7"]


async def test_with_tasks_a_prepare_returns_before_its_ztoc(tmp_path: Path) -> None:
    downloads = ZtocDownloads([ZTOC])
    row = Row("lazy", catalog=FakeCatalog(ztocs=downloads))
    fs = tmp_path / "snapshots" / "7" / "fs"
    async with open_task_scope("test") as tasks:
        mounter = make(row, tmp_path, tasks)
        assert await mounter.mount(fs, labels()) is MountResult.REMOTE
        assert row.layers.mounted == [] and mounter.status()["mountsInProgress"] == ["snap-7"]
        await trio.testing.wait_all_tasks_blocked()
        assert mounter.demand is not None and mounter.demand.mounting == 1  # background waits
        await mounter.check(fs)  # a layer of the pull on top of it does not wait
        waited = trio.Event()

        async def container() -> None:
            await mounter.ready(fs)
            waited.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(container)
            await trio.testing.wait_all_tasks_blocked()
            assert not waited.is_set()  # a container's snapshot waits for the mount
            downloads.done(ZTOC)
        assert row.layers.mounted == ["snap-7"] and "mountsInProgress" not in mounter.status()
        assert mounter.demand.mounting == 0
        await mounter.ready(fs)  # mounted: at once


async def test_a_deferred_mount_that_fails_is_unpacked_locally(tmp_path: Path) -> None:
    downloads = ZtocDownloads([ZTOC])
    row = Row("lazy", catalog=FakeCatalog(ztocs=downloads))
    fs = tmp_path / "snapshots" / "7" / "fs"
    async with open_task_scope("test") as tasks:
        mounter = make(row, tmp_path, tasks)
        assert await mounter.mount(fs, labels()) is MountResult.REMOTE
        downloads.done(ZTOC, "zTOC: 503")
        await mounter.ready(fs)
        assert row.layers.mounted == [] and row.unpacker.calls == [LAYER]
        record = RecordStore(tmp_path / "remote").read("snap-7")
        assert record is not None and record.local
        # after a restart there is nothing to mount: its files are in `fs`
        again = make(Row("restore", catalog=FakeCatalog(IndexFetchError("down"))), tmp_path)
        await again.restore(fs, labels())
        await again.check(fs)
        assert again.layers.mounted == []  # type: ignore[attr-defined]


async def test_a_deferred_layer_nothing_could_serve_is_unavailable_until_a_retry(
    tmp_path: Path,
) -> None:
    row = Row(
        "lazy",
        catalog=FakeCatalog(ztocs=ZtocDownloads([ZTOC])),
        unpacker=FakeUnpacker(UnpackError("registry down")),
    )
    fs = tmp_path / "snapshots" / "7" / "fs"
    async with open_task_scope("test") as tasks:
        mounter = make(row, tmp_path, tasks)
        assert await mounter.mount(fs, labels()) is MountResult.REMOTE
        assert row.catalog.ztocs is not None
        row.catalog.ztocs.done(ZTOC, "zTOC: 503")
        with pytest.raises(Unavailable, match="registry down"):
            await mounter.ready(fs)
        with pytest.raises(Unavailable, match="503"):
            await mounter.check(fs)
        # the registry is back: the next container tries again, discovering the index anew
        row.catalog.ztocs = None
        row.unpacker.error = None
        await mounter.ready(fs)
        assert row.layers.mounted == ["snap-7"] and row.unpacker.calls == [LAYER]
        await mounter.check(fs)


async def test_unmount_waits_for_a_deferred_mount(tmp_path: Path) -> None:
    downloads = ZtocDownloads([ZTOC])
    row = Row("lazy", catalog=FakeCatalog(ztocs=downloads))
    fs = tmp_path / "snapshots" / "7" / "fs"
    async with open_task_scope("test") as tasks:
        mounter = make(row, tmp_path, tasks)
        await mounter.mount(fs, labels())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mounter.unmount, fs)
            await trio.testing.wait_all_tasks_blocked()
            assert row.layers.unmounted == []
            downloads.done(ZTOC)
        assert row.layers.mounted == ["snap-7"] and row.layers.unmounted == [fs]


async def test_a_ztoc_at_hand_is_mounted_in_the_background_a_failed_one_falls_back_at_once(
    tmp_path: Path,
) -> None:
    row = Row("lazy")  # every zTOC present: its tree still takes time to build
    fs = tmp_path / "snapshots" / "7" / "fs"
    async with open_task_scope("test") as tasks:
        mounter = make(row, tmp_path, tasks)
        assert await mounter.mount(fs, labels()) is MountResult.REMOTE
        await mounter.ready(fs)
        assert row.layers.mounted == ["snap-7"]
        failed = Row("failed", catalog=FakeCatalog(ztocs=failed_download("zTOC: 503")))
        mounter = make(failed, tmp_path, tasks)
        assert await mounter.mount(fs, labels()) is MountResult.LOCAL
        assert failed.unpacker.calls == [LAYER]


async def test_no_index_logged_once_per_image(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    row = Row("no index", catalog=FakeCatalog(NoIndex("none")))
    mounter = make(row, tmp_path)
    for snap in ("1", "2", "3"):
        fs = tmp_path / "snapshots" / snap / "fs"
        assert await mounter.mount(fs, labels()) is MountResult.DECLINED
    assert fallback_reasons(caplog) == ("no_index",)
    assert row.catalog.calls == 3  # the catalog decides what to remember (TTL)


async def test_failed_restore_answers_unavailable(tmp_path: Path) -> None:
    row = Row("restore", catalog=FakeCatalog(IndexFetchError("registry down")))
    mounter = make(row, tmp_path)
    fs = tmp_path / "snapshots" / "9" / "fs"
    await mounter.restore(fs, labels())  # no record: rediscovery fails
    with pytest.raises(Unavailable, match="registry down"):
        await mounter.check(fs)
    await mounter.check(tmp_path / "snapshots" / "8" / "fs")  # other layers are fine
    assert mounter.status()["restoreFailed"] == {"snap-9": "registry down"}
    await mounter.unmount(fs)
    await mounter.check(fs)
    assert row.layers.unmounted == [fs]


async def test_restore_from_record_without_registry(tmp_path: Path) -> None:
    row = Row("restore", catalog=FakeCatalog(IndexFetchError("registry down")))
    mounter = make(row, tmp_path)
    RecordStore(tmp_path / "remote").write(
        "snap-9", LayerRecord("registry.test/app:1", MANIFEST, LAYER, INDEX, ZTOC, 5)
    )
    fs = tmp_path / "snapshots" / "9" / "fs"
    await mounter.restore(fs, labels())
    await mounter.check(fs)
    assert row.layers.mounted == ["snap-9"] and row.catalog.calls == 0


async def test_degraded_mounter_declines_and_fails_restored_layers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mounter = DegradedMounter("cache", "PermissionError: /r/cache")
    for snap in ("1", "2"):
        fs = tmp_path / "snapshots" / snap / "fs"
        assert await mounter.mount(fs, labels()) is MountResult.DECLINED
    assert fallback_reasons(caplog) == ("degraded",)
    fs = tmp_path / "snapshots" / "3" / "fs"
    await mounter.restore(fs, labels())
    with pytest.raises(Unavailable, match="cache"):
        await mounter.check(fs)


def settings(root: Path, **remote: object) -> Settings:
    config = Config(remote=RemoteConfig(hosts_dir="", **remote))  # type: ignore[arg-type]
    return Settings(config=config, address=str(root / "sock"), root=root)


async def test_broken_cache_degrades_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "cache").write_text("a file where the cache directory belongs")
    async with open_remote_mounter(settings(root)) as mounter:
        assert isinstance(mounter, DegradedMounter)
        assert mounter.component == "cache"
        doc = read_daemon_status(root)
        assert doc is not None and doc["lazyLayers"] == "degraded"
        assert doc["component"] == "cache"
        fs = root / "snapshots" / "1" / "fs"
        assert await mounter.mount(fs, labels()) is MountResult.DECLINED
    disabled = [r for r in caplog.records if r.getMessage() == "lazy layers disabled"]
    assert len(disabled) == 1 and disabled[0].exc_info is None
    assert read_daemon_status(root) is None  # removed on a clean exit


async def test_disabled_by_config_is_in_status(tmp_path: Path) -> None:
    async with open_remote_mounter(settings(tmp_path, enable=False)):
        doc = read_daemon_status(tmp_path)
        assert doc is not None
        assert json.loads(json.dumps(doc))["lazyLayers"] == "disabled"
