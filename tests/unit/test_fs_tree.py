"""The pure layer filesystem: tree shape, whiteouts, hardlinks, inodes, host, errno table."""

from __future__ import annotations

import errno
import io
import itertools
import os
import posixpath
import stat
import subprocess
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

import pytest
import trio

from index.applyrules import archive_xattrs, clean_path
from index.model import EntryType, FileMetadata, UncompressedOffset
from snapshotter.fs.errors import (
    BadHandle,
    FsError,
    HeaderMismatch,
    IsADirectory,
    LayerExists,
    LayerReadError,
    NoSuchAttribute,
    NotADirectory,
    NotASymlink,
    NotFound,
    PermissionDenied,
    ReadOnly,
    TreeBuildError,
)
from snapshotter.fs.host import (
    STATE_DIR_NAME,
    STATUS_FILE_NAME,
    LayerHost,
    default_slot,
)
from snapshotter.fs.inodes import FUSE_ROOT_INODE, node_inode, split_inode
from snapshotter.fs.readers import LocalBlobReader, LocalTarReader
from snapshotter.fs.tree import (
    ROOT_NODE,
    Attr,
    HeaderAttr,
    LayerTree,
    NodeId,
    build_tree,
    header_offsets,
    parse_rfc3339_ns,
)
from tests.support.fuselayers import entries_from_tar, ztoc_for_layer
from tests.support.images import Dir, File, Hardlink, Symlink, write_layer

T0 = "2023-11-14T22:13:20Z"
T0_NS = 1_700_000_000 * 1_000_000_000


def fm(
    name: str,
    kind: EntryType = EntryType.REG,
    *,
    offset: int = 0,
    size: int = 0,
    **kw: object,
) -> FileMetadata:
    kw.setdefault("mod_time", T0)
    kw.setdefault("mode", 0o644)
    return FileMetadata(
        name=name,
        type=kind,
        uncompressed_offset=UncompressedOffset(offset),
        uncompressed_size=size,
        **kw,  # type: ignore[arg-type]
    )


def tree_of(*entries: FileMetadata, userxattr: bool = False) -> LayerTree:
    # Lay the entries out like a tar: each one 512 header bytes, then its data.
    placed: list[FileMetadata] = []
    pos = 0
    for e in entries:
        pos += 512
        placed.append(e._replace(uncompressed_offset=UncompressedOffset(pos)))
        pos += (e.uncompressed_size + 511) // 512 * 512
    return build_tree(placed, userxattr=userxattr)


def walk(tree: LayerTree, node: NodeId = ROOT_NODE, prefix: str = "") -> dict[str, NodeId]:
    out: dict[str, NodeId] = {}
    for entry in tree.readdir(node):
        path = prefix + entry.name.decode()
        out[path] = entry.node
        if tree.attr(entry.node).is_dir:
            out.update(walk(tree, entry.node, path + "/"))
    return out


def resolve(tree: LayerTree, path: str) -> NodeId:
    node = ROOT_NODE
    for part in path.split("/"):
        node = tree.lookup(node, part.encode())
    return node


# -- names and times ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("./usr//bin/", "usr/bin"),
        ("/etc/passwd", "etc/passwd"),
        ("./", ""),
        ("/", ""),
        ("a/./b/../c", "a/c"),
        ("../../x", "x"),
        ("a/../../b", "b"),
        ("..", ""),
        ("../", ""),
    ],
)
def test_clean_path(raw: str, clean: str) -> None:
    """One rule for `..`, containerd's: it stops at the layer root."""
    assert clean_path(raw) == clean


def test_clean_path_agrees_with_normpath_on_every_short_name() -> None:
    """The shortcut for names that are already clean gives `normpath`'s answer on every name
    of up to four components from a set of awkward ones, with and without slashes around."""
    parts = ["a", ".", "..", "", ".b", "b.", "...", "a.b"]
    for n in range(1, 5):
        for combo in itertools.product(parts, repeat=n):
            for lead, trail in itertools.product(("", "/", "./"), ("", "/", "//")):
                name = lead + "/".join(combo) + trail
                assert clean_path(name) == posixpath.normpath("/" + name).lstrip("/"), name


def test_dotdot_names_stay_inside_the_layer() -> None:
    tree = tree_of(
        fm("../../etc/escaped", size=3),
        fm("a/../../../b", EntryType.DIR),
        fm("../", EntryType.DIR, mode=0o700, uid=9),
    )
    assert set(walk(tree)) == {"etc", "etc/escaped", "b"}
    root = tree.attr(ROOT_NODE)
    assert root.mode == stat.S_IFDIR | 0o755 and root.uid == 0


def test_parse_rfc3339_keeps_nanoseconds_and_offsets() -> None:
    assert parse_rfc3339_ns("") == 0
    assert parse_rfc3339_ns(T0) == T0_NS
    assert parse_rfc3339_ns("2023-11-14T22:13:20.000000001Z") == T0_NS + 1
    assert parse_rfc3339_ns("2023-11-14T22:13:20.5Z") == T0_NS + 500_000_000
    assert parse_rfc3339_ns("2023-11-15T00:13:20+02:00") == T0_NS
    assert parse_rfc3339_ns("2023-11-14T21:13:20-01:00") == T0_NS
    assert parse_rfc3339_ns("1969-12-31T23:59:59Z") == -1_000_000_000
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_rfc3339_ns("yesterday")


