"""FUSE passthrough at its seams: the INIT and OPEN layouts, and the OPEN/RELEASE answers and
backing copies of `Passthrough` over a real `LayerHost` (the kernel's backing-file ioctls are
the seam: recorded here, real in tests/integration/test_fuse_passthrough.py).

What must hold: an inode open cached is never opened with a backing file and one open with a
backing file always gets the same one (the kernel fails the open otherwise); copies come only
from local, checked bytes; whatever goes wrong turns copies or passthrough off, never an
exception out of a request.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
import trio

from index.model import UncompressedOffset
from snapshotter.fs import protocol as p
from snapshotter.fs.host import STATE_DIR_NAME, STATUS_FILE_NAME, LayerHost
from snapshotter.fs.inodes import FUSE_ROOT_INODE
from snapshotter.fs.passthrough import (
    FH_CACHED,
    FH_PASSTHROUGH,
    FH_PLAIN,
    Passthrough,
    PassthroughConfig,
)
from snapshotter.fs.readers import LocalTarReader
from snapshotter.fs.tree import build_tree
from tests.support.fuselayers import entries_from_tar

BIG = os.urandom(3 * 1024 * 1024 + 5)
SMALL = b"small file\n"


def _init(minor: int = 45, flags2: int = p.PASSTHROUGH2, ext: bool = True) -> p.InitRequest:
    flags = p.WANTED_FLAGS | p.NO_OPEN_SUPPORT | (p.INIT_EXT if ext else 0)
    return p.parse_init(p.init_request(unique=1, major=7, minor=minor, flags=flags, flags2=flags2))


def test_passthrough_is_asked_for_only_when_wanted_and_offered() -> None:
    on = p.negotiate(_init(), passthrough=True)
    assert on.passthrough and on.minor == p.PASSTHROUGH_MINOR and on.flags & p.INIT_EXT
    reply = p.init_reply(_init(), on)
    fields = p.INIT_OUT.unpack_from(reply, p.OUT_HEADER.size)
    assert fields[3] & p.INIT_EXT and fields[10] == p.PASSTHROUGH2 and fields[11] == 1
    for init, wanted in (
        (_init(), False),
        (_init(minor=39), True),
        (_init(flags2=0), True),
        (_init(ext=False), True),
    ):
        off = p.negotiate(init, passthrough=wanted)
        assert not off.passthrough and off.minor == p.MINOR and not off.flags & p.INIT_EXT
        fields = p.INIT_OUT.unpack_from(p.init_reply(init, off), p.OUT_HEADER.size)
        assert fields[10] == 0 and fields[11] == 0


def test_open_out_and_ioctl_layouts_are_the_kernels() -> None:
    out = p.open_out(7, p.FOPEN_PASSTHROUGH, 3)
    assert len(out) == 16
    assert int.from_bytes(out[:8], "little") == 7
    assert int.from_bytes(out[8:12], "little") == 1 << 7
    assert int.from_bytes(out[12:16], "little", signed=True) == 3
    assert p.FUSE_DEV_IOC_BACKING_OPEN == 0x4010E501  # _IOW(229, 1, struct fuse_backing_map)
    assert p.FUSE_DEV_IOC_BACKING_CLOSE == 0x4004E502  # _IOW(229, 2, uint32_t)
    assert p.BACKING_MAP.size == 16 and p.RELEASE_IN.size == 24


class Recorded(Passthrough):
    """`Passthrough` with the kernel's ioctls recorded (ids 1, 2, ...), or refused."""

    def __init__(self, *args: object, refuse: bool = False, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.registered: dict[int, bytes] = {}
        self.closed: list[int] = []
        self.refuse = refuse

    def backing_open(self, path: Path) -> int:
        if self.refuse:
            raise PermissionError(1, "Operation not permitted")
        backing_id = len(self.registered) + 1
        self.registered[backing_id] = path.read_bytes()
        return backing_id

    def backing_close(self, backing_id: int) -> None:
        self.closed.append(backing_id)


class LocalOnly(LocalTarReader):
    """A tar reader whose `read_local` can be switched off (bytes not local)."""

    local = True

    async def read_local(self, offset: UncompressedOffset, size: int) -> bytes | None:
        return await super().read_local(offset, size) if self.local else None


@pytest.fixture
def layer_tar(tmp_path: Path) -> Path:
    path = tmp_path / "layer.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in (("big", BIG), ("small", SMALL)):
            info = tarfile.TarInfo(name)
            info.mode = 0o644
            info.mtime = 1_700_000_000
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _host(layer_tar: Path, name: str = "l1") -> tuple[LayerHost, LocalOnly]:
    entries, _ = entries_from_tar(layer_tar)
    reader = LocalOnly(layer_tar)
    host = LayerHost()
    host.add_layer(name, build_tree(entries), reader)
    return host, reader


def _inode(host: LayerHost, name: str, layer: str = "l1") -> int:
    root = host.lookup(FUSE_ROOT_INODE, layer.encode())
    return host.lookup(root.inode, name.encode()).inode


def _release(fh: int) -> memoryview:
    return memoryview(p.RELEASE_IN.pack(fh, 0, 0, 0))


def _answer(out: bytes) -> tuple[int, int, int]:
    fh, flags, backing_id = p.OPEN_OUT.unpack(out)
    return fh, flags, backing_id


async def _read_whole(host: LayerHost, inode: int, size: int) -> bytes:
    return await host.read(inode, 0, size)


def _attached(host: LayerHost, directory: Path, nursery: trio.Nursery, **settings: Any) -> Recorded:
    """A `Recorded` serving connection fd -1 (never used: the ioctls are recorded), copies of
    at least 1 MiB (unless `settings` say) in `directory`."""
    settings.setdefault("min_file_bytes", 1 << 20)
    refuse = settings.pop("refuse", False)
    pt = Recorded(host, PassthroughConfig(directory, **settings), refuse=refuse)
    pt.clear()
    pt.attach(-1, nursery)
    return pt


def _cycle(pt: Passthrough, inode: int, times: int = 1) -> None:
    """Open `inode` and release it, `times` times."""
    for _ in range(times):
        pt.release(inode, _release(_answer(pt.open(inode))[0]))


async def _comes_back(pt: Passthrough, host: LayerHost, inode: int) -> None:
    """`inode` (BIG) read whole, then opened and closed twice: its copy is made."""
    await _read_whole(host, inode, len(BIG))
    _cycle(pt, inode, 2)
    await _settle()


async def _settle() -> None:
    await trio.testing.wait_all_tasks_blocked()
    for _ in range(50):
        await trio.sleep(0.01)


async def test_a_file_read_whole_is_copied_and_then_passed_through(
    layer_tar: Path, tmp_path: Path
) -> None:
    host, _ = _host(layer_tar)
    big = _inode(host, "big")
    async with trio.open_nursery() as nursery:
        pt = _attached(host, tmp_path / "pt", nursery)
        fh, flags, _ = _answer(pt.open(big))
        assert (fh, flags) == (FH_CACHED, p.FOPEN_KEEP_CACHE)
        assert await _read_whole(host, big, len(BIG)) == BIG  # checks the tar header too
        pt.release(big, _release(fh))
        await _settle()
        assert pt.copied == 0, "read once: not copied"
        _cycle(pt, big)
        await _settle()
        assert pt.copied == 1 and not pt.registered  # registered at the next open only
        first = _answer(pt.open(big))
        second = _answer(pt.open(big))
        assert first == second == (FH_PASSTHROUGH, p.FOPEN_PASSTHROUGH, 1)
        assert pt.registered == {1: BIG}  # the copy holds the file's bytes
        pt.release(big, _release(FH_PASSTHROUGH))
        assert _answer(pt.open(big))[2] == 1, "the id stays with the inode"
        assert pt.opened == {"plain": 0, "cached": 2, "passthrough": 3}


async def test_an_inode_open_cached_is_not_opened_with_a_backing_file(
    layer_tar: Path, tmp_path: Path
) -> None:
    host, _ = _host(layer_tar)
    big = _inode(host, "big")
    async with trio.open_nursery() as nursery:
        pt = _attached(host, tmp_path / "pt", nursery)
        _cycle(pt, big)
        a = _answer(pt.open(big))[0]
        b = _answer(pt.open(big))[0]
        await _read_whole(host, big, len(BIG))
        pt.release(big, _release(a))
        await _settle()
        assert pt.copied == 0, "copied only once no cached open is left"
        pt.release(big, _release(b))
        await _settle()
        assert pt.copied == 1
        c = _answer(pt.open(big))
        assert c[0] == FH_PASSTHROUGH
        # a copy finished while an inode is open cached waits for that open to end
        pt2 = _attached(host, tmp_path / "pt2", nursery)
        _cycle(pt2, big, 2)
        await _settle()
        assert _answer(pt2.open(big))[0] == FH_PASSTHROUGH
        # the other connection's cached open is no concern of this one
        e = _answer(pt.open(big))
        assert e == c


async def test_small_unread_unlocal_or_over_budget_files_are_not_copied(
    layer_tar: Path, tmp_path: Path
) -> None:
    host, reader = _host(layer_tar)
    big, small = _inode(host, "big"), _inode(host, "small")
    async with trio.open_nursery() as nursery:
        pt = _attached(host, tmp_path / "pt", nursery)
        await _read_whole(host, small, len(SMALL))
        _cycle(pt, small, 2)
        # never read: its tar header is unchecked, so nothing is copied
        _cycle(pt, big, 2)
        await _settle()
        assert pt.copied == 0
        await _read_whole(host, big, len(BIG))
        reader.local = False
        _cycle(pt, big)
        await _settle()
        assert pt.copied == 0 and os.listdir(tmp_path / "pt") == ["ids"], "no partial copy left"
        reader.local = True
        tight = _attached(host, tmp_path / "tight", nursery, max_bytes=len(BIG) - 1)
        _cycle(tight, big, 2)
        await _settle()
        assert tight.copied == 0 and tight.statistics()["bytes"] == 0


async def test_the_status_file_is_opened_plain(layer_tar: Path, tmp_path: Path) -> None:
    host, _ = _host(layer_tar)
    root = host.lookup(FUSE_ROOT_INODE, b"l1")
    state = host.lookup(root.inode, STATE_DIR_NAME)
    status = host.lookup(state.inode, STATUS_FILE_NAME)
    pt = Recorded(host, PassthroughConfig(tmp_path / "pt"))
    assert _answer(pt.open(status.inode)) == (FH_PLAIN, 0, 0)


async def test_a_refused_backing_file_leaves_the_file_cached(
    layer_tar: Path, tmp_path: Path
) -> None:
    host, _ = _host(layer_tar)
    big = _inode(host, "big")
    async with trio.open_nursery() as nursery:
        pt = _attached(host, tmp_path / "pt", nursery, refuse=True)
        await _comes_back(pt, host, big)
        assert pt.copied == 1
        assert _answer(pt.open(big))[:2] == (FH_CACHED, p.FOPEN_KEEP_CACHE)
        assert pt.copy_off is not None and "refused" in pt.copy_off
        assert os.listdir(tmp_path / "pt") == ["ids"] and pt.statistics()["bytes"] == 0
        pt.refuse = False  # tried once only: the file stays cached
        assert _answer(pt.open(big))[0] == FH_CACHED and not pt.registered


async def test_an_unwritable_directory_stops_copies_without_an_error(
    layer_tar: Path, tmp_path: Path
) -> None:
    host, _ = _host(layer_tar)
    big = _inode(host, "big")
    async with trio.open_nursery() as nursery:
        pt = _attached(host, tmp_path / "pt", nursery)
        shutil.rmtree(tmp_path / "pt")
        (tmp_path / "pt").write_text("a file where the directory was")
        await _comes_back(pt, host, big)
        assert pt.copied == 0 and pt.copy_off is not None
        assert pt.statistics()["bytes"] == 0
        assert _answer(pt.open(big))[0] == FH_CACHED


async def test_a_removed_layer_closes_its_ids_and_its_inodes_get_none_again(
    layer_tar: Path, tmp_path: Path
) -> None:
    host, _ = _host(layer_tar)
    big = _inode(host, "big")
    async with trio.open_nursery() as nursery:
        pt = _attached(host, tmp_path / "pt", nursery)
        await _comes_back(pt, host, big)
        assert _answer(pt.open(big))[0] == FH_PASSTHROUGH
        slot = host.remove_layer("l1")
        pt.forget_layer(slot)
        assert pt.closed == [1] and os.listdir(tmp_path / "pt") == ["ids"]
        entries, _ = entries_from_tar(layer_tar)
        host.add_layer("l1", build_tree(entries), LocalTarReader(layer_tar), slot=slot)
        assert _inode(host, "big") == big
        # the kernel may still hold the old backing file for this inode: never another one
        await _read_whole(host, big, len(BIG))
        _cycle(pt, big, 3)
        await _settle()
        assert _answer(pt.open(big))[0] == FH_CACHED and pt.registered.keys() == {1}
        assert _answer(pt.open(_inode(host, "small")))[0] == FH_CACHED


async def test_an_adopted_connection_answers_the_journaled_ids_and_copies_nothing(
    layer_tar: Path, tmp_path: Path
) -> None:
    host, _ = _host(layer_tar)
    big, small = _inode(host, "big"), _inode(host, "small")
    async with trio.open_nursery() as nursery:
        first = _attached(host, tmp_path / "pt", nursery)
        await _comes_back(first, host, big)
        assert _answer(first.open(big)) == (FH_PASSTHROUGH, p.FOPEN_PASSTHROUGH, 1)
        # the process dies with the file open; the next one adopts the connection
        with open(tmp_path / "pt" / "ids", "ab") as journal:
            journal.write(b"open 12")  # a line cut short by the crash
        second = Recorded(host, PassthroughConfig(tmp_path / "pt", min_file_bytes=1 << 20))
        assert second.adopt()
        second.attach(-1, nursery)
        assert _answer(second.open(big)) == (FH_PASSTHROUGH, p.FOPEN_PASSTHROUGH, 1)
        assert _answer(second.open(small))[0] == FH_CACHED
        assert not second.registered, "nothing registered again"
        await _read_whole(host, small, len(SMALL))
        _cycle(second, small, 3)
        await _settle()
        assert second.copied == 0 and second.copy_off is not None
        # a layer now in that slot under another name never gets the old file's bytes
        slot = host.remove_layer("l1")
        entries, _ = entries_from_tar(layer_tar)
        host.add_layer("l2", build_tree(entries), LocalTarReader(layer_tar), slot=slot)
        assert _answer(second.open(big))[0] == FH_CACHED
    assert not Recorded(host, PassthroughConfig(tmp_path / "none")).adopt(), "no journal"


async def test_a_backing_directory_that_cannot_be_made_stops_copies_only(
    layer_tar: Path, tmp_path: Path
) -> None:
    host, _ = _host(layer_tar)
    (tmp_path / "file").write_text("not a directory")
    pt = Recorded(host, PassthroughConfig(tmp_path / "file" / "pt"))
    pt.clear()  # no exception: the daemon starts, files stay cached
    assert pt.copy_off is not None and "cannot empty or create" in pt.copy_off
    assert _answer(pt.open(_inode(host, "big")))[0] == FH_CACHED
