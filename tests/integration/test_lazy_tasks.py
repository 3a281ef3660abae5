"""A lazy layer's tasks die with the layer, and one layer's failure never stops the daemon.

A real `sociable-snapshotter` process (own `--root`, `--address` and config file) mounts two
lazy layers of an image converted with `sociable convert` into a real docker-registry, through
the Snapshots API (Prepare with CRI's labels, answered ALREADY_EXISTS), and serves them from
its FUSE host; the test reads the layers' files from `<root>/fuse/snap-<id>`:

- unmounting a layer (Remove + Cleanup) while its read-ahead and a background step wait on a
  slow, failing registry cancels that work: no request for the layer's blob reaches the
  registry afterwards (the retries would otherwise go on), and the other layer keeps serving;
- a read of the layer in progress at the unmount fails (EIO) instead of retrying its fetch;
- a background step of one layer raising an unexpected exception (injected into the daemon
  process by a `sitecustomize` module on its PYTHONPATH, the seam being
  `RemoteLayerReader.prefetch_step`) fails that layer's background fetch only: the daemon stays
  up, both layers serve reads, the other layer is filled, and `sociable-snapshotter status`
  shows the error on the failed layer.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
import textwrap
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
from snapshotter.remote import labels as L
from tests.support import images
from tests.support.cli import snapshotter_cli, sociable
from tests.support.registry import CountingProxy, RegistryServer, start_proxy
from tests.support.snapclient import SnapClient, SnapDaemon, can_mount, run_daemon

pytestmark = [pytest.mark.root, pytest.mark.slow]

T = TypeVar("T")

MIB = 1 << 20
PAGE = os.sysconf("SC_PAGESIZE")
SPAN_SIZE = MIB
"""`--span-size` of the conversion: small spans, so a few MiB make many spans."""
REPOSITORY = "lazy/tasks"
TAG = "v1-soci"
HOLD_SEC = 2.0
"""How long the proxy holds a read-ahead request of the unmounted layer before failing it."""
IO_TIMEOUT_SEC = 30.0
"""Longest a FUSE read of the test may take (a hung daemon fails the test, not the run)."""


@dataclass(frozen=True)
class LayerFile:
    """The one file of a test layer: its name, content, where its data starts in the tar
    stream, and the layer's spans (as the daemon's zTOC has them)."""

    digest: str
    name: str
    data: bytes
    data_offset: int
    spans: SpanMap

    def pages_before_span_end(self, span: int) -> int:
        """The file offset of the last page boundary in span `span`: the kernel reads whole
        pages, so reading the file up to there touches no later span."""
        end = int(self.spans.uncompressed_range(SpanId(span))[1]) - self.data_offset
        return end - end % PAGE


@dataclass(frozen=True)
class Pushed:
    """The converted image in the registry: its platform manifest and its two layers."""

    manifest: str
    layers: tuple[LayerFile, LayerFile]


def _layer_file(layer: images.Layer) -> LayerFile:
    with tarfile.open(layer.path, "r:gz") as tf:
        member = next(m for m in tf if m.isreg())
        f = tf.extractfile(member)
        assert f is not None
        data = f.read()
    ztoc = build_ztoc(layer.path, images.MEDIA_LAYER_GZIP, SPAN_SIZE)
    return LayerFile(layer.digest, member.name, data, member.offset_data, SpanMap.from_ztoc(ztoc))


def _platform_manifest(registry: RegistryServer) -> str:
    """The digest of the image manifest carrying the SOCI index annotation (v2)."""
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
    """Two layers of one pseudo-random file each (A: 12 MiB, about 7 spans; B: 4 MiB),
    converted into the registry with 1 MiB spans."""
    reason = can_mount()
    if reason:
        pytest.skip(f"PREREQUISITE MISSING: {reason}")
    base = tmp_path_factory.mktemp("lazy-tasks")
    image = images.write_oci_layout(
        base / "layout",
        [[images.File(path="a.bin", size=12 * MIB)], [images.File(path="b.bin", size=4 * MIB)]],
        tag="v1",
    )
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
    a, b = (_layer_file(layer) for layer in image.layers)
    assert a.spans.span_count >= 6, "layer A needs spans beyond a read-ahead window"
    return Pushed(_platform_manifest(registry), (a, b))


# -- the daemon and its layers ---------------------------------------------------------------


@dataclass
class Mounted:
    """A daemon with the two layers mounted: their committed snapshot names and FUSE dirs."""

    daemon: SnapDaemon
    snap: SnapClient
    targets: tuple[str, str]
    dirs: tuple[Path, Path]


def _prepare_remote(snap: SnapClient, host: str, pushed: Pushed, layer: LayerFile) -> str:
    """Prepare `layer` with CRI's labels as containerd's unpacker does; the daemon mounts it
    lazily and answers ALREADY_EXISTS. Returns the committed snapshot's name."""
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
    info = snap.stat(target)
    assert info.labels.get(L.REMOTE), f"{layer.digest} was not mounted lazily: {info}"
    snap.wait_ready(target)
    return target