def test_bad_mod_time_names_the_entry() -> None:
    with pytest.raises(TreeBuildError, match="etc/x"):
        tree_of(fm("etc/x", mod_time="2023-13"))


# -- tree shape --------------------------------------------------------------------------------


def test_implicit_parents_then_explicit_dir_overrides() -> None:
    tree = tree_of(
        fm("a/b/c", size=3, uid=7),
        fm("a/", EntryType.DIR, mode=0o700, uid=5, gid=6, mod_time="2024-01-01T00:00:00Z"),
    )
    assert set(walk(tree)) == {"a", "a/b", "a/b/c"}
    implicit = tree.attr(resolve(tree, "a/b"))
    assert (implicit.mode, implicit.uid, implicit.gid, implicit.mtime_ns) == (
        stat.S_IFDIR | 0o755,
        0,
        0,
        0,
    )
    explicit = tree.attr(resolve(tree, "a"))
    assert explicit.mode == stat.S_IFDIR | 0o700
    assert (explicit.uid, explicit.gid) == (5, 6)
    assert explicit.mtime_ns == parse_rfc3339_ns("2024-01-01T00:00:00Z")
    assert tree.attr(resolve(tree, "a/b/c")).uid == 7


def test_whiteout_owner_and_bounded_times_follow_containerd() -> None:
    tree = tree_of(
        fm("d/.wh.gone", uid=7, gid=8),
        fm("d/old", mod_time="1969-12-31T23:59:59.5Z"),
        fm("d/ns", mod_time="2023-11-14T22:13:42.999999999Z"),
    )
    gone = tree.attr(resolve(tree, "d/gone"))
    assert stat.S_ISCHR(gone.mode) and (gone.uid, gone.gid, gone.rdev) == (7, 8, 0)
    assert tree.attr(resolve(tree, "d/old")).mtime_ns == 0
    assert tree.attr(resolve(tree, "d/ns")).mtime_ns == 1_700_000_022_999_999_999


def test_root_entry_is_ignored_as_containerd_does() -> None:
    records = {"SCHILY.xattr.user.x": "v"}
    tree = tree_of(fm("./", EntryType.DIR, mode=0o750, uid=3, xattrs=records), fm("f"))
    root = tree.attr(ROOT_NODE)
    assert (root.mode, root.uid, root.mtime_ns) == (stat.S_IFDIR | 0o755, 0, 0)
    assert tree.listxattr(ROOT_NODE) == ()
    assert set(walk(tree)) == {"f"}


def test_dir_nlink_counts_subdirs() -> None:
    tree = tree_of(
        fm("d/", EntryType.DIR),
        fm("d/s1/", EntryType.DIR),
        fm("d/s2/x", size=1),
        fm("d/f"),
        fm("e/", EntryType.DIR),
    )
    assert tree.attr(ROOT_NODE).nlink == 4  # 2 + d + e
    assert tree.attr(resolve(tree, "d")).nlink == 4  # 2 + s1 + s2
    assert tree.attr(resolve(tree, "d/s1")).nlink == 2
    assert tree.attr(resolve(tree, "d/f")).nlink == 1


def test_types_modes_rdev_blocks_symlinks() -> None:
    tree = tree_of(
        fm("bin/sh", size=5000, mode=0o4755, uid=1, gid=2),
        fm("dev/null", EntryType.CHAR, devmajor=1, devminor=3, mode=0o666),
        fm("dev/sda", EntryType.BLOCK, devmajor=8, devminor=0, mode=0o660),
        fm("run/fifo", EntryType.FIFO, mode=0o600),
        fm("bin/link", EntryType.SYMLINK, linkname="sh", mode=0o777),
        fm("tmp/", EntryType.DIR, mode=0o1777),
    )
    sh = tree.attr(resolve(tree, "bin/sh"))
    assert sh.mode == stat.S_IFREG | 0o4755 and (sh.uid, sh.gid) == (1, 2)
    assert sh.size == 5000 and sh.blocks == 16 and sh.mtime_ns == T0_NS
    null = tree.attr(resolve(tree, "dev/null"))
    assert stat.S_ISCHR(null.mode) and null.rdev == os.makedev(1, 3)
    sda = tree.attr(resolve(tree, "dev/sda"))
    assert stat.S_ISBLK(sda.mode) and sda.rdev == os.makedev(8, 0)
    assert stat.S_ISFIFO(tree.attr(resolve(tree, "run/fifo")).mode)
    link = resolve(tree, "bin/link")
    assert stat.S_ISLNK(tree.attr(link).mode)
    assert tree.readlink(link) == b"sh" and tree.attr(link).size == 2
    assert tree.attr(resolve(tree, "tmp")).mode == stat.S_IFDIR | 0o1777
    with pytest.raises(NotASymlink):
        tree.readlink(resolve(tree, "bin/sh"))


def test_hardlinks_share_node_and_count_links() -> None:
    tree = tree_of(
        fm("a", size=10, mode=0o700),
        fm("d/b", EntryType.HARDLINK, linkname="a", mode=0o700),
        fm("d/c", EntryType.HARDLINK, linkname="./d/b", mode=0o700),
    )
    a, b, c = (resolve(tree, p) for p in ("a", "d/b", "d/c"))
    assert a == b == c
    attr = tree.attr(a)
    assert attr.nlink == 3 and attr.size == 10 and attr.mode == stat.S_IFREG | 0o700
    assert tree.path_of(a) == "a"
    sorted_first = tree_of(fm("z/target", size=1), fm("a", EntryType.HARDLINK, linkname="z/target"))
    assert sorted_first.path_of(resolve(sorted_first, "a")) == "z/target"


