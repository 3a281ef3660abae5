"""FUSE request counters (`snapshotter.fs.fuse.FuseOpStats`): per handler counts and the trio
thread's CPU time of the handler's own task steps, not of tasks that ran while it waited; and
the handlers' cheap paths (an xattr miss answered without a domain exception)."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest
import trio

from index.model import EntryType, FileMetadata, UncompressedOffset
from snapshotter.fs import protocol as p
from snapshotter.fs.fuse import FUSE_OP_STATS, FUSE_OPS, FuseOperations, FuseOpStats
from snapshotter.fs.host import LayerHost
from snapshotter.fs.inodes import FUSE_ROOT_INODE, make_inode
from snapshotter.fs.readers import LocalTarReader
from snapshotter.fs.tree import build_tree
from tests.support.fuserequests import Client, Failed, request


def burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def other_task() -> None:
    await trio.sleep(0.01)
    burn(0.1)


async def handler(stats: FuseOpStats, op: str, before: float, after: float) -> None:
    task = stats.enter(op)
    try:
        burn(before)
        await trio.sleep(0.05)  # other tasks run here
        burn(after)
    finally:
        stats.exit(op, task)


async def test_counts_and_cpu_of_own_steps_only() -> None:
    stats = FuseOpStats()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handler, stats, "read", 0.02, 0.02)
        nursery.start_soon(handler, stats, "read", 0.0, 0.0)
        nursery.start_soon(other_task)  # not a request: never counted
        await trio.sleep(0.01)
        task = stats.enter("getattr")
        stats.exit("getattr", task)
    s = stats.statistics()
    assert s.counts == {"read": 2, "getattr": 1}
    # The two reads spent ~40 ms of their own; the 100 ms burn ran while they slept.
    assert 0.035 <= s.cpu_sec["read"] < 0.09
    assert s.cpu_sec["getattr"] < 0.01
    # The thread serving requests also ran the 100 ms burn: all of it is in its total.
    assert s.trio_thread_cpu_sec >= 0.1 + s.cpu_sec["read"]
    assert s.to_status()["read"]["count"] == 2
    assert list(s.to_status()) == ["getattr", "read"]


async def test_instrument_added_once_per_run() -> None:
    stats = FuseOpStats()
    for _ in range(3):
        stats.exit("lookup", stats.enter("lookup"))
    await trio.sleep(0)
    assert stats.statistics().counts == {"lookup": 3}
    trio.lowlevel.remove_instrument(stats)  # raises KeyError if it had not been added


def test_every_request_the_server_answers_is_counted() -> None:
    stats_before = FUSE_OP_STATS.statistics().counts
    client = Client(FuseOperations(LayerHost()))
    client.getattr(FUSE_ROOT_INODE)
    with pytest.raises(Failed):
        client.lookup(FUSE_ROOT_INODE, b"nope")
    client.ops.handle(request(p.FORGET, 5, bytes(8)))
    counts = FUSE_OP_STATS.statistics().counts
    for op in ("getattr", "lookup", "forget"):
        assert counts[op] == stats_before.get(op, 0) + 1, op
    handled = {op for op, _ in client.ops._handlers.values()}
    assert handled == set(FUSE_OPS) - {"read"}


def _host_with_xattr() -> tuple[LayerHost, int, int]:
    """A host with layer `l`: `a` has xattr user.k = v, `b` has none. Returns the host and
    the inodes of `a` and `b`."""
    entries = [
        FileMetadata(
            name=name,
            type=EntryType.REG,
            uncompressed_offset=UncompressedOffset(512 * (i * 2 + 1)),
            uncompressed_size=0,
            mod_time="2023-11-14T22:13:20Z",
            mode=0o644,
            xattrs=xattrs,
        )
        for i, (name, xattrs) in enumerate((("a", {"SCHILY.xattr.user.k": "v"}), ("b", {})))
    ]
    host = LayerHost()
    host.add_layer("l", build_tree(entries), LocalTarReader(Path("/nonexistent")))
    layer = host.lookup(FUSE_ROOT_INODE, b"l").inode
    return host, host.lookup(layer, b"a").inode, host.lookup(layer, b"b").inode


async def test_getxattr_answers_a_miss_without_the_domain_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host, a, b = _host_with_xattr()
    ops = Client(FuseOperations(host))
    assert ops.getxattr(a, b"user.k") == b"v"
    assert ops.getxattr(a, b"user.k", size=0) == p.GETXATTR_OUT.pack(1, 0)
    assert ops.listxattr(a) == b"user.k\0"
    calls: list[int] = []
    real = LayerHost.getxattr

    def counting(self: LayerHost, inode: int, name: bytes) -> bytes:
        calls.append(inode)
        return real(self, inode, name)

    monkeypatch.setattr(LayerHost, "getxattr", counting)
    for inode, name in (
        (b, b"trusted.overlay.opaque"),
        (a, b"user.other"),
        (FUSE_ROOT_INODE, b"x"),
    ):
        with pytest.raises(Failed) as info:
            ops.getxattr(inode, name)
        assert info.value.errno == errno.ENODATA
    assert calls == []
    with pytest.raises(Failed) as info:
        ops.getxattr(make_inode(4000, 5), b"user.k")  # no such layer
    assert info.value.errno == errno.ENOENT