def _fuse_dir(root: Path, digest: str) -> Path:
    for d in sorted((root / "fuse").iterdir()):
        status = json.loads((d / ".sociable" / "status.json").read_bytes())
        if status.get("digest") == digest:
            return d
    raise AssertionError(f"no FUSE directory serves {digest}")


@contextlib.contextmanager
def mounted(base: Path, config: str, host: str, pushed: Pushed) -> Iterator[Mounted]:
    """A daemon under `base` with `[remote]` settings `config`, both layers mounted from the
    registry at `host`. Stopped (SIGTERM, then SIGKILL) and its mounts swept on exit."""
    base.mkdir(parents=True, exist_ok=True)
    config_path = base / "sociable.toml"
    config_path.write_text(f'[remote]\nhosts_dir = ""\n{config}\n')
    with (
        run_daemon(base, config=config_path) as daemon,
        contextlib.closing(daemon.client()) as snap,
    ):
        targets = (
            _prepare_remote(snap, host, pushed, pushed.layers[0]),
            _prepare_remote(snap, host, pushed, pushed.layers[1]),
        )
        dirs = (
            _fuse_dir(daemon.root, pushed.layers[0].digest),
            _fuse_dir(daemon.root, pushed.layers[1].digest),
        )
        yield Mounted(daemon, snap, targets, dirs)


def _bounded(fn: Callable[[], T], timeout: float = IO_TIMEOUT_SEC) -> T:
    """`fn()` in a thread, failing the test when it takes longer than `timeout` seconds (a
    FUSE read the daemon never answers; the thread ends when the fixture stops the daemon)."""
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


def read_sequentially(path: Path, end: int, chunk: int = 128 * 1024) -> bytes:
    """Bytes `[0, end)` of `path`, read in order `chunk` bytes at a time, with the kernel's
    read-ahead off (POSIX_FADV_RANDOM), so the daemon sees exactly these reads."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        parts = []
        offset = 0
        while offset < end:
            part = os.pread(fd, min(chunk, end - offset), offset)
            if not part:
                break
            parts.append(part)
            offset += len(part)
        return b"".join(parts)
    finally:
        os.close(fd)


def read_at(path: Path, offset: int, size: int) -> bytes:
    """One read of `size` bytes at `offset` of `path`, the kernel's read-ahead off."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def read_whole(path: Path) -> bytes:
    return _bounded(path.read_bytes)


def blob_gets(proxy: CountingProxy, digest: str) -> int:
    """Requests for the blob `digest` that reached the proxy."""
    return proxy.requests_to(f"/blobs/{digest}")


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _range_start(header: str) -> int:
    """The first byte of a `bytes=START-END` Range header; -1 when there is none."""
    if not header.startswith("bytes="):
        return -1
    return int(header[len("bytes=") :].split("-", 1)[0])


# -- the tests ---------------------------------------------------------------------------------


def test_unmount_cancels_the_layers_read_ahead_and_background_fetch(
    pushed: Pushed, registry: RegistryServer, tmp_path: Path
) -> None:
    a, b = pushed.layers
    held_from = a.spans.compressed_range(SpanId(2))[0]
    step = max(e - s for s, e in map(a.spans.compressed_range, map(SpanId, range(2))))
    config = (
        "background_quiet_period_ms = 0\nbackground_rate_bytes_per_sec = 0\n"
        f"background_step_bytes = {step}"  # one span of layer A per background step
    )
    with start_proxy(registry) as proxy:
        # The registry is slow, then fails, for layer A's bytes from span 2 on: where the
        # background fetch and a sequential reader's read-ahead go once spans 0 and 1 are local.
        proxy.hold_status = 503
        proxy.hold = lambda path, rng: (
            HOLD_SEC if a.digest in path and _range_start(rng) >= held_from else 0.0
        )
        with mounted(tmp_path / "d", config, proxy.host, pushed) as m:
            # First the background fetch takes spans 0 and 1 and waits on span 2 (it must start
            # before the read-ahead: it waits for on-demand fetching to be quiet).
            wait_for("A's background step on span 2", lambda: proxy.holding >= 1, 10)
            end = a.pages_before_span_end(1)
            started = time.monotonic()
            got = _bounded(lambda: read_sequentially(m.dirs[0] / a.name, end))
            assert got == a.data[:end]
            assert time.monotonic() - started < HOLD_SEC, "the reads waited for held requests"
            # The sequential read started read-ahead of spans 3-5 (one request): held too.
            wait_for("A's read-ahead", lambda: proxy.holding >= 2, 10)

            m.snap.remove(m.targets[0])
            m.snap.cleanup()  # reclaims the snapshot: returns once the layer is unmounted
            assert not m.dirs[0].exists(), "layer A is still in the FUSE host"
            unmounted = blob_gets(proxy, a.digest)
            # A held request is answered 503 after HOLD_SEC and retried after a backoff of
            # at most 2 s: work still going on for A would show within this wait.
            time.sleep(HOLD_SEC + 2.0)
            assert blob_gets(proxy, a.digest) == unmounted, (
                f"requests for layer A after its unmount: {dict(proxy.requests)}\n"
                f"{m.daemon.log_tail(60)}"
            )

            assert m.daemon.alive()
            assert read_whole(m.dirs[1] / b.name) == b.data
            assert m.snap.stat(m.targets[1]).labels.get(L.REMOTE)