T1 = "2024-05-06T07:08:09.123456789Z"


def test_last_header_naming_an_inode_sets_its_metadata() -> None:
    """As containerd's applier: each hardlink header's lchown, setxattr, chmod and utimes land
    on the shared inode; the creating header's metadata stays available for verification."""
    tree = tree_of(
        fm(
            "f",
            size=3,
            mode=0o4750,
            uid=5,
            gid=6,
            xattrs={
                "SCHILY.xattr.security.capability": "cap",
                "SCHILY.xattr.user.a": "1",
                "SCHILY.xattr.trusted.t": "t",
            },
        ),
        fm("h1", EntryType.HARDLINK, linkname="f", mode=0o600, uid=11, gid=12),
        fm(
            "h2",
            EntryType.HARDLINK,
            linkname="h1",
            mode=0o2604,
            uid=13,
            gid=14,
            mod_time=T1,
            xattrs={"SCHILY.xattr.user.b": "2", "SCHILY.xattr.user.a": "new"},
        ),
        fm("s", EntryType.SYMLINK, linkname="f", uid=1, gid=1),
        fm("s-link", EntryType.HARDLINK, linkname="s", mode=0o600, uid=7, gid=8),
    )
    node = resolve(tree, "f")
    attr = tree.attr(node)
    assert attr.mode == stat.S_IFREG | 0o2604 and (attr.uid, attr.gid) == (13, 14)
    assert attr.mtime_ns == parse_rfc3339_ns(T1) and attr.nlink == 3
    # The second header's lchown removed security.capability; setxattr merges, never removes.
    assert tree.listxattr(node) == (b"user.a", b"user.b")
    assert tree.getxattr(node, b"user.a") == b"new"
    assert tree.header_attr(node) == HeaderAttr(
        perm=0o4750,
        uid=5,
        gid=6,
        mtime_ns=T0_NS,
        xattrs=((b"security.capability", b"cap"), (b"user.a", b"1")),
    )
    link = tree.attr(resolve(tree, "s"))
    assert link.mode == stat.S_IFLNK | 0o777 and (link.uid, link.gid) == (7, 8)
    plain = tree_of(fm("p", mode=0o640, uid=3))
    assert plain.header_attr(resolve(plain, "p")) == HeaderAttr(
        perm=0o640, uid=3, gid=0, mtime_ns=T0_NS, xattrs=()
    )


def test_hardlink_target_must_come_first() -> None:
    with pytest.raises(TreeBuildError, match="earlier"):
        tree_of(fm("b", EntryType.HARDLINK, linkname="a"), fm("a"))
    with pytest.raises(TreeBuildError, match="dir"):
        tree_of(fm("d/", EntryType.DIR), fm("h", EntryType.HARDLINK, linkname="d"))


def test_parent_that_is_a_file_is_an_error() -> None:
    with pytest.raises(TreeBuildError, match="not a directory"):
        tree_of(fm("f"), fm("f/x"))


def test_later_entry_replaces_earlier_file() -> None:
    tree = tree_of(fm("f", size=1, mode=0o600), fm("f", EntryType.SYMLINK, linkname="t"))
    assert list(walk(tree)) == ["f"]
    assert tree.readlink(resolve(tree, "f")) == b"t"


def test_xattrs_from_schily_records_only() -> None:
    tree = tree_of(
        fm(
            "f",
            xattrs={
                "SCHILY.xattr.user.b": "2",
                "SCHILY.xattr.security.capability": "\x01\x00",
                "path": "f",
                "LIBARCHIVE.creationtime": "1",
            },
        )
    )
    node = resolve(tree, "f")
    assert tree.listxattr(node) == (b"security.capability", b"user.b")
    assert tree.getxattr(node, b"user.b") == b"2"
    assert tree.header_attr(node).xattrs == (
        (b"security.capability", b"\x01\x00"),
        (b"user.b", b"2"),
    )
    with pytest.raises(NoSuchAttribute):
        tree.getxattr(node, b"path")


def test_xattrs_are_those_containerd_sets() -> None:
    """trusted.* never (containerd refuses them), user.* on files and directories only (EPERM
    elsewhere, ignored), security.* always, no other namespace."""
    records = {
        "SCHILY.xattr.trusted.overlay.opaque": "y",
        "SCHILY.xattr.trusted.x": "t",
        "SCHILY.xattr.user.u": "u",
        "SCHILY.xattr.security.selinux": "s",
        "SCHILY.xattr.system.posix_acl_access": "acl",
        "SCHILY.xattr.nonamespace": "n",
    }
    for kind, user in (
        (EntryType.REG, True),
        (EntryType.DIR, True),
        (EntryType.SYMLINK, False),
        (EntryType.FIFO, False),
        (EntryType.CHAR, False),
    ):
        tree = tree_of(fm("e", kind, linkname="t", xattrs=records))
        names = tree.listxattr(resolve(tree, "e"))
        assert names == ((b"security.selinux", b"user.u") if user else (b"security.selinux",))
    assert archive_xattrs({"SCHILY.xattr.user.ü": "\udcff"}, stat.S_IFREG) == {
        "user.ü".encode(): b"\xff"
    }


