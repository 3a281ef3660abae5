"""Two real daemons that are each other's peers, on loopback, against a real registry.

Node A listens on 127.0.0.1, node B on 127.0.0.2 (`[peers]` with a static list of both, small
chunks, background fetch off so only reads fetch). An image of three layers, converted with
`sociable convert` into a docker-registry behind the counting proxy, is mounted lazily on both
nodes through the Snapshots API (Prepare with CRI's labels); the test reads every file through
each node's FUSE directory:

1. A reads layer 1, then B reads it. A's read crosses the registry link once: A fetches the
   chunks it owns first, and asks B for the others, which B fetches (and keeps) as their
   owner. B's read is right and costs the registry (almost) nothing: A's chunks come from A,
   its own from its cache; B's status shows bytes from peers and A up.
2. A and B read layer 2 at the same time: each chunk crosses the registry link once for the
   two nodes (about one layer, where two independent nodes would pull two).
3. A is killed (SIGKILL); B reads layer 3: right bytes from the registry, and A marked down
   in B's status.
"""

from __future__ import annotations

import contextlib
import json
import socket
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import httpx
import pytest

from index.builder import build_ztoc
from index.model import SpanId
from index.zinfo import SpanMap
from snapshotter.peers.ownership import chunk_of, owners
from snapshotter.remote import labels as L
from tests.support import images
from tests.support.cli import sociable
from tests.support.registry import CountingProxy, RegistryServer, start_proxy
from tests.support.snapclient import SnapClient, SnapDaemon, can_mount, run_daemon

pytestmark = [pytest.mark.root, pytest.mark.slow]

T = TypeVar("T")

MIB = 1 << 20
SPAN_SIZE = 64 * 1024
CHUNK_BYTES = 128 * 1024
"""Several spans per chunk (runs of spans go to peers) and many chunks per layer."""
REPOSITORY = "peers/loopback"
TAG = "v1-soci"
IO_TIMEOUT_SEC = 30.0


@dataclass(frozen=True)
class PeerLayer:
    digest: str
    size: int
    files: dict[str, bytes]
    spans: SpanMap


@dataclass(frozen=True)
class Pushed:
    manifest: str
    layers: tuple[PeerLayer, ...]


def _test_layer(layer: images.Layer) -> PeerLayer:
    files: dict[str, bytes] = {}
    with tarfile.open(layer.path, "r:gz") as tf:
        for member in tf:
            if member.isreg():
                f = tf.extractfile(member)
                assert f is not None
                files[member.name] = f.read()
    ztoc = build_ztoc(layer.path, images.MEDIA_LAYER_GZIP, SPAN_SIZE)
    return PeerLayer(layer.digest, layer.size, files, SpanMap.from_ztoc(ztoc))


def _platform_manifest(registry: RegistryServer) -> str:
    resp = httpx.get(
        f"{registry.url}/v2/{REPOSITORY}/manifests/{TAG}",
        headers={"Accept": "application/vnd.oci.image.index.v1+json"},
        timeout=30,
    )
    resp.raise_for_status()
    for desc in resp.json()["manifests"]:
        if "com.amazon.soci.index-digest" in desc.get("annotations", {}):
            return str(desc["digest"])
    raise AssertionError(f"no indexed manifest in {resp.text}")


