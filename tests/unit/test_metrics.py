"""Metrics: the instruments, the collectors, the metered source, the listener, and the seams
that record (FUSE boundary, gRPC servicer, mounter), each read back through the registry or
the Prometheus text format parsed with prometheus_client's own parser."""

from __future__ import annotations

import errno
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from index.digest import Digest
from index.model import CompressedOffset, SpanId
from index.oci.reference import Reference
from index.oci.responses import BodySink
from snapshotter.config import Config, MetricsConfig, RemoteConfig
from snapshotter.daemon import Settings
from snapshotter.errors import NotFound
from snapshotter.fs import LayerHost
from snapshotter.fs.fuse import FuseOperations
from snapshotter.fs.inodes import FUSE_ROOT_INODE, make_inode
from snapshotter.lazy.background import BackgroundStatistics
from snapshotter.lazy.cache import CacheConfig, SpanCache
from snapshotter.lazy.sources import (
    AccessDenied,
    AllSourcesFailed,
    BlobNotFound,
    Check,
    ContentMismatch,
    FetchError,
    FetchTimeout,
    SourceUnavailable,
)
from snapshotter.metrics import (
    DaemonMetrics,
    MeteredSource,
    MetricsApp,
    bind_metrics,
    error_kind,
    grpc_recorder_of,
    serve_metrics,
)
from snapshotter.metrics.collectors import (
    BackgroundCollector,
    CacheCollector,
    LayersCollector,
    PeersCollector,
    PushCollector,
)
from snapshotter.peers.client import PeerDeclined
from snapshotter.peers.listener import bind_listener
from snapshotter.remote.compose import open_remote_mounter
from snapshotter.remote.discovery import ImageArtifacts
from snapshotter.remote.errors import NoIndex
from snapshotter.remote.labels import LayerLabels
from snapshotter.remote.mounter import DegradedMounter, RemoteMounter
from snapshotter.remote.records import LayerRecord, RecordStore
from snapshotter.snapshots.grpc_server import SnapshotsServicer
from snapshotter.snapshots.model import Info, Kind
from snapshotter.snapshots.service import MountResult
from tests.support.fuserequests import Client, Failed

LAYER = Digest("sha256:" + "ab" * 32)


