"""The root filesystem sociable serves is the one containerd's overlayfs snapshotter builds.

One image uses every tar feature across five layers: whiteouts of files, of directories and of
a hard-link peer, opaque directories over lower content, files replaced by directories and back,
hard links (three names for one inode), long names (a 255-byte component, paths over 400 bytes,
GNU ``././@LongLink`` headers and PAX ``path``/``linkpath`` records), PAX xattrs (``user.*`` and
``trusted.*``), PAX mtimes with nanoseconds, FIFOs, character and block devices (a minor number
over 255), empty files, a 9 MiB run of zeros and pseudo-random files across span boundaries,
setuid/setgid/sticky modes, uids and gids over 2**21 (PAX only), absolute, relative, long and
dangling symlinks, deep directories and non-ASCII names.

It is pushed to a local registry and indexed with ``sociable convert --min-layer-size 0``. Then
one private containerd 1.6 pulls it twice: with its built-in ``overlayfs`` snapshotter
(``ctr images pull``), and through CRI ``PullImage`` with ``snapshotter = "sociable"`` (lazily,
when the daemon has the remote-layer path). A read-only view of the top layer is made in each
snapshotter through containerd's Snapshots service, both are mounted, and the two trees are
compared attribute by attribute (``tests.support.treecompare``). As a check of the comparison
itself, the overlayfs tree is also compared with a plain extraction of the layers done here in
Python (whiteouts applied by hand).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

from tests.support import images
from tests.support.cli import sociable
from tests.support.containerd import (
    PROXY_NAME,
    Containerd,
    ContainerdSnapshots,
    require_containerd,
    start_containerd,
)
from tests.support.images import (
    BlockDev,
    CharDev,
    Dir,
    Entry,
    Fifo,
    File,
    Hardlink,
    Opaque,
    Symlink,
    Whiteout,
)
from tests.support.registry import RegistryServer
from tests.support.snapclient import SnapClient, mounted, run_daemon
from tests.support.treecompare import Tree, assert_same_tree, scan_tree

pytestmark = [pytest.mark.root, pytest.mark.slow]

MIB = 1 << 20
SPAN_SIZE = MIB
"""Small spans, so that several files cross span boundaries."""

REMOTE_LABEL = "containerd.io/snapshot/remote"
NS_MTIME = "1700000123.123456789"
LONG_COMPONENT = "L" * 255
DEEP = "/".join(f"deep{i:02d}-" + "d" * 14 for i in range(24))  # 24 levels, 480 bytes


# ---------------------------------------------------------------------------------------------
# The image


def lower_layer() -> list[Entry]:
    """Layer 1: busybox and the lower content later layers delete, hide or replace."""
    return [
        *images.busybox_layer(),
        Dir(path="lower"),
        Dir(path="lower/keep"),
        File(path="lower/keep/a.txt", data=b"kept\n"),
        Dir(path="lower/gone-dir"),
        File(path="lower/gone-dir/x", data=b"x\n"),
        Dir(path="lower/gone-dir/sub"),
        File(path="lower/gone-dir/sub/y", data=b"y\n"),
        Dir(path="lower/opaque-me", mode=0o750, uid=7, gid=8),
        File(path="lower/opaque-me/old1", data=b"old1\n"),
        Dir(path="lower/opaque-me/olddir"),
        File(path="lower/opaque-me/olddir/old2", data=b"old2\n"),
        File(path="lower/becomes-dir", data=b"a file below\n"),
        Dir(path="lower/becomes-file"),
        File(path="lower/becomes-file/child", data=b"child\n"),
        File(path="lower/rewritten", data=b"lower version\n", mode=0o600),
        File(path="lower/chmodded", data=b"same bytes\n", mode=0o644),
        Dir(path="fakeopq"),
        File(path="fakeopq/from-layer1", data=b"must stay visible\n"),
    ]


def features_layer() -> list[Entry]:
    """Layer 2: one of everything, with odd metadata."""
    zeros = bytes(9 * MIB + 123)
    return [
        Dir(path="f"),
        File(path="f/empty"),
        File(path="f/zeros.bin", data=zeros),
        File(path="f/random.bin", data=b"R", size=5 * MIB + 7),
        File(path="f/tail-zeros.bin", data=b"head" + bytes(3 * MIB)),
        File(path="f/setuid", data=b"#!/bin/sh\n", mode=0o4755),
        File(path="f/setgid", data=b"#!/bin/sh\n", mode=0o2711),
        File(path="f/no-perms", data=b"secret\n", mode=0o000),
        File(path="f/read-only", data=b"ro\n", mode=0o444),
        Dir(path="f/sticky", mode=0o1777),
        Dir(path="f/private", mode=0o700, uid=1000, gid=1000),
        File(path="f/private/inside", data=b"in\n", uid=1000, gid=1000, mode=0o600),
        File(path="f/nobody", data=b"n\n", uid=65534, gid=65534),
        File(path="f/big-ids", data=b"b\n", uid=4_000_000, gid=3_000_000),
        File(path="f/hl-src", data=b"three names, one inode\n", mode=0o640, uid=5, gid=6),
        # The link headers' metadata differs from the file's: the last header wins.
        Hardlink(path="f/hl-a", target="f/hl-src", mode=0o600, uid=11, gid=12),
        Dir(path="f/hl-dir"),
        Hardlink(path="f/hl-dir/hl-b", target="f/hl-src", mode=0o604, uid=13, gid=14),
        File(path="f/hl2-src", data=b"two names\n"),
        Hardlink(path="f/hl2-peer", target="f/hl2-src"),
        Symlink(path="f/abs-link", target="/etc/passwd"),
        Symlink(path="f/rel-link", target="../lower/keep/a.txt"),
        Symlink(path="f/dir-link", target="../lower/keep"),
        Symlink(path="f/dangling", target="nowhere/at/all"),
        Symlink(path="f/long-link", target="/" + DEEP + "/leaf.txt"),
        File(path="f/" + LONG_COMPONENT, data=b"255-byte name\n"),
        Dir(path="f/" + DEEP.split("/")[0]),
        *[
            Dir(path="f/" + "/".join(DEEP.split("/")[: i + 1]))
            for i in range(1, len(DEEP.split("/")))
        ],
        File(path="f/" + DEEP + "/leaf.txt", data=b"deep leaf\n"),
        File(path="f/ünïcødé-名前-😀.txt", data="unicode ✓\n".encode()),
        Dir(path="f/Καλημέρα"),
        File(path="f/Καλημέρα/κόσμε", data=b"greek\n"),
        File(path="f/name with spaces & $ymbols!", data=b"spaces\n"),
        File(path="f/not.wh.whiteout", data=b".wh. in the middle is a plain name\n"),
        File(
            path="f/xattrs",
            data=b"xattrs\n",
            xattrs=(
                ("user.sociable.one", "value-1"),
                ("user.sociable.utf8", "ünï ✓"),
                ("trusted.sociable", "trusted-value"),
            ),
        ),
        Dir(path="f/xattr-dir", xattrs=(("user.dir", "on a directory"),)),
        Fifo(path="f/fifo", mode=0o600),
        CharDev(path="f/null", major=1, minor=3, mode=0o666),
        CharDev(path="f/tty-ish", major=136, minor=300, mode=0o620, gid=5),
        BlockDev(path="f/loop", major=7, minor=0, mode=0o660, gid=6),
        BlockDev(path="f/sda1", major=8, minor=1),
        File(path="f/doomed", data=b"deleted above\n"),
        File(path="f/shared", data=b"layer 2 version\n"),
    ]


def upper_layer() -> list[Entry]:
    """Layer 3: whiteouts, opaque directories and replacements over layers 1 and 2."""
    return [
        Dir(path="lower"),
        Whiteout(path="lower/gone-dir"),
        Dir(path="lower/opaque-me", mode=0o755, uid=9, gid=10),
        Opaque(path="lower/opaque-me"),
        File(path="lower/opaque-me/new", data=b"after the opaque marker\n"),
        Dir(path="lower/becomes-dir"),
        File(path="lower/becomes-dir/inside", data=b"now a directory\n"),
        File(path="lower/becomes-file", data=b"now a file\n"),
        File(path="lower/rewritten", data=b"upper version, longer than before\n", mode=0o644),
        File(path="lower/chmodded", data=b"same bytes\n", mode=0o755),
        Dir(path="f"),
        Whiteout(path="f/doomed"),
        Whiteout(path="f/hl-a"),  # the other two names of that inode stay
        File(path="f/shared", data=b"layer 3 version\n"),
        Dir(path="f/fresh-opaque"),
        Opaque(path="f/fresh-opaque"),  # opaque over nothing: harmless
        File(path="f/fresh-opaque/file", data=b"fresh\n"),
        # An image must not steer overlayfs: containerd drops trusted.* records from archives.
        Dir(path="fakeopq", xattrs=(("trusted.overlay.opaque", "y"),)),
        File(path="fakeopq/from-layer3", data=b"upper\n"),
    ]


def whiteout_dir_layer() -> list[Entry]:
    """Layer 5 (over the hand-written layer 4): deletes a whole directory of layer 2 and
    recreates a name of layer 4 with another type."""
    return [
        Dir(path="f"),
        Whiteout(path="f/Καλημέρα"),
        Dir(path="pax"),
        Whiteout(path="pax/replaced"),
        Symlink(path="pax/replaced", target="now-a-symlink"),
    ]


def _pax_ns_entries() -> Iterator[tuple[tarfile.TarInfo, bytes | None]]:
    """Layer 4 entries: PAX mtimes with nanoseconds (Python's tarfile writes integer seconds
    unless given the PAX record) and a GNU long-name member is in :func:`_gnu_layer`."""

    def info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = mode
        ti.mtime = int(Decimal(NS_MTIME))
        ti.uname = ti.gname = ""
        ti.pax_headers = {"mtime": NS_MTIME}
        return ti

    yield info("pax", tarfile.DIRTYPE, 0o755), None
    data = b"nanosecond mtime\n"
    ti = info("pax/ns-file", tarfile.REGTYPE, 0o644)
    ti.size = len(data)
    yield ti, data
    sym = info("pax/ns-symlink", tarfile.SYMTYPE, 0o777)
    sym.linkname = "ns-file"
    yield sym, None
    rep = info("pax/replaced", tarfile.REGTYPE, 0o644)
    rep.size = 3
    yield rep, b"abc"
    # Long names as GNU writes them would also come here, but one tar stream has one format:
    # the GNU layer below carries them.


def _gnu_entries() -> Iterator[tuple[tarfile.TarInfo, bytes | None]]:
    """GNU-format members with ``././@LongLink`` names and link targets."""
    name = "gnu/" + "g" * 150 + "/" + "n" * 200
    d1 = tarfile.TarInfo("gnu")
    d1.type, d1.mode, d1.mtime = tarfile.DIRTYPE, 0o755, images.FIXED_MTIME
    yield d1, None
    d2 = tarfile.TarInfo("gnu/" + "g" * 150)
    d2.type, d2.mode, d2.mtime = tarfile.DIRTYPE, 0o755, images.FIXED_MTIME
    yield d2, None
    data = b"gnu long name\n"
    f = tarfile.TarInfo(name)
    f.mode, f.mtime, f.size = 0o644, images.FIXED_MTIME, len(data)
    yield f, data
    link = tarfile.TarInfo("gnu/long-target-link")
    link.type, link.mode, link.mtime = tarfile.SYMTYPE, 0o777, images.FIXED_MTIME
    link.linkname = name.split("/", 1)[1]
    yield link, None
    hard = tarfile.TarInfo("gnu/" + "h" * 120)
    hard.type, hard.mtime, hard.mode = tarfile.LNKTYPE, images.FIXED_MTIME, 0o644
    hard.linkname = name
    yield hard, None


def build_feature_image(layout: Path, tag: str = "v1") -> images.Image:
    """Writes the six-layer feature image as an OCI layout (deterministic but for nothing)."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    layers = (
        images.write_layer(lower_layer(), blobs),
        images.write_layer(features_layer(), blobs),
        images.write_layer(upper_layer(), blobs),
        images.write_raw_layer(_pax_ns_entries(), blobs),
        images.write_layer(whiteout_dir_layer(), blobs),
        images.write_raw_layer(_gnu_entries(), blobs, fmt=tarfile.GNU_FORMAT),
    )
    cmd = ["/bin/sh", "-c", "cat /f/shared"]
    return images.write_image_layout(layout, layers, tag=tag, cmd=cmd)