@pytest.fixture(scope="module")
def pushed(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    """Three layers of a few pseudo-random files each, converted with 64 KiB spans."""
    reason = can_mount()
    if reason:
        pytest.skip(f"PREREQUISITE MISSING: {reason}")
    base = tmp_path_factory.mktemp("peers-loopback")
    specs = [
        [images.File(path=f"l{n}/f{i}.bin", size=MIB + 4099 * i) for i in range(4)]
        for n in range(3)
    ]
    image = images.write_oci_layout(base / "layout", specs, tag="v1")
    sociable(
        "convert",
        "--min-layer-size",
        "0",
        "--span-size",
        str(SPAN_SIZE),
        f"oci-layout:{image.layout}:v1",
        f"{registry.host}/{REPOSITORY}:{TAG}",
        root=base / "convert-root",
    )
    return Pushed(_platform_manifest(registry), tuple(_test_layer(x) for x in image.layers))


# -- a node ------------------------------------------------------------------------------------


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Node:
    name: str
    address: str
    daemon: SnapDaemon
    snap: SnapClient
    dirs: dict[str, Path]  # layer digest → FUSE directory

    def status(self) -> dict[str, object]:
        doc: dict[str, object] = json.loads((self.daemon.root / "status.json").read_bytes())
        return doc

    def peers(self) -> dict[str, dict[str, object]]:
        peers = self.status().get("peers")
        assert isinstance(peers, dict), self.status()
        return {m["peer"]: m for m in peers["members"]}

    def bytes_from(self, digest: str) -> dict[str, int]:
        layers = self.status()["layers"]
        assert isinstance(layers, dict)
        name = self.dirs[digest].name
        got: dict[str, int] = layers[name]["bytesFrom"]
        return got

    def read_layer(self, layer: PeerLayer) -> dict[str, bytes]:
        return {
            name: _bounded(self.dirs[layer.digest].joinpath(name).read_bytes)
            for name in layer.files
        }


def _prepare_remote(snap: SnapClient, host: str, pushed: Pushed, layer: PeerLayer) -> None:
    target = f"sha256:{uuid.uuid4().hex}{uuid.uuid4().hex}"
    labels = {
        L.TARGET_REF: target,
        L.CRI_IMAGE_REF: f"{host}/{REPOSITORY}:{TAG}",
        L.CRI_MANIFEST_DIGEST: pushed.manifest,
        L.CRI_LAYER_DIGEST: layer.digest,
    }
    with pytest.raises(grpc.RpcError) as err:
        snap.prepare(f"extract-{target}", "", labels)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS, err.value.details()
    assert snap.stat(target).labels.get(L.REMOTE), f"{layer.digest} was not mounted lazily"
    snap.wait_ready(target)


def _fuse_dirs(root: Path) -> dict[str, Path]:
    out = {}
    for d in sorted((root / "fuse").iterdir()):
        status = json.loads((d / ".sociable" / "status.json").read_bytes())
        out[str(status["digest"])] = d
    return out


@contextlib.contextmanager
def open_node(
    base: Path, name: str, address: str, members: list[str], host: str, pushed: Pushed
) -> Iterator[Node]:
    base.mkdir(parents=True, exist_ok=True)
    config = base / "sociable.toml"
    config.write_text(
        '[remote]\nhosts_dir = ""\nbackground_fetch = false\n'
        "[peers]\nenable = true\n"
        f'listen = "{address}"\n'
        f"static = {json.dumps(members)}\n"
        f"chunk_bytes = {CHUNK_BYTES}\n"
        "budget_sec = 5.0\n"
    )
    with run_daemon(base, config=config) as daemon, contextlib.closing(daemon.client()) as snap:
        for layer in pushed.layers:
            _prepare_remote(snap, host, pushed, layer)
        yield Node(name, address, daemon, snap, _fuse_dirs(daemon.root))


def _bounded(fn: Callable[[], T], timeout: float = IO_TIMEOUT_SEC) -> T:
    """`fn()` in a thread, failing the test when it takes longer than `timeout` seconds."""
    out: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run, name="fuse-read", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"{fn} did not return within {timeout} s")
    if errors:
        raise errors[0]
    return out[0]


