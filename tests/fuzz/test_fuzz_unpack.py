"""Tar headers of a layer unpacked locally (`snapshotter.remote.apply.apply_tar`), as root.

Generated layers mix entries named `../../etc/x`, `/abs`, `./a/../../b`, symlinks pointing
outside (`a -> /etc`, `a -> ../../..`, `a -> <the test's outside dir>`, then `a/x`), hard links
to outside and to symlinks, device files, whiteouts, very long names, big ids (PAX records or
GNU base-256 numbers) and PAX records with odd values; some streams are also damaged as bytes.
Each one is applied into an empty root next to an "outside" directory and:

- nothing outside the root is written or changed: the tree around the root (contents,
  modes, owners, link counts, times) is the same before and after, `/etc` has none of the
  layer's names it did not have and `/etc/passwd` is unchanged;
- the apply succeeds or raises `UnpackError` (the mounter declines the layer), never
  anything else;
- a layer of plain entries (files, directories, fifos, no links or whiteouts) gives exactly
  the tree containerd's rules (`index.applyrules`) describe: names cleaned with `..` stopping
  at the root, missing parents created, the last entry for a path wins, and a parent that is
  not a directory fails the layer.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from index.applyrules import clean_path
from snapshotter.remote.apply import apply_tar
from snapshotter.remote.errors import UnpackError
from tests.fuzz.strategies import fuzz_settings, mutated_bytes, safe_text

pytestmark = pytest.mark.root

OUTSIDE = "outside"
"""The directory next to the root whose contents must never change."""


@pytest.fixture(autouse=True)
def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("PREREQUISITE MISSING: root (mknod, chown, trusted.* xattrs)")


_WORKDIR: list[Path] = []


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="sociable-fuzz-tar-", dir="/var/tmp") as d:
        _WORKDIR.append(Path(d))
        yield Path(d)


@dataclass(frozen=True)
class Entry:
    kind: str  # reg, dir, sym, hard, chr, blk, fifo
    name: str
    link: str = ""
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    mode: int = 0o644
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, str] = field(default_factory=dict)


_TYPES = {
    "reg": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "sym": tarfile.SYMTYPE,
    "hard": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}
PLAIN = frozenset({"reg", "dir", "fifo"})


def tar_bytes(entries: list[Entry], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = _TYPES[e.kind]
            info.linkname = e.link
            info.uid, info.gid, info.mode = e.uid, e.gid, e.mode
            info.mtime = 1_700_000_000
            info.devmajor, info.devminor = e.devmajor, e.devminor
            info.pax_headers = dict(e.pax)
            info.size = len(e.data) if e.kind == "reg" else 0
            tf.addfile(info, io.BytesIO(e.data) if e.kind == "reg" else None)
    return buf.getvalue()


COMPONENTS = ("a", "b", "c", "..", ".", "", "etc", "x", ".wh.a", ".wh..wh..opq")


def names(outside: str) -> st.SearchStrategy[str]:
    joined = st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=5).map("/".join)
    return st.one_of(
        joined,
        st.tuples(st.sampled_from(("/", "./", "../../")), joined).map("".join),
        st.sampled_from(
            (
                "../../etc/x",
                "./a/../../b",
                "/etc/passwd",
                "a/x",
                outside + "/pwned",
                "../" + OUTSIDE + "/pwned",
                "n" * 300,
                "d/" * 120 + "f",
                "ü/ß😀",
            )
        ),
        safe_text(20).filter(lambda s: "\x00" not in s),
    )


def link_targets(outside: str) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(
            (
                "/etc",
                "/etc/passwd",
                "..",
                "../..",
                "../../..",
                "/",
                "a",
                "a/x",
                "b",
                outside,
                outside + "/file",
                "../" + OUTSIDE,
                "../" + OUTSIDE + "/file",
            )
        ),
        names(outside),
    )


ODD_PAX = st.dictionaries(
    st.sampled_from(
        (
            "mtime",
            "atime",
            "uid",
            "gid",
            "uname",
            "path",
            "linkpath",
            "SCHILY.xattr.user.k",
            "SCHILY.xattr.security.capability",
            "SCHILY.xattr.trusted.overlay.opaque",
            "SCHILY.xattr.system.posix_acl_access",
            "hdrcharset",
            "comment",
        )
    ),
    st.one_of(
        st.sampled_from(
            (
                "",
                "-1",
                "1.5.5",
                "1e400",
                "99999999999999999999999",
                "-99999999999999999999.5",
                "1700000000.123456789",
                "BINARY",
                "../../etc/x",
                "abc",
            )
        ),
        safe_text(12),
    ),
    max_size=3,
)


@st.composite
def entries(draw: st.DrawFn, outside: str, *, plain: bool = False) -> Entry:
    kind = draw(st.sampled_from(sorted(PLAIN) if plain else sorted(_TYPES)))
    big = st.sampled_from(
        (0, 0, 0, 0, 0, 1000, 1000, 65534, (1 << 21) - 1, 1 << 21, (1 << 32) - 1, 1 << 32, 1 << 62)
    )
    return Entry(
        kind=kind,
        name=draw(names(outside)),
        link=draw(link_targets(outside)) if kind in ("sym", "hard") else "",
        data=draw(st.binary(max_size=64)) if kind == "reg" else b"",
        uid=draw(big) if not plain else draw(st.sampled_from((0, 1000))),
        gid=draw(big) if not plain else 0,
        mode=draw(st.sampled_from((0o644, 0o755, 0o4755, 0o7777, 0o000, 0o700))),
        devmajor=draw(st.sampled_from((0, 1, 8, 255, (1 << 21) - 1))),
        devminor=draw(st.sampled_from((0, 3, 255, (1 << 21) - 1))),
        pax={} if plain or draw(st.integers(0, 3)) else draw(ODD_PAX),
    )


# --- the safety net ------------------------------------------------------------------------------


def _snapshot(top: Path, skip: Path) -> dict[str, tuple[object, ...]]:
    """Every path under `top` except `skip`'s subtree: type, mode, owner, size, link count,
    mtime, link target or content hash."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        if Path(dirpath) == skip:
            dirnames[:] = []
            continue
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            if Path(path) == skip:
                continue
            st_ = os.lstat(path)
            extra: object = None
            if stat.S_ISLNK(st_.st_mode):
                extra = os.readlink(path)
            elif stat.S_ISREG(st_.st_mode):
                extra = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            out[path] = (
                st_.st_mode,
                st_.st_uid,
                st_.st_gid,
                st_.st_size if not stat.S_ISDIR(st_.st_mode) else 0,
                st_.st_nlink if not stat.S_ISDIR(st_.st_mode) else 0,
                st_.st_mtime_ns,
                extra,
            )
    return out