LOCAL_MIN_LAYER_SIZE = 64 * 1024
"""`convert --min-layer-size` for the local-unpack image: the busybox layer gets a zTOC, the
small layer does not (the zstd layer never does), so the daemon unpacks those two itself."""
LOCAL_TIMES = {
    "up": "1700000022.999999999",  # float seconds give ...023.000000000
    "low": "1700000031.123456789",  # float seconds give ...031.123456768
    "dir": "1700000044.000000001",
    "link": "1700000055.987654321",
}


def _timed(name: str, kind: bytes, mtime: str, **fields: object) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    ti.mtime = int(Decimal(mtime))
    ti.uname = ti.gname = ""
    ti.pax_headers = {"mtime": mtime, "atime": "1800000000.5"}
    for key, value in fields.items():
        setattr(ti, key, value)
    return ti


def _small_local_entries() -> Iterator[tuple[tarfile.TarInfo, bytes | None]]:
    """Layer 2 of the local-unpack image (gzip, under the minimum size): nanosecond PAX times on
    every type, a hard link whose header changes the inode, names with `..`, an ignored root
    entry, a whiteout and an opaque directory over the lazy layer below, a trusted.* xattr."""
    t = LOCAL_TIMES
    yield _timed("./", tarfile.DIRTYPE, t["up"], mode=0o700, uid=9), None
    yield _timed("ns", tarfile.DIRTYPE, t["dir"]), None
    for key in ("up", "low"):
        data = f"{key}\n".encode()
        yield _timed(f"ns/{key}", tarfile.REGTYPE, t[key], size=len(data)), data
    yield _timed("ns/link", tarfile.SYMTYPE, t["link"], linkname="up"), None
    yield _timed("ns/hard", tarfile.LNKTYPE, t["low"], linkname="ns/up", mode=0o600, uid=3), None
    data = b"escaped?\n"
    yield _timed("../../ns/dotdot", tarfile.REGTYPE, t["low"], size=len(data)), data
    yield _timed("ns/sub/../../ns/clamped", tarfile.DIRTYPE, t["dir"]), None
    trusted = _timed("ns/trusted", tarfile.REGTYPE, t["up"], size=1)
    trusted.pax_headers = {
        **trusted.pax_headers,
        "SCHILY.xattr.trusted.overlay.opaque": "y",
        "SCHILY.xattr.user.kept": "k",
    }
    yield trusted, b"t"
    # Without its own entry `bin` would get the unpack time (the whiteout device is created in
    # it), on both sides but not the same instant.
    yield _timed("bin", tarfile.DIRTYPE, t["dir"]), None
    yield _timed("bin/.wh.vi", tarfile.REGTYPE, t["up"], size=0), b""
    yield _timed("etc", tarfile.DIRTYPE, t["dir"]), None
    yield _timed("etc/.wh..wh..opq", tarfile.REGTYPE, t["up"], size=0), b""
    yield _timed("etc/only", tarfile.REGTYPE, t["low"], size=1), b"o"


