"""Disk faults under a lazy layer: a full cache disk, damaged cache files, a read-only root.

A real `sociable-snapshotter` mounts a layer of pseudo-random files (converted into a real
docker-registry, read through a `FaultProxy` that only counts the layer's Range reads) and
its files are read through `<root>/fuse/snap-<id>` and compared with the source:

- the span cache on a 1 MiB tmpfs, smaller than the layer: every file still reads right
  (served from what was fetched), the daemon says in its log that the disk is full, and keeps
  serving;
- cache files damaged on disk between reads (a byte flipped in compressed spans and in the
  inflated tier, files truncated): detected, never served, fetched again, right bytes;
- the root made read-only under the running daemon (a read-only bind over a tmpfs root):
  reads are right or EIO, a Prepare fails with FAILED_PRECONDITION naming the error and the
  path, the committed snapshots (Prepare/Commit through the Snapshots API, a file written
  into the snapshot) stay as they were; writable again, Prepare and Commit work;
- a lazy layer's restore record damaged while the daemon is down (and no mount left, as after
  a reboot): the daemon starts, a view of the layer is refused (UNAVAILABLE, never an empty
  lower) and leaves no snapshot behind, Remove and Cleanup reclaim it.

Background fetch and read-ahead are off, and one inflated span is kept in memory, so reads
reach the disk caches. Test budget: about 20 s (the chaos suite together: under 120 s).
"""

from __future__ import annotations

import contextlib
import errno
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.support.chaos import (
    ChaosImage,
    ChaosLayer,
    chaos_seed,
    fuse_dir,
    log_events,
    prepare_remote,
    push_chaos_image,
    read_file,
    write_config,
)
from tests.support.containerd import snapshot_dir_of
from tests.support.faultproxy import FaultPlan, FaultProxy, start_fault_proxy
from tests.support.registry import RegistryServer
from tests.support.snapclient import (
    SnapClient,
    SnapDaemon,
    can_mount,
    run_daemon,
    sweep_mounts,
)
from tests.support.snapclient import mounted as mounted_at

pytestmark = [pytest.mark.root, pytest.mark.slow]

DAEMON_CONFIG = """
background_fetch = false
readahead_spans = 0
memory_cache_spans = 1
fetch_backoff_initial_ms = 20
fetch_backoff_max_ms = 100
request_timeout_sec = 10
"""


@pytest.fixture(scope="module")
def image(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> ChaosImage:
    reason = can_mount()
    if reason:
        pytest.skip(f"PREREQUISITE MISSING: {reason}")
    return push_chaos_image(
        registry.host,
        registry.url,
        tmp_path_factory.mktemp("chaos-disk-image"),
        "chaos/disk",
        files=12,
    )


@dataclass
class Mounted:
    proxy: FaultProxy
    daemon: SnapDaemon
    snap: SnapClient
    layer: ChaosLayer
    target: str
    dir: Path

    def read(self, name: str) -> bytes | OSError:
        return read_file(self.dir / name)

    def expect_right(self, name: str, what: str) -> None:
        got = self.read(name)
        assert not isinstance(got, OSError), f"{what}: {name}: {got}\n{self.daemon.log_tail(30)}"
        assert got == self.layer.files[name], f"{what}: {name}: WRONG BYTES"


@contextlib.contextmanager
def mounted(
    registry: RegistryServer, image: ChaosImage, base: Path, config: str = DAEMON_CONFIG
) -> Iterator[Mounted]:
    layer = image.layers[0]
    with (
        start_fault_proxy(registry.url, FaultPlan(match=f"/blobs/{layer.digest}")) as proxy,
        run_daemon(base, config=write_config(base, config)) as daemon,
        contextlib.closing(daemon.client()) as snap,
    ):
        target = prepare_remote(snap, proxy.host, image, layer)
        yield Mounted(proxy, daemon, snap, layer, target, fuse_dir(daemon.root, layer.digest))
        assert daemon.alive(), daemon.log_tail(60)


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def test_full_cache_disk_still_serves_right_bytes(
    registry: RegistryServer, image: ChaosImage, tmp_path: Path
) -> None:
    base = tmp_path / "d"
    mount_tmpfs(base / "root" / "cache", "1m")  # the layer's blob is about 2 MiB
    with mounted(registry, image, base) as m:
        names = sorted(m.layer.files)
        for name in names:
            m.expect_right(name, "cache disk full")
        for name in names:  # again: what was cached is right, the rest is fetched again
            m.expect_right(name, "cache disk full, second pass")
        full = [
            e
            for e in log_events(m.daemon)
            if e.get("level") == "warning" and "No space left on device" in str(e.get("error"))
        ]
        assert full, f"no log line says the cache disk is full:\n{m.daemon.log_tail(40)}"
        print(f"{len(full)} warnings about the full cache disk; first: {full[0]['msg']}")
        # Once per layer in 10 s, not once per request (`layer` names it).
        assert len(full) == 1 and full[0].get("layer") == m.layer.digest, full
        # The daemon keeps serving: the layer mounts again.
        prepare_remote(m.snap, m.proxy.host, image, m.layer)


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name.isdigit())


