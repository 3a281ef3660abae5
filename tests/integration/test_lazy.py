"""Lazy layers end to end: containerd 1.6 + CRI, a local registry behind a counting proxy,
an image indexed with `sociable convert`, pulled with `sociable pull` (CRI PullImage).

One module-scoped stack (registry proxy, daemon, containerd) runs the scenarios in order:
lazy pull (only index, manifests, config and zTOCs cross the wire), a container reading files
whose checksums are checked, the local-unpack path for a layer below `--min-layer-size`, an
image without an index (left to containerd), a daemon restart with lazy layers mounted, and
image removal + GC (every layer unmounted, no directory left).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapshotter.mountinfo import mounts_under
from snapshotter.remote.status import read_daemon_status
from tests.support import images
from tests.support.cli import sociable
from tests.support.containerd import (
    Containerd,
    CtrError,
    PushedImages,
    require_containerd,
    start_containerd,
)
from tests.support.registry import CountingProxy, RegistryServer, start_proxy
from tests.support.snapclient import SnapDaemon, run_daemon

pytestmark = [pytest.mark.root, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
K8S = "k8s.io"
MIN_LAYER_SIZE = 100_000
"""Skips the 250-byte whiteout layer: it goes through the local-unpack path."""

PY_FILES = ("os.py", "json/decoder.py", "email/message.py", "_bulk_padding.bin")
"""Files of the bulk layer the container reads (paths under /usr/lib/python3.11)."""


@dataclass
class Stack:
    proxy: CountingProxy
    daemon: SnapDaemon
    containerd: Containerd
    image: images.Image
    lazy_ref: str
    plain_ref: str

    def pull(self, ref: str) -> str:
        """`sociable pull` through CRI; returns its stdout."""
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "index.cli",
                "pull",
                "--address",
                str(self.containerd.address),
                ref,
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            check=False,
        )
        assert proc.returncode == 0, (
            f"sociable pull {ref}: {proc.stderr}\n--- daemon ---\n{self.daemon.log_tail(80)}"
            f"\n--- containerd ---\n{self.containerd.log_tail()}"
        )
        return proc.stdout

    def run(self, ref: str, name: str, script: str) -> str:
        return self.containerd.run(ref, name, "/bin/sh", "-c", script, namespace=K8S, timeout=300)

    def blob_bytes(self, digest: str) -> int:
        return sum(n for k, n in self.proxy.bytes_sent.items() if k.endswith(digest))

    def blob_gets(self, digest: str) -> int:
        return sum(n for k, n in self.proxy.requests.items() if k.endswith(digest))

    def daemon_events(self) -> list[dict[str, object]]:
        out = []
        for line in self.daemon.log.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def events_when(
        self, ok: Callable[[list[dict[str, object]]], bool], timeout_s: float = 10.0
    ) -> list[dict[str, object]]:
        """The daemon's log records once `ok`; fails after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not ok(events := self.daemon_events()):
            assert time.monotonic() < deadline, f"daemon log: {events[-20:]}"
            time.sleep(0.05)
        return events


def bulk_sums(image: images.Image) -> dict[str, str]:
    """sha256 of the PY_FILES as stored in the image's bulk layer (the padding file is
    generated, so read the layer with tarfile)."""
    import gzip
    import tarfile

    want = {f"usr/lib/python3.11/{p}" for p in PY_FILES}
    out: dict[str, str] = {}
    with gzip.open(image.layers[-1].path) as gz, tarfile.open(fileobj=gz, mode="r|") as tf:
        for m in tf:
            name = m.name.lstrip("./")
            if name in want and m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                out["/" + name] = hashlib.sha256(f.read()).hexdigest()
    assert len(out) == len(want), f"bulk layer lacks some of {sorted(want)}"
    return out


def parse_sums(output: str) -> dict[str, str]:
    sums = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and len(parts[0]) == 64:
            sums[parts[1]] = parts[0]
    return sums


@dataclass(frozen=True)
class Images:
    image: images.Image
    lazy_ref: str
    plain_ref: str
    registry: RegistryServer
    pause_ref: str


