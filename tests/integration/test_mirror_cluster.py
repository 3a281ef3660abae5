"""The registry mirror on a cluster of nodes in network namespaces (`tests.support.cluster`).

Each node runs its own containerd 1.6 (CRI) and `sociable-snapshotter` with peers and the
registry mirror on, the mirror reading that node's containerd content store. The image
(busybox and four layers of incompressible files, about 33 MB compressed, seven blobs with
the config) is pushed with skopeo and no SOCI index, so every node's snapshotter declines it
and containerd pulls it the ordinary way, keeping the layers in its content store. A node's
containerd asks its own mirror first once `sociable-snapshotter mirror configure` has put it
in the node's `hosts.toml`; the other nodes' `hosts.toml` name the registry only. One test
pushes it with a SOCI index instead: a node pulls it lazily, and another node's mirror
serves it from that node's span cache.

"Registry layer bytes" are the body bytes of the registry's blob answers for the image's
layers (its access log, `ClusterRegistry.since`); manifest answers are read from the same
log. A pull is a CRI PullImage (with the pod's pull secret when given), as the kubelet makes
it.

What containerd 1.6.20 does with a mirror (`test_mirror_down_or_slow_falls_back` asserts it):
a closed port or a 404 (also a 500 before the body) sends it to the next host at once; an
answer cut after it started fails the whole pull (`unexpected EOF`), and so do wrong bytes
(`unexpected commit digest`): it never retries the blob at the next host; a mirror that
accepts the connection and never answers stalls the pull until the caller gives up. So the
mirror answers only bytes a content store verified, starts an answer only once its first
bytes are there, and bounds every lookup.
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import json
import re
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support.cluster import (
    Cluster,
    Node,
    PeerImage,
    RegistryMark,
    build_peer_image,
    missing_binaries,
    nsenter_args,
    open_cluster,
    parse_sha256sum,
    wait_until,
)
from tests.support.containerd import CTR_BIN, capabilities, cri_message
from tests.support.registry import free_port

pytestmark = [pytest.mark.root, pytest.mark.slow]

TEST_BUDGET_S = 90.0
PULL_TIMEOUT_S = 60.0
ALMOST_NONE = 0.01
"""Registry layer bytes of a pull served by the mirror: at most this share of the layers."""
K8S_NAMESPACE = "k8s.io"
LOOKUP_TIMEOUT_S = 2.0
"""`[mirror] lookup_timeout_sec` (the default)."""
QUICK_ADDED_S = 3.0
"""Most a mirror that refuses connections or answers 404 at once may add to a pull."""
SILENT_WAIT_S = 10.0
"""How long a pull through a mirror that never answers is given before it counts as hung."""


class Budget:
    """The time left of a test's :data:`TEST_BUDGET_S`."""

    def __init__(self, seconds: float = TEST_BUDGET_S) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self, at_least: float = 1.0) -> float:
        return max(at_least, self.deadline - time.monotonic())


def _require() -> None:
    caps = capabilities()
    missing = [] if caps.root else ["root"]
    if not caps.overlay:
        missing.append("overlay filesystem")
    if not caps.fuse:
        missing.append("fuse")
    if not caps.skopeo:
        missing.append("skopeo")
    missing += missing_binaries()
    if missing:
        pytest.skip(f"PREREQUISITE MISSING for the mirror cluster tests: {', '.join(missing)}")


@pytest.fixture(scope="module")
def peer_image(tmp_path_factory: pytest.TempPathFactory) -> PeerImage:
    _require()
    return build_peer_image(tmp_path_factory.mktemp("mirror-image") / "layout")


@pytest.fixture
def budget() -> Budget:
    return Budget()


def _pull(
    node: Node,
    ref: str,
    *,
    credentials: tuple[str, str] | None = None,
    timeout: float = PULL_TIMEOUT_S,
) -> str:
    """CRI PullImage of ``ref`` on ``node`` (with ``credentials`` as the pod's pull secret);
    returns the image ref. Raises grpc.RpcError."""
    assert node.containerd is not None
    request = cri_message("PullImageRequest")(image=cri_message("ImageSpec")(image=ref))
    if credentials is not None:
        request.auth.CopyFrom(
            cri_message("AuthConfig")(username=credentials[0], password=credentials[1])
        )
    call = node.containerd.channel().unary_unary(
        "/runtime.v1.ImageService/PullImage",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=cri_message("PullImageResponse").FromString,
    )
    return str(call(request, timeout=timeout).image_ref)


