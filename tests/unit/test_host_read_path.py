"""The host's read path: a file's first read checks its tar header in the same reader call as
its data when it starts at the file's start, and in a call of its own otherwise."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from index.model import UncompressedOffset
from snapshotter.fs.errors import HeaderMismatch
from snapshotter.fs.host import LayerHost
from snapshotter.fs.inodes import FUSE_ROOT_INODE
from snapshotter.fs.readers import LocalTarReader
from snapshotter.fs.tree import build_tree
from tests.support.fuselayers import entries_from_tar

CONTENTS = bytes(range(256)) * 64


class CountingReader:
    """A `LayerReader` over a tar file that records each call."""

    def __init__(self, path: Path) -> None:
        self.inner = LocalTarReader(path)
        self.calls: list[tuple[int, int]] = []

    async def read(
        self, offset: UncompressedOffset, size: int, file_end: int | None = None
    ) -> bytes:
        self.calls.append((int(offset), size))
        return await self.inner.read(offset, size)


@pytest.fixture
def layer_tar(tmp_path: Path) -> Path:
    path = tmp_path / "layer.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name in ("a", "b"):
            info = tarfile.TarInfo(name)
            info.mode = 0o644
            info.mtime = 1_700_000_000
            info.size = len(CONTENTS)
            tf.addfile(info, io.BytesIO(CONTENTS))
    return path


def _open(host: LayerHost, name: str) -> int:
    layer = host.lookup(FUSE_ROOT_INODE, b"l1")
    return host.lookup(layer.inode, name.encode()).inode


async def test_first_read_from_the_start_is_one_reader_call(layer_tar: Path) -> None:
    entries, _ = entries_from_tar(layer_tar)
    reader = CountingReader(layer_tar)
    host = LayerHost()
    host.add_layer("l1", build_tree(entries), reader)
    fh = _open(host, "a")
    assert await host.read(fh, 0, 1000) == CONTENTS[:1000]
    assert len(reader.calls) == 1
    assert reader.calls[0][1] > 1000  # the header blocks, then the data
    assert await host.read(fh, 1000, 24) == CONTENTS[1000:1024]
    assert len(reader.calls) == 2  # verified once: data only from now on
    assert reader.calls[1][1] == 24
    assert host.status("l1").read_errors == 0


async def test_first_read_further_in_checks_the_header_first(layer_tar: Path) -> None:
    entries, _ = entries_from_tar(layer_tar)
    reader = CountingReader(layer_tar)
    host = LayerHost()
    host.add_layer("l1", build_tree(entries), reader)
    fh = _open(host, "b")
    assert await host.read(fh, 5000, 100_000) == CONTENTS[5000:]
    (header_start, header_size), (data_start, data_size) = reader.calls
    assert data_start == header_start + header_size + 5000
    assert data_size == len(CONTENTS) - 5000
    assert await host.read(fh, 0, 10) == CONTENTS[:10]
    assert len(reader.calls) == 3


async def test_a_forged_header_fails_the_combined_read(layer_tar: Path) -> None:
    entries, _ = entries_from_tar(layer_tar)
    forged = [e._replace(mode=0o600) if e.name == "a" else e for e in entries]
    reader = CountingReader(layer_tar)
    host = LayerHost()
    host.add_layer("l1", build_tree(forged), reader)
    fh = _open(host, "a")
    with pytest.raises(HeaderMismatch, match="mode"):
        await host.read(fh, 0, 10)
    with pytest.raises(HeaderMismatch):  # still unverified: checked again, still refused
        await host.read(fh, 0, 10)
    assert host.status("l1").read_errors == 2
