"""Real mounts under a directory whose name has a space and non-ASCII letters are found by the
one mountinfo parser, and detached (bind mounts) or cleaned up (the FUSE layer host)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from snapshotter.fs.fuse import READ_AHEAD_KB, cleanup_stale_mount
from snapshotter.mountinfo import is_mountpoint, mount_at, mounts_under
from snapshotter.remote import bindmount
from tests.support.fuselayers import LayerBlob, fuse_server
from tests.support.images import File, write_layer

pytestmark = pytest.mark.root

ODD_NAME = "søciable dir"


@pytest.fixture
def odd_root(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("PREREQUISITE MISSING: root (mount)")
    root = tmp_path / ODD_NAME
    root.mkdir()
    return root


def test_bind_mounts_under_a_non_ascii_root_are_found_and_detached(odd_root: Path) -> None:
    source = odd_root / "source dir"
    source.mkdir()
    (source / "f").write_text("x")
    targets = [odd_root / "snapshots" / n / "fs" for n in ("1", "2 two")]
    try:
        for target in targets:
            target.mkdir(parents=True)
            bindmount.bind(source, target)
        assert (targets[1] / "f").read_text() == "x"
        found = mount_at(targets[1])
        assert found is not None and found.mountpoint == str(targets[1])
        assert found.root.endswith("/" + ODD_NAME + "/source dir")
        assert {m.mountpoint for m in mounts_under(odd_root)} == {str(t) for t in targets}
        assert all(is_mountpoint(t) for t in targets)
        assert bindmount.detach_all_under(odd_root) == 2
        assert mounts_under(odd_root) == [] and not is_mountpoint(targets[0])
    finally:
        for target in targets:
            subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


def test_fuse_host_under_a_non_ascii_root(odd_root: Path) -> None:
    """`fuse_server` waits for `is_mountpoint`; read-ahead needs the device from mountinfo."""
    layer = write_layer([File(path="f", data=b"data")], odd_root / "blobs")
    with fuse_server(odd_root, [LayerBlob("l", layer.path)]) as srv:
        assert (srv.mountpoint / "l/f").read_bytes() == b"data"
        mount = mount_at(srv.mountpoint)
        assert mount is not None and mount.fstype == "fuse.sociable"
        bdi = Path(f"/sys/class/bdi/{mount.device}/read_ahead_kb")
        assert int(bdi.read_text()) == READ_AHEAD_KB
        srv.proc.kill()
        srv.proc.wait(timeout=15)
        assert is_mountpoint(srv.mountpoint)  # a dead FUSE mount stays listed
        assert cleanup_stale_mount(srv.mountpoint) is True
        assert not is_mountpoint(srv.mountpoint)