def test_repeated_dir_entry_adds_xattrs() -> None:
    tree = tree_of(
        fm("d/", EntryType.DIR, xattrs={"SCHILY.xattr.user.a": "1"}),
        fm("d/", EntryType.DIR, mode=0o700, xattrs={"SCHILY.xattr.user.b": "2"}),
        fm("d/", EntryType.DIR, mode=0o750),
    )
    d = resolve(tree, "d")
    assert tree.attr(d).mode == stat.S_IFDIR | 0o750
    assert tree.listxattr(d) == (b"user.a", b"user.b")


# -- whiteouts and opaque directories ----------------------------------------------------------


def test_whiteouts_become_char_devices() -> None:
    tree = tree_of(
        fm("etc/.wh.passwd"),
        fm("etc/.wh.group"),
        fm("etc/group", size=1),  # the same layer re-creates it: no whiteout shown
        fm(".wh.opt"),
    )
    assert set(walk(tree)) == {"etc", "etc/passwd", "etc/group", "opt"}
    passwd = tree.attr(resolve(tree, "etc/passwd"))
    assert passwd.mode == stat.S_IFCHR and passwd.rdev == 0
    assert (passwd.uid, passwd.gid, passwd.size, passwd.nlink) == (0, 0, 0, 1)
    assert stat.S_ISREG(tree.attr(resolve(tree, "etc/group")).mode)
    assert stat.S_ISCHR(tree.attr(resolve(tree, "opt")).mode)
    for hidden in ("etc/.wh.passwd", "etc/.wh.group", ".wh.opt"):
        with pytest.raises(NotFound):
            resolve(tree, hidden)


@pytest.mark.parametrize(
    ("userxattr", "key"),
    [(False, b"trusted.overlay.opaque"), (True, b"user.overlay.opaque")],
)
def test_opaque_dir_reports_overlay_xattr_first(userxattr: bool, key: bytes) -> None:
    tree = tree_of(
        fm("d/", EntryType.DIR, xattrs={"SCHILY.xattr.user.a": "1"}),
        fm("d/.wh..wh..opq"),
        fm("d/kept", size=1),
        userxattr=userxattr,
    )
    d = resolve(tree, "d")
    assert tree.listxattr(d) == (key, b"user.a")
    assert tree.getxattr(d, key) == b"y"
    assert set(walk(tree)) == {"d", "d/kept"}
    with pytest.raises(NotFound):
        tree.lookup(d, b".wh..wh..opq")
    with pytest.raises(NoSuchAttribute):
        tree.getxattr(ROOT_NODE, key)


def test_only_the_oci_marker_makes_a_directory_opaque() -> None:
    """A PAX trusted.overlay.opaque record is dropped (containerd never sets trusted.* from an
    archive), so it cannot hide the lower layers' content."""
    tree = tree_of(
        fm("fake/", EntryType.DIR, xattrs={"SCHILY.xattr.trusted.overlay.opaque": "y"}),
        fm("fake/f", size=1),
    )
    fake = resolve(tree, "fake")
    assert tree.listxattr(fake) == ()
    with pytest.raises(NoSuchAttribute):
        tree.getxattr(fake, b"trusted.overlay.opaque")
    marked = tree_of(
        fm("d/", EntryType.DIR, xattrs={"SCHILY.xattr.user.overlay.opaque": "x"}),
        fm("d/.wh..wh..opq"),
        userxattr=True,
    )
    d = resolve(marked, "d")
    assert marked.listxattr(d) == (b"user.overlay.opaque",)
    assert marked.getxattr(d, b"user.overlay.opaque") == b"y"
    assert marked.header_attr(d).xattrs == ((b"user.overlay.opaque", b"x"),)


# -- listings, lookups, offsets ----------------------------------------------------------------


def test_readdir_sorted_with_resumable_offsets() -> None:
    names = ["zeta", "alpha", "Beta", "m", "a.b", "a-b"]
    tree = tree_of(*(fm(f"d/{n}") for n in names))
    d = resolve(tree, "d")
    listing = list(tree.readdir(d))
    assert [e.name for e in listing] == sorted(n.encode() for n in names)
    for i, entry in enumerate(listing):
        rest = list(tree.readdir(d, entry.next_offset))
        assert [e.name for e in rest] == [e.name for e in listing[i + 1 :]]
    for name in names:
        assert tree.lookup(d, name.encode()) == resolve(tree, f"d/{name}")
    with pytest.raises(NotFound):
        tree.lookup(d, b"nope")
    with pytest.raises(NotADirectory):
        tree.lookup(resolve(tree, "d/m"), b"x")
    with pytest.raises(NotFound):
        tree.attr(NodeId(10_000))


def test_header_offsets_follow_the_previous_entry() -> None:
    files = [fm("a", offset=512, size=10), fm("b", offset=1536, size=0), fm("c", offset=2048)]
    assert header_offsets(files) == [0, 1024, 1536]
    with pytest.raises(TreeBuildError, match="invalid toc entry"):
        header_offsets([fm("a", offset=512, size=1000), fm("b", offset=1024)])