def _zstd_local_entries() -> Iterator[tuple[tarfile.TarInfo, bytes | None]]:
    """Layer 3 (zstd: never indexed): replaces and adds nanosecond-timed entries."""
    t = LOCAL_TIMES
    yield _timed("ns", tarfile.DIRTYPE, t["low"]), None
    data = b"zstd replaced\n"
    yield _timed("ns/low", tarfile.REGTYPE, t["up"], size=len(data), mode=0o640), data
    yield _timed("zstd", tarfile.DIRTYPE, t["dir"]), None
    yield _timed("zstd/f", tarfile.REGTYPE, t["link"], size=2), b"zz"


def build_local_unpack_image(layout: Path, tag: str = "v1") -> images.Image:
    """A lazily served busybox layer under a small gzip layer and a zstd layer that the daemon
    unpacks itself (`snapshotter.remote.apply`), both with nanosecond PAX times."""
    blobs = layout / "blobs" / "sha256"
    layers = (
        images.write_layer(images.busybox_layer(), blobs),
        images.write_raw_layer(_small_local_entries(), blobs),
        images.write_raw_layer(_zstd_local_entries(), blobs, compression="zstd"),
    )
    assert layers[0].size >= LOCAL_MIN_LAYER_SIZE > layers[1].size
    return images.write_image_layout(layout, layers, tag=tag, cmd=("/bin/ls", "/ns"))