def test_unmount_stops_a_read_in_progress_from_fetching(
    pushed: Pushed, registry: RegistryServer, tmp_path: Path
) -> None:
    a, b = pushed.layers
    held_from = a.spans.compressed_range(SpanId(2))[0]
    with start_proxy(registry) as proxy:
        # Layer A's bytes from span 2 on: slow, then failing (the read would retry).
        proxy.hold_status = 503
        proxy.hold = lambda path, rng: (
            HOLD_SEC if a.digest in path and _range_start(rng) >= held_from else 0.0
        )
        with mounted(tmp_path / "d", "background_fetch = false", proxy.host, pushed) as m:
            offset = int(a.spans.uncompressed_range(SpanId(3))[0]) - a.data_offset
            offset -= offset % PAGE
            outcome: list[bytes | OSError] = []

            def read_span_3() -> None:
                try:
                    outcome.append(read_at(m.dirs[0] / a.name, offset, PAGE))
                except OSError as e:
                    outcome.append(e)

            reader = threading.Thread(target=read_span_3, name="fuse-read", daemon=True)
            reader.start()
            wait_for("the read's request to reach the registry", lambda: proxy.holding > 0, 10)

            m.snap.remove(m.targets[0])
            m.snap.cleanup()
            unmounted = blob_gets(proxy, a.digest)
            reader.join(IO_TIMEOUT_SEC)
            assert not reader.is_alive(), "the read did not end at the unmount"
            assert isinstance(outcome[0], OSError), outcome  # EIO: the layer went away
            time.sleep(HOLD_SEC + 2.0)  # a retry would be sent within this
            assert blob_gets(proxy, a.digest) == unmounted, (
                f"requests for layer A after its unmount: {dict(proxy.requests)}"
            )
            assert read_whole(m.dirs[1] / b.name) == b.data


SITECUSTOMIZE = textwrap.dedent(
    '''
    """Test fault: the background step of one layer raises an unexpected exception."""
    import os

    _BROKEN = os.environ.get("SOCIABLE_TEST_BROKEN_LAYER", "")
    if _BROKEN:
        from snapshotter.lazy.reader import RemoteLayerReader

        _step = RemoteLayerReader.prefetch_step

        async def _broken_step(self, max_bytes):
            if str(self.layer) == _BROKEN:
                raise RuntimeError("injected background bug")
            return await _step(self, max_bytes)

        RemoteLayerReader.prefetch_step = _broken_step
    '''
)


def status_lines(root: Path) -> dict[str, dict[str, object]]:
    """`sociable-snapshotter --root ROOT status`, by layer digest."""
    proc = snapshotter_cli("--root", str(root), "status", "--json", timeout=IO_TIMEOUT_SEC)
    assert proc.returncode == 0, proc.stderr
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    return {str(d.get("digest")): d for d in docs}


def test_background_bug_in_one_layer_keeps_the_daemon_serving(
    pushed: Pushed, registry: RegistryServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pushed.layers
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", str(hooks))
    monkeypatch.setenv("SOCIABLE_TEST_BROKEN_LAYER", a.digest)
    config = "background_quiet_period_ms = 0\nbackground_rate_bytes_per_sec = 0"
    with mounted(tmp_path / "d", config, registry.host, pushed) as m:
        # Layer B is read while the background fetcher fails on layer A and fills B.
        assert read_whole(m.dirs[1] / b.name) == b.data

        def settled() -> bool:
            assert m.daemon.alive(), m.daemon.log_tail(60)
            status = status_lines(m.daemon.root)
            return bool(status.get(a.digest, {}).get("lastFetchError")) and (
                status.get(b.digest, {}).get("fetchedPercent") == 100
            )

        # B is 2 MB on loopback: filled within a second unless the fetcher stopped.
        wait_for("A's background error and B fully fetched", settled, 20)
        assert m.daemon.alive(), m.daemon.log_tail(60)
        assert m.snap.stat(m.targets[0]).labels.get(L.REMOTE)
        assert m.snap.stat(m.targets[1]).labels.get(L.REMOTE)
        assert read_whole(m.dirs[0] / a.name) == a.data  # on demand, not by the background
        assert read_whole(m.dirs[1] / b.name) == b.data

        status = status_lines(m.daemon.root)
        broken, fine = status[a.digest], status[b.digest]
        assert "RuntimeError: injected background bug" in str(broken["lastFetchError"]), broken
        assert isinstance(broken["fetchErrors"], int) and broken["fetchErrors"] >= 1, broken
        assert broken["taskErrors"] == 0, broken  # the fetcher's boundary, not a layer task
        assert fine["fetchErrors"] == 0 and "lastFetchError" not in fine, fine
        events = [json.loads(x) for x in m.daemon.log.read_text().splitlines() if x[:1] == "{"]
        failed = [e for e in events if e.get("msg") == "background fetch failed"]
        assert failed and all(e.get("layer") == m.dirs[0].name for e in failed), failed
