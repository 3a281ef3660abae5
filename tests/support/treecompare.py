"""Compare two mounted root filesystems attribute by attribute.

:func:`scan_tree` walks a directory without following symlinks or crossing into other mounts'
children it does not own (it walks whatever the tree shows, mount points included) and records,
for every path below the root: its type, permission bits (with setuid/setgid/sticky), owner,
size (non-directories), mtime in nanoseconds, symlink target, device numbers, link count
(non-directories), extended attributes (names and values) and, for regular files, the SHA-256
of the content. Hard-link groups (non-directories sharing ``(st_dev, st_ino)`` within the tree)
are derived from the scan.

:func:`compare_trees` lists every :class:`Difference` between two scans; :func:`assert_same_tree`
raises :class:`TreeMismatch` (an ``AssertionError``) listing them. What is deliberately not
compared, because it depends on the filesystem and not on the image: directory sizes and link
counts, inode numbers themselves (only the grouping), atime and ctime, and the attributes of the
root directory (a snapshot's root comes from the snapshotter, not from a tar entry). Extended
attributes that overlayfs keeps for itself (``trusted.overlay.*``, ``user.overlay.*``) are
ignored by default.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

HASH_CHUNK_BYTES = 1 << 20

IGNORED_XATTR_PREFIXES: tuple[str, ...] = ("trusted.overlay.", "user.overlay.")
"""Extended attributes overlayfs uses for its own bookkeeping (opaque dirs, redirects, origin)."""

ATTRIBUTES: tuple[str, ...] = (
    "presence",
    "kind",
    "mode",
    "uid",
    "gid",
    "size",
    "mtime_ns",
    "target",
    "rdev",
    "nlink",
    "xattrs",
    "sha256",
    "hardlinks",
)
"""Every attribute a :class:`Difference` can name, in report order."""


class TreeCompareError(Exception):
    """A tree could not be scanned (unreadable directory, file or attribute); chained."""


class TreeMismatch(AssertionError):
    """Two trees differ; ``differences`` lists every difference found."""

    def __init__(self, message: str, differences: list[Difference]) -> None:
        super().__init__(message)
        self.differences = differences


@dataclass(frozen=True)
class Node:
    """What one path of a tree looks like. ``kind`` is one of ``dir``, ``file``, ``symlink``,
    ``fifo``, ``char``, ``block``, ``socket``. ``mode`` is ``S_IMODE`` (permission bits plus
    setuid, setgid, sticky). ``size`` and ``nlink`` are ``None`` for directories; ``target`` is
    set for symlinks only, ``rdev`` (major, minor) for devices only, ``sha256`` (hex) for regular
    files only (``None`` too when the scan did not hash). ``xattrs`` are sorted ``(name, value)``
    pairs. ``inode`` is ``(st_dev, st_ino)``; it is not compared, only used for grouping."""

    path: str
    kind: str
    mode: int
    uid: int
    gid: int
    size: int | None
    mtime_ns: int
    target: str | None = None
    rdev: tuple[int, int] | None = None
    nlink: int | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()
    sha256: str | None = None
    inode: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class Tree:
    """A scanned tree: ``nodes`` maps a relative path (``a/b``; the root itself is not included)
    to its :class:`Node`. ``root`` is where it was scanned, for messages only."""

    root: str
    nodes: Mapping[str, Node] = field(default_factory=dict)

    def hardlink_peers(self) -> dict[str, tuple[str, ...]]:
        """For every non-directory that shares its inode with another path of this tree: the
        sorted paths of its group (itself included). Paths without peers are absent."""
        groups: defaultdict[tuple[int, int], list[str]] = defaultdict(list)
        for node in self.nodes.values():
            if node.kind != "dir":
                groups[node.inode].append(node.path)
        peers: dict[str, tuple[str, ...]] = {}
        for members in groups.values():
            if len(members) > 1:
                group = tuple(sorted(members))
                for p in group:
                    peers[p] = group
        return peers

    def total_file_bytes(self) -> int:
        """The sum of the sizes of the regular files (each hard-link group counted per path)."""
        return sum(n.size or 0 for n in self.nodes.values() if n.kind == "file")


@dataclass(frozen=True)
class Difference:
    """One attribute of one path that differs; ``left``/``right`` are the two values (for
    ``presence``: ``True`` or ``False``)."""

    path: str
    attribute: str
    left: object
    right: object

    def __str__(self) -> str:
        return f"{self.path or '/'}: {self.attribute}: {self.left!r} != {self.right!r}"


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "dir"),
        (stat.S_ISREG, "file"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISCHR, "char"),
        (stat.S_ISBLK, "block"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return f"unknown({stat.S_IFMT(mode):o})"


def read_xattrs(path: str, ignore: Callable[[str], bool]) -> tuple[tuple[str, bytes], ...]:
    """The extended attributes of ``path`` (not following symlinks) that ``ignore`` does not
    reject, sorted by name. A filesystem without xattr support gives ``()``. Raises
    :class:`TreeCompareError` for any other failure."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return ()
        raise TreeCompareError(f"listxattr {path}: {e}") from e
    out = []
    for name in sorted(names):
        if ignore(name):
            continue
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError as e:
            raise TreeCompareError(f"getxattr {path} {name}: {e}") from e
    return tuple(out)


def file_sha256(path: str) -> str:
    """The hex SHA-256 of a regular file's content. Raises :class:`TreeCompareError`."""
    h = hashlib.sha256()
    try:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(HASH_CHUNK_BYTES):
                h.update(chunk)
    except OSError as e:
        raise TreeCompareError(f"reading {path}: {e}") from e
    return h.hexdigest()


def default_xattr_filter(name: str) -> bool:
    """True for the xattrs overlayfs keeps for itself (:data:`IGNORED_XATTR_PREFIXES`)."""
    return name.startswith(IGNORED_XATTR_PREFIXES)


