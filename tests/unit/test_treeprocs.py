"""TreeProcesses: trees built in worker processes equal those built in the daemon; a broken,
idle or closed pool gives way to the caller's own build and never to a wrong tree."""

from __future__ import annotations

import gzip
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from index.digest import Digest
from index.store import LocalStore
from index.ztoc_codec import encode_ztoc
from snapshotter.fs.tree import LayerTree
from snapshotter.remote import treeprocs
from snapshotter.remote import trees as trees_module
from snapshotter.remote.errors import MountError
from snapshotter.remote.treeprocs import TreeProcesses, build_light
from snapshotter.remote.trees import LayerTrees
from snapshotter.tasks import open_task_scope
from tests.support.fuselayers import ztoc_for_layer


def _layer(path: Path) -> Path:
    """Files, long names, xattrs, a symlink, a hardlink and whiteouts."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(30):
            info = tarfile.TarInfo(f"d{i % 3}/" + "long-" * (i % 25) + f"f{i}")
            data = bytes([i]) * (i * 311)
            info.size = len(data)
            info.mtime = 1_700_000_000 + i
            if i % 5 == 0:
                info.pax_headers = {"SCHILY.xattr.user.k": f"v{i}"}
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("d0/sym")
        link.type, link.linkname = tarfile.SYMTYPE, "f0"
        tf.addfile(link)
        hard = tarfile.TarInfo("d1/hard")
        hard.type, hard.linkname = tarfile.LNKTYPE, "d0/f0"
        tf.addfile(hard)
        for name in ("d2/.wh.gone", "d1/.wh..wh..opq"):
            tf.addfile(tarfile.TarInfo(name))
    path.write_bytes(gzip.compress(raw.getvalue()))
    return path


@pytest.fixture(scope="module")
def ztoc_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return encode_ztoc(ztoc_for_layer(_layer(tmp_path_factory.mktemp("layer") / "l.tar.gz")))


def _same(a: LayerTree, b: LayerTree) -> bool:
    return [getattr(a, s) for s in type(a).__slots__] == [getattr(b, s) for s in type(b).__slots__]


def _alive(pid: int) -> bool:
    """Whether child `pid` still runs (reaped when it exited)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return _running(pid)


def _running(pid: int) -> bool:
    """Whether any process `pid` runs (not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.fixture
def processes() -> Iterator[TreeProcesses]:
    procs = TreeProcesses(2)
    yield procs
    procs.close()


def test_a_worker_builds_the_tree_the_daemon_would(
    processes: TreeProcesses, ztoc_bytes: bytes
) -> None:
    for userxattr in (False, True):
        built = processes.build(ztoc_bytes, userxattr=userxattr)
        assert built is not None
        light, tree = built
        here_light, here_tree = build_light(ztoc_bytes, userxattr=userxattr)
        assert light == here_light and light.files == ()
        assert _same(tree, here_tree)
    assert tree.entry_count > 30
    assert processes.builds == 2 and processes.fallbacks == 0
    assert processes.running == 1 and len(processes.pids()) == 1  # one build at a time


def test_without_wait_only_a_started_worker_builds(
    processes: TreeProcesses, ztoc_bytes: bytes
) -> None:
    processes.start()
    assert processes.build(ztoc_bytes, userxattr=False, wait=False) is None  # still starting
    assert processes.fallbacks == 0 and processes.builds == 0
    deadline = time.monotonic() + 10
    while (built := processes.build(ztoc_bytes, userxattr=False, wait=False)) is None:
        assert time.monotonic() < deadline, "no worker started"
        time.sleep(0.02)
    assert _same(built[1], build_light(ztoc_bytes, userxattr=False)[1])
    assert processes.builds == 1 and processes.fallbacks == 0


def test_a_bad_ztoc_is_a_mount_error_and_the_workers_stay(
    processes: TreeProcesses, ztoc_bytes: bytes
) -> None:
    with pytest.raises(MountError, match="zTOC"):
        processes.build(b"\x00" * 64, userxattr=False)
    assert processes.build(ztoc_bytes, userxattr=False) is not None
    assert processes.fallbacks == 0


def test_killed_workers_give_way_then_are_replaced(
    processes: TreeProcesses, ztoc_bytes: bytes
) -> None:
    assert processes.build(ztoc_bytes, userxattr=False) is not None
    (old,) = processes.pids()
    os.kill(old, signal.SIGKILL)
    assert processes.build(ztoc_bytes, userxattr=False) is None  # the caller builds it
    assert processes.fallbacks == 1 and processes.running == 0 and not _alive(old)
    built = processes.build(ztoc_bytes, userxattr=False)
    assert built is not None and _same(built[1], build_light(ztoc_bytes, userxattr=False)[1])
    assert processes.pids() != [old] and processes.fallbacks == 1


def test_workers_run_in_their_own_session(processes: TreeProcesses) -> None:
    """A terminal's Ctrl-C (SIGINT to the foreground process group) does not reach them."""
    processes.start()
    pids = processes.pids()
    assert len(pids) == 2
    for pid in pids:
        assert os.getsid(pid) == pid and os.getpgid(pid) != os.getpgid(0)