def value(m: DaemonMetrics, name: str, **labels: str) -> float:
    """A sample's value, 0 when absent."""
    got = m.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def scrape(m: DaemonMetrics) -> dict[str, Any]:
    """The registry rendered and parsed back: family name → family."""
    from prometheus_client import generate_latest

    text = generate_latest(m.registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


# -- instruments ------------------------------------------------------------------------------


def test_fuse_op_recorder_counts_latency_and_errno_names() -> None:
    m = DaemonMetrics()
    read = m.fuse_op("read")
    read.done(0.0002)
    read.done(0.003)
    read.failed(0.5, errno.EIO)
    m.fuse_op("lookup").failed(0.0001, errno.ENOENT)
    assert value(m, "sociable_fuse_operation_seconds_count", op="read") == 3
    assert value(m, "sociable_fuse_operation_seconds_bucket", op="read", le="0.00025") == 1
    assert value(m, "sociable_fuse_operation_seconds_sum", op="read") == pytest.approx(0.5032)
    assert value(m, "sociable_fuse_operation_errors_total", op="read", errno="EIO") == 1
    assert value(m, "sociable_fuse_operation_errors_total", op="lookup", errno="ENOENT") == 1
    assert value(m, "sociable_fuse_operation_errors_total", op="read", errno="ENOENT") == 0


def test_each_daemon_has_its_own_registry() -> None:
    a, b = DaemonMetrics(), DaemonMetrics()
    a.fuse_op("read").done(0.001)
    a.grpc_call("Prepare", "OK", 0.01)
    assert value(a, "sociable_fuse_operation_seconds_count", op="read") == 1
    assert value(b, "sociable_fuse_operation_seconds_count", op="read") == 0
    assert value(b, "sociable_grpc_calls_total", method="Prepare", code="OK") == 0


def test_grpc_calls_by_method_and_code() -> None:
    m = DaemonMetrics()
    m.grpc_call("Stat", "OK", 0.0004)
    m.grpc_call("Stat", "OK", 0.0006)
    m.grpc_call("Stat", "NOT_FOUND", 0.0002)
    assert value(m, "sociable_grpc_calls_total", method="Stat", code="OK") == 2
    assert value(m, "sociable_grpc_calls_total", method="Stat", code="NOT_FOUND") == 1
    assert value(m, "sociable_grpc_call_seconds_count", method="Stat") == 3


def test_no_label_carries_a_digest_or_a_path() -> None:
    m = DaemonMetrics()
    m.fuse_op("read").failed(0.1, errno.EIO)
    m.source("registry").fetched(100, 0.1)
    m.mount_result("remote")
    m.fallback("no_index")
    m.grpc_call("Prepare", "OK", 0.1)
    for family in scrape(m).values():
        for sample in family.samples:
            for v in sample.labels.values():
                assert "sha256" not in v and "/" not in v, sample


# -- the metered source ---------------------------------------------------------------------


class FakeSource:
    def __init__(self, error: Exception | None = None, name: str = "registry:r/x") -> None:
        self.error = error
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    async def fetch(
        self,
        digest: Digest,
        start: CompressedOffset,
        end: CompressedOffset,
        *,
        check: Check | None = None,
        sink: BodySink | None = None,
    ) -> bytes:
        await trio.sleep(0)
        if self.error is not None:
            raise self.error
        return b"x" * (end - start)


async def test_metered_source_counts_bytes_and_errors_by_kind() -> None:
    m = DaemonMetrics()
    ok = MeteredSource(FakeSource(), m.source("registry"))
    assert ok.name == "registry:r/x"
    assert await ok.fetch(LAYER, CompressedOffset(10), CompressedOffset(1010)) == b"x" * 1000
    assert await ok.fetch(LAYER, CompressedOffset(0), CompressedOffset(24)) == b"x" * 24
    bad = MeteredSource(FakeSource(FetchTimeout("slow")), m.source("peer"))
    with pytest.raises(FetchTimeout):
        await bad.fetch(LAYER, CompressedOffset(0), CompressedOffset(5))
    assert value(m, "sociable_fetch_bytes_total", source="registry") == 1024
    assert value(m, "sociable_fetch_bytes_total", source="peer") == 0
    assert value(m, "sociable_fetch_seconds_count", source="registry") == 2
    assert value(m, "sociable_fetch_seconds_count", source="peer") == 1
    assert value(m, "sociable_fetch_errors_total", source="peer", kind="timeout") == 1


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (FetchTimeout("t"), "timeout"),
        (PeerDeclined("d"), "unavailable"),
        (SourceUnavailable("u"), "unavailable"),
        (ContentMismatch("c"), "content_mismatch"),
        (BlobNotFound("n"), "not_found"),
        (AccessDenied("a"), "access_denied"),
        (AllSourcesFailed("all", []), "all_failed"),
        (FetchError("f"), "other"),
        (RuntimeError("bug"), "unexpected"),
    ],
)
def test_error_kinds(error: Exception, kind: str) -> None:
    assert error_kind(error) == kind


# -- collectors -----------------------------------------------------------------------------


def test_cache_collector_reads_the_cache_statistics(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path / "cache", CacheConfig(max_bytes=250, inflated_max_bytes=1000))
    data = b"s" * 100
    import hashlib

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    cache.put(LAYER, SpanId(0), data)
    assert cache.get(LAYER, SpanId(0), digest) == data
    assert cache.get(LAYER, SpanId(1), digest) is None  # a miss
    cache.put(LAYER, SpanId(1), data)
    cache.put(LAYER, SpanId(2), data)  # over 250 bytes: the oldest goes
    m = DaemonMetrics()
    m.register([CacheCollector(cache)])
    assert value(m, "sociable_cache_size_bytes", tier="span") == 200
    assert value(m, "sociable_cache_max_bytes", tier="span") == 250
    assert value(m, "sociable_cache_entries", tier="span") == 2
    assert value(m, "sociable_cache_hits_total", tier="span") == 1
    assert value(m, "sociable_cache_read_bytes_total", tier="span") == 100
    assert value(m, "sociable_cache_misses_total", tier="span") == 1
    assert value(m, "sociable_cache_evictions_total", tier="span") == 1
    assert value(m, "sociable_cache_max_bytes", tier="inflated") == 1000
    # read at scrape time: a later hit shows without anything else done
    assert cache.get(LAYER, SpanId(2), digest) == data
    assert value(m, "sociable_cache_read_bytes_total", tier="span") == 200