def _etc() -> tuple[frozenset[str], str]:
    """/etc's names and /etc/passwd's hash (the targets of `a -> /etc` and `/etc/passwd`)."""
    passwd = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    return frozenset(os.listdir("/etc")), passwd


def _basenames(data: bytes) -> frozenset[str]:
    """The last component of every name in the tar stream (what an escape would create)."""
    out = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tf:
            for m in tf:
                out.add(m.name.rstrip("/").rpartition("/")[2])
    except (tarfile.TarError, OSError, EOFError, ValueError, OverflowError):
        pass
    return frozenset(out)


@dataclass
class Applied:
    root: Path
    error: UnpackError | None


def _apply_safely(workdir: Path, data: bytes) -> Applied:
    """Apply `data` into a fresh root beside a fresh outside dir; assert nothing outside
    the root changed and nothing but UnpackError was raised."""
    for d in (workdir / "root", workdir / OUTSIDE):
        if d.exists():
            shutil.rmtree(d)
    outside = workdir / OUTSIDE
    (outside / "dir").mkdir(parents=True)
    (outside / "file").write_bytes(b"keep me")
    os.symlink("file", outside / "link")
    root = workdir / "root"
    root.mkdir()
    before, etc_before = _snapshot(workdir, root), _etc()
    error = None
    try:
        apply_tar(io.BytesIO(data), root)
    except UnpackError as e:
        error = e
        assert e.__cause__ is not None or "cancelled" in str(e)
    assert _snapshot(workdir, root) == before
    # /etc is compared by the names this layer could have put there: other programs may
    # change /etc meanwhile.
    etc_after = _etc()
    assert not (etc_after[0] - etc_before[0]) & _basenames(data)
    assert etc_after[1] == etc_before[1]
    return Applied(root, error)


# --- the model of containerd's rules for plain entries --------------------------------------------


def expected_tree(entries_: list[Entry]) -> dict[str, tuple[str, bytes]] | None:
    """Path → (kind, content) after applying plain entries, or None when the layer fails
    (a parent that is not a directory)."""
    tree: dict[str, tuple[str, bytes]] = {}
    for e in entries_:
        rel = clean_path(e.name)
        if not rel:
            continue
        parts = rel.split("/")
        base = parts[-1]
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in tree and tree[parent][0] != "dir":
                return None
            tree.setdefault(parent, ("dir", b""))
        if base == ".wh..wh..opq" or base.startswith(".wh."):
            raise AssertionError("plain layers have no whiteouts")
        if rel in tree and not (e.kind == "dir" and tree[rel][0] == "dir"):
            for p in [p for p in tree if p == rel or p.startswith(rel + "/")]:
                del tree[p]
        if e.kind == "dir":
            tree.setdefault(rel, ("dir", b""))
        else:
            tree[rel] = (e.kind, e.data)
    return tree