@pytest.fixture(scope="module")
def pushed(
    registry: RegistryServer,
    pushed_images: PushedImages,
    tmp_path_factory: pytest.TempPathFactory,
) -> Images:
    """The bulk image converted (v2) into the registry, and a small image without an index."""
    require_containerd()
    base = tmp_path_factory.mktemp("lazy-images")
    image = images.bulk_image()
    lazy_ref = f"{registry.host}/lazy/bulk:v1-soci"
    sociable(
        "convert",
        "--min-layer-size",
        str(MIN_LAYER_SIZE),
        f"oci-layout:{image.layout}:{image.tag}",
        lazy_ref,
        root=base / "convert-root",
    )
    plain = images.write_oci_layout(
        base / "plain",
        [images.busybox_layer(), [images.File(path="data/plain.txt", data=b"not indexed\n")]],
        tag="v1",
    )
    plain_ref = images.push(plain, registry.host, "lazy/plain", "v1")
    return Images(image, lazy_ref, plain_ref, registry, pushed_images.pause_ref)


@contextlib.contextmanager
def open_stack(pushed: Images, base: Path, remote_config: str) -> Iterator[Stack]:
    """A counting proxy, a daemon with `[remote]` settings `remote_config`, and containerd."""
    base.mkdir(parents=True, exist_ok=True)
    config = base / "sociable.toml"
    config.write_text(f'[remote]\nhosts_dir = ""\n{remote_config}\n')
    registry = pushed.registry
    with (
        start_proxy(registry) as proxy,
        run_daemon(base / "sociable", config=config) as daemon,
        start_containerd(
            base / "containerd",
            proxy_address=daemon.address,
            registry_hosts=[proxy.host, registry.host],
            sandbox_image=pushed.pause_ref,
        ) as ctd,
    ):
        yield Stack(
            proxy=proxy,
            daemon=daemon,
            containerd=ctd,
            image=pushed.image,
            lazy_ref=pushed.lazy_ref.replace(registry.host, proxy.host),
            plain_ref=pushed.plain_ref,
        )


@pytest.fixture(scope="module")
def stack(pushed: Images, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The module's stack, background fetch off so the proxy counts on-demand bytes only."""
    with open_stack(pushed, tmp_path_factory.mktemp("lazy"), "background_fetch = false") as st:
        yield st


def test_lazy_pull_fetches_no_layer_and_container_reads(stack: Stack) -> None:
    image = stack.image
    busybox, features, whiteout, bulk = image.layers
    stack.proxy.requests.clear()
    stack.proxy.bytes_sent.clear()

    start = time.monotonic()
    out = stack.pull(stack.lazy_ref)
    pull_sec = time.monotonic() - start
    assert "pulled sha256:" in out

    served = dict(stack.proxy.bytes_sent)
    print(f"\nlazy pull took {pull_sec:.2f} s; registry served {sum(served.values())} bytes:")
    for key, n in sorted(served.items()):
        print(f"  {n:>10}  {key}")
    # Indexed layers: not one byte before a container runs.
    for layer in (busybox, features, bulk):
        assert stack.blob_bytes(layer.digest) == 0, f"layer {layer.digest} was fetched"
    # The layer below --min-layer-size was unpacked locally by the snapshotter (full GET).
    assert stack.blob_bytes(whiteout.digest) == whiteout.size
    events = stack.events_when(  # PullImage does not wait for the deferred mounts
        lambda evs: sum(1 for e in evs if e.get("msg") == "lazy layer mounted") >= 3
    )
    reasons = [e.get("reason") for e in events if e.get("msg") == "lazy layer fallback"]
    assert reasons.count("no_ztoc") == 1, reasons
    assert sum(1 for e in events if e.get("msg") == "lazy layer mounted") == 3
    assert any(e.get("msg") == "layer unpacked locally" for e in events)

    # The lazily mounted layers are visible to an operator.
    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "snapshotter.cli",
            "--root",
            str(stack.daemon.root),
            "status",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    ).stdout.splitlines()
    digests = {json.loads(line)["digest"] for line in status}
    assert digests == {busybox.digest, features.digest, bulk.digest}

    # A container reads a few files through overlay over the FUSE layers.
    files = " ".join(f"/usr/lib/python3.11/{p}" for p in PY_FILES)
    script = (
        f"sha256sum {files} /data/hello.txt /data/hello-link.txt; "
        "cat /data/hello.txt; ls /data/opaque; test ! -e /data/doomed.txt && echo doomed-gone"
    )
    output = stack.run(stack.lazy_ref, "lazy-1", script)
    sums = parse_sums(output)
    want = bulk_sums(image)
    for path, digest in want.items():
        assert sums.get(path) == digest, f"{path}: {sums.get(path)} != {digest}\n{output}"
    assert sums["/data/hello.txt"] == hashlib.sha256(b"hello from layer 3\n").hexdigest()
    assert sums["/data/hello-link.txt"] == hashlib.sha256(b"hello from layer 2\n").hexdigest()
    assert "new.txt" in output and "old.txt" not in output
    assert "doomed-gone" in output

    fetched = stack.blob_bytes(bulk.digest)
    print(
        f"after the container: bulk layer {fetched} of {bulk.size} bytes fetched "
        f"({100.0 * fetched / bulk.size:.1f}%) in {stack.blob_gets(bulk.digest)} requests; "
        f"total served {sum(stack.proxy.bytes_sent.values())} bytes"
    )
    assert 0 < fetched < bulk.size
    # the bulk layer's zTOC is over 1 MiB: tree worker processes were started, none failed
    doc = status_when(stack, lambda d: "treeWorkers" in d)
    workers = doc["treeWorkers"]
    assert isinstance(workers, dict) and workers["processes"] == 2, doc
    assert workers["running"] + workers["builds"] >= 1 and workers["fallbacks"] == 0, doc