def test_push_collector_sums_the_connections() -> None:
    conns = [
        {"files": 3, "bytes": 300, "unknownInode": 1, "skipped": 0},
        {"files": 4, "bytes": 50, "unknownInode": 0, "skipped": 2},
    ]
    m = DaemonMetrics()
    m.register([PushCollector(lambda: conns)])
    assert value(m, "sociable_fuse_pushed_files_total") == 7
    assert value(m, "sociable_fuse_pushed_bytes_total") == 350
    assert value(m, "sociable_fuse_push_unknown_inodes_total") == 1
    conns.pop()  # read at scrape time
    assert value(m, "sociable_fuse_pushed_files_total") == 3


def test_background_and_layers_collectors() -> None:
    stats = BackgroundStatistics(
        layers=2, bytes_fetched=4096, steps=3, errors=1, completed_layers=5
    )
    mounted = [1, 2, 3]
    m = DaemonMetrics()
    m.register([BackgroundCollector(lambda: stats), LayersCollector(lambda: len(mounted))])
    assert value(m, "sociable_background_fetch_bytes_total") == 4096
    assert value(m, "sociable_background_fetch_steps_total") == 3
    assert value(m, "sociable_background_fetch_errors_total") == 1
    assert value(m, "sociable_background_layers_pending") == 2
    assert value(m, "sociable_background_layers_completed_total") == 5
    assert value(m, "sociable_lazy_layers") == 3
    mounted.pop()
    assert value(m, "sociable_lazy_layers") == 2


class FakePeers:
    def __init__(self, mirror: int | None) -> None:
        self.mirror = mirror

    def members(self) -> list[dict[str, object]]:
        return [{"peer": "a", "state": "up"}, {"peer": "b", "state": "down"}, {"state": "up"}]

    def served_bytes(self) -> int:
        return 1234

    def served(self) -> int:
        return 7

    def mirror_bytes(self) -> int | None:
        return self.mirror


@pytest.mark.parametrize("mirror", [None, 99])
def test_peers_collector(mirror: int | None) -> None:
    m = DaemonMetrics()
    m.register([PeersCollector(FakePeers(mirror))])
    assert value(m, "sociable_peer_members", state="up") == 2
    assert value(m, "sociable_peer_members", state="down") == 1
    assert value(m, "sociable_peer_served_bytes_total") == 1234
    assert value(m, "sociable_peer_served_requests_total") == 7
    got = m.registry.get_sample_value("sociable_mirror_served_bytes_total")
    assert got == (None if mirror is None else 99)


# -- the seams that record ------------------------------------------------------------------


async def test_fuse_server_records_answers_and_errnos() -> None:
    m = DaemonMetrics()
    client = Client(FuseOperations(LayerHost(), m))
    client.getattr(FUSE_ROOT_INODE)
    with pytest.raises(Failed):
        client.lookup(FUSE_ROOT_INODE, b"no-such-layer")
    with pytest.raises(Failed):
        await client.read(make_inode(3, 5), 0, 10)  # its layer is gone: EIO
    with pytest.raises(Failed):
        await client.read(5, 0, 10)  # no file: EBADF
    assert value(m, "sociable_fuse_operation_seconds_count", op="getattr") == 1
    assert value(m, "sociable_fuse_operation_seconds_count", op="lookup") == 1
    assert value(m, "sociable_fuse_operation_seconds_count", op="read") == 2
    assert value(m, "sociable_fuse_operation_errors_total", op="lookup", errno="ENOENT") == 1
    assert value(m, "sociable_fuse_operation_errors_total", op="read", errno="EIO") == 1
    assert value(m, "sociable_fuse_operation_errors_total", op="read", errno="EBADF") == 1