def _check_sums(node: Node, image: PeerImage, sums: Mapping[str, str]) -> None:
    wrong = sorted(p for p in image.paths if sums.get(p) != image.sha256[p])
    assert not wrong, f"node {node.index}: wrong or missing checksums {wrong}\n{node.describe()}"


def _mirror_stats(node: Node) -> dict[str, int]:
    """``peers.mirror`` of the node's status.json ({} before the mirror has one)."""
    mirror = node.peer_status().get("mirror")
    return {str(k): int(v) for k, v in mirror.items()} if isinstance(mirror, dict) else {}


def _mirror_events(node: Node) -> list[dict[str, Any]]:
    """The node's `mirror request` log records."""
    return [e for e in node.daemon_events() if e.get("msg") == "mirror request"]


def _check_no_listener_errors(cluster: Cluster) -> None:
    """No node's listener let an exception reach hypercorn (a 500 and a traceback), other
    than the one way to cut an answer that has started (`MirrorError`)."""
    for node in cluster.nodes:
        errors = [
            str(e.get("exc", ""))[-300:]
            for e in node.daemon_events()
            if e.get("logger") == "snapshotter.peers.hypercorn" and e.get("level") == "error"
        ]
        assert not errors, f"node {node.index}: {errors}"


def _layer_report(cluster: Cluster, image: PeerImage, mark: RegistryMark, what: str) -> int:
    """Prints the registry traffic since ``mark``; returns its layer bytes."""
    traffic = cluster.registry.since(mark)
    layer = traffic.layer_bytes(image.layer_digests)
    print(
        f"{what}: registry layer bytes {layer} ({layer / image.layer_bytes:.3f} of the layers' "
        f"{image.layer_bytes}), blob bytes {sum(traffic.blob_bytes.values())}, on the wire "
        f"{traffic.sent_bytes}, blob GETs {traffic.blob_requests}"
    )
    return layer


def test_unindexed_image_pulled_through_the_mirror(
    peer_image: PeerImage, tmp_path: Path, budget: Budget
) -> None:
    """A pulls an image without an index the ordinary way; B, whose containerd asks B's
    mirror first, pulls it with (almost) no layer bytes from the registry: B's mirror found
    the layers in A's content store and streamed them through; B's container reads every
    file right."""
    with open_cluster(tmp_path / "c", 2, registry_rate=None, peers=True, mirror=True) as cluster:
        a, b = cluster.nodes
        ref = cluster.push_unindexed(peer_image, repository="mirror/plain")

        mark = cluster.registry.mark()
        _pull(a, ref, timeout=budget.left())
        _check_sums(a, peer_image, a.run_checksums(ref, peer_image.paths))
        first = _layer_report(cluster, peer_image, mark, "node A, the ordinary pull")
        assert first >= peer_image.layer_bytes, cluster.describe()

        print(b.configure_mirror(cluster.registry.host))
        mark = cluster.registry.mark()
        t0 = time.monotonic()
        _pull(b, ref, timeout=budget.left())
        pulled = time.monotonic() - t0
        _check_sums(b, peer_image, b.run_checksums(ref, peer_image.paths))
        second = _layer_report(
            cluster, peer_image, mark, f"node B through its mirror ({pulled:.1f} s)"
        )
        assert second <= ALMOST_NONE * peer_image.layer_bytes, cluster.describe()

        wait_until(
            lambda: (
                _mirror_stats(b).get("from_peers", 0) >= peer_image.layer_bytes
                and _mirror_stats(a).get("from_content", 0) >= peer_image.layer_bytes
            ),
            timeout=budget.left(),
            what="mirror counters in status.json",
        )
        print("A mirror", _mirror_stats(a), "B mirror", _mirror_stats(b))
        served = {
            e["path"].rsplit("/", 1)[-1]
            for e in _mirror_events(b)
            if e.get("source") == "peer" and e.get("status") == 200
        }
        assert set(peer_image.layer_digests) <= served, _mirror_events(b)
        assert b.layer_status() == [], "the image has no index: no layer is lazy"
        _check_no_listener_errors(cluster)


