"""Pushing the small files after a file read (`snapshotter.fs.push`): which files the host
gives (`LayerHost.files_after`: whole, in tar order, at hand only, nothing fetched, within
the budget) and the store notifications the pusher writes, one per write, each file once
until a READ shows the kernel lacks it. Real span cache and reader, an in-memory blob source;
the notifications go to a pipe instead of a FUSE connection."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import trio

from snapshotter.fs import LayerHost, build_tree
from snapshotter.fs import protocol as p
from snapshotter.fs.inodes import FUSE_ROOT_INODE
from snapshotter.fs.push import Pusher
from snapshotter.fs.tree import NodeId
from tests.support.lazylayer import Layer, MemorySource
from tests.unit.test_read_now import make_reader


@pytest.fixture(scope="module")
def layer() -> Layer:
    return Layer(files=30, size=3000)  # about 20 files in a 64 KiB span


def inode_of(host: LayerHost, name: str) -> int:
    attr = host.lookup(FUSE_ROOT_INODE, b"l")
    for part in name.split("/"):
        attr = host.lookup(attr.inode, part.encode())
    assert stat.S_ISREG(attr.mode)
    return attr.inode


def list_after(host: LayerHost, fh: int, **kw: Any) -> list[tuple[int, bytes]]:
    return list(host.files_after(fh, **kw))


async def host_of(layer: Layer, tmp_path: Path) -> tuple[LayerHost, MemorySource]:
    source = MemorySource(layer.blob)
    host = LayerHost()
    reader = make_reader(layer, source, tmp_path)
    host.add_layer("l", build_tree(list(layer.ztoc.files)), reader, digest=str(layer.digest))
    return host, source


async def test_the_host_gives_the_whole_files_after_one_that_are_at_hand(
    layer: Layer, tmp_path: Path
) -> None:
    host, source = await host_of(layer, tmp_path)
    files = layer.files()
    names = sorted(files, key=lambda n: files[n][0])  # tar order
    first = inode_of(host, names[0])
    kw = {"max_bytes": 1 << 20, "max_file_bytes": 1 << 20, "scan": 64, "chunk_bytes": 1 << 18}
    assert list_after(host, first, skip=set(), **kw) == []  # nothing at hand: nothing fetched
    assert source.calls == []
    assert await host.read(first, 0, 100) == files[names[0]][1][:100]  # fetches span 0
    calls = len(source.calls)
    got = list_after(host, first, skip=set(), **kw)
    assert 5 < len(got) < len(names) - 1  # up to the first file not wholly in memory
    for (inode, data), name in zip(got, names[1:], strict=False):
        assert inode == inode_of(host, name) and data == files[name][1]
    after = names[len(got) + 1]
    assert host.read_now(inode_of(host, after), 0, len(files[after][1])) is None  # not at hand
    assert len(source.calls) == calls  # nothing fetched for them
    status = host.status("l")
    assert status.bytes_pushed == sum(len(d) for _, d in got)
    assert status.bytes_served == 100  # pushes are not READs
    # the budget, the file size bound, the files to skip
    sizes = [len(d) for _, d in got]
    assert len(list_after(host, first, skip=set(), **{**kw, "max_bytes": sizes[0] + sizes[1]})) == 2
    assert list_after(host, first, skip=set(), **{**kw, "max_file_bytes": 100}) == []
    skipped = list_after(host, first, skip={got[0][0]}, **kw)
    assert [i for i, _ in skipped] == [i for i, _ in got[1:]]
    assert list_after(host, FUSE_ROOT_INODE, skip=set(), **kw) == []
    # read in runs of one file each: the same files
    assert list_after(host, first, skip=set(), **{**kw, "chunk_bytes": 1}) == got


def test_the_tree_walks_files_in_tar_order(layer: Layer) -> None:
    tree = build_tree(list(layer.ztoc.files))
    regular = [n for n in range(tree.node_count) if stat.S_ISREG(tree.attr(NodeId(n)).mode)]
    assert list(tree.files_after(NodeId(0), 1000, 1 << 20)) == regular
    assert list(tree.files_after(NodeId(regular[0]), 3, 1 << 20)) == regular[1:4]
    assert list(tree.files_after(NodeId(0), 1000, 10)) == []  # all larger


def read_messages(fd: int) -> list[tuple[int, int, int, bytes]]:
    """(notify code, nodeid, offset, data) of each notification in the pipe."""
    out: list[tuple[int, int, int, bytes]] = []
    while True:
        try:
            head = os.read(fd, p.OUT_HEADER.size)
        except BlockingIOError:
            return out
        length, code, unique = p.OUT_HEADER.unpack(head)
        assert unique == 0
        body = os.read(fd, length - p.OUT_HEADER.size)
        nodeid, offset, size, _ = p.STORE_OUT.unpack_from(body)
        data = body[p.STORE_OUT.size :]
        assert len(data) == size
        out.append((code, nodeid, offset, data))


def read_request(inode: int, offset: int) -> bytes:
    body = p.READ_IN.pack(0, offset, 4096, 0, 0, 0, 0)
    return p.IN_HEADER.pack(p.IN_HEADER.size + len(body), p.READ, 2, inode, 0, 0, 1, 0, 0) + body


async def stores(fd: int, count: int) -> list[tuple[int, int, int, bytes]]:
    """The next `count` notifications written to the pipe (the writer thread's)."""
    got: list[tuple[int, int, int, bytes]] = []
    with trio.fail_after(10):
        while len(got) < count:
            got += read_messages(fd)
            await trio.sleep(0.01)
    assert len(got) == count
    return got


async def test_the_pusher_writes_one_store_per_file_once(layer: Layer, tmp_path: Path) -> None:
    host, _ = await host_of(layer, tmp_path)
    files = layer.files()
    names = sorted(files, key=lambda n: files[n][0])
    first = inode_of(host, names[0])
    await host.read(first, 0, 100)
    r, w = os.pipe()
    os.set_blocking(r, False)
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)  # every store fits: nothing waits for a reader
    fds = len(os.listdir("/proc/self/fd"))
    pusher = Pusher(host, w, max_bytes=1 << 20)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pusher.run)
            assert pusher.after_read(read_request(first, 4096)) == 0  # not its start
            queued = pusher.after_read(read_request(first, 0))
            assert queued > 5
            messages = await stores(r, queued)
            assert [(c, o) for c, _, o, _ in messages] == [(p.NOTIFY_STORE, 0)] * queued
            assert [(n, d) for _, n, _, d in messages] == [
                (inode_of(host, name), files[name][1]) for name in names[1 : queued + 1]
            ]
            assert pusher.after_read(read_request(first, 0)) == 0  # pushed already
            # a READ of a pushed file: the kernel lacks it, so it is pushed again after the
            # next read that starts a file before it
            second = messages[0][1]
            assert pusher.after_read(read_request(second, 4096)) == 0
            assert pusher.after_read(read_request(first, 0)) == 1
            assert [n for _, n, _, _ in await stores(r, 1)] == [second]
            pusher.reading[second] += 1  # a READ in flight: not pushed
            pusher.after_read(read_request(second, 4096))
            assert pusher.after_read(read_request(first, 0)) == 0
            with trio.fail_after(10):  # counted once its write(2) returned
                while pusher.statistics()["files"] < queued + 1:
                    await trio.sleep(0.01)
            assert pusher.statistics()["files"] == queued + 1
            pusher.close()
        assert pusher.after_read(read_request(first, 0)) == 0  # closed: nothing more
        assert len(os.listdir("/proc/self/fd")) == fds  # the writer closed its copy of the fd
    finally:
        pusher.close()
        os.close(r)
        os.close(w)


async def test_finish_waits_for_the_store_being_written(layer: Layer, tmp_path: Path) -> None:
    host, _ = await host_of(layer, tmp_path)
    files = layer.files()
    first = inode_of(host, min(files, key=lambda n: files[n][0]))
    await host.read(first, 0, 100)
    r, w = os.pipe()
    os.set_blocking(r, False)
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)  # one page: the second store waits for a reader
    pusher = Pusher(host, w, max_bytes=1 << 20)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pusher.run)
            assert pusher.after_read(read_request(first, 0)) > 2
            await trio.sleep(0.2)
            assert not await pusher.finish(0.2)  # a write waits (as for a READ's page lock)
            drained = 0
            with trio.fail_after(10):
                while not await pusher.finish(0.05):
                    with contextlib.suppress(BlockingIOError):
                        drained += len(os.read(r, 1 << 16))
            assert drained >= 1
            assert pusher.after_read(read_request(first, 0)) == 0  # finished: nothing more
    finally:
        os.close(r)
        os.close(w)
