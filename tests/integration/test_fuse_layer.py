"""The layer filesystem mounted for real: FUSE in a child process, overlayfs on top.

Layers are generated with every tar feature (hardlinks, symlinks, long names, PAX xattrs, FIFOs,
devices, empty and large files, whiteouts and opaque directories over lower layers), indexed into
zTOCs, served by `tests.support.fuselayers` and compared with the tar contents: each layer on
its own, and merged by overlayfs against an in-memory extraction with OCI whiteout semantics.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import signal
import stat
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from snapshotter.fs.fuse import cleanup_stale_mount
from snapshotter.mountinfo import is_mountpoint
from snapshotter.remote.apply import apply_tar, decompressed
from tests.support.fuselayers import (
    MEDIA_LAYER_GZIP,
    FuseServer,
    LayerBlob,
    fuse_server,
    read_dir_raw,
)
from tests.support.images import (
    BlockDev,
    CharDev,
    Dir,
    Entry,
    Fifo,
    File,
    Hardlink,
    Layer,
    Opaque,
    Symlink,
    Whiteout,
    write_layer,
)
from tests.support.treecompare import Tree, assert_same_tree, scan_tree

pytestmark = pytest.mark.root

LONG_COMPONENT = "l" * 200
DEEP_DIRS = ["deep", *("deep/" + "/".join(["d" * 60] * i) for i in range(1, 6))]

LOWER: list[Entry] = [
    Dir(path="etc"),
    File(path="etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"),
    File(path="etc/group", data=b"root:x:0:\n"),
    File(path="etc/shadow", data=b"root:*:19000::::::\n", mode=0o600),
    Dir(path="etc/secret", mode=0o700),
    File(path="etc/secret/key", data=b"k" * 100, mode=0o400),
    Dir(path="opt"),
    Dir(path="opt/app"),
    File(path="opt/app/a", data=b"a"),
    File(path="opt/app/b", data=b"b"),
    Dir(path="usr"),
    Dir(path="usr/bin"),
    File(path="usr/bin/tool", size=300_000, mode=0o4755),
    Hardlink(path="usr/bin/tool2", target="usr/bin/tool", mode=0o4755),
    # The last header naming an inode sets its metadata (containerd's applier).
    Hardlink(path="etc/tool3", target="usr/bin/tool", mode=0o4750, uid=3, gid=4),
    Symlink(path="usr/bin/t", target="tool"),
    Symlink(path="usr/bin/abs", target="/etc/passwd"),
    File(path="empty", data=b""),
    File(path="large", size=12_000_000),
    File(path="owned", data=b"owned", uid=1000, gid=1001, mode=0o640),
    File(path="xattrs", data=b"x", xattrs=(("user.comment", "hello"), ("user.other", "x y z"))),
    Dir(path="xdir", xattrs=(("user.dirattr", "1"),)),
    Dir(path="tmp", mode=0o1777),
    Dir(path="run"),
    Fifo(path="run/fifo", mode=0o600),
    Dir(path="dev"),
    CharDev(path="dev/null", major=1, minor=3, mode=0o666),
    BlockDev(path="dev/loop0", major=7, minor=0, mode=0o660),
    Dir(path="long"),
    File(path=f"long/{LONG_COMPONENT}", data=b"long name"),
    *(Dir(path=d) for d in DEEP_DIRS),
    File(path=DEEP_DIRS[-1] + "/leaf", data=b"deep leaf"),
]

MIDDLE: list[Entry] = [
    Dir(path="etc"),
    Whiteout(path="etc/group"),
    File(path="etc/passwd", data=b"root:x:0:0:new:/root:/bin/sh\n"),
    Dir(path="opt"),
    Dir(path="opt/app"),
    Opaque(path="opt/app"),
    File(path="opt/app/c", data=b"c"),
    Dir(path="usr"),
    Dir(path="usr/bin"),
    Whiteout(path="usr/bin/t"),
    Dir(path="newdir", mode=0o750),
    File(path="newdir/f", data=b"new"),
    Whiteout(path="large"),
]

UPPER: list[Entry] = [
    Whiteout(path="long"),
    Dir(path="etc"),
    File(path="etc/group", data=b"wheel:x:10:\n"),
    File(path="empty", data=b"not empty any more"),
    Dir(path="tmp", mode=0o1777),
    File(path="tmp/new", data=b"t"),
]


@dataclass(frozen=True)
class Node:
    """What a path must look like: type bits, perms, owner, size, mtime, target, rdev, xattrs,
    content digest; `links` is the hardlink group key (None when not hardlinked)."""

    kind: int
    perm: int
    uid: int
    gid: int
    size: int | None
    mtime: int | None
    target: str | None
    rdev: int
    xattrs: tuple[tuple[str, bytes], ...]
    digest: str | None
    links: str | None = None


def _members(blob: Path) -> Iterator[tuple[tarfile.TarInfo, bytes]]:
    with gzip.open(blob) as gz, tarfile.open(fileobj=gz, mode="r|") as tf:
        for info in tf:
            data = b""
            if info.isreg():
                f = tf.extractfile(info)
                assert f is not None
                data = f.read()
            yield info, data


def _xattrs(info: tarfile.TarInfo) -> tuple[tuple[str, bytes], ...]:
    prefix = "SCHILY.xattr."
    return tuple(
        sorted(
            (k[len(prefix) :], v.encode("utf-8", "surrogateescape"))
            for k, v in info.pax_headers.items()
            if k.startswith(prefix)
        )
    )


_KINDS = {
    tarfile.REGTYPE: stat.S_IFREG,
    tarfile.DIRTYPE: stat.S_IFDIR,
    tarfile.SYMTYPE: stat.S_IFLNK,
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
}


def _node(info: tarfile.TarInfo, data: bytes) -> Node:
    kind = _KINDS[info.type]
    return Node(
        kind=kind,
        perm=info.mode & 0o7777,
        uid=info.uid,
        gid=info.gid,
        size=len(data) if kind == stat.S_IFREG else None,
        mtime=int(info.mtime),
        target=info.linkname if kind == stat.S_IFLNK else None,
        rdev=os.makedev(info.devmajor, info.devminor)
        if kind in (stat.S_IFCHR, stat.S_IFBLK)
        else 0,
        xattrs=_xattrs(info),
        digest=hashlib.sha256(data).hexdigest() if kind == stat.S_IFREG else None,
    )


def _link_into(view: dict[str, Node], info: tarfile.TarInfo) -> None:
    """Adds hard-link member ``info`` to ``view``: a new name for its target's inode, whose
    owner, permissions (not a symlink's), mtime and xattrs take the member's own values, as
    containerd's applier leaves them (every header is applied to the inode; the last one wins;
    the lchown drops ``security.capability``, setxattr adds)."""
    target = view[info.linkname]
    group = target.links or info.linkname
    xattrs = {k: v for k, v in target.xattrs if k != "security.capability"}
    xattrs.update(_xattrs(info))
    node = replace(
        target,
        perm=target.perm if target.kind == stat.S_IFLNK else info.mode & 0o7777,
        uid=info.uid,
        gid=info.gid,
        mtime=int(info.mtime),
        xattrs=tuple(sorted(xattrs.items())),
        links=group,
    )
    for path in [p for p, n in view.items() if p == info.linkname or n.links == group]:
        view[path] = node
    view[info.name.rstrip("/")] = node


WHITEOUT_NODE = Node(stat.S_IFCHR, 0, 0, 0, None, None, None, 0, (), None)


def expected_layer_view(blob: Path) -> dict[str, Node]:
    """One layer as the FUSE host must show it: whiteouts in overlayfs form."""
    view: dict[str, Node] = {}
    whiteouts: list[str] = []
    opaque: list[str] = []
    for info, data in _members(blob):
        name = info.name.rstrip("/")
        head, _, base = name.rpartition("/")
        if base == ".wh..wh..opq":
            opaque.append(head)
        elif base.startswith(".wh."):
            whiteouts.append(f"{head}/{base[4:]}" if head else base[4:])
        elif info.islnk():
            _link_into(view, info)
        else:
            view[name] = _node(info, data)
    for path in whiteouts:
        view.setdefault(path, WHITEOUT_NODE)
    for path in opaque:
        node = view[path]
        view[path] = replace(node, xattrs=(("trusted.overlay.opaque", b"y"), *node.xattrs))
    return view


def expected_merged_view(blobs: list[Path]) -> dict[str, Node]:
    """Layers applied bottom to top with OCI whiteout semantics (as an unpacker would)."""
    merged: dict[str, Node] = {}

    def drop(path: str, *, keep_self: bool) -> None:
        for p in [p for p in merged if p == path or p.startswith(path + "/")]:
            if not (keep_self and p == path):
                del merged[p]

    for blob in blobs:
        members = list(_members(blob))
        for info, _ in members:  # whiteouts hide lower layers only
            head, _, base = info.name.rstrip("/").rpartition("/")
            if base == ".wh..wh..opq":
                drop(head, keep_self=True)
            elif base.startswith(".wh."):
                drop(f"{head}/{base[4:]}" if head else base[4:], keep_self=False)
        for info, data in members:
            name = info.name.rstrip("/")
            if name.rpartition("/")[2].startswith(".wh."):
                continue
            if info.islnk():
                _link_into(merged, info)
                continue
            if name in merged and not (info.isdir() and merged[name].kind == stat.S_IFDIR):
                drop(name, keep_self=False)
            merged[name] = _node(info, data)
    return merged


def observed_view(root: Path, *, opaque_xattr: bool) -> tuple[dict[str, Node], dict[str, int]]:
    """Every path under `root` with its attributes (contents hashed), and inode numbers."""
    view: dict[str, Node] = {}
    inodes: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            digest = None
            if kind == stat.S_IFREG:
                with open(full, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            xattrs: tuple[tuple[str, bytes], ...] = ()
            if kind in (stat.S_IFREG, stat.S_IFDIR):
                keys = sorted(os.listxattr(full, follow_symlinks=False))
                xattrs = tuple(
                    (k, os.getxattr(full, k, follow_symlinks=False))
                    for k in keys
                    if k.startswith("user.") or (opaque_xattr and k == "trusted.overlay.opaque")
                )
            if opaque_xattr and kind == stat.S_IFDIR:
                try:
                    value = os.getxattr(full, "trusted.overlay.opaque", follow_symlinks=False)
                    xattrs = (("trusted.overlay.opaque", value), *xattrs)
                except OSError as e:
                    assert e.errno == errno.ENODATA, (full, e)
                xattrs = tuple(dict(xattrs).items())
            view[rel] = Node(
                kind=kind,
                perm=stat.S_IMODE(st.st_mode),
                uid=st.st_uid,
                gid=st.st_gid,
                size=st.st_size if kind == stat.S_IFREG else None,
                mtime=st.st_mtime_ns // 1_000_000_000,
                target=os.readlink(full) if kind == stat.S_IFLNK else None,
                rdev=st.st_rdev,
                xattrs=xattrs,
                digest=digest,
            )
            inodes[rel] = st.st_ino
    return view, inodes


def _without_links(view: dict[str, Node]) -> dict[str, Node]:
    return {p: replace(n, links=None) for p, n in view.items()}


def _assert_same(observed: dict[str, Node], expected: dict[str, Node]) -> None:
    missing = sorted(set(expected) - set(observed))
    extra = sorted(set(observed) - set(expected))
    assert not missing and not extra, f"missing {missing}, unexpected {extra}"
    expected = _without_links(expected)
    observed = {
        p: replace(n, mtime=None) if expected[p].mtime is None else n for p, n in observed.items()
    }
    wrong = {p: (observed[p], expected[p]) for p in expected if observed[p] != expected[p]}
    assert not wrong, wrong


def _assert_hardlink_groups(expected: dict[str, Node], inodes: dict[str, int], root: Path) -> None:
    groups: dict[str, list[str]] = {}
    for path, node in expected.items():
        if node.links is not None:
            groups.setdefault(node.links, []).append(path)
    assert groups, "the layers were meant to contain hardlinks"
    for paths in groups.values():
        assert len({inodes[p] for p in paths}) == 1, paths
        assert all(os.lstat(root / p).st_nlink == len(paths) for p in paths), paths


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> list[Layer]:
    if os.geteuid() != 0:
        pytest.skip("FUSE and overlay mounts need root (this test runs as root in CI)")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing: FUSE is not available on this machine")
    blobs = tmp_path_factory.mktemp("blobs")
    return [write_layer(spec, blobs) for spec in (LOWER, MIDDLE, UPPER)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, layers: list[Layer]) -> Iterator[FuseServer]:
    work = tmp_path_factory.mktemp("fuse")
    names = ["lower", "middle", "upper"]
    specs = [
        LayerBlob(n, layer.path, span_size=1 << 20) for n, layer in zip(names, layers, strict=True)
    ]
    with fuse_server(work, specs) as srv:
        yield srv
    assert srv.proc.poll() is not None
    assert not is_mountpoint(srv.mountpoint)


def test_each_layer_matches_its_tar(server: FuseServer, layers: list[Layer]) -> None:
    assert sorted(os.listdir(server.mountpoint)) == ["lower", "middle", "upper"]
    for name, layer in zip(["lower", "middle", "upper"], layers, strict=True):
        root = server.mountpoint / name
        expected = expected_layer_view(layer.path)
        observed, inodes = observed_view(root, opaque_xattr=True)
        _assert_same(observed, expected)
        if name == "lower":
            _assert_hardlink_groups(expected, inodes, root)
    # Whiteout names are never visible, but the overlay form is.
    with pytest.raises(FileNotFoundError):
        os.lstat(server.mountpoint / "middle/etc/.wh.group")
    assert os.lstat(server.mountpoint / "middle/etc/group").st_rdev == 0


def test_read_only_and_errnos(server: FuseServer) -> None:
    target = server.mountpoint / "lower/etc/passwd"
    with pytest.raises(OSError) as info, open(target, "r+b"):
        pass
    assert info.value.errno == errno.EROFS
    with pytest.raises(OSError) as info:
        (server.mountpoint / "lower/newfile").write_bytes(b"x")
    assert info.value.errno == errno.EROFS
    with pytest.raises(OSError) as info:
        os.getxattr(target, "user.none")
    assert info.value.errno == errno.ENODATA
    st = os.statvfs(server.mountpoint)
    assert st.f_flag & os.ST_RDONLY and st.f_bsize == 4096 and st.f_files > 0
    # default_permissions: the kernel applies the mode bits for non-root callers.
    result = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "cat",
            str(server.mountpoint / "lower/etc/secret/key"),
        ],
        capture_output=True,
        check=False,
    )
    assert result.returncode != 0 and b"Permission denied" in result.stderr


def test_overlay_merge_matches_whiteout_extraction(
    server: FuseServer, layers: list[Layer], tmp_path: Path
) -> None:
    upper, work, merged = tmp_path / "upper", tmp_path / "work", tmp_path / "merged"
    for d in (upper, work, merged):
        d.mkdir()
    m = server.mountpoint
    lowerdir = f"{m / 'upper'}:{m / 'middle'}:{m / 'lower'}"
    options = f"lowerdir={lowerdir},upperdir={upper},workdir={work}"
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
        check=True,
        capture_output=True,
    )
    try:
        observed, inodes = observed_view(merged, opaque_xattr=False)
        expected = expected_merged_view([layer.path for layer in layers])
        _assert_same(observed, expected)
        _assert_hardlink_groups(expected, inodes, merged)
        assert not (merged / "opt/app/a").exists()  # hidden by the opaque directory
        assert (merged / "opt/app/c").read_bytes() == b"c"
        assert not (merged / "long").exists() and not (merged / "large").exists()
        (merged / "etc/passwd").write_bytes(b"copied up\n")  # copy-up reads through FUSE
        assert (upper / "etc/passwd").read_bytes() == b"copied up\n"
    finally:
        subprocess.run(["umount", str(merged)], check=False, capture_output=True)
    assert not is_mountpoint(merged)


def test_concurrent_reads_give_the_same_bytes(server: FuseServer, layers: list[Layer]) -> None:
    expected = {info.name: data for info, data in _members(layers[0].path) if info.name == "large"}[
        "large"
    ]
    path = server.mountpoint / "lower/large"
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def reader(i: int) -> None:
        try:
            chunk = 65536 * (i + 1)
            fd = os.open(path, os.O_RDONLY)
            try:
                parts: dict[int, bytes] = {}
                offsets = list(range(0, len(expected), chunk))
                if i % 2:
                    offsets.reverse()
                for off in offsets:
                    parts[off] = os.pread(fd, chunk, off)
                data = b"".join(parts[o] for o in sorted(parts))
            finally:
                os.close(fd)
            results[i] = hashlib.sha256(data).hexdigest()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert set(results.values()) == {hashlib.sha256(expected).hexdigest()}
    status = json.loads((server.mountpoint / "lower/.sociable/status.json").read_text())
    assert status["layer"] == "lower" and status["readErrors"] == 0
    assert 0 < status["fetchedSize"] <= status["totalSize"] == layers[0].size
    assert status["bytesServed"] >= len(expected)
    assert ".sociable" not in os.listdir(server.mountpoint / "lower")


def test_server_killed_mount_is_cleaned(layers: list[Layer], tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError, match="boom"),
        fuse_server(tmp_path, [LayerBlob("upper", layers[2].path)]) as srv,
    ):
        assert (srv.mountpoint / "upper/etc/group").read_bytes() == b"wheel:x:10:\n"
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(timeout=30)
        assert is_mountpoint(srv.mountpoint)  # a dead FUSE mount stays until cleaned
        raise RuntimeError("boom")
    assert srv.proc.poll() is not None
    assert not is_mountpoint(srv.mountpoint)
    assert cleanup_stale_mount(srv.mountpoint) is False


def test_clean_shutdown_unmounts(layers: list[Layer], tmp_path: Path) -> None:
    with fuse_server(tmp_path, [LayerBlob("upper", layers[2].path)]) as srv:
        assert os.listdir(srv.mountpoint) == ["upper"]
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(timeout=30)
        assert srv.proc.returncode == 0, srv.log()
        deadline = time.monotonic() + 10
        while is_mountpoint(srv.mountpoint) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_mountpoint(srv.mountpoint), "the server unmounts on SIGTERM"


def test_remove_and_readd_layer_while_mounted(layers: list[Layer], tmp_path: Path) -> None:
    specs = [LayerBlob("lower", layers[0].path), LayerBlob("upper", layers[2].path)]
    with fuse_server(tmp_path, specs) as srv:
        m = srv.mountpoint
        group = m / "upper/etc/group"
        inode = os.stat(group).st_ino
        status_path = m / "upper/.sociable/status.json"
        served_before = json.loads(status_path.read_text())["bytesServed"]
        fd = os.open(group, os.O_RDONLY)
        try:
            assert srv.control([{"remove": "upper"}]) == ["ok"]
            assert os.listdir(m) == ["lower"]
            # Entries have long timeouts, so only the invalidation makes these disappear.
            with pytest.raises(FileNotFoundError):
                os.stat(m / "upper")
            with pytest.raises(FileNotFoundError):
                os.stat(group)
            with pytest.raises(OSError) as info:
                os.pread(fd, 100, 0)
            assert info.value.errno == errno.EIO
        finally:
            os.close(fd)
        layer = {"name": "upper", "blob": str(layers[2].path), "span_size": 1 << 22}
        layer["slot"] = inode >> 32
        assert srv.control([{"add": layer}]) == ["ok"]
        assert os.stat(group).st_ino == inode  # same slot, same zTOC: same inode numbers
        assert group.read_bytes() == b"wheel:x:10:\n"
        status = json.loads(status_path.read_text())
        assert status["bytesServed"] == len(b"wheel:x:10:\n") and served_before == 0
        assert srv.control([{"remove": "nope"}])[0].startswith("error: NotFound")


# -- the lazy layer against the same layer unpacked on ext4 by the local applier -----------------

LAYER_NAMES = ("lower", "middle", "upper")


@pytest.fixture(scope="module")
def applied(tmp_path_factory: pytest.TempPathFactory, layers: list[Layer]) -> dict[str, Path]:
    """Each layer applied on its own by `snapshotter.remote.apply` into an ext4 directory."""
    base = tmp_path_factory.mktemp("applied")
    out: dict[str, Path] = {}
    for name, layer in zip(LAYER_NAMES, layers, strict=True):
        dest = base / name
        dest.mkdir()
        with decompressed(layer.path, MEDIA_LAYER_GZIP) as stream:
            apply_tar(stream, dest)
        out[name] = dest
    return out


def _whiteout_times_zeroed(tree: Tree) -> Tree:
    """containerd creates a whiteout device at unpack time (no mtime from the tar); the lazy
    tree reports 0. Everything else about whiteouts is compared."""
    nodes = {
        p: replace(n, mtime_ns=0) if n.kind == "char" and n.rdev == (0, 0) else n
        for p, n in tree.nodes.items()
    }
    return Tree(root=tree.root, nodes=nodes)


def test_local_applier_matches_lazy_layer(
    server: FuseServer, applied: dict[str, Path], layers: list[Layer]
) -> None:
    for name in LAYER_NAMES:
        local = _whiteout_times_zeroed(scan_tree(applied[name]))
        lazy = _whiteout_times_zeroed(scan_tree(server.mountpoint / name))
        assert_same_tree(local, lazy)
    assert stat.S_ISCHR(os.lstat(applied["middle"] / "etc/group").st_mode)


def _dir_listings(root: Path) -> dict[str, list[bytes]]:
    """`readdir` names (`.` and `..` included) of every directory below `root`, sorted."""
    out: dict[str, list[bytes]] = {}
    for dirpath, _, _ in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        out[rel] = sorted(name for name, _, _ in read_dir_raw(Path(dirpath)))
    return out


def test_dot_and_dotdot_are_listed_as_on_ext4(
    server: FuseServer, applied: dict[str, Path], tmp_path: Path
) -> None:
    """`ls -a` in a lazy layer shows `.` and `..` like the same layer on ext4, directly and
    through overlayfs, with the right inode numbers and offsets that resume anywhere."""
    for name in LAYER_NAMES:
        lazy = _dir_listings(server.mountpoint / name)
        assert lazy == _dir_listings(applied[name])
        assert all(names[:2] == [b".", b".."] for names in lazy.values())
    ls = subprocess.run(
        ["ls", "-a1f", str(server.mountpoint / "lower/etc")], capture_output=True, check=True
    )
    assert ls.stdout.split(b"\n")[:2] == [b".", b".."]

    for directory, parent in (
        (server.mountpoint, server.mountpoint),  # the filesystem root is its own parent
        (server.mountpoint / "lower", server.mountpoint),
        (server.mountpoint / "lower/etc", server.mountpoint / "lower"),
        (server.mountpoint / "lower/etc/secret", server.mountpoint / "lower/etc"),
    ):
        listing = read_dir_raw(directory)
        inodes = {name: ino for name, ino, _ in listing}
        assert inodes[b"."] == os.stat(directory).st_ino
        assert inodes[b".."] == os.stat(parent).st_ino
        for i, (_, _, off) in enumerate(listing):
            assert read_dir_raw(directory, off) == listing[i + 1 :]

    def overlay(lowers: list[Path], target: Path) -> None:
        target.mkdir()
        options = "lowerdir=" + ":".join(map(str, lowers))
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(target)],
            check=True,
            capture_output=True,
        )

    lazy_view, local_view = tmp_path / "lazy", tmp_path / "local"
    overlay([server.mountpoint / n for n in reversed(LAYER_NAMES)], lazy_view)
    try:
        overlay([applied[n] for n in reversed(LAYER_NAMES)], local_view)
        try:
            assert _dir_listings(lazy_view) == _dir_listings(local_view)
            assert read_dir_raw(lazy_view / "usr/bin")[0][0] in (b".", b"..")
        finally:
            subprocess.run(["umount", str(local_view)], check=False, capture_output=True)
    finally:
        subprocess.run(["umount", str(lazy_view)], check=False, capture_output=True)