HOLD_SEC = 5.0
"""How long the proxy holds each zTOC request in the deferred-mount scenarios."""


def hold_ztocs(image: images.Image, seconds: float) -> Callable[[str, str], float]:
    """A `CountingProxy.hold` holding every blob GET that is not one of `image`'s layers or
    its config: its zTOCs."""
    known = {layer.digest for layer in image.layers} | {image.config_digest}

    def hold(path: str, _range: str) -> float:
        if "/blobs/" in path and path.rsplit("/", 1)[-1] not in known:
            return seconds
        return 0.0

    return hold


def container_reads_bulk_files(stack: Stack, name: str) -> None:
    files = " ".join(f"/usr/lib/python3.11/{p}" for p in PY_FILES)
    output = stack.run(stack.lazy_ref, name, f"sha256sum {files}; cat /data/hello.txt")
    sums = parse_sums(output)
    for path, digest in bulk_sums(stack.image).items():
        assert sums.get(path) == digest, f"{path}: {sums.get(path)} != {digest}\n{output}"
    assert "hello from layer 3" in output


def status_when(
    stack: Stack, ok: Callable[[dict[str, object]], bool], timeout_s: float = 3.0
) -> dict[str, object]:
    """The daemon's status.json once `ok` (it is rewritten every second); fails after
    `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        doc = read_daemon_status(stack.daemon.root) or {}
        if ok(doc):
            return doc
        assert time.monotonic() < deadline, f"status.json: {doc}"
        time.sleep(0.1)


def test_the_pull_ends_before_its_ztocs_and_the_container_waits_for_them(
    pushed: Images, tmp_path: Path
) -> None:
    with open_stack(pushed, tmp_path / "deferred", "background_fetch = false") as st:
        st.proxy.hold = hold_ztocs(st.image, HOLD_SEC)
        st.pull(st.lazy_ref)
        # PullImage returned while the zTOCs are still on their way: the mounts wait
        assert st.proxy.holding > 0, "the pull waited for every zTOC"
        doc = status_when(st, lambda d: len(d.get("mountsInProgress") or ()) == 3)
        assert st.proxy.holding > 0, f"the zTOCs were answered before the status showed {doc}"
        # the container's snapshot waits for them, then reads the right bytes
        container_reads_bulk_files(st, "deferred-1")
        status_when(st, lambda d: "mountsInProgress" not in d)
        mounted = [e for e in st.daemon_events() if e.get("msg") == "lazy layer mounted"]
        assert len(mounted) == 3 and all(e.get("deferred") for e in mounted), mounted
        for layer in (st.image.layers[0], st.image.layers[1], st.image.layers[3]):
            assert st.blob_bytes(layer.digest) < layer.size  # served lazily, not pulled


def test_a_deferred_mount_whose_ztoc_fails_is_unpacked_locally(
    pushed: Images, tmp_path: Path
) -> None:
    with open_stack(pushed, tmp_path / "failing", "background_fetch = false") as st:
        st.proxy.hold = hold_ztocs(st.image, 0.3)
        st.proxy.hold_status = 503  # every zTOC request fails, after a while
        st.pull(st.lazy_ref)
        container_reads_bulk_files(st, "deferred-2")
        events = st.daemon_events()
        local = [e for e in events if e.get("msg") == "layer unpacked locally"]
        assert sum(1 for e in local if e.get("deferred")) == 3, local
        assert not any(e.get("msg") == "lazy layer mounted" for e in events)
        records = [json.loads(p.read_bytes()) for p in (st.daemon.root / "remote").glob("*.json")]
        assert len(records) == 3 and all(r["local"] for r in records), records


def test_image_without_index_is_left_to_containerd(stack: Stack) -> None:
    stack.pull(stack.plain_ref)
    output = stack.run(stack.plain_ref, "plain-1", "cat /data/plain.txt")
    assert output.strip() == "not indexed"
    reasons = [
        e.get("reason")
        for e in stack.daemon_events()
        if e.get("msg") == "lazy layer fallback" and e.get("image") == stack.plain_ref
    ]
    assert reasons == ["no_index"], reasons


def test_restart_keeps_lazy_layers(stack: Stack) -> None:
    # One zTOC vanished from the local store meanwhile: its layer is restored by rediscovery.
    records = [json.loads(p.read_bytes()) for p in (stack.daemon.root / "remote").glob("*.json")]
    bulk = next(r for r in records if r["layer_digest"] == stack.image.layers[-1].digest)
    blobs = stack.daemon.root / "content" / "blobs" / "sha256"
    (blobs / bulk["ztoc_digest"].split(":", 1)[1]).unlink()
    restart_daemon(stack)
    events = stack.daemon_events()
    assert any(e.get("msg") == "lazy layer record unusable" for e in events)
    restored = [e for e in events if e.get("msg") == "lazy layer restored"]
    assert len(restored) >= 3, [e for e in events if "restore" in str(e.get("msg"))]
    output = stack.run(stack.lazy_ref, "lazy-2", "sha256sum /usr/lib/python3.11/os.py")
    want = bulk_sums(stack.image)["/usr/lib/python3.11/os.py"]
    assert parse_sums(output).get("/usr/lib/python3.11/os.py") == want, output


def restart_daemon(stack: Stack) -> None:
    """kill -9 and start the daemon; wait until containerd talks to it again (it re-dials
    the proxy socket with backoff, up to 3 s)."""
    stack.daemon.kill9()
    stack.daemon.start()
    deadline = time.monotonic() + 30
    while True:
        res = stack.containerd.ctr(
            "snapshots", "--snapshotter", "sociable", "ls", namespace=K8S, check=False
        )
        if res.returncode == 0:
            return
        assert time.monotonic() < deadline, res.stderr
        time.sleep(0.5)


def test_unrestorable_layer_answers_unavailable(stack: Stack) -> None:
    records = stack.daemon.root / "remote"
    assert len(list(records.glob("snap-*.json"))) >= 3
    for record in records.glob("snap-*.json"):
        record.unlink()  # restore must now rediscover the index through the registry...
    stack.proxy.fail_status, stack.proxy.fail_count = 503, 10_000  # ...which is down
    try:
        restart_daemon(stack)
        failed = [e for e in stack.daemon_events() if e.get("msg") == "lazy layer restore failed"]
        assert len(failed) >= 3
        with pytest.raises(CtrError, match="unavailable"):
            stack.run(stack.lazy_ref, "lazy-3", "true")
    finally:
        stack.proxy.fail_count = 0
    restart_daemon(stack)
    output = stack.run(stack.lazy_ref, "lazy-4", "cat /data/hello.txt")
    assert output.strip() == "hello from layer 3"


def test_remove_and_gc_unmounts_everything(stack: Stack) -> None:
    cri = stack.containerd.cri()
    for ref in (stack.lazy_ref, stack.plain_ref):
        cri.remove_image(ref)
    stack.containerd.gc(namespace=K8S)
    snapshots = stack.daemon.root / "snapshots"
    fuse = stack.daemon.root / "fuse"
    deadline = time.monotonic() + 60
    while True:
        left = sorted(p.name for p in snapshots.iterdir())
        layers = sorted(p.name for p in fuse.iterdir())
        mounts = [m.mountpoint for m in mounts_under(snapshots)]
        if not left and not layers and not mounts:
            break
        if time.monotonic() > deadline:
            raise AssertionError(
                f"left: dirs {left}, FUSE layers {layers}, mounts {mounts}\n"
                f"{stack.daemon.log_tail(60)}"
            )
        time.sleep(0.5)
    unmounted = [e for e in stack.daemon_events() if e.get("msg") == "lazy layer unmounted"]
    assert len(unmounted) >= 3


def wait_fully_fetched(stack: Stack, count: int, timeout_s: float = 120) -> list[dict[str, object]]:
    """Polls `sociable-snapshotter status` until `count` layers report 100 % fetched."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "snapshotter.cli",
                "--root",
                str(stack.daemon.root),
                "status",
                "--json",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
        ).stdout
        status = [json.loads(line) for line in out.splitlines()]
        if len(status) == count and all(s["fetchedPercent"] == 100 for s in status):
            return status
        assert time.monotonic() < deadline, f"not fetched in {timeout_s} s: {status}"
        time.sleep(0.5)