class _Aborted(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None

    def abort(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        raise _Aborted(message)


class FakeService:
    def stat_blocking(self, key: str) -> Info:
        if key == "missing":
            raise NotFound(f"snapshot {key} does not exist")
        return Info(name=key, parent="", kind=Kind.COMMITTED, created_ns=1, updated_ns=2)


def test_grpc_servicer_records_method_code_and_latency() -> None:
    m = DaemonMetrics()
    token: Any = object()
    servicer = SnapshotsServicer(FakeService(), token, m)  # type: ignore[arg-type]

    class Req:
        key = "k"

    assert servicer.Stat(Req(), FakeContext()).info.name == "k"
    Req.key = "missing"
    ctx = FakeContext()
    with pytest.raises(_Aborted):
        servicer.Stat(Req(), ctx)
    assert ctx.code is grpc.StatusCode.NOT_FOUND
    assert value(m, "sociable_grpc_calls_total", method="Stat", code="OK") == 1
    assert value(m, "sociable_grpc_calls_total", method="Stat", code="NOT_FOUND") == 1
    assert value(m, "sociable_grpc_call_seconds_count", method="Stat") == 2


class NoIndexCatalog:
    async def artifacts(self, ll: LayerLabels, ref: Reference) -> ImageArtifacts:
        raise NoIndex("no index for the image")


class NoLayers:
    async def mount(self, mountpoint: Path, name: str, record: LayerRecord) -> None:
        raise AssertionError("not reached")

    async def unmount(self, mountpoint: Path) -> None:
        return None

    async def close(self) -> None:
        return None

    def statuses(self) -> dict[str, dict[str, object]]:
        return {}


class NoUnpacker:
    async def unpack(self, ll: LayerLabels, ref: Reference, dest: Path) -> int:
        raise AssertionError("not reached")


def prepare_labels(layer: str) -> Mapping[str, str]:
    from snapshotter.remote import labels as L

    return {
        L.TARGET_REF: layer,
        L.CRI_IMAGE_REF: "registry.test/app:1",
        L.CRI_MANIFEST_DIGEST: "sha256:" + "11" * 32,
        L.CRI_LAYER_DIGEST: layer,
    }


async def test_mounter_counts_every_result_and_fallback(tmp_path: Path) -> None:
    m = DaemonMetrics()
    mounter = RemoteMounter(
        catalog=NoIndexCatalog(),
        layers=NoLayers(),
        unpacker=NoUnpacker(),
        records=RecordStore(tmp_path / "remote"),
        mount_timeout_sec=5.0,
        metrics=m,
    )
    assert grpc_recorder_of(mounter) is m
    for snap in ("1", "2"):  # logged once per image, counted every time
        fs = tmp_path / "snapshots" / snap / "fs"
        assert await mounter.mount(fs, prepare_labels(str(LAYER))) is MountResult.DECLINED
    assert await mounter.mount(tmp_path / "snapshots" / "3" / "fs", {}) is MountResult.DECLINED
    assert value(m, "sociable_layer_mounts_total", result="declined") == 3
    assert value(m, "sociable_layer_fallbacks_total", reason="no_index") == 2
    assert value(m, "sociable_layer_fallbacks_total", reason="no_cri_labels") == 1

    degraded = DegradedMounter("fuse", "no /dev/fuse", metrics=m)
    fs = tmp_path / "snapshots" / "4" / "fs"
    assert await degraded.mount(fs, prepare_labels(str(LAYER))) is MountResult.DECLINED
    assert value(m, "sociable_layer_fallbacks_total", reason="degraded") == 1
    assert value(m, "sociable_layer_mounts_total", result="declined") == 4
    assert grpc_recorder_of(DegradedMounter("x", "y")) is None


# -- the listener ---------------------------------------------------------------------------


async def test_metrics_listener_serves_the_registry_over_http() -> None:
    m = DaemonMetrics()
    m.fuse_op("read").done(0.001)
    m.grpc_call("Prepare", "OK", 0.2)
    sock = bind_listener("127.0.0.1", 0)  # what bind_metrics binds, on a free port
    port = sock.getsockname()[1]
    app = MetricsApp(m.registry)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_metrics, app, sock)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(100):  # hypercorn binds in its own task: wait for it
                try:
                    r = await client.get("/metrics")
                    break
                except httpx.ConnectError:
                    await trio.sleep(0.02)
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/plain")
            families = {f.name: f for f in text_string_to_metric_families(r.text)}
            calls = families["sociable_grpc_calls"]
            assert [(s.labels, s.value) for s in calls.samples if s.name.endswith("_total")] == [
                ({"method": "Prepare", "code": "OK"}, 1.0)
            ]
            assert (await client.get("/")).status_code == 404
            assert (await client.post("/metrics")).status_code == 405
            head = await client.head("/metrics")
            assert head.status_code == 200 and head.content == b""
            om = await client.get(
                "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
            )
            assert om.headers["content-type"].startswith("application/openmetrics-text")
            assert om.text.endswith("# EOF\n")
        nursery.cancel_scope.cancel()
    assert app.scrapes == 3


def test_bind_metrics_refuses_a_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            bind_metrics(f"127.0.0.1:{port}")


def test_the_sample_dashboard_uses_metrics_that_exist(tmp_path: Path) -> None:
    import json
    import re

    from prometheus_client import generate_latest

    m = DaemonMetrics()
    m.fuse_op("read").failed(0.1, errno.EIO)
    m.source("registry").fetched(1, 0.1)
    m.source("registry").failed("timeout", 0.1)
    m.mount_result("remote")
    m.fallback("no_index")
    m.grpc_call("Stat", "OK", 0.001)
    m.register(
        [
            CacheCollector(SpanCache(tmp_path / "cache")),
            BackgroundCollector(lambda: BackgroundStatistics(0, 0, 0, 0, 0)),
            LayersCollector(lambda: 0),
            PeersCollector(FakePeers(0)),
        ]
    )
    exported = {
        line.split("{")[0].split(" ")[0]
        for line in generate_latest(m.registry).decode().splitlines()
        if line and not line.startswith("#")
    }
    dashboard = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "sociable.json"
    exprs = [
        t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p.get("targets", [])
    ]
    used = {name for e in exprs for name in re.findall(r"sociable_[a-z_]+", e)}
    assert len(exprs) > 15 and used
    assert used <= exported, used - exported


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def degraded_settings(root: Path, metrics_address: str) -> Settings:
    """A daemon whose span cache cannot be created: lazy loading degrades at start."""
    root.mkdir()
    (root / "cache").write_text("a file where the cache directory belongs")
    config = Config(remote=RemoteConfig(hosts_dir=""), metrics=MetricsConfig(metrics_address))
    return Settings(config=config, address=str(root / "sock"), root=root)


async def test_a_degraded_daemon_serves_its_metrics(tmp_path: Path) -> None:
    port = free_port()
    async with open_remote_mounter(degraded_settings(tmp_path / "root", f"127.0.0.1:{port}")) as (
        mounter
    ):
        assert isinstance(mounter, DegradedMounter)
        metrics = grpc_recorder_of(mounter)
        assert metrics is not None
        fs = tmp_path / "root" / "snapshots" / "1" / "fs"
        assert await mounter.mount(fs, prepare_labels(str(LAYER))) is MountResult.DECLINED
        async with httpx.AsyncClient() as client:
            for _ in range(100):
                try:
                    r = await client.get(f"http://127.0.0.1:{port}/metrics")
                    break
                except httpx.ConnectError:
                    await trio.sleep(0.02)
        families = {f.name: f for f in text_string_to_metric_families(r.text)}
        fallbacks = {
            s.labels["reason"]: s.value
            for s in families["sociable_layer_fallbacks"].samples
            if s.name.endswith("_total")
        }
        assert fallbacks == {"degraded": 1.0}
    with socket.socket() as probe:  # the listener is closed with the mounter
        assert probe.connect_ex(("127.0.0.1", port)) != 0


async def test_a_port_in_use_disables_only_the_metrics(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        async with open_remote_mounter(degraded_settings(tmp_path / "root", address)) as mounter:
            assert isinstance(mounter, DegradedMounter)
            assert grpc_recorder_of(mounter) is None
    [line] = [r for r in caplog.records if r.getMessage() == "metrics disabled"]
    assert getattr(line, "address", "") == address and getattr(line, "error", "")


def test_node_peers_view_reads_the_node() -> None:
    from types import SimpleNamespace

    from snapshotter.metrics.collectors import NodePeersView
    from snapshotter.mirror.serve import MirrorStatistics
    from snapshotter.peers.serving import ServeStatistics

    members = [{"peer": "10.0.0.2:8472", "state": "up"}]
    node: Any = SimpleNamespace(
        settings=SimpleNamespace(self_id="10.0.0.1:8472"),
        membership=SimpleNamespace(status=lambda: members),
        app=None,
    )
    view = NodePeersView(node)
    assert (view.members(), view.served_bytes(), view.served(), view.mirror_bytes()) == (
        members,
        0,
        0,
        None,
    )  # not serving yet
    node.app = SimpleNamespace(
        server=SimpleNamespace(stats=ServeStatistics(served=3, bytes_served=300)),
        mirror=SimpleNamespace(stats=MirrorStatistics(bytes_served=42)),
    )
    assert (view.served_bytes(), view.served(), view.mirror_bytes()) == (300, 3, 42)
    m = DaemonMetrics()
    m.register([PeersCollector(view)])
    assert value(m, "sociable_peer_members", state="up") == 1
    assert value(m, "sociable_mirror_served_bytes_total") == 42
