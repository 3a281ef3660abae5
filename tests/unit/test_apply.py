"""The local applier (`snapshotter.remote.apply`) against containerd's rules (`index.applyrules`).

Real tar streams applied into real directories (root: mknod, chown, xattrs).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from index.applyrules import bound_time_ns, clean_path, tar_times_ns
from index.tartime import pax_time_ns
from snapshotter.remote.apply import apply_tar
from snapshotter.remote.errors import UnpackError
from tests.support.tarfixtures import member, members_tar

pytestmark = pytest.mark.root


@pytest.fixture(autouse=True)
def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("PREREQUISITE MISSING: root (mknod, chown, trusted.* xattrs)")


def apply(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]], *, userxattr: bool = False
) -> Path:
    root = tmp_path / "fs"
    root.mkdir()
    data = members_tar(members)
    assert (
        apply_tar(io.BytesIO(data), root, userxattr=userxattr)
        == "sha256:" + hashlib.sha256(data).hexdigest()
    )
    return root


def test_apply_converts_whiteouts_and_applies_every_header(tmp_path: Path) -> None:
    x = member("d/x.txt", uid=1234, gid=99, mode=0o4750)
    x.pax_headers = {"SCHILY.xattr.user.test": "v"}
    root = apply(
        tmp_path,
        [
            (member("d", tarfile.DIRTYPE), b""),
            (x, b"hello\n"),
            # A hard link header's own metadata lands on the shared inode: the last one wins.
            (member("d/link", tarfile.LNKTYPE, linkname="d/x.txt", uid=5, gid=6, mode=0o600), b""),
            (member("d/sym", tarfile.SYMTYPE, linkname="x.txt"), b""),
            (member("d/fifo", tarfile.FIFOTYPE), b""),
            (member("d/null", tarfile.CHRTYPE, devmajor=1, devminor=3), b""),
            (member("d/.wh.gone", uid=7, gid=8), b""),
            (member("o/.wh..wh..opq"), b""),
            (member("o/new"), b"n"),
        ],
    )
    st = os.lstat(root / "d/x.txt")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (5, 6, 0o600)
    assert st.st_nlink == 2 and os.lstat(root / "d/link").st_ino == st.st_ino
    assert os.getxattr(root / "d/x.txt", "user.test") == b"v"
    assert st.st_mtime_ns == 1_700_000_000 * 10**9
    assert os.readlink(root / "d/sym") == "x.txt"
    assert stat.S_ISFIFO(os.lstat(root / "d/fifo").st_mode)
    assert os.lstat(root / "d/null").st_rdev == os.makedev(1, 3)
    gone = os.lstat(root / "d/gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert (gone.st_uid, gone.st_gid) == (7, 8)
    assert not (root / "d/.wh.gone").exists()
    assert os.getxattr(root / "o", "trusted.overlay.opaque") == b"y"
    assert not (root / "o/.wh..wh..opq").exists() and (root / "o/new").read_bytes() == b"n"


def test_apply_userxattr_opaque_marker(tmp_path: Path) -> None:
    root = apply(tmp_path, [(member("o/.wh..wh..opq"), b"")], userxattr=True)
    assert os.getxattr(root / "o", "user.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(root / "o")


def test_apply_keeps_nanosecond_pax_times(tmp_path: Path) -> None:
    """PAX mtimes are decimal strings: `.999999999` must not round up to the next second and
    `.123456789` must not turn into `.123456768` (what float seconds give)."""

    def timed(name: str, kind: bytes, mtime: str, atime: str | None = None) -> tarfile.TarInfo:
        info = member(name, kind, mtime=int(float(mtime)))
        info.pax_headers = {"mtime": mtime} | ({"atime": atime} if atime else {})
        if kind == tarfile.SYMTYPE:
            info.linkname = "f1"
        return info

    root = apply(
        tmp_path,
        [
            (timed("d", tarfile.DIRTYPE, "1700000044.000000001"), b""),
            (timed("d/f1", tarfile.REGTYPE, "1700000022.999999999"), b"1"),
            (timed("d/f2", tarfile.REGTYPE, "1700000031.123456789", "1700000099.5"), b"2"),
            (timed("d/f3", tarfile.REGTYPE, "1700000031.123456789", "1600000000.1"), b"3"),
            (timed("d/sym", tarfile.SYMTYPE, "1700000055.987654321"), b""),
            (timed("d/old", tarfile.REGTYPE, "-12.5"), b"4"),
        ],
    )
    d = root / "d"
    assert os.lstat(d / "f1").st_mtime_ns == 1_700_000_022_999_999_999
    f2 = os.lstat(d / "f2")
    assert (f2.st_mtime_ns, f2.st_atime_ns) == (
        1_700_000_031_123_456_789,
        1_700_000_099_500_000_000,
    )
    f3 = os.lstat(d / "f3")  # atime is never earlier than mtime (containerd's latestTime)
    assert f3.st_atime_ns == f3.st_mtime_ns == 1_700_000_031_123_456_789
    assert os.lstat(d / "sym").st_mtime_ns == 1_700_000_055_987_654_321
    assert os.lstat(d / "old").st_mtime_ns == 0  # before the epoch: bounded as containerd does
    assert os.lstat(d).st_mtime_ns == 1_700_000_044_000_000_001  # set after its children


def test_tar_times_ns_is_exact() -> None:
    assert tar_times_ns({"mtime": "1700000022.999999999"}, 0.0) == (
        1_700_000_022_999_999_999,
        1_700_000_022_999_999_999,
    )
    assert tar_times_ns({}, 1_700_000_000.0) == (1_700_000_000 * 10**9,) * 2
    assert pax_time_ns(b"-1.5") == -1_500_000_000 and bound_time_ns(-1) == 0
    with pytest.raises(ValueError):
        tar_times_ns({"mtime": "12.x"}, 0.0)


def test_apply_keeps_everything_inside_the_root(tmp_path: Path) -> None:
    """`..` stops at the layer root (`clean_path`, containerd's rule) and symlinks in parent
    paths resolve as if the root were `/`: nothing is written outside; the root entry itself
    is ignored."""
    outside = tmp_path / "outside"
    outside.mkdir()
    root = apply(
        tmp_path,
        [
            (member("../", tarfile.DIRTYPE, mode=0o700, uid=9), b""),
            (member("../../evil"), b"e"),
            (member("a/../../../b/c"), b"c"),
            (member("abs", tarfile.SYMTYPE, linkname=str(outside)), b""),
            (member("abs/through-abs"), b"x"),
            (member("rel", tarfile.SYMTYPE, linkname="../../../.."), b""),
            (member("rel/through-rel"), b"y"),
            (member("hl", tarfile.LNKTYPE, linkname="../../evil"), b""),
        ],
    )
    assert list(outside.iterdir()) == []
    assert (root / "evil").read_bytes() == b"e" and (root / "b/c").read_bytes() == b"c"
    assert (root / outside.relative_to("/") / "through-abs").read_bytes() == b"x"
    assert (root / "through-rel").read_bytes() == b"y"
    assert os.lstat(root / "hl").st_ino == os.lstat(root / "evil").st_ino
    st = os.lstat(root)
    assert stat.S_IMODE(st.st_mode) != 0o700 and st.st_uid == 0
    assert clean_path("../../evil") == "evil"


def test_apply_xattrs_as_containerd_sets_them(tmp_path: Path) -> None:
    f = member("f")
    f.pax_headers = {
        "SCHILY.xattr.user.kept": "ü",
        "SCHILY.xattr.trusted.overlay.opaque": "y",  # containerd refuses trusted.* from archives
    }
    s = member("s", tarfile.SYMTYPE, linkname="f")
    s.pax_headers = {"SCHILY.xattr.user.on-symlink": "no"}  # EPERM in the kernel, ignored
    root = apply(tmp_path, [(f, b"f"), (s, b"")])
    assert os.listxattr(root / "f") == ["user.kept"]
    assert os.getxattr(root / "f", "user.kept") == "ü".encode()
    assert os.listxattr(root / "s", follow_symlinks=False) == []


def test_apply_errors_are_unpack_errors(tmp_path: Path) -> None:
    loop = [
        (member("l1", tarfile.SYMTYPE, linkname="l2"), b""),
        (member("l2", tarfile.SYMTYPE, linkname="l1"), b""),
        (member("l1/x"), b"x"),
    ]
    bad_time = member("t")
    bad_time.pax_headers = {"mtime": "1.2.3"}
    for i, members in enumerate((loop, [(bad_time, b"")])):
        root = tmp_path / f"fs{i}"
        root.mkdir()
        with pytest.raises(UnpackError) as info:
            apply_tar(io.BytesIO(members_tar(members)), root)
        assert info.value.__cause__ is not None
    with pytest.raises(UnpackError, match="applying layer"):
        apply_tar(io.BytesIO(b"not a tar" * 100), tmp_path / "fs0")