def _settled_files(directory: Path) -> list[Path]:
    """`_files(directory)` once it stops changing (the daemon writes the inflated tier from a
    writer thread, a moment after the read that inflated a span)."""
    files = _files(directory)
    for _ in range(50):
        time.sleep(0.1)
        again = _files(directory)
        if again == files:
            break
        files = again
    return files


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def test_damaged_cache_files_are_never_served(
    registry: RegistryServer, image: ChaosImage, tmp_path: Path
) -> None:
    seed = chaos_seed("damaged cache files")
    with mounted(registry, image, tmp_path / "d") as m:
        names = sorted(m.layer.files)
        for name in names:
            m.expect_right(name, "first read")
        cache = m.daemon.root / "cache"
        spans = _files(cache / "spans")
        inflated = _settled_files(cache / "inflated" / "spans")  # written behind the reads
        assert spans and inflated, f"nothing cached under {cache}"

        # A byte flipped in every inflated span (same size): never served.
        for i, path in enumerate(inflated):
            _flip(path, seed + i * 7919)
        fetched = m.proxy.matched
        for name in names:
            m.expect_right(name, f"inflated tier flipped (seed {seed})")
        # The compressed spans were intact: nothing was fetched again.
        assert m.proxy.matched == fetched, "intact compressed spans were fetched again"

        # The compressed spans flipped and the inflated tier truncated: both detected, the
        # spans fetched again from the registry.
        for i, path in enumerate(_files(cache / "spans")):
            _flip(path, seed + i * 104729)
        for path in _files(cache / "inflated" / "spans"):
            with path.open("r+b") as f:
                f.truncate(max(0, path.stat().st_size // 2))
        for name in names:
            m.expect_right(name, f"compressed flipped, inflated truncated (seed {seed})")
        assert m.proxy.matched > fetched, "damaged spans were not fetched again"
        dropped = [e for e in log_events(m.daemon) if "does not match" in str(e.get("msg"))]
        assert dropped, "no log line says a cached span was corrupt"

        # Compressed spans truncated to nothing and the inflated tier deleted: fetched again.
        for path in _files(cache / "spans"):
            path.write_bytes(b"")
        for path in _files(cache / "inflated" / "spans"):
            path.unlink()
        fetched = m.proxy.matched
        for name in names:
            m.expect_right(name, "compressed spans emptied")
        assert m.proxy.matched > fetched


def _rw_snapshot(snap: SnapClient, parent: str, key: str, name: str, data: bytes) -> Path:
    """An active snapshot on `parent` with `data` written into it, committed as `name`;
    returns the file."""
    upper = snapshot_dir_of(snap.prepare(key, parent)) / "fs"
    path = upper / "chaos.txt"
    path.write_bytes(data)
    snap.commit(name, key)
    return path


def test_read_only_root_keeps_committed_snapshots(
    registry: RegistryServer, image: ChaosImage, tmp_path: Path
) -> None:
    base = tmp_path / "d"
    root = base / "root"
    mount_tmpfs(root, "256m")
    with mounted(registry, image, base) as m:
        names = sorted(m.layer.files)
        for name in names[: len(names) // 2]:
            m.expect_right(name, "before read-only")
        committed = _rw_snapshot(m.snap, m.target, "ro-active", "ro-committed", b"kept\n")
        before = {i.name: i for i in m.snap.list()}

        # A read-only bind over the root (its mounts included): new files cannot be made.
        subprocess.run(["mount", "--rbind", str(root), str(root)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(root)], check=True)
            probe = root / "probe"
            with pytest.raises(OSError) as ro:
                probe.write_bytes(b"x")
            assert ro.value.errno == errno.EROFS
            outcomes = {"right": 0, "eio": 0}
            for name in names:
                got = m.read(name)
                if isinstance(got, OSError):
                    assert got.errno == errno.EIO, f"{name}: {got!r}"
                    outcomes["eio"] += 1
                else:
                    assert got == m.layer.files[name], f"read-only root: {name}: WRONG BYTES"
                    outcomes["right"] += 1
            print(f"read-only root: {outcomes}")
            with pytest.raises(grpc.RpcError) as refused:
                m.snap.prepare("ro-new", "ro-committed")
            code, details = refused.value.code(), refused.value.details()
            print(f"Prepare on a read-only root: {code} {details}")
            assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, details)
            assert details.startswith(f"Read-only file system (EROFS): {root}/"), details
            assert m.daemon.alive(), m.daemon.log_tail(40)
            assert m.snap.stat("ro-committed").kind == "committed"
            assert committed.read_bytes() == b"kept\n"
        finally:
            subprocess.run(["umount", "-l", str(root)], check=True)

        # Writable again: the committed snapshots are as they were, new ones can be made.
        after = {i.name: i for i in m.snap.list()}
        assert after == before, f"snapshots changed: {before} -> {after}"
        assert committed.read_bytes() == b"kept\n"
        _rw_snapshot(m.snap, "ro-committed", "rw-active", "rw-committed", b"again\n")
        assert m.snap.stat("rw-committed").parent == "ro-committed"
        for name in names:
            m.expect_right(name, "writable again")


@contextlib.contextmanager
def damaged_record(registry: RegistryServer, image: ChaosImage, base: Path) -> Iterator[Mounted]:
    """A daemon restarted after its lazy layer's restore record was damaged on disk (and every
    mount swept, as after a reboot, so the record is what would restore the layer)."""
    with mounted(registry, image, base) as m:
        name = sorted(m.layer.files)[0]
        m.expect_right(name, "before the restart")
        records = sorted((m.daemon.root / "remote").glob("*.json"))
        assert len(records) == 1
        m.daemon.stop()
        sweep_mounts(m.daemon.root)
        records[0].write_bytes(records[0].read_bytes()[:20])
        m.daemon.start()
        yield m


def test_damaged_restore_record(
    registry: RegistryServer, image: ChaosImage, tmp_path: Path
) -> None:
    """A lazy layer's restore record damaged on disk while the daemon is down: the daemon
    starts, a view of the layer is refused (never an empty or wrong lower), and Remove +
    Cleanup reclaim it."""
    with (
        damaged_record(registry, image, tmp_path / "d") as m,
        contextlib.closing(m.daemon.client()) as snap,
    ):
        name = sorted(m.layer.files)[0]
        assert snap.stat(m.target).kind == "committed"
        try:
            view = snap.view("probe", m.target)
        except grpc.RpcError as e:
            print(f"View of a layer whose record is damaged: {e.code()} {e.details()}")
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            assert "probe" not in {i.name for i in snap.list()}  # see the next test
        else:
            with mounted_at(view, tmp_path / "view") as target:
                got = read_file(target / name)
                assert got == m.layer.files[name], f"view: {name}: {got!r:.60}"
            snap.remove("probe")
        snap.remove(m.target)
        snap.cleanup()
        assert snap.list() == []
        assert not list((m.daemon.root / "remote").glob("*.json"))


def test_refused_view_leaves_no_snapshot(
    registry: RegistryServer, image: ChaosImage, tmp_path: Path
) -> None:
    with (
        damaged_record(registry, image, tmp_path / "d") as m,
        contextlib.closing(m.daemon.client()) as snap,
    ):
        with pytest.raises(grpc.RpcError) as err:
            snap.view("probe", m.target)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert sorted(i.name for i in snap.list()) == [m.target]
        # Nothing keeps the layer's snapshot: it can be removed (image GC goes on).
        snap.remove(m.target)
        assert snap.list() == []