def test_same_ztoc_gives_same_nodes_and_inodes() -> None:
    entries = [fm(f"d{i % 7}/f{i}", size=i) for i in range(200)]
    entries += [fm("d1/h", EntryType.HARDLINK, linkname="d1/f1"), fm("d2/.wh.x")]
    one, two = tree_of(*entries), tree_of(*entries)
    paths = walk(one)
    assert paths == walk(two)
    host_a, host_b = LayerHost(), LayerHost()
    for host in (host_a, host_b):
        host.add_layer("layer", one, LocalTarReader(Path("/nonexistent")), slot=9)
    for path in paths:
        ino_a = _host_resolve(host_a, "layer/" + path).inode
        assert ino_a == _host_resolve(host_b, "layer/" + path).inode
        assert split_inode(ino_a) == (9, paths[path] + 3)
    assert default_slot("sha256:abc") == default_slot("sha256:abc")
    assert node_inode(9, ROOT_NODE) == host_a.layer_inode("layer")


# -- memory ------------------------------------------------------------------------------------


def synthetic_entries(count: int) -> list[FileMetadata]:
    """A layer shaped like a real root filesystem: 10% dirs, 10% symlinks, deep-ish paths."""
    files: list[FileMetadata] = []
    offset = 0
    dirs = [f"usr/lib/pkg{d:04d}" for d in range(count // 10)]
    for i in range(count):
        offset += 512
        if i < len(dirs):
            files.append(fm(dirs[i] + "/", EntryType.DIR, offset=offset, mode=0o755))
            continue
        parent = dirs[i % len(dirs)]
        if i % 10 == 0:
            files.append(
                fm(
                    f"{parent}/link{i}.so",
                    EntryType.SYMLINK,
                    offset=offset,
                    linkname=f"lib{i}.so.1",
                )
            )
            continue
        size = 1000 + i % 5000
        files.append(
            fm(f"{parent}/module_{i:06d}.py", offset=offset, size=size, uid=0, gid=0, mode=0o644)
        )
        offset += (size + 511) // 512 * 512
    return files


@pytest.mark.slow
def test_memory_per_entry_is_small() -> None:
    count = 100_000
    files = synthetic_entries(count)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        started = time.perf_counter()
        tree = build_tree(files)
        elapsed = time.perf_counter() - started
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_entry = (after - before) / count
    peak_per_entry = (peak - before) / count
    print(
        f"\n{count} entries: retained {per_entry:.0f} B/entry, build peak "
        f"{peak_per_entry:.0f} B/entry, {elapsed:.2f}s (under tracemalloc)"
    )
    assert tree.entry_count == count + 2  # implicit usr, usr/lib
    assert per_entry < 300
    assert peak_per_entry < 1500


# -- host --------------------------------------------------------------------------------------


def _host_resolve(host: LayerHost, path: str) -> Attr:
    attr = host.getattr(FUSE_ROOT_INODE)
    for part in path.split("/"):
        attr = host.lookup(attr.inode, part.encode())
    return attr


def write_tar(
    path: Path, members: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.PAX_FORMAT
) -> None:
    with tarfile.open(path, "w", format=fmt) as tf:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tf.addfile(info, io.BytesIO(data))


def tinfo(name: str, kind: bytes = tarfile.REGTYPE, **kw: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = 1_700_000_000
    for key, value in kw.items():
        setattr(info, key, value)
    return info


@pytest.fixture(params=[tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def tar_layer(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, list[FileMetadata]]:
    """A tar layer with long names (PAX records or GNU L entries) and an xattr (PAX only)."""
    long_name = "deep/" + "n" * 150 + "/file-with-a-name-longer-than-100-bytes-" + "f" * 80
    members = [
        (tinfo("etc/", tarfile.DIRTYPE, mode=0o755), b""),
        (tinfo("etc/hosts", mode=0o644), b"127.0.0.1 localhost\n"),
        (tinfo(long_name, mode=0o600), b"long name contents"),
        (tinfo("big", mode=0o644), bytes(range(256)) * 4096),
        (tinfo("x", pax_headers={"SCHILY.xattr.user.k": "v"}), b"xattr file"),
    ]
    path = tmp_path / "layer.tar"
    write_tar(path, members, request.param)
    entries, _ = entries_from_tar(path)
    return path, entries


async def test_host_reads_files_and_verifies_headers(
    tar_layer: tuple[Path, list[FileMetadata]],
) -> None:
    path, entries = tar_layer
    host = LayerHost()
    host.add_layer("l1", build_tree(entries), LocalTarReader(path), digest="sha256:00")
    with tarfile.open(path) as tf:
        for info in tf:
            if not info.isreg():
                continue
            attr = _host_resolve(host, "l1/" + info.name)
            expected = tf.extractfile(info).read()  # type: ignore[union-attr]
            got = await host.read(attr.inode, 0, len(expected) + 100)
            assert got == expected, info.name
            assert await host.read(attr.inode, 7, 5) == expected[7:12]
            assert await host.read(attr.inode, len(expected), 10) == b""
    status = host.status("l1")
    assert status.read_errors == 0 and status.last_error is None
    assert status.bytes_served > 1_000_000


async def test_header_mismatch_is_eio_and_recorded(
    tar_layer: tuple[Path, list[FileMetadata]],
) -> None:
    path, entries = tar_layer
    forged = [e._replace(mode=0o777) if e.name == "etc/hosts" else e for e in entries]
    host = LayerHost()
    host.add_layer("l1", build_tree(forged), LocalTarReader(path))
    fh = _host_resolve(host, "l1/etc/hosts").inode
    with pytest.raises(HeaderMismatch, match="mode"):
        await host.read(fh, 0, 10)
    status = host.status("l1")
    assert status.read_errors == 1 and "mode" in (status.last_error or "")
    unverified = LayerHost(verify_headers=False)
    unverified.add_layer("l1", build_tree(forged), LocalTarReader(path))
    fh = _host_resolve(unverified, "l1/etc/hosts").inode
    assert await unverified.read(fh, 0, 9) == b"127.0.0.1"


async def test_hardlinked_file_verifies_against_its_own_header(tmp_path: Path) -> None:
    """Hardlink headers with other metadata change the inode, not what the file's header is
    checked against; the trusted.* record is in the header but not in the tree."""
    members = [
        (
            tinfo(
                "f",
                mode=0o640,
                uid=5,
                gid=6,
                pax_headers={"SCHILY.xattr.trusted.t": "t", "SCHILY.xattr.user.u": "u"},
            ),
            b"shared bytes",
        ),
        (tinfo("h", tarfile.LNKTYPE, linkname="f", mode=0o604, uid=13, gid=14, mtime=5), b""),
    ]
    path = tmp_path / "links.tar"
    write_tar(path, members)
    entries, _ = entries_from_tar(path)
    host = LayerHost()
    host.add_layer("l1", build_tree(entries), LocalTarReader(path))
    attr = _host_resolve(host, "l1/h")
    assert (stat.S_IMODE(attr.mode), attr.uid, attr.gid) == (0o604, 13, 14)
    assert host.listxattr(attr.inode) == (b"user.u",)
    fh = attr.inode
    assert await host.read(fh, 0, 100) == b"shared bytes"
    assert host.status("l1").read_errors == 0


async def test_reader_failure_is_layer_read_error(
    tar_layer: tuple[Path, list[FileMetadata]], tmp_path: Path
) -> None:
    _, entries = tar_layer
    host = LayerHost()
    host.add_layer("gone", build_tree(entries), LocalTarReader(tmp_path / "missing.tar"))
    fh = _host_resolve(host, "gone/etc/hosts").inode
    with pytest.raises(LayerReadError, match=r"missing\.tar"):
        await host.read(fh, 0, 10)
    assert "missing.tar" in (host.status("gone").last_error or "")


def _listing_from(host: LayerHost, fh: int, offset: int) -> list[tuple[bytes, int, int]]:
    return [(x.name, x.attr.inode, x.next_offset) for x in host.readdir(fh, offset)]


def test_readdir_lists_dot_and_dotdot_with_stable_offsets(
    tar_layer: tuple[Path, list[FileMetadata]],
) -> None:
    """Every directory lists `.` (itself) and `..` (its parent) first, as ext4 does; a listing
    resumed at any offset it handed out continues exactly where the full listing goes on."""
    path, entries = tar_layer
    host = LayerHost()
    host.add_layer("a", build_tree(entries), LocalTarReader(path), slot=5)
    layer_root = host.lookup(FUSE_ROOT_INODE, b"a").inode
    etc = host.lookup(layer_root, b"etc").inode
    state = host.lookup(layer_root, STATE_DIR_NAME).inode
    expected_dots = {
        FUSE_ROOT_INODE: (FUSE_ROOT_INODE, FUSE_ROOT_INODE),
        layer_root: (layer_root, FUSE_ROOT_INODE),
        etc: (etc, layer_root),
        state: (state, layer_root),
    }
    for directory, (own, parent) in expected_dots.items():
        fh = host.opendir(directory)
        full = _listing_from(host, fh, 0)
        assert [(name, ino) for name, ino, _ in full[:2]] == [(b".", own), (b"..", parent)]
        assert [off for _, _, off in full[:2]] == [1, 2]
        assert len({off for _, _, off in full}) == len(full)
        for i, (_, _, off) in enumerate(full):
            assert _listing_from(host, fh, off) == full[i + 1 :]
        host.releasedir(fh)
    fh = host.opendir(etc)
    names = [name for name, _, _ in _listing_from(host, fh, 0)]
    assert names[2:] == sorted(names[2:]) and b"hosts" in names


async def test_host_layout_state_dir_and_errors(tar_layer: tuple[Path, list[FileMetadata]]) -> None:
    path, entries = tar_layer
    host = LayerHost()
    slot_a = host.add_layer("a", build_tree(entries), LocalTarReader(path), slot=5)
    slot_b = host.add_layer("b", build_tree(entries), LocalTarReader(path), slot=3)
    assert (slot_a, slot_b) == (5, 3)
    with pytest.raises(LayerExists):
        host.add_layer("a", build_tree(entries), LocalTarReader(path))
    with pytest.raises(LayerExists):
        host.add_layer("c", build_tree(entries), LocalTarReader(path), slot=3)
    with pytest.raises(ValueError, match="invalid layer name"):
        host.add_layer("x/y", build_tree(entries), LocalTarReader(path))

    root = host.getattr(FUSE_ROOT_INODE)
    assert stat.S_ISDIR(root.mode) and root.nlink == 4
    fh = host.opendir(FUSE_ROOT_INODE)
    listing = list(host.readdir(fh, 0))
    assert [x.name for x in listing] == [b".", b"..", b"b", b"a"]  # then slot order
    assert [x.name for x in host.readdir(fh, listing[2].next_offset)] == [b"a"]
    host.releasedir(fh)
    host.releasedir(fh)  # handles are inode numbers: nothing is freed, nothing can go stale
    with pytest.raises(BadHandle):
        etc = host.lookup(host.lookup(FUSE_ROOT_INODE, b"a").inode, b"etc").inode
        host.releasedir(host.lookup(etc, b"hosts").inode)  # a file is no directory handle

    layer_root = host.lookup(FUSE_ROOT_INODE, b"a")
    fh = host.opendir(layer_root.inode)
    assert STATE_DIR_NAME not in {x.name for x in host.readdir(fh, 0)}
    state = host.lookup(layer_root.inode, STATE_DIR_NAME)
    assert stat.S_IMODE(state.mode) == 0o500 and not state.cacheable
    status_attr = host.lookup(state.inode, STATUS_FILE_NAME)
    assert not status_attr.cacheable and status_attr.mtime_ns > 0  # "now": pages dropped
    assert status_attr.size == len(host.status("a").to_json())
    with pytest.raises(NotFound):
        host.lookup(state.inode, b"other")

    hosts_attr = host.lookup(host.lookup(layer_root.inode, b"etc").inode, b"hosts")
    with pytest.raises(BadHandle):
        await host.read(layer_root.inode, 0, 1)  # a directory is no file
    with pytest.raises(NotADirectory):
        host.opendir(hosts_attr.inode)
    with pytest.raises(ReadOnly):
        host.access(hosts_attr.inode, os.W_OK, 0, (0,))
    host.access(hosts_attr.inode, os.R_OK, 1000, (1000,))
    with pytest.raises(PermissionDenied):
        host.access(hosts_attr.inode, os.X_OK, 1000, (1000,))
    stats = host.statfs()
    assert stats.files > 10 and stats.blocks >= 2 * (1024 * 1024 // 4096)

    host.remove_layer("a")
    with pytest.raises(NotFound):
        host.getattr(layer_root.inode)
    with pytest.raises(NotFound):
        host.remove_layer("a")
    assert host.layer_names() == ["b"]


# -- the errno table (no mount) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (NotFound("x"), errno.ENOENT),
        (NotADirectory("x"), errno.ENOTDIR),
        (IsADirectory("x"), errno.EISDIR),
        (NotASymlink("x"), errno.EINVAL),
        (NoSuchAttribute("x"), errno.ENODATA),
        (ReadOnly("x"), errno.EROFS),
        (PermissionDenied("x"), errno.EACCES),
        (BadHandle("x"), errno.EBADF),
        (LayerExists("x"), errno.EEXIST),
        (HeaderMismatch("x"), errno.EIO),
        (LayerReadError("x"), errno.EIO),
        (TreeBuildError("x"), errno.EIO),
        (FsError("x"), errno.EIO),
        (RuntimeError("x"), errno.EIO),
    ],
)
def test_errno_table(exc: BaseException, code: int) -> None:
    from snapshotter.fs.fuse import errno_for

    assert errno_for(exc) == code


async def test_adapter_translates_without_mounting(
    tar_layer: tuple[Path, list[FileMetadata]], tmp_path: Path
) -> None:
    from snapshotter.fs import protocol as p
    from snapshotter.fs.fuse import LONG_TIMEOUT_S, FuseOperations
    from tests.support.fuserequests import Client, Failed

    _, entries = tar_layer
    host = LayerHost()
    host.add_layer("l", build_tree(entries), LocalTarReader(tmp_path / "missing"))
    ops = Client(FuseOperations(host))
    entry = ops.lookup(FUSE_ROOT_INODE, b"l")
    assert entry.entry_timeout == LONG_TIMEOUT_S and stat.S_ISDIR(entry.mode)
    assert ops.getattr(FUSE_ROOT_INODE).attr_timeout == 0
    with pytest.raises(Failed) as info:
        ops.lookup(entry.nodeid, b"missing")
    assert info.value.errno == errno.ENOENT
    hosts = ops.lookup(ops.lookup(entry.nodeid, b"etc").nodeid, b"hosts")
    assert hosts.ino == hosts.nodeid and hosts.attr_timeout == LONG_TIMEOUT_S
    # OPEN and FLUSH: ENOSYS, so the kernel opens without asking (and never flushes).
    for opcode in (p.OPEN, p.FLUSH):
        with pytest.raises(Failed) as info:
            ops.call(opcode, hosts.nodeid, bytes(8))
        assert info.value.errno == errno.ENOSYS
    with pytest.raises(Failed) as info:
        await ops.read(hosts.nodeid, 0, 10)  # the reader's file is missing
    assert info.value.errno == errno.EIO
    with pytest.raises(Failed) as info:
        ops.getxattr(hosts.nodeid, b"user.nope")
    assert info.value.errno == errno.ENODATA
    _blocks, _bfree, _bavail, files, _ffree, bsize, namelen, frsize = ops.statfs()
    assert bsize == frsize == 4096 and namelen == 255 and files > len(entries)
    # A write request, or any other the server does not know: ENOSYS; FORGET: no reply.
    with pytest.raises(Failed) as info:
        ops.call(16, hosts.nodeid, bytes(40))  # FUSE_WRITE
    assert info.value.errno == errno.ENOSYS
    assert ops.ops.handle(request_bytes(p.FORGET, hosts.nodeid, bytes(8))) is None
    names = [name for name, _ in ops.readdirplus(entry.nodeid)]
    assert names[:2] == [b".", b".."] and b"etc" in names


def request_bytes(opcode: int, nodeid: int, body: bytes) -> bytes:
    from tests.support.fuserequests import request

    return request(opcode, nodeid, body)


async def test_adapter_logs_each_failure_once_with_its_layer(
    tar_layer: tuple[Path, list[FileMetadata]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """EIO from the domain: one warning naming the layer; an unexpected exception (a bug):
    EIO, one error record with the traceback and the layer; ENOENT: not logged."""
    from snapshotter.fs.fuse import FuseOperations
    from tests.support.fuserequests import Client, Failed

    _, entries = tar_layer
    host = LayerHost()
    host.add_layer("lay", build_tree(entries), LocalTarReader(tmp_path / "missing"))
    ops = Client(FuseOperations(host))
    layer_root = ops.lookup(FUSE_ROOT_INODE, b"lay")
    etc = ops.lookup(layer_root.nodeid, b"etc")
    hosts = ops.lookup(etc.nodeid, b"hosts")

    caplog.clear()
    with pytest.raises(Failed) as info:
        await ops.read(hosts.nodeid, 0, 10)
    assert info.value.errno == errno.EIO
    assert [(r.levelname, "layer lay" in r.getMessage()) for r in caplog.records] == [
        ("WARNING", True)
    ]

    def broken(self: LayerTree, node: NodeId, inode: int | None = None) -> Attr:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(LayerTree, "attr", broken)
    caplog.clear()
    with pytest.raises(Failed) as info:
        ops.getattr(etc.nodeid)
    assert info.value.errno == errno.EIO
    assert len(caplog.records) == 1
    record = caplog.records[0]
    assert record.levelname == "ERROR" and "layer lay" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError

    monkeypatch.undo()
    caplog.clear()
    with pytest.raises(Failed) as info:
        ops.lookup(etc.nodeid, b"nope")
    assert info.value.errno == errno.ENOENT and caplog.records == []


# -- local blob reader -------------------------------------------------------------------------


async def test_local_blob_reader_verifies_spans_and_shares_work(tmp_path: Path) -> None:
    layer = write_layer(
        [
            Dir(path="d"),
            File(path="d/big", size=3_000_000),
            File(path="d/small", data=b"small"),
            Symlink(path="d/s", target="small"),
            Hardlink(path="d/h", target="d/small"),
        ],
        tmp_path / "blobs",
    )
    ztoc = ztoc_for_layer(layer.path, span_size=256 * 1024)
    assert ztoc.compression.max_span_id > 3
    tree = build_tree(ztoc.files)
    reader = LocalBlobReader(layer.path, ztoc)
    host = LayerHost()
    host.add_layer("l", tree, reader)
    big = _host_resolve(host, "l/d/big")
    fh = big.inode
    results: dict[int, bytes] = {}

    async def read_all(i: int) -> None:
        chunks = [await host.read(fh, off, 131072) for off in range(0, 3_000_000, 131072)]
        results[i] = b"".join(chunks)

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(read_all, i)
    import gzip

    with gzip.open(layer.path) as gz, tarfile.open(fileobj=gz, mode="r|") as tf:
        expected = next(tf.extractfile(m).read() for m in tf if m.name == "d/big")  # type: ignore[union-attr]
    assert all(data == expected for data in results.values())
    progress = reader.progress()
    assert 0 < progress.fetched_bytes <= progress.total_bytes == layer.size

    corrupt = tmp_path / "corrupt.gz"
    blob = bytearray(layer.path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(blob))
    bad = LocalBlobReader(corrupt, ztoc)
    with pytest.raises(LayerReadError, match="span"):
        await bad.read(UncompressedOffset(0), ztoc.uncompressed_archive_size)


def test_pure_modules_do_not_import_fuse_or_grpc() -> None:
    code = (
        "import sys\n"
        "import snapshotter.fs, snapshotter.fs.tree, snapshotter.fs.host, snapshotter.fs.verify\n"
        "bad = {'snapshotter.fs.fuse', 'snapshotter.fs.protocol', 'grpc'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_eio_warnings_are_rate_limited_per_layer(caplog: pytest.LogCaptureFixture) -> None:
    """Every source failing for a layer must not log a line per FUSE read."""
    import logging

    from snapshotter.fs.errors import LayerReadError
    from snapshotter.fs.fuse import EIO_LOG_INTERVAL_SEC, _EioLog

    now = [100.0]
    eio = _EioLog(clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="snapshotter.fs.fuse"):
        for _ in range(500):
            eio("read", "snap-1", LayerReadError("every source failed"))
        eio("read", "snap-2", LayerReadError("every source failed"))
        now[0] += EIO_LOG_INTERVAL_SEC
        eio("read", "snap-1", LayerReadError("every source failed"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0] == "fuse read failed in snap-1: every source failed"
    assert "snap-2" in lines[1]
    assert "and 499 more failures" in lines[2]