def _manifest_answers(
    cluster: Cluster, mark: RegistryMark, repository: str
) -> list[tuple[str, str, int]]:
    """(method, reference, status) of the registry's manifest answers for ``repository``
    since ``mark`` (its access log)."""
    with open(cluster.registry.log, "rb") as f:
        f.seek(mark.log_offset)
        text = f.read().decode(errors="replace")
    pattern = re.compile(
        rf'"(GET|HEAD) /v2/{re.escape(repository)}/manifests/(\S+) HTTP/[0-9.]+" (\d{{3}})'
    )
    return [(m[1], m[2], int(m[3])) for m in pattern.finditer(text)]


def _denied(node: Node, ref: str) -> tuple[grpc.StatusCode, str]:
    """The (code, details) of a CRI pull of ``ref`` without credentials, which must fail."""
    try:
        _pull(node, ref)
    except grpc.RpcError as e:
        return e.code(), e.details()
    raise AssertionError(f"node {node.index}: {ref} pulled without credentials\n{node.describe()}")


def test_private_repository_stays_private(
    peer_image: PeerImage, tmp_path: Path, budget: Budget
) -> None:
    """A token-auth registry where every repository is private. A pulls with credentials.
    Without credentials, B (its mirror first) fails exactly as C (no mirror), by tag and by
    digest: B's mirror never hands out the manifest or the config A holds. With credentials
    B pulls, its manifest and config from the registry and its layers from A."""
    repository = "private/data"
    with open_cluster(
        tmp_path / "c", 3, registry_rate=None, peers=True, mirror=True, registry_auth=True
    ) as cluster:
        a, b, c = cluster.nodes
        creds = cluster.registry.credentials
        assert creds is not None
        ref = cluster.push_unindexed(peer_image, repository=repository)
        by_digest = ref.rsplit(":", 1)[0] + "@" + peer_image.image.manifest_digest
        _pull(a, ref, credentials=creds, timeout=budget.left())
        _check_sums(a, peer_image, a.run_checksums(ref, peer_image.paths))
        b.configure_mirror(cluster.registry.host)

        for what in (ref, by_digest):
            with_mirror = _denied(b, what)
            without = _denied(c, what)
            print(f"without credentials, {what}:\n  B (mirror) {with_mirror}\n  C {without}")
            assert with_mirror == without, cluster.describe()
        wait_until(
            lambda: _mirror_stats(a).get("private", 0) >= 1,
            timeout=budget.left(),
            what="A refused the private manifest to B's mirror",
        )
        # containerd also asked B's mirror for the manifest through the blobs endpoint, which
        # looks in A's store: A held it and refused it
        asked = [e for e in _mirror_events(b) if peer_image.image.manifest_digest in str(e["path"])]
        assert any("/blobs/" in str(e["path"]) for e in asked), asked
        assert all(e["status"] == 404 for e in asked), asked
        assert b.cri.image_status(ref) is None

        mark = cluster.registry.mark()
        _pull(b, ref, credentials=creds, timeout=budget.left())
        _check_sums(b, peer_image, b.run_checksums(ref, peer_image.paths))
        layer = _layer_report(cluster, peer_image, mark, "node B with credentials")
        assert layer <= ALMOST_NONE * peer_image.layer_bytes, cluster.describe()
        manifests = _manifest_answers(cluster, mark, repository)
        print("registry manifest answers for B:", manifests)
        assert ("GET", peer_image.image.manifest_digest, 200) in manifests
        traffic = cluster.registry.since(mark)
        assert traffic.blob_bytes.get(peer_image.image.config_digest, 0) > 0, traffic
        _check_no_listener_errors(cluster)
        wait_until(
            lambda: _mirror_stats(b).get("from_peers", 0) >= peer_image.layer_bytes,
            timeout=budget.left(),
            what="B's mirror counted the layers from A",
        )
        print(
            "A mirror", _mirror_stats(a), "B mirror", _mirror_stats(b), "C mirror", _mirror_stats(c)
        )


