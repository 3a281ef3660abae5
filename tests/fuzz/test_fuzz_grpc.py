"""The Snapshots gRPC boundary: odd requests through the real server, in-process.

The real `grpc_server.build_server` serves a real `SnapshotService` over a sqlite store on a
unix socket; its trio loop runs in a thread of the test process. Its layer mounter parses the
CRI labels of every Prepare (`LayerLabels.parse`, then the image reference, as the remote
mounter does) and declines the layer, so label parsing is part of every Prepare.

- sequences of calls with odd keys, parents, labels, filters and field masks are answered
  with a status of the error table (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS,
  FAILED_PRECONDITION), never UNKNOWN; the mounter never sees an exception other than the
  ones it documents;
- request bytes damaged on the wire are refused by grpcio's decoder (INTERNAL) or decoded and
  answered as above;
- after each example a normal Prepare, Stat, List and Remove work: the daemon keeps serving.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from hypothesis import example, given
from hypothesis import strategies as st

from index.oci.errors import OciError
from index.oci.reference import Reference
from snapshotter.api import snapshots_pb2 as pb
from snapshotter.remote import labels as L
from snapshotter.remote.errors import BadLabels
from snapshotter.snapshots.grpc_server import build_server
from snapshotter.snapshots.metadata import SqliteStore
from snapshotter.snapshots.model import LABEL_TARGET_REF
from snapshotter.snapshots.service import MountResult, SnapshotService
from tests.fuzz.strategies import fuzz_settings, mutated_bytes, safe_text
from tests.support.snapclient import SnapClient

ANSWERS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
}
"""The statuses an odd but well-formed request may get."""

SERVICE = "/containerd.services.snapshots.v1.Snapshots/"


@dataclass
class LabelsMounter:
    """A `LayerMounter` that parses a Prepare's labels as the remote mounter does, then
    declines; it records what parsing raised that it should not have."""

    unexpected: list[BaseException] = field(default_factory=list)
    parsed: int = 0

    async def mount(self, mountpoint: Path, labels: Mapping[str, str]) -> MountResult:
        try:
            ll = L.LayerLabels.parse(labels)
            Reference.parse(ll.image_ref)
            self.parsed += 1
        except (BadLabels, OciError):
            pass
        except Exception as e:
            self.unexpected.append(e)
        return MountResult.DECLINED

    async def check(self, mountpoint: Path) -> None:
        return None

    async def ready(self, mountpoint: Path) -> None:
        return None

    async def restore(self, mountpoint: Path, labels: Mapping[str, str]) -> None:
        return None

    async def unmount(self, mountpoint: Path) -> None:
        return None


@dataclass
class Served:
    client: SnapClient
    mounter: LabelsMounter
    counter: list[int] = field(default_factory=lambda: [0])

    def fresh_key(self) -> str:
        self.counter[0] += 1
        return f"fuzz-fresh-{self.counter[0]}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("grpc")
    socket = root / "snap.sock"
    mounter = LabelsMounter()
    ready = threading.Event()
    failure: list[BaseException] = []
    box: dict[str, Any] = {}

    async def serve() -> None:
        store = SqliteStore(root / "metadata.db")
        try:
            service = SnapshotService(store, root, mounter=mounter, sync_dirs=False)
            await service.open()
            server = build_server(service, trio.lowlevel.current_trio_token(), threads=4)
            assert server.add_insecure_port(f"unix:{socket}") != 0
            server.start()
            stop = trio.Event()
            box["token"], box["stop"] = trio.lowlevel.current_trio_token(), stop
            ready.set()
            await stop.wait()
            await trio.to_thread.run_sync(lambda: server.stop(grace=1).wait())
        finally:
            store.close()

    def run() -> None:
        try:
            trio.run(serve)
        except BaseException as e:
            failure.append(e)
            ready.set()

    thread = threading.Thread(target=run, name="fuzz-grpc-daemon", daemon=True)
    thread.start()
    assert ready.wait(30) and not failure, failure
    client = SnapClient(socket)
    try:
        yield Served(client, mounter)
    finally:
        client.close()
        trio.from_thread.run_sync(box["stop"].set, trio_token=box["token"])
        thread.join(30)
        assert not thread.is_alive() and not failure, failure


def _still_serving(served: Served) -> None:
    """A normal request sequence works after whatever came before."""
    key = served.fresh_key()
    client = served.client
    mounts = client.prepare(key, labels={"containerd.io/gc.root": "x"})
    assert mounts and client.stat(key).kind == "active"
    assert key in {i.name for i in client.list([f'name=="{key}"'])}
    client.remove(key)
    assert not served.mounter.unexpected, served.mounter.unexpected


KEYS = st.one_of(st.sampled_from(("a", "b", "c", "")), safe_text(30))
LABEL_KEYS = st.one_of(
    st.sampled_from(
        (
            LABEL_TARGET_REF,
            L.CRI_IMAGE_REF,
            L.CRI_MANIFEST_DIGEST,
            L.CRI_LAYER_DIGEST,
            L.CRI_IMAGE_LAYERS,
            L.SOCI_INDEX_DIGEST,
            "containerd.io/gc.root",
        )
    ),
    safe_text(20),
)
LABEL_VALUES = st.one_of(
    st.sampled_from(
        (
            "sha256:" + "a" * 64,
            "docker.io/library/busybox:latest",
            "sha256:" + "a" * 64 + ",sha256:" + "b" * 64,
            "x" * 5000,
        )
    ),
    safe_text(40),
)
LABELS = st.dictionaries(LABEL_KEYS, LABEL_VALUES, max_size=6)
FILTERS = st.lists(
    st.one_of(
        st.sampled_from(
            (
                'name=="a"',
                "labels.x",
                'labels."a.b"~=/[/',
                "kind==committed,parent!=a",
                "name~=|a\\|b|",
                '"\\x4',
                "a.b.c==",
                ",",
                'labels."\\U0010ffff"==1',
            )
        ),
        safe_text(30),
    ),
    max_size=3,
)
PATHS = st.lists(
    st.one_of(st.sampled_from(("labels", "labels.a", "name", "parent", "")), safe_text(12)),
    max_size=3,
)


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, Any]:
    method = draw(
        st.sampled_from(
            ("Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "List", "Usage")
        )
    )
    key, parent = draw(KEYS), draw(KEYS)
    if method == "Prepare":
        return method, pb.PrepareSnapshotRequest(key=key, parent=parent, labels=draw(LABELS))
    if method == "View":
        return method, pb.ViewSnapshotRequest(key=key, parent=parent, labels=draw(LABELS))
    if method == "Mounts":
        return method, pb.MountsRequest(key=key)
    if method == "Commit":
        return method, pb.CommitSnapshotRequest(name=parent, key=key, labels=draw(LABELS))
    if method == "Remove":
        return method, pb.RemoveSnapshotRequest(key=key)
    if method == "Stat":
        return method, pb.StatSnapshotRequest(key=key)
    if method == "Update":
        req = pb.UpdateSnapshotRequest(
            info=pb.Info(name=key, parent=parent, kind=draw(st.integers(0, 5)), labels=draw(LABELS))
        )
        req.update_mask.paths.extend(draw(PATHS))
        return method, req
    if method == "List":
        return method, pb.ListSnapshotsRequest(filters=draw(FILTERS))
    return method, pb.UsageRequest(key=key)


def _call(served: Served, method: str, request: Any) -> None:
    stub = served.client.stub
    try:
        answer = getattr(stub, method)(request, timeout=30)
        if method == "List":
            list(answer)
    except grpc.RpcError as e:
        assert e.code() in ANSWERS, (method, request, e.code(), e.details())


@fuzz_settings(120)
@example(
    [
        ("Prepare", pb.PrepareSnapshotRequest(key="a", labels={LABEL_TARGET_REF: "t"})),
        ("Commit", pb.CommitSnapshotRequest(name="b", key="a")),
        ("View", pb.ViewSnapshotRequest(key="v", parent="b")),
        ("Commit", pb.CommitSnapshotRequest(name="c", key="v")),
        ("Remove", pb.RemoveSnapshotRequest(key="b")),
        ("Mounts", pb.MountsRequest(key="b")),
        ("Update", pb.UpdateSnapshotRequest(info=pb.Info(name="b"))),
        ("List", pb.ListSnapshotsRequest(filters=['labels."\\x4', "name~=/(/"])),
    ]
)
@given(st.lists(calls(), min_size=1, max_size=8))
def test_odd_requests_get_a_status(served: Served, sequence: list[tuple[str, Any]]) -> None:
    for method, request in sequence:
        _call(served, method, request)
    _still_serving(served)


def _raw(served: Served, method: str) -> Any:
    return served.client.channel.unary_unary(
        SERVICE + method,
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )


RAW_SAMPLES = (
    ("Prepare", pb.PrepareSnapshotRequest(key="raw", parent="", labels={"a": "b"})),
    ("Update", pb.UpdateSnapshotRequest(info=pb.Info(name="raw", labels={"a": "b"}))),
    ("Commit", pb.CommitSnapshotRequest(name="raw-c", key="raw")),
    ("Stat", pb.StatSnapshotRequest(key="raw")),
)


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    method, message = draw(st.sampled_from(RAW_SAMPLES))
    return method, draw(mutated_bytes(message.SerializeToString()))


@fuzz_settings(100)
@example(("Prepare", b"\x0a\x02\xff\xfe"))
@example(("Stat", b"\x0a\xff\xff\xff\xff\x0f"))
@given(raw_requests())
def test_damaged_request_bytes(served: Served, raw: tuple[str, bytes]) -> None:
    method, data = raw
    try:
        _raw(served, method)(data, timeout=30)
    except grpc.RpcError as e:
        assert e.code() in ANSWERS | {grpc.StatusCode.INTERNAL}, (method, data, e.code())
        if e.code() is grpc.StatusCode.INTERNAL:  # grpcio's own decoder refused the bytes
            assert "deserializ" in (e.details() or "").lower()
    _still_serving(served)


def test_prepare_labels_reach_the_mounter(served: Served) -> None:
    """The mounter parses real CRI labels (so the fuzzed ones reach the same parser)."""
    before = served.mounter.parsed
    key = served.fresh_key()
    labels = {
        LABEL_TARGET_REF: f"target-{key}",
        L.CRI_IMAGE_REF: "docker.io/library/busybox:latest",
        L.CRI_MANIFEST_DIGEST: "sha256:" + "a" * 64,
        L.CRI_LAYER_DIGEST: "sha256:" + "b" * 64,
    }
    assert served.client.prepare(key, labels=labels)
    assert served.mounter.parsed == before + 1
    served.client.remove(key)