def check_local_tree(tree: Tree) -> None:
    """Spot checks that the local-unpack image's features reached the reference tree."""
    n = tree.nodes
    ns = {key: int(Decimal(value) * 1_000_000_000) for key, value in LOCAL_TIMES.items()}
    assert n["ns/trusted"].mtime_ns == ns["up"] and ns["up"] % 10**9 == 999_999_999
    assert n["ns/up"].mtime_ns == ns["low"]  # the hard link's header wins
    assert n["ns/low"].mtime_ns == ns["up"] and n["ns"].mtime_ns == ns["low"]
    assert n["ns/link"].mtime_ns == ns["link"] and n["zstd/f"].mtime_ns == ns["link"]
    assert (n["ns/up"].mode, n["ns/up"].uid, n["ns/up"].nlink) == (0o600, 3, 2)
    assert "ns/dotdot" in n and "ns/clamped" in n
    assert dict(n["ns/trusted"].xattrs) == {"user.kept": b"k"}
    assert "bin/vi" not in n and "bin/sh" in n
    assert sorted(p for p in n if p.startswith("etc/")) == ["etc/only"]


# ---------------------------------------------------------------------------------------------
# A plain extraction, as a reference for the reference


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _mtime_ns(member: tarfile.TarInfo) -> int:
    text = member.pax_headers.get("mtime")
    if text is not None:
        return int(Decimal(text) * 1_000_000_000)
    return int(member.mtime) * 1_000_000_000