def test_workers_exit_when_the_daemon_is_killed(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from snapshotter.remote.treeprocs import TreeProcesses\n"
        "p = TreeProcesses(2)\n"
        "p.start()\n"
        "print(*p.pids(), flush=True)\n"
        "time.sleep(60)\n"
    )
    daemon = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout is not None
        pids = [int(p) for p in daemon.stdout.readline().split()]
        assert len(pids) == 2 and all(Path(f"/proc/{pid}").exists() for pid in pids)
    finally:
        daemon.kill()
        daemon.wait()
        assert daemon.stdout is not None
        daemon.stdout.close()
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in pids):
        assert time.monotonic() < deadline, f"workers {pids} outlived their daemon"
        time.sleep(0.05)


def test_workers_that_cannot_start_are_given_up(
    monkeypatch: pytest.MonkeyPatch, ztoc_bytes: bytes
) -> None:
    monkeypatch.setattr(sys, "executable", "/bin/false")
    procs = TreeProcesses(1)
    try:
        for _ in range(treeprocs.MAX_FAILURES):
            assert procs.build(ztoc_bytes, userxattr=False) is None
        monkeypatch.undo()  # workers would start now: given up all the same
        assert procs.build(ztoc_bytes, userxattr=False) is None
        procs.start()
        assert procs.running == 0 and procs.builds == 0
        assert procs.fallbacks == treeprocs.MAX_FAILURES + 1
    finally:
        procs.close()


def test_idle_workers_stop_and_come_back(ztoc_bytes: bytes) -> None:
    procs = TreeProcesses(1, idle_sec=0.3)
    try:
        assert procs.seconds_to_idle() is None and procs.close_if_idle()
        assert procs.build(ztoc_bytes, userxattr=False) is not None
        wait = procs.seconds_to_idle()
        assert wait is not None and 0 < wait <= 0.3
        assert not procs.close_if_idle()
        time.sleep(0.35)
        assert procs.seconds_to_idle() == 0
        assert procs.close_if_idle() and not procs.running
        assert procs.build(ztoc_bytes, userxattr=False) is not None
        assert procs.builds == 2 and procs.fallbacks == 0
    finally:
        procs.close()


def test_closed_workers_exit_and_builds_fall_back(
    processes: TreeProcesses, ztoc_bytes: bytes
) -> None:
    assert processes.build(ztoc_bytes, userxattr=False) is not None
    pids = processes.pids()
    processes.close()
    assert pids and not any(_alive(pid) for pid in pids)
    assert processes.build(ztoc_bytes, userxattr=False) is None
    assert processes.fallbacks == 1 and processes.running == 0


async def test_small_ztocs_are_built_in_the_daemon(tmp_path: Path, ztoc_bytes: bytes) -> None:
    store = LocalStore(tmp_path)
    digest = Digest(store.content.write_blob(ztoc_bytes).digest)
    procs = TreeProcesses(1)
    try:
        async with open_task_scope("test") as scope:
            trees = LayerTrees(store, scope, processes=procs)
            trees.warm(len(ztoc_bytes))
            await trees.take(digest)
            assert procs.running == 0 and procs.builds == 0 and procs.fallbacks == 0
    finally:
        procs.close()
        store.close()


async def test_layer_trees_build_in_workers_and_stop_them_when_idle(
    tmp_path: Path, ztoc_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trees_module, "PROCESS_MIN_ZTOC_BYTES", len(ztoc_bytes))
    monkeypatch.setattr(trees_module, "PROCESS_WAIT_ZTOC_BYTES", len(ztoc_bytes))
    store = LocalStore(tmp_path)
    digest = Digest(store.content.write_blob(ztoc_bytes).digest)
    procs = TreeProcesses(1, idle_sec=0.3)
    try:
        async with open_task_scope("test") as scope:
            trees = LayerTrees(store, scope, processes=procs)
            trees.warm(len(ztoc_bytes) - 1)  # no zTOC goes to the workers: none starts
            await trio.sleep(0.1)
            assert procs.running == 0
            trees.warm(len(ztoc_bytes))  # the workers start before any zTOC is in
            with trio.fail_after(5):
                while procs.running < 1:
                    await trio.sleep(0.01)
            (warmed,) = procs.pids()
            light, tree = await trees.take(digest)
            assert procs.pids() == [warmed]
            assert _same(tree, build_light(ztoc_bytes, userxattr=False)[1])
            assert procs.builds == 1 and procs.running
            pids = procs.pids()
            await trio.sleep(0.6)  # real time: the workers are real processes
            assert not procs.running and pids and not any(_alive(pid) for pid in pids)
            assert (await trees.take(digest))[0] == light
            assert procs.builds == 2
    finally:
        procs.close()
    async with open_task_scope("test") as scope:
        with pytest.raises(MountError, match="not in the local store"):
            await LayerTrees(store, scope, processes=procs).take(Digest("sha256:" + "0" * 64))
    store.close()
