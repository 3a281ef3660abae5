"""FUSE passthrough with the real kernel: a layer file read whole through an overlayfs view
twice is copied to a backing file, and its later reads and mmaps, through the same view, come from that
copy (the daemon serves no byte of them), with the same bytes and in the large page-cache
folios of the backing filesystem; small files stay with the daemon; removing the layer
deletes the copy."""

from __future__ import annotations

import hashlib
import mmap
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bench.page_cache_folios import folio_sizes
from tests.integration.test_fuse_page_cache import served
from tests.support.fuselayers import FuseServer, LayerBlob, fuse_server
from tests.support.images import File, write_layer

pytestmark = pytest.mark.root

BIG = 8 * 1024 * 1024 + 4321


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FuseServer]:
    if os.geteuid() != 0:
        pytest.skip("FUSE and overlay mounts need root (this test runs as root in CI)")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing: FUSE is not available on this machine")
    layer = write_layer(
        [File(path="big", size=BIG), File(path="dir/small", size=5000)], tmp_path / "blobs"
    )
    with fuse_server(
        tmp_path, [LayerBlob("l", layer.path, span_size=1 << 20)], passthrough_min_bytes=1 << 20
    ) as srv:
        if "the kernel does not offer it" in srv.log():
            pytest.skip(f"this kernel ({os.uname().release}) offers no FUSE passthrough")
        yield srv


@pytest.fixture
def view(server: FuseServer, tmp_path: Path) -> Iterator[Path]:
    """A read-only overlayfs view whose lower is the layer, as containerd mounts one."""
    empty, view = tmp_path / "empty", tmp_path / "view"
    empty.mkdir()
    view.mkdir()
    lower = server.mountpoint / "l"
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lower}:{empty}", view],
        check=True,
    )
    try:
        yield view
    finally:
        subprocess.run(["umount", view], check=False)


def read(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def wait_for_copy(directory: Path, timeout_s: float = 20.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        names = [n for n in os.listdir(directory) if not n.endswith(".tmp") and n != "ids"]
        if names:
            return names
        time.sleep(0.05)
    raise AssertionError(f"no backing file in {directory} after {timeout_s} s")


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def test_a_file_read_whole_is_then_read_from_its_copy(
    server: FuseServer, view: Path, tmp_path: Path
) -> None:
    first = read(view / "big")
    assert len(first) == BIG
    assert served(server) == BIG
    time.sleep(0.5)
    assert os.listdir(tmp_path / "passthrough") == ["ids"], "read once: not copied"
    assert read(view / "big") == first  # the file comes back: now it is copied
    names = wait_for_copy(tmp_path / "passthrough")
    assert len(names) == 1
    assert (tmp_path / "passthrough" / names[0]).read_bytes() == first
    before = served(server)  # the second read: from the daemon, or its page cache
    drop_caches()  # nothing of the file is in any page cache now
    again = read(view / "big")
    assert hashlib.sha256(again).digest() == hashlib.sha256(first).digest()
    assert served(server) == before, "the third read came from the backing file"
    with open(view / "big", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m[:4096] == first[:4096] and m[-4096:] == first[-4096:]
    assert served(server) == before
    # the kernel serves the view's pages from the backing file's large folios
    _, folios = folio_sizes(str(view / "big"))
    assert max(folios) > 4, folios
    small = read(view / "dir" / "small")
    assert len(small) == 5000 and served(server) == before + 5000
    for _ in range(2):
        read(view / "dir" / "small")
    assert served(server) == before + 3 * 5000, "files below the minimum stay with the daemon"


def test_removing_the_layer_deletes_its_copy(server: FuseServer, tmp_path: Path) -> None:
    for _ in range(2):
        read(server.mountpoint / "l" / "big")
    wait_for_copy(tmp_path / "passthrough")
    with open(server.mountpoint / "l" / "big", "rb") as f:  # passed through, held open
        assert server.control([{"remove": "l"}]) == ["ok"]
        assert os.listdir(tmp_path / "passthrough") == ["ids"]
        assert len(f.read()) == BIG, "an open file keeps its backing file"
