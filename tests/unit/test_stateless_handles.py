"""Handles a daemon handed out are answered by the next one: a file or directory handle is
its inode number, so a second `LayerHost` with the same layer in the same slot (what a
restarted daemon builds from the restore records) reads files and resumes listings on
handles opened by the first, with the same bytes and the same offsets."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from snapshotter.fs.errors import BadHandle, LayerReadError
from snapshotter.fs.host import STATE_DIR_NAME, STATUS_FILE_NAME, LayerHost
from snapshotter.fs.inodes import FUSE_ROOT_INODE
from snapshotter.fs.readers import LocalTarReader
from snapshotter.fs.tree import build_tree
from tests.support.fuselayers import entries_from_tar


def _layer(tmp_path: Path) -> Path:
    path = tmp_path / "layer.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(40):
            data = f"file {i}\n".encode() * (i + 1)
            info = tarfile.TarInfo(f"dir/f{i:02d}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _host(path: Path) -> LayerHost:
    host = LayerHost()
    entries, _ = entries_from_tar(path)
    host.add_layer("snap-7", build_tree(entries), LocalTarReader(path), slot=42)
    return host


async def test_a_second_host_answers_the_first_hosts_handles(tmp_path: Path) -> None:
    path = _layer(tmp_path)
    first, second = _host(path), _host(path)
    layer = first.lookup(FUSE_ROOT_INODE, b"snap-7").inode
    directory = first.lookup(layer, b"dir").inode
    dir_fh = first.opendir(directory)
    listing = list(first.readdir(dir_fh, 0))
    middle = listing[20].next_offset
    # The restarted host resumes the listing at an offset the first one handed out.
    resumed = [(x.name, x.attr.inode, x.next_offset) for x in second.readdir(dir_fh, middle)]
    assert resumed == [(x.name, x.attr.inode, x.next_offset) for x in listing[21:]]
    file_fh = first.lookup(directory, b"f07").inode  # files are read by inode
    assert await second.read(file_fh, 0, 1000) == b"file 7\n" * 8
    assert await second.read(file_fh, 7, 7) == b"file 7\n"
    second.releasedir(dir_fh)
    # The status file is rendered when read, from the host that reads it.
    state = second.lookup(layer, STATE_DIR_NAME).inode
    status_fh = first.lookup(state, STATUS_FILE_NAME).inode
    assert b'"layer": "snap-7"' in await second.read(status_fh, 0, 4096)
    # A handle of a layer the new host does not serve fails as a read error (EIO).
    other = LayerHost()
    with pytest.raises(LayerReadError):
        await other.read(file_fh, 0, 10)
    with pytest.raises(BadHandle):
        await second.read(directory, 0, 10)  # a directory is no file handle