class Stub:
    """An HTTP server in the host namespace at `host:port` (the bridge address) whose answers
    depend on `mode`:

    - "404": 404 to everything at once;
    - "silent": reads the request and never answers (until `close`);
    - "corrupt": a blob of `blobs` (digest → file) with one byte flipped in the middle (the
      right length and `Docker-Content-Digest`), 404 to anything else;
    - "claims": as a member asked for a blob of `blobs`: HEAD says it holds it (200 and its
      size), every GET is a 404 (as a member whose blob was collected in between);
    - "claims, sniff only": the same, but a GET of the blob's first bytes (a `Range` from 0
      of at most 64 bytes) is answered right (206), and only the rest is a 404.

    `requests` records (client, method, path) in arrival order."""

    def __init__(self, host: str, port: int, blobs: Mapping[str, Path]) -> None:
        self.address = f"{host}:{port}"
        self.mode = "404"
        self.requests: list[tuple[str, str, str]] = []
        self._released = threading.Event()
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _answer(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                stub.requests.append((self.client_address[0], self.command, self.path))
                mode = stub.mode
                if mode == "silent":
                    stub._released.wait()
                    self.close_connection = True
                    return
                digest = urllib.parse.urlsplit(self.path).path.rpartition("/blobs/")[2]
                if digest not in blobs or mode == "404":
                    self._answer(404, b"", {})
                    return
                data = bytearray(blobs[digest].read_bytes())
                headers = {"Content-Type": "application/octet-stream"}
                if mode == "corrupt":
                    data[len(data) // 2] ^= 0xFF
                    headers["Docker-Content-Digest"] = digest
                    self._answer(200, bytes(data), headers)
                elif self.command == "HEAD":
                    self._answer(200, b"", {**headers, "Content-Length": str(len(data))})
                else:
                    wanted = self.headers.get("Range", "")
                    first, _, last = wanted.removeprefix("bytes=").partition("-")
                    sniff = first == "0" and last.isdigit() and int(last) < 64
                    if mode == "claims, sniff only" and sniff:
                        headers["Content-Range"] = f"bytes 0-{last}/{len(data)}"
                        self._answer(206, bytes(data[: int(last) + 1]), headers)
                    else:
                        self._answer(404, b"", {})

            do_GET = do_HEAD = _handle

        self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def asked_by(self, client: str) -> int:
        return sum(1 for c, _, _ in self.requests if c == client)

    def close(self) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def _bridge_ip(addresses: list[str]) -> str:
    """The bridge's address (`.1` of the nodes' /24), from the node addresses `node_config`
    gets before the cluster object exists."""
    host = addresses[0].rpartition(":")[0]
    return str(ipaddress.ip_interface(f"{host}/24").network.network_address + 1)


def _layout_blobs(image: PeerImage) -> dict[str, Path]:
    blobs = image.image.layout / "blobs" / "sha256"
    return {f"sha256:{p.name}": p for p in blobs.iterdir()}


def _forget(node: Node, ref: str, image: PeerImage) -> None:
    """Removes ``ref`` from the node's containerd and collects its content, so the next pull
    fetches every blob again. Raises AssertionError when a blob is left."""
    assert node.containerd is not None
    with contextlib.suppress(grpc.RpcError):
        node.cri.remove_image(ref)
    node.containerd.gc(K8S_NAMESPACE)
    held = node.containerd.ctr("content", "ls", "-q", namespace=K8S_NAMESPACE).stdout.split()
    left = set(held) & {image.image.config_digest, *image.layer_digests}
    assert not left, f"node {node.index}: still holds {left} after removing {ref}"


def _timed_pull(node: Node, ref: str, timeout: float) -> tuple[float, str]:
    """(seconds, error): a CRI pull of ``ref``; error is "" when it succeeded."""
    t0 = time.monotonic()
    try:
        _pull(node, ref, timeout=timeout)
    except grpc.RpcError as e:
        return time.monotonic() - t0, f"{e.code().name}: {e.details()}"
    return time.monotonic() - t0, ""


def test_mirror_down_or_slow_falls_back(
    peer_image: PeerImage, tmp_path: Path, budget: Budget
) -> None:
    """Node B pulls an image no node holds, its `hosts.toml` naming first: nothing (the
    baseline), a closed port, its own listener where no member holds the blobs (a quick
    404), its own listener with a member that never answers the lookup (a 404 after
    three quarters of `lookup_timeout_sec` once; the member is then marked down and
    skipped), its own listener with a member that says it holds every blob and
    then does not send it (at once, or after the first bytes), a stub serving wrong bytes,
    and a stub that never answers. The time each adds to the pull is printed.

    Our listener and a closed port never make the pull fail: at most a few seconds more, or
    one `lookup_timeout_sec` with a silent member, and the layers from the registry.
    containerd 1.6 itself gives up on a mirror serving wrong bytes (the pull fails with a
    digest mismatch, it does not try the next host) and waits forever on a mirror that never
    answers: both are asserted as containerd's behaviour, the reason the mirror answers only
    what containerd's content stores verified and bounds every wait."""
    member_port = free_port()

    def with_stub_member(i: int, addresses: list[str]) -> str:
        if i != 1:
            return ""
        static = [*addresses, f"{_bridge_ip(addresses)}:{member_port}"]
        return f"[peers]\nstatic = {json.dumps(static)}\n"

    blobs = _layout_blobs(peer_image)
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(
            open_cluster(
                tmp_path / "c",
                2,
                registry_rate=None,
                peers=True,
                mirror=True,
                node_config=with_stub_member,
            )
        )
        _, b = cluster.nodes
        member = Stub(cluster.bridge_ip, member_port, blobs)
        stack.callback(member.close)
        mirror_stub = Stub(cluster.bridge_ip, free_port(), blobs)
        stack.callback(mirror_stub.close)
        ref = cluster.push_unindexed(peer_image, repository="mirror/fallback")
        host = cluster.registry.host
        ours = f"http://{b.peer_address}"
        results: dict[str, tuple[float, str]] = {}
        misses: dict[str, list[int]] = {}

        def case(name: str, mirror: str, timeout: float = PULL_TIMEOUT_S) -> str:
            """Pulls with ``mirror`` first ("": none); returns the error ("" on success)."""
            if mirror:
                b.configure_mirror(host, mirror)
            else:
                b.unconfigure_mirror(host)
            mark = cluster.registry.mark()
            before = len(_mirror_events(b))
            took, error = _timed_pull(b, ref, min(timeout, budget.left()))
            layer = cluster.registry.since(mark).layer_bytes(peer_image.layer_digests)
            results[name] = (took, error)
            misses[name] = [int(e["ms"]) for e in _mirror_events(b)[before:] if e["status"] == 404]
            print(
                f"{name}: {took:.2f} s, registry layer bytes {layer}"
                + (f", FAILED {error}" if error else "")
            )
            if not error:
                assert layer >= peer_image.layer_bytes, (name, layer)
            _forget(b, ref, peer_image)
            return error

        assert case("no mirror", "") == ""
        base = results["no mirror"][0]
        assert case("closed port", f"http://{b.ip}:{free_port()}") == "", b.describe()
        assert case("our listener, blob nowhere", ours) == "", b.describe()
        member.mode = "silent"
        assert case("our listener, a member silent", ours) == "", b.describe()
        member.mode = "claims"
        assert case("our listener, a member lies", ours) == "", b.describe()
        member.mode = "claims, sniff only"
        assert case("our listener, a member lies later", ours) == "", b.describe()
        member.mode = "404"
        mirror_stub.mode = "corrupt"
        corrupt = case("a stub serving wrong bytes", mirror_stub.url)
        mirror_stub.mode = "silent"
        silent = case("a stub that never answers", mirror_stub.url, SILENT_WAIT_S)
        assert case("our listener, after the hung pull", ours) == "", b.describe()

        print(f"pull times on node B (the registry link unlimited, {len(blobs)} blobs):")
        for name, (took, error) in results.items():
            print(f"  {name:36s} {took:6.2f} s  added {took - base:+6.2f} s  {error[:90]}")
        for name, ms in misses.items():
            print(f"  {name:36s} mirror 404s after (ms) {ms}")
        blob_count = 1 + len(peer_image.layer_digests)
        for name in ("closed port", "our listener, blob nowhere", "our listener, a member lies"):
            assert results[name][0] - base <= QUICK_ADDED_S, (name, results)
        assert misses["our listener, blob nowhere"], misses
        assert max(misses["our listener, blob nowhere"]) < 1000, misses
        slow = misses["our listener, a member silent"]
        # a member is given three quarters of the lookup bound (so a silent one is seen)
        waited = [ms for ms in slow if ms >= 750 * LOOKUP_TIMEOUT_S - 100]
        # the silent member costs the misses in flight when it is first asked, then it is
        # marked down and skipped
        assert 1 <= len(waited) <= blob_count, slow
        assert max(slow) <= 1000 * (LOOKUP_TIMEOUT_S + 1), slow
        assert len(slow) > len(waited), slow
        added = results["our listener, a member silent"][0] - base
        assert added <= LOOKUP_TIMEOUT_S + QUICK_ADDED_S + 1, results
        assert "unexpected commit digest" in corrupt, corrupt
        assert silent.startswith("DEADLINE_EXCEEDED"), silent
        _check_no_listener_errors(cluster)


def _ctr_pull_in_netns(node: Node, ref: str, timeout: float) -> None:
    """``ctr images pull`` of ``ref`` into the ``overlayfs`` snapshotter (namespace
    ``default``), run in the node's network namespace: containerd 1.6's ctr fetches in its
    own process, so it must reach the node's mirror from the node's address (its own
    containerd, allowed without a token) and read the node's ``hosts.toml``. Raises
    AssertionError with ctr's stderr."""
    assert node.containerd is not None
    ctd = node.containerd
    cmd = nsenter_args(
        node.ns.name,
        CTR_BIN,
        "--address",
        str(ctd.address),
        "--namespace",
        "default",
        "images",
        "pull",
        "--plain-http",
        "--hosts-dir",
        str(ctd.paths.certs_d),
        "--snapshotter",
        "overlayfs",
        ref,
    )
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert res.returncode == 0, f"{res.stderr.strip()}\n{ctd.log_tail()}"


def test_lazily_fetched_layers_served_from_the_span_cache(
    peer_image: PeerImage, tmp_path: Path, budget: Budget
) -> None:
    """A pulls an indexed image lazily and its background fetch caches every span; B pulls
    the same image the ordinary way (ctr into overlayfs, B's containerd asking B's mirror
    first): B's mirror finds each layer in A's span cache, or in its own when B owns every
    chunk of a layer and so fetched all of it for A (each whole blob checked once against its
    digest, its head bytes the only registry bytes); the registry sends B (almost) no layer
    bytes, containerd checks every blob's digest as it commits it, and B's container reads
    every file right."""
    with open_cluster(tmp_path / "c", 2, registry_rate=None, peers=True, mirror=True) as cluster:
        a, b = cluster.nodes
        ref = cluster.push(peer_image, repository="mirror/lazy")
        layers = len(peer_image.layer_digests)

        _pull(a, ref, timeout=budget.left())
        _check_sums(a, peer_image, a.run_checksums(ref, peer_image.paths))
        # every span in A's cache (B fetched the chunks it owns for A, and keeps them too)
        a.wait_fetched(layers, timeout=budget.left())

        print(b.configure_mirror(cluster.registry.host))
        mark = cluster.registry.mark()
        t0 = time.monotonic()
        _ctr_pull_in_netns(b, ref, timeout=budget.left())
        pulled = time.monotonic() - t0
        second = _layer_report(
            cluster, peer_image, mark, f"node B, ctr pull through its mirror ({pulled:.1f} s)"
        )
        assert second <= ALMOST_NONE * peer_image.layer_bytes, cluster.describe()

        # each layer comes from a whole span cache: A's, or B's own when B, owning every
        # chunk of a small layer, fetched all of it for A
        def from_spans() -> int:
            return sum(_mirror_stats(n).get("from_spans", 0) for n in (a, b))

        try:
            wait_until(
                lambda: from_spans() >= peer_image.layer_bytes,
                timeout=min(10.0, budget.left()),
                what="the mirrors counting the bytes they served from span caches",
            )
        except AssertionError as e:
            raise AssertionError(f"{e}: A {_mirror_stats(a)} B {_mirror_stats(b)}") from None
        print("A mirror", _mirror_stats(a), "B mirror", _mirror_stats(b))
        served = {
            (node.index, e["path"].rsplit("/", 1)[-1])
            for node in (a, b)
            for e in _mirror_events(node)
            if e.get("source") == "spans" and e.get("status") == 200
        }
        from_a = {digest for index, digest in served if index == a.index}
        from_b = {digest for index, digest in served if index == b.index}
        assert set(peer_image.layer_digests) <= from_a | from_b, (_mirror_events(a), served)
        assert from_a, "A's span cache served no layer"
        through_b = {
            e["path"].rsplit("/", 1)[-1]
            for e in _mirror_events(b)
            if e.get("source") in ("peer", "spans") and e.get("status") == 200
        }
        assert set(peer_image.layer_digests) <= through_b, _mirror_events(b)
        assert b.containerd is not None
        out = b.containerd.run(
            ref,
            f"sums-{b.tag}-spans",
            "/bin/sh",
            "-c",
            "PATH=/bin; sha256sum " + " ".join(peer_image.paths),
            snapshotter="overlayfs",
            namespace="default",
            timeout=budget.left(),
        )
        _check_sums(b, peer_image, parse_sha256sum(out))
        _check_no_listener_errors(cluster)