def scan_node(
    full: str,
    rel: str,
    *,
    hash_contents: bool = True,
    ignore_xattr: Callable[[str], bool] = default_xattr_filter,
) -> Node:
    """The :class:`Node` of one path (``full`` on disk, ``rel`` as reported). Raises
    :class:`TreeCompareError` when it cannot be read."""
    try:
        st = os.lstat(full)
    except OSError as e:
        raise TreeCompareError(f"lstat {full}: {e}") from e
    kind = _kind(st.st_mode)
    target = None
    if kind == "symlink":
        try:
            target = os.readlink(full)
        except OSError as e:
            raise TreeCompareError(f"readlink {full}: {e}") from e
    rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("char", "block") else None
    is_dir = kind == "dir"
    return Node(
        path=rel,
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=None if is_dir else st.st_size,
        mtime_ns=st.st_mtime_ns,
        target=target,
        rdev=rdev,
        nlink=None if is_dir else st.st_nlink,
        xattrs=read_xattrs(full, ignore_xattr),
        sha256=file_sha256(full) if kind == "file" and hash_contents else None,
        inode=(st.st_dev, st.st_ino),
    )


def scan_tree(
    root: Path,
    *,
    hash_contents: bool = True,
    ignore_xattr: Callable[[str], bool] = default_xattr_filter,
) -> Tree:
    """Scans every path below ``root`` (not following symlinks). Raises
    :class:`TreeCompareError` if ``root`` is not a directory or anything cannot be read."""
    base = str(root)
    if not os.path.isdir(base):
        raise TreeCompareError(f"{root}: not a directory")
    nodes: dict[str, Node] = {}

    def walk(directory: str, rel_dir: str) -> None:
        try:
            names = sorted(os.listdir(directory))
        except OSError as e:
            raise TreeCompareError(f"listing {directory}: {e}") from e
        for name in names:
            full = os.path.join(directory, name)
            rel = f"{rel_dir}/{name}" if rel_dir else name
            node = scan_node(full, rel, hash_contents=hash_contents, ignore_xattr=ignore_xattr)
            nodes[rel] = node
            if node.kind == "dir":
                walk(full, rel)

    walk(base, "")
    return Tree(root=base, nodes=nodes)


_NODE_ATTRIBUTES = ("kind", "mode", "uid", "gid", "size", "mtime_ns", "target", "rdev", "nlink")


def compare_trees(
    left: Tree, right: Tree, *, skip: Iterable[str] = (), limit: int | None = None
) -> list[Difference]:
    """Every difference between ``left`` and ``right``, sorted by path then attribute order of
    :data:`ATTRIBUTES`. A path present on one side only gives one ``presence`` difference (and
    nothing else); a type change gives one ``kind`` difference (and nothing else). Attributes
    named in ``skip`` are not compared. Stops after ``limit`` differences when given."""
    skipped = frozenset(skip)
    unknown = skipped - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attributes to skip: {sorted(unknown)}")
    left_peers = left.hardlink_peers()
    right_peers = right.hardlink_peers()
    diffs: list[Difference] = []

    def add(path: str, attribute: str, a: object, b: object) -> bool:
        if attribute in skipped:
            return False
        diffs.append(Difference(path, attribute, a, b))
        return limit is not None and len(diffs) >= limit

    for path in sorted(set(left.nodes) | set(right.nodes)):
        a = left.nodes.get(path)
        b = right.nodes.get(path)
        if a is None or b is None:
            if add(path, "presence", a is not None, b is not None):
                return diffs
            continue
        if a.kind != b.kind:
            if add(path, "kind", a.kind, b.kind):
                return diffs
            continue
        for attribute in _NODE_ATTRIBUTES[1:]:
            va, vb = getattr(a, attribute), getattr(b, attribute)
            if va != vb and add(path, attribute, va, vb):
                return diffs
        if a.xattrs != b.xattrs and add(path, "xattrs", dict(a.xattrs), dict(b.xattrs)):
            return diffs
        if a.sha256 != b.sha256 and add(path, "sha256", a.sha256, b.sha256):
            return diffs
        pa, pb = left_peers.get(path, ()), right_peers.get(path, ())
        if pa != pb and add(path, "hardlinks", pa, pb):
            return diffs
    return diffs


def assert_same_tree(
    left: Path | Tree,
    right: Path | Tree,
    *,
    skip: Iterable[str] = (),
    show: int = 40,
) -> Tree:
    """Scans (if given paths) and compares two trees; returns the left :class:`Tree`. Raises
    :class:`TreeMismatch` naming both roots, the number of differences and the first ``show``
    of them; :class:`TreeCompareError` when a tree cannot be scanned."""
    a = left if isinstance(left, Tree) else scan_tree(left)
    b = right if isinstance(right, Tree) else scan_tree(right)
    diffs = compare_trees(a, b, skip=skip)
    if diffs:
        lines = "\n".join(f"  {d}" for d in diffs[:show])
        more = f"\n  ... and {len(diffs) - show} more" if len(diffs) > show else ""
        raise TreeMismatch(
            f"trees differ: {a.root} ({len(a.nodes)} paths) vs {b.root} ({len(b.nodes)} paths): "
            f"{len(diffs)} differences\n{lines}{more}",
            diffs,
        )
    return a


__all__ = [
    "ATTRIBUTES",
    "IGNORED_XATTR_PREFIXES",
    "Difference",
    "Node",
    "Tree",
    "TreeCompareError",
    "TreeMismatch",
    "assert_same_tree",
    "compare_trees",
    "default_xattr_filter",
    "file_sha256",
    "read_xattrs",
    "scan_node",
    "scan_tree",
]