def apply_layer(blob: Path, dest: Path) -> None:
    """Applies one gzip tar layer onto ``dest`` the way the OCI spec describes: ``.wh.NAME``
    deletes NAME of lower layers, ``.wh..wh..opq`` empties its directory of lower content, an
    entry replaces a lower non-directory (or a directory, when it is not one itself), metadata
    and xattrs as recorded (a hard-link header's own metadata lands on the shared inode, as
    containerd's applier does: the last header wins) (but ``trusted.*``, which containerd refuses to set from an archive),
    directory mtimes set last. Hard links take no metadata of their
    own. Raises ``OSError``/``tarfile.TarError``."""
    created: set[str] = set()
    dir_times: list[tuple[Path, int]] = []
    with tarfile.open(blob, "r:gz") as tf:
        for m in tf:
            name = m.name.removeprefix("./").strip("/")
            parent, _, base = name.rpartition("/")
            pdir = dest / parent if parent else dest
            if base == ".wh..wh..opq":
                for child in os.listdir(pdir):
                    rel = f"{parent}/{child}" if parent else child
                    if rel not in created:
                        _remove(pdir / child)
                continue
            if base.startswith(".wh."):
                _remove(pdir / base[4:])
                continue
            target = dest / name
            if os.path.lexists(target) and not (m.isdir() and target.is_dir()):
                _remove(target)
            created.add(name)
            if m.islnk():
                os.link(dest / m.linkname.removeprefix("./").strip("/"), target)
            elif m.isdir():
                target.mkdir(exist_ok=True)
            elif m.isreg():
                src = tf.extractfile(m)
                assert src is not None
                with open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
            elif m.issym():
                os.symlink(m.linkname, target)
            elif m.isfifo():
                os.mkfifo(target)
            elif m.ischr() or m.isblk():
                kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
                os.mknod(target, kind | 0o600, os.makedev(m.devmajor, m.devminor))
            else:
                raise tarfile.TarError(f"unexpected member type {m.type!r} of {name}")
            os.lchown(target, m.uid, m.gid)
            if not m.issym():
                os.chmod(target, m.mode)
            for key, value in m.pax_headers.items():
                if key.startswith("SCHILY.xattr.") and not key.startswith("SCHILY.xattr.trusted."):
                    os.setxattr(
                        target,
                        key[len("SCHILY.xattr.") :],
                        value.encode("utf-8", "surrogateescape"),
                        follow_symlinks=False,
                    )
            ns = _mtime_ns(m)
            if m.isdir():
                dir_times.append((target, ns))
            else:
                os.utime(target, ns=(ns, ns), follow_symlinks=False)
    for path, ns in reversed(dir_times):
        if path.exists():
            os.utime(path, ns=(ns, ns))