def test_background_fetch_fills_layers_and_cache_survives_removal(
    pushed: Images, tmp_path: Path
) -> None:
    config = "background_quiet_period_ms = 0\nbackground_rate_bytes_per_sec = 0"
    with open_stack(pushed, tmp_path / "bg", config) as st:
        bulk = st.image.layers[-1]
        st.pull(st.lazy_ref)
        wait_fully_fetched(st, 3)
        # Every span, i.e. all of the blob but the 8-byte gzip trailer.
        assert st.blob_bytes(bulk.digest) >= bulk.size - 8
        fetched = sum(st.proxy.bytes_sent.values())
        # Everything is local now: the container reads without the registry.
        output = st.run(st.lazy_ref, "bg-1", "sha256sum /usr/lib/python3.11/os.py")
        want = bulk_sums(st.image)["/usr/lib/python3.11/os.py"]
        assert parse_sums(output).get("/usr/lib/python3.11/os.py") == want
        assert sum(st.proxy.bytes_sent.values()) == fetched
        # Removed and pulled again: the spans are still cached, no layer byte is fetched.
        st.containerd.cri().remove_image(st.lazy_ref)
        st.containerd.gc(namespace=K8S)
        deadline = time.monotonic() + 60
        while list((st.daemon.root / "fuse").iterdir()):
            assert time.monotonic() < deadline, "layers still mounted after GC"
            time.sleep(0.5)
        before = {layer.digest: st.blob_bytes(layer.digest) for layer in st.image.layers}
        st.pull(st.lazy_ref)
        output = st.run(st.lazy_ref, "bg-2", "sha256sum /usr/lib/python3.11/os.py")
        assert parse_sums(output).get("/usr/lib/python3.11/os.py") == want
        for layer in st.image.layers[:2] + st.image.layers[3:]:
            assert st.blob_bytes(layer.digest) == before[layer.digest], layer.digest
        print(f"\nbackground fetch: registry served {fetched} bytes for a full fill")