def wait_for(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (OSError, ValueError, KeyError, AssertionError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def blob_bytes(proxy: CountingProxy, digest: str) -> int:
    """Bytes of blob `digest` the registry (proxy) sent."""
    return sum(n for path, n in proxy.bytes_sent.items() if path.endswith(f"/blobs/{digest}"))


def first_owned_bytes(layer: PeerLayer, node: str, nodes: list[str]) -> int:
    """Compressed bytes of `layer`'s spans in chunks whose first owner is `node`."""
    total = 0
    for i in range(layer.spans.span_count):
        start, end = layer.spans.compressed_range(SpanId(i))
        chunk = chunk_of(start, CHUNK_BYTES)
        if owners([(n, n) for n in nodes], layer.digest, chunk, 1) == [node]:
            total += end - start
    return total


# -- the test ----------------------------------------------------------------------------------


def test_two_nodes_share_spans_and_survive_a_peer_killed(
    pushed: Pushed, registry: RegistryServer, tmp_path: Path
) -> None:
    l1, l2, l3 = pushed.layers
    a_addr = f"127.0.0.1:{_free_port('127.0.0.1')}"
    b_addr = f"127.0.0.2:{_free_port('127.0.0.2')}"
    assert a_addr.split(":")[1] != b_addr.split(":")[1]
    nodes = [a_addr, b_addr]
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(start_proxy(registry))
        a = stack.enter_context(open_node(tmp_path / "a", "A", a_addr, nodes, proxy.host, pushed))
        b = stack.enter_context(open_node(tmp_path / "b", "B", b_addr, nodes, proxy.host, pushed))
        wait_for("A and B to list each other", lambda: b_addr in a.peers() and a_addr in b.peers())

        def a_serve() -> dict[str, int]:
            peers = a.status()["peers"]
            assert isinstance(peers, dict)
            serve: dict[str, int] = peers["serve"]
            return serve

        # 1. A reads layer 1: the chunks B owns first, B fetches for A (and keeps); then B
        #    reads it: its own chunks from its cache, A's from A, nothing from the registry
        b_first = first_owned_bytes(l1, b_addr, nodes)
        a_first = first_owned_bytes(l1, a_addr, nodes)
        assert a_first > 0 and b_first > 0, "both nodes should own chunks of layer 1"
        proxy.bytes_sent.clear()
        assert a.read_layer(l1) == l1.files
        first_read = blob_bytes(proxy, l1.digest)
        proxy.bytes_sent.clear()
        started = time.monotonic()
        assert b.read_layer(l1) == l1.files
        b_sec = time.monotonic() - started
        second_read = blob_bytes(proxy, l1.digest)
        print(
            f"\nlayer 1 ({l1.size} bytes, {l1.spans.span_count} spans; A owns {a_first} bytes "
            f"first, B {b_first}): the registry sent {first_read} for A's read, then "
            f"{second_read} for B's ({b_sec:.2f} s)"
        )
        assert 0.9 * l1.size <= first_read <= 1.05 * l1.size
        assert second_read <= 0.05 * l1.size, second_read
        wait_for(
            "B's status to count layer 1's bytes",
            lambda: sum(b.bytes_from(l1.digest).values()) >= 0.95 * l1.size,
            timeout=5.0,
        )
        # B's own chunks came from the registry, fetched by B when A asked for them
        got = b.bytes_from(l1.digest)
        assert got["peers"] >= 0.9 * a_first, got
        assert got["registry"] <= b_first + 0.05 * l1.size, got
        assert b.peers()[a_addr]["state"] == "up"
        wait_for("A's status to count what it served B", lambda: a_serve()["served"] > 0, 5.0)
        a_peers, b_peers = a.status()["peers"], b.status()["peers"]
        assert isinstance(a_peers, dict) and isinstance(b_peers, dict)
        assert a_peers["fetch"]["owned_here"] > 0 and a_peers["fetch"]["failures"] == 0
        assert b_peers["serve"]["fetched_for_peers"] > 0  # B fetched its chunks for A
        assert a_peers["serve"]["served"] > 0 and a_peers["serve"]["forbidden"] == 0
        assert a_peers["serve"]["fetched_for_peers"] == 0  # A had all of it already

        # 2. both read layer 2 at once: each chunk crosses the registry link once
        proxy.bytes_sent.clear()
        results: dict[str, dict[str, bytes]] = {}
        threads = [
            threading.Thread(target=lambda n=n: results.__setitem__(n.name, n.read_layer(l2)))
            for n in (a, b)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(2 * IO_TIMEOUT_SEC)
        assert results == {"A": l2.files, "B": l2.files}
        both = blob_bytes(proxy, l2.digest)
        print(f"layer 2 ({l2.size} bytes) read on both at once: registry sent {both}")
        assert both <= 1.1 * l2.size, (both, l2.size)
        wait_for(
            "both nodes' status to count layer 2's peer bytes",
            lambda: a.bytes_from(l2.digest)["peers"] > 0 and b.bytes_from(l2.digest)["peers"] > 0,
        )
        assert b.peers()[a_addr]["state"] == "up" and a.peers()[b_addr]["state"] == "up"

        # 3. A dies; B reads layer 3 from the registry, and marks A down
        a.daemon.kill9()
        proxy.bytes_sent.clear()
        started = time.monotonic()
        assert b.read_layer(l3) == l3.files
        alone_sec = time.monotonic() - started
        print(f"layer 3 read on B alone in {alone_sec:.2f} s")
        assert blob_bytes(proxy, l3.digest) >= 0.9 * l3.size
        wait_for("B to show A down", lambda: b.peers()[a_addr]["state"] == "down")
        entry = b.peers()[a_addr]
        assert isinstance(entry["failures"], int) and entry["failures"] >= 1, entry
        assert entry["lastError"], entry
        assert b.bytes_from(l3.digest)["peers"] == 0
        assert alone_sec < 20, "a dead peer should cost milliseconds per read, not budgets"