# ---------------------------------------------------------------------------------------------
# The test


@dataclass(frozen=True)
class Pushed:
    image: images.Image
    ref: str
    """The converted (indexed) image reference in the registry."""


def push_and_convert(
    registry: RegistryServer,
    base: Path,
    build: Callable[[Path], images.Image],
    repo: str,
    *convert_args: str,
) -> Pushed:
    """Build the image under `base`, push it to `<repo>/src:v1` and index it into
    `<repo>/indexed:v1` with `sociable convert <convert_args>`."""
    require_containerd()
    image = build(base / "layout")
    src = images.push(image, registry.host, f"{repo}/src", "v1")
    dst = registry.ref(f"{repo}/indexed", "v1")
    sociable("convert", *convert_args, src, dst, root=base / "index-root")
    return Pushed(image=image, ref=dst)


@pytest.fixture(scope="module")
def feature_image(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    base = tmp_path_factory.mktemp("lazy-tree")
    args = ("--min-layer-size", "0", "--span-size", str(SPAN_SIZE))
    return push_and_convert(registry, base, build_feature_image, "lazy-tree", *args)


@pytest.fixture(scope="module")
def local_unpack_image(
    registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory
) -> Pushed:
    base = tmp_path_factory.mktemp("local-tree")
    args = ("--min-layer-size", str(LOCAL_MIN_LAYER_SIZE))
    return push_and_convert(registry, base, build_local_unpack_image, "local-tree", *args)


@contextlib.contextmanager
def mounted_view(
    ctd: Containerd, snapshotter: str, namespace: str, parent: str, target: Path
) -> Iterator[Path]:
    """A read-only view of ``parent`` made through containerd's Snapshots service, mounted on
    ``target`` for the body; the view is removed afterwards."""
    client = ContainerdSnapshots(ctd.address, snapshotter, namespace)
    key = f"tree-view-{snapshotter}"
    try:
        with mounted(client.view(key, parent=parent), target) as root:
            yield root
    finally:
        with contextlib.suppress(Exception):
            client.remove(key)
        client.close()


def lazy_path_available() -> bool:
    """Whether this checkout has the daemon's remote-layer path (``snapshotter/remote``); when
    it does, every layer of the image must be mounted lazily, not unpacked."""
    return (Path(__file__).resolve().parents[2] / "snapshotter" / "remote").is_dir()


def _remote_layers(backend: SnapClient) -> int:
    return sum(1 for i in backend.list() if REMOTE_LABEL in i.labels)


def check_feature_tree(tree: Tree, image: images.Image) -> None:
    """Spot checks that the image really has what the comparison is meant to cover (so a
    tree that lost a feature on both sides does not pass silently)."""
    n = tree.nodes
    assert "lower/gone-dir" not in n and "f/doomed" not in n and "f/hl-a" not in n
    assert sorted(p for p in n if p.startswith("lower/opaque-me/")) == ["lower/opaque-me/new"]
    assert n["lower/opaque-me"].uid == 9
    assert n["lower/becomes-dir"].kind == "dir" and n["lower/becomes-file"].kind == "file"
    assert n["f/hl-src"].nlink == 3
    assert (n["f/hl-src"].mode, n["f/hl-src"].uid, n["f/hl-src"].gid) == (0o604, 13, 14)
    assert tree.hardlink_peers()["f/hl-src"] == ("f/hl-dir/hl-b", "f/hl-src")
    assert n["f/setuid"].mode == 0o4755 and n["f/sticky"].mode == 0o1777
    assert n["f/big-ids"].uid == 4_000_000
    assert n["f/tty-ish"].rdev == (136, 300) and n["f/loop"].kind == "block"
    assert n["f/fifo"].kind == "fifo"
    # containerd's applier sets user.* but never trusted.* from an archive (tar_unix.go).
    assert dict(n["f/xattrs"].xattrs) == {
        "user.sociable.one": b"value-1",
        "user.sociable.utf8": "ünï ✓".encode(),
    }
    assert "fakeopq/from-layer1" in n and "fakeopq/from-layer3" in n
    assert n["pax/ns-file"].mtime_ns == int(Decimal(NS_MTIME) * 1_000_000_000)
    assert n["pax/replaced"].kind == "symlink"
    assert "f/Καλημέρα" not in n and "f/" + DEEP + "/leaf.txt" in n
    assert n["f/zeros.bin"].size == 9 * MIB + 123
    assert any(p.startswith("gnu/" + "g" * 150 + "/") for p in n)
    assert len(image.layers) == 6


def compare_with_overlayfs(
    pushed: Pushed,
    registry: RegistryServer,
    tmp_path: Path,
    *,
    lazy_layers: int,
    check: Callable[[Tree], None],
) -> None:
    """Pull `pushed` with containerd's overlayfs snapshotter and through CRI with sociable,
    require `lazy_layers` of its layers to be mounted lazily (the others are unpacked by the
    daemon), `check` the overlayfs view and compare both views attribute by attribute."""
    top = pushed.image.chain_ids[-1]
    with (
        run_daemon(tmp_path / "sociable") as daemon,
        start_containerd(
            tmp_path / "containerd",
            proxy_address=daemon.address,
            proxy_name=PROXY_NAME,
            cri_snapshotter=PROXY_NAME,
            registry_hosts=[registry.host],
        ) as ctd,
    ):
        backend = daemon.client()
        try:
            ctd.pull(pushed.ref, snapshotter="overlayfs")
            ctd.cri().pull_image(pushed.ref)
            remote = _remote_layers(backend)
            if lazy_path_available():
                assert remote == lazy_layers, (
                    f"{remote} of {len(pushed.image.layers)} layers were mounted lazily, "
                    f"expected {lazy_layers}:\n{daemon.log_tail()}"
                )
            with (
                mounted_view(ctd, "overlayfs", "default", top, tmp_path / "ovl") as ovl,
                mounted_view(ctd, PROXY_NAME, "k8s.io", top, tmp_path / "soc") as soc,
            ):
                reference = scan_tree(ovl)
                check(reference)
                assert_same_tree(reference, scan_tree(soc))
        finally:
            backend.close()


def test_lazy_tree_equals_overlayfs_tree(
    feature_image: Pushed, registry: RegistryServer, tmp_path: Path
) -> None:
    image = feature_image.image
    compare_with_overlayfs(
        feature_image,
        registry,
        tmp_path,
        lazy_layers=len(image.layers),
        check=lambda tree: check_feature_tree(tree, image),
    )


def test_locally_unpacked_layers_equal_overlayfs_tree(
    local_unpack_image: Pushed, registry: RegistryServer, tmp_path: Path
) -> None:
    """Layers without a zTOC (under the minimum size; zstd) are unpacked by the daemon and
    must look exactly as containerd unpacks them: nanosecond PAX mtimes kept, hard-link
    headers applied, `..` clamped at the root, trusted.* xattrs dropped."""
    compare_with_overlayfs(
        local_unpack_image, registry, tmp_path, lazy_layers=1, check=check_local_tree
    )


def test_overlayfs_tree_equals_plain_extraction(
    feature_image: Pushed, registry: RegistryServer, tmp_path: Path
) -> None:
    """The comparison's own sanity check: containerd's overlayfs tree against layers applied
    here by hand. ``nlink`` is not compared: deleting a hard-link peer in an upper layer lowers
    the count in a plain extraction but not under overlayfs (the lower inode keeps it)."""
    image = feature_image.image
    plain = tmp_path / "plain"
    plain.mkdir()
    for layer in image.layers:
        apply_layer(layer.path, plain)
    with start_containerd(
        tmp_path / "containerd",
        proxy_address=None,
        cri_snapshotter="overlayfs",
        registry_hosts=[registry.host],
    ) as ctd:
        ctd.pull(feature_image.ref, snapshotter="overlayfs")
        with mounted_view(
            ctd, "overlayfs", "default", image.chain_ids[-1], tmp_path / "ovl"
        ) as ovl:
            reference = scan_tree(ovl)
            check_feature_tree(reference, image)
            assert_same_tree(reference, scan_tree(plain), skip=["nlink"])