def actual_tree(root: Path) -> dict[str, tuple[str, bytes]]:
    out: dict[str, tuple[str, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            mode = os.lstat(path).st_mode
            if stat.S_ISDIR(mode):
                out[rel] = ("dir", b"")
            elif stat.S_ISREG(mode):
                out[rel] = ("reg", path.read_bytes())
            elif stat.S_ISFIFO(mode):
                out[rel] = ("fifo", b"")
            else:
                out[rel] = (f"mode {mode:o}", b"")
    return out


def _plain_names() -> st.SearchStrategy[str]:
    comps = st.sampled_from(("a", "b", "..", ".", "", "c"))
    joined = st.lists(comps, min_size=1, max_size=4).map("/".join)
    return st.one_of(joined, st.tuples(st.sampled_from(("/", "./", "../")), joined).map("".join))


@st.composite
def plain_layers(draw: st.DrawFn) -> list[Entry]:
    out = []
    for _ in range(draw(st.integers(1, 10))):
        e = draw(entries("/nowhere", plain=True))
        out.append(Entry(e.kind, draw(_plain_names()), data=e.data, mode=0o644, uid=e.uid))
    return out


# --- the targets -----------------------------------------------------------------------------------


@fuzz_settings(120)
@given(plain_layers())
def test_plain_layers_follow_containerds_rules(workdir: Path, layer: list[Entry]) -> None:
    applied = _apply_safely(workdir, tar_bytes(layer, tarfile.PAX_FORMAT))
    want = expected_tree(layer)
    if want is None:
        assert applied.error is not None
        return
    assert applied.error is None, applied.error
    assert actual_tree(applied.root) == want


@st.composite
def hostile_layers(draw: st.DrawFn, outside: str) -> tuple[list[Entry], int]:
    layer = draw(st.lists(entries(outside), min_size=1, max_size=10))
    # GNU format writes big ids and device numbers in base-256 (PAX records are dropped).
    fmt = draw(st.sampled_from((tarfile.PAX_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT)))
    return layer, fmt


def _outside_path() -> str:
    """The absolute path of the outside dir (strategies are drawn after the fixture ran)."""
    return str(_WORKDIR[-1] / OUTSIDE)


@fuzz_settings(200)
@example(
    (
        [
            Entry("sym", "a", link="/etc"),
            Entry("reg", "a/x", data=b"x"),
            Entry("sym", "o", link="../" + OUTSIDE),
            Entry("reg", "o/file", data=b"overwrite"),
            Entry("hard", "h", link="../" + OUTSIDE + "/file"),
        ],
        tarfile.PAX_FORMAT,
    )
)
@example(([Entry("reg", "big-uid", uid=1 << 32)], tarfile.PAX_FORMAT))
@example(([Entry("chr", "dev", devmajor=1 << 40)], tarfile.GNU_FORMAT))
@example(([Entry("reg", "t", pax={"mtime": "1e400"})], tarfile.PAX_FORMAT))
@given(st.deferred(lambda: hostile_layers(_outside_path())))
def test_hostile_layers_stay_inside_the_root(
    workdir: Path, layer_fmt: tuple[list[Entry], int]
) -> None:
    layer, fmt = layer_fmt
    try:
        data = tar_bytes(layer, fmt)
    except (ValueError, UnicodeError):  # tarfile cannot write it: not a layer anyone serves
        return
    _apply_safely(workdir, data)


@fuzz_settings(80)
@given(
    st.deferred(lambda: hostile_layers(_outside_path())).flatmap(
        lambda lf: mutated_bytes(_writable(lf), max_ops=3)
    )
)
def test_damaged_tar_streams(workdir: Path, data: bytes) -> None:
    _apply_safely(workdir, data)


def _writable(layer_fmt: tuple[list[Entry], int]) -> bytes:
    try:
        return tar_bytes(*layer_fmt)
    except (ValueError, UnicodeError):
        return tar_bytes([Entry("reg", "a", data=b"a")], tarfile.PAX_FORMAT)


def test_the_safety_net_sees_an_escape(workdir: Path) -> None:
    """What an unsafe extractor would do (tarfile without a filter follows `..`) changes the
    snapshot of the tree around the root."""
    _apply_safely(workdir, tar_bytes([Entry("reg", "a", data=b"a")], tarfile.PAX_FORMAT))
    root = workdir / "root"
    before = _snapshot(workdir, root)
    data = tar_bytes([Entry("reg", f"../{OUTSIDE}/file", data=b"pwned")], tarfile.PAX_FORMAT)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        tf.extractall(root, filter="fully_trusted")
    assert (workdir / OUTSIDE / "file").read_bytes() == b"pwned"
    assert _snapshot(workdir, root) != before
    assert "file" in _basenames(data)
