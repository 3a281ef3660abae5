"""The directory tree of one layer, built from its zTOC entries (pure: no FUSE, no I/O).

A `LayerTree` answers what a mounted layer looks like: lookups, sorted directory listings with
stable offsets, attributes, symlink targets, extended attributes and where each regular file's
bytes live in the uncompressed tar stream. Names, whiteouts, xattrs and times follow the rules
of containerd's applier in `index.applyrules` (shared with the local applier,
`snapshotter.remote.apply`), and:

* names are cleaned by `clean_path` (Go's `path.Clean("/" + name)`: `..` stops at the layer
  root); an entry naming the root itself is ignored, as containerd ignores it, so the layer
  root is always 0755, uid/gid 0, mtime 0;
* missing parent directories are created implicitly (0755, uid/gid 0, mtime 0); a later `dir`
  entry for the same path replaces their attributes; a later entry for an existing non-directory
  path replaces it (as extracting the tar would);
* a hardlink shares its target's node (so it has the same inode) and the node's nlink counts
  every name; the target must appear earlier in the tar, else `TreeBuildError`;
* directories have nlink 2 + number of subdirectories; symlinks have size `len(target)`;
  `blocks` counts 512-byte units of `ceil(size / 4096) * 4096` bytes;
* mode = type bits from the entry type | the entry's permission, setuid, setgid and sticky bits,
  except symlinks, which are always 0777 (Linux has no lchmod; containerd never chmods them).

Metadata follows containerd 1.6's applier (`archive.createTarFile`), which for every header
does lchown(uid, gid), then setxattr for each `SCHILY.xattr.*` record, then chmod (not for
symlinks), then utimes (not following symlinks). Where SOCI's runtime differs (it shows every
`SCHILY.xattr.*` record and the first header's metadata), this tree follows containerd, so a
lazily mounted image looks exactly like the same image unpacked by containerd:

* a hardlink header applies its own uid, gid, mode and mtime to the shared inode, so the last
  header naming an inode wins; its lchown drops `security.capability` (the kernel removes it on
  every chown of a non-directory) and its xattrs are added to the inode's;
* a `dir` entry for a directory that already exists in this layer keeps the directory and adds
  its xattrs to those it has (setxattr never removes one);
* xattrs are the PAX records `SCHILY.xattr.<name>` (prefix stripped) that the applier manages
  to set (`archive_xattrs`): `trusted.*` never (containerd refuses them from archives, so a
  `trusted.overlay.opaque` record cannot make a directory opaque), `user.*` only on regular
  files and directories (the kernel refuses the others with EPERM, which containerd ignores),
  `security.*` always, and no other namespace (`system.*` POSIX ACLs are not served; unknown
  namespaces fail with EOPNOTSUPP, which containerd ignores);
* OCI whiteouts appear in overlayfs form: `.wh.<name>` is hidden and shown as a character
  device 0/0 called `<name>` (mode S_IFCHR, the whiteout header's uid/gid, nlink 1) unless the
  same directory of this layer has a real `<name>`; `.wh..wh..opq` is hidden and its directory reports the xattr
  `trusted.overlay.opaque` (or `user.overlay.opaque` with `userxattr`) = `y`.

Memory: nodes and directory entries live in parallel `array.array`s and every name in one bytes
blob, so a tree costs about 100-150 bytes per entry instead of a Python object per entry; only
nodes a later hardlink header changed (and opaque directories) keep their creating header's
metadata (`header_attr`) in a sparse dict.
Node ids are assigned in tar order and are therefore the same every time the same zTOC is built.
"""

from __future__ import annotations

import bisect
import calendar
import os
import re
import stat
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NewType

from index.applyrules import (
    CAPABILITY_XATTR,
    OPAQUE_MARKER_BYTES,
    WHITEOUT_PREFIX_BYTES,
    archive_xattrs,
    bound_time_ns,
    clean_path,
    opaque_xattr,
)
from index.model import EntryType, FileMetadata, UncompressedOffset
from index.ztoc_codec import ZtocView
from snapshotter.fs.errors import (
    NoSuchAttribute,
    NotADirectory,
    NotASymlink,
    NotFound,
    TreeBuildError,
)

NodeId = NewType("NodeId", int)
"""The index of a node (an inode) within one layer tree; the layer root is node 0."""

ROOT_NODE = NodeId(0)
MAX_NODES = (1 << 32) - 16
"""Node ids must fit in the low 32 bits of an inode number (see `snapshotter.fs.inodes`)."""

_CAPABILITY_XATTR = CAPABILITY_XATTR.encode()
BLOCK_SIZE = 4096
"""The block size every inode and statfs report (bytes)."""
_NO_ENTRY = 0xFFFFFFFF
_MAX_DEVICE = (1 << 31) - 1
"""The largest device major or minor `os.makedev` takes (a C int)."""

_TYPE_BITS: dict[EntryType, int] = {
    EntryType.REG: stat.S_IFREG,
    EntryType.DIR: stat.S_IFDIR,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.CHAR: stat.S_IFCHR,
    EntryType.BLOCK: stat.S_IFBLK,
    EntryType.FIFO: stat.S_IFIFO,
}

_RFC3339_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})$"
)


def parse_rfc3339_ns(value: str) -> int:
    """Parse an RFC 3339 time (as Go's `MarshalText` writes it) into nanoseconds since the epoch.

    The empty string (what Go stores when a time cannot be marshalled) gives 0. Fractions keep
    their full nanosecond precision; offsets are applied, so equal instants give equal results.

    Raises:
        ValueError: `value` is not an RFC 3339 date-time.
    """
    if not value:
        return 0
    m = _RFC3339_RE.match(value)
    if m is None:
        raise ValueError(f"not an RFC 3339 time: {value!r}")
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    fraction = m.group(7) or ""
    nanos = int(fraction.ljust(9, "0")) if fraction else 0
    zone = m.group(8)
    if zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return seconds * 1_000_000_000 + nanos


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


Xattrs = tuple[tuple[bytes, bytes], ...]
"""Extended attributes as `(name, value)` pairs sorted by name."""


def blocks_of(size: int) -> int:
    """Allocated size of `size` bytes in 512-byte units: whole `BLOCK_SIZE` blocks."""
    return -(-size // BLOCK_SIZE) * (BLOCK_SIZE // 512)


@dataclass(frozen=True, slots=True)
class Attr:
    """The attributes of one inode as the kernel sees them (the one attribute record of the
    layer filesystem); times in nanoseconds since the epoch, sizes in bytes.

    `inode` is the tree's node id for `LayerTree.attr(node)`, the kernel's inode number when
    the host asks. `cacheable` is False for inodes whose attributes change (the host's root,
    state directory and status file): the FUSE adapter gives them zero timeouts and no page
    cache. atime and ctime are not kept: they are reported as 0, as SOCI does.
    """

    inode: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    mtime_ns: int
    cacheable: bool = True

    @property
    def blocks(self) -> int:
        """Allocated size in 512-byte units (`blocks_of`)."""
        return blocks_of(self.size)

    @property
    def blksize(self) -> int:
        return BLOCK_SIZE

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One directory listing row: `next_offset` resumes the listing after this entry."""

    name: bytes
    node: NodeId
    next_offset: int


@dataclass(frozen=True, slots=True)
class HeaderAttr:
    """What the tar header that created a node recorded, as applied: permission bits (with
    setuid, setgid, sticky), owner, mtime in nanoseconds and the xattrs the applier set
    (`archive_xattrs`). It differs from the node's attributes only when later hardlink
    headers changed the inode."""

    perm: int
    uid: int
    gid: int
    mtime_ns: int
    xattrs: Xattrs


class LayerTree:
    """An immutable layer tree. Build one with `build_tree`.

    All methods are pure lookups on compact arrays and never block. Node ids passed in must come
    from this tree; unknown ids raise `NotFound`.
    """

    __slots__ = (
        "_child_count",
        "_child_start",
        "_data_off",
        "_entry_node",
        "_entry_parent",
        "_gid",
        "_hdr_off",
        "_links",
        "_mode",
        "_mtime",
        "_name_off",
        "_names",
        "_nlink",
        "_node_entry",
        "_origin",
        "_rdev",
        "_size",
        "_uid",
        "_xattrs",
        "total_file_bytes",
    )

    def __init__(
        self,
        *,
        nodes: _NodeArrays,
        names: bytes,
        name_off: array[int],
        entry_node: array[int],
        entry_parent: array[int],
        child_start: array[int],
        child_count: array[int],
        node_entry: array[int],
        links: dict[int, bytes],
        xattrs: dict[int, Xattrs],
        origin: dict[int, HeaderAttr],
    ) -> None:
        self._mode = nodes.mode
        self._uid = nodes.uid
        self._gid = nodes.gid
        self._size = nodes.size
        self._mtime = nodes.mtime
        self._rdev = nodes.rdev
        self._nlink = nodes.nlink
        self._data_off = nodes.data_off
        self._hdr_off = nodes.hdr_off
        self._names = names
        self._name_off = name_off
        self._entry_node = entry_node
        self._entry_parent = entry_parent
        self._child_start = child_start
        self._child_count = child_count
        self._node_entry = node_entry
        self._links = links
        self._xattrs = xattrs
        self._origin = origin
        self.total_file_bytes = sum(
            self._size[n] for n in range(len(self._mode)) if stat.S_ISREG(self._mode[n])
        )

    def __repr__(self) -> str:
        return f"<LayerTree nodes={self.node_count} entries={self.entry_count}>"

    def bytes_in_files_of_at_least(self, size: int) -> int:
        """The bytes of the layer's files of at least `size` bytes (`size` > 0: directories
        and symlinks count only when as large)."""
        return sum(s for s in self._size if s >= size)

    @property
    def node_count(self) -> int:
        """Number of node ids in use (including the root and nodes no longer reachable)."""
        return len(self._mode)

    @property
    def entry_count(self) -> int:
        """Number of visible directory entries (names), not counting the root."""
        return len(self._entry_node)

    def _check(self, node: int) -> None:
        if not 0 <= node < len(self._mode):
            raise NotFound(f"node {node} is not in this layer tree")

    def attr(self, node: NodeId, inode: int | None = None) -> Attr:
        """The attributes of `node`, numbered `inode` (default: the node id).

        Raises `NotFound` for an unknown node id.
        """
        self._check(node)
        return Attr(
            inode=node if inode is None else inode,
            mode=self._mode[node],
            nlink=self._nlink[node],
            uid=self._uid[node],
            gid=self._gid[node],
            rdev=self._rdev[node],
            size=self._size[node],
            mtime_ns=self._mtime[node],
        )

    def _entry_name(self, entry: int) -> bytes:
        return self._names[self._name_off[entry] : self._name_off[entry + 1]]

    def _dir_range(self, node: NodeId) -> tuple[int, int]:
        self._check(node)
        if not stat.S_ISDIR(self._mode[node]):
            raise NotADirectory(f"node {node} ({self.path_of(node)!r}) is not a directory")
        start = self._child_start[node]
        return start, start + self._child_count[node]

    def lookup(self, parent: NodeId, name: bytes) -> NodeId:
        """The node called `name` in directory `parent` (binary search, O(log n)).

        Raises:
            NotADirectory: `parent` is not a directory.
            NotFound: no such name (hidden whiteout names `.wh.*` are never found).
        """
        lo, hi = self._dir_range(parent)
        names = _EntryNames(self, lo, hi)
        i = bisect.bisect_left(names, name)
        if i < hi - lo and names[i] == name:
            return NodeId(self._entry_node[lo + i])
        raise NotFound(f"no entry {name!r} in {self.path_of(parent)!r}")

    def parent(self, node: NodeId) -> NodeId:
        """The directory that holds directory `node`; the root's parent is the root (its `..`
        within the tree). Raises `NotFound` for an unknown node id."""
        self._check(node)
        entry = self._node_entry[node]
        if node == ROOT_NODE or entry == _NO_ENTRY:
            return ROOT_NODE
        return NodeId(self._entry_parent[entry])

    def readdir(self, parent: NodeId, offset: int = 0) -> Iterator[DirEntry]:
        """The entries of directory `parent` sorted by name, from listing position `offset`.

        `offset` is 0 or a `next_offset` returned earlier; the tree never changes, so offsets
        stay valid. `.` and `..` are not listed here (the host adds them: a layer root's `..` is
        outside the tree). Raises `NotADirectory`.
        """
        lo, hi = self._dir_range(parent)
        for i in range(lo + max(offset, 0), hi):
            yield DirEntry(self._entry_name(i), NodeId(self._entry_node[i]), i - lo + 1)

    def child_count(self, parent: NodeId) -> int:
        """Number of entries in directory `parent`. Raises `NotADirectory`."""
        lo, hi = self._dir_range(parent)
        return hi - lo

    def readlink(self, node: NodeId) -> bytes:
        """The target of symlink `node`. Raises `NotASymlink`, `NotFound`."""
        self._check(node)
        target = self._links.get(node)
        if target is None:
            raise NotASymlink(f"node {node} ({self.path_of(node)!r}) is not a symlink")
        return target

    def listxattr(self, node: NodeId) -> tuple[bytes, ...]:
        """Names of `node`'s extended attributes, the overlay opaque marker first."""
        self._check(node)
        return tuple(name for name, _ in self._xattrs.get(node, ()))

    def getxattr(self, node: NodeId, name: bytes) -> bytes:
        """The value of extended attribute `name`. Raises `NoSuchAttribute`, `NotFound`."""
        self._check(node)
        for key, value in self._xattrs.get(node, ()):
            if key == name:
                return value
        raise NoSuchAttribute(f"{self.path_of(node)!r} has no xattr {name!r}")

    def header_attr(self, node: NodeId) -> HeaderAttr:
        """The metadata `node`'s creating tar header recorded (see `HeaderAttr`); a directory's
        overlay opaque marker is not part of it. Raises `NotFound`."""
        self._check(node)
        origin = self._origin.get(node)
        if origin is not None:
            return origin
        return HeaderAttr(
            perm=self._mode[node] & 0o7777,
            uid=self._uid[node],
            gid=self._gid[node],
            mtime_ns=self._mtime[node],
            xattrs=self._xattrs.get(node, ()),
        )

    def data_range(self, node: NodeId) -> tuple[UncompressedOffset, int]:
        """(offset of the file's data in the uncompressed tar stream, size in bytes)."""
        self._check(node)
        return UncompressedOffset(self._data_off[node]), self._size[node]

    def files_after(self, node: NodeId, scan: int, max_size: int) -> Iterator[NodeId]:
        """The regular files of 1 to `max_size` bytes among the `scan` nodes that follow
        `node` in tar order, in that order."""
        mode, size = self._mode, self._size
        for n in range(node + 1, min(node + 1 + scan, len(size))):
            if stat.S_ISREG(mode[n]) and 0 < size[n] <= max_size:
                yield NodeId(n)

    def header_range(self, node: NodeId) -> tuple[UncompressedOffset, UncompressedOffset]:
        """[start, end) of the tar header blocks (PAX/GNU included) that describe `node`."""
        self._check(node)
        return UncompressedOffset(self._hdr_off[node]), UncompressedOffset(self._data_off[node])

    def path_of(self, node: NodeId) -> str:
        """The cleaned path of `node`'s first name (for messages and verification)."""
        parts: list[bytes] = []
        current = int(node)
        for _ in range(4096):
            if current == ROOT_NODE or not 0 <= current < len(self._node_entry):
                break
            entry = self._node_entry[current]
            if entry == _NO_ENTRY:
                break
            parts.append(self._entry_name(entry))
            current = self._entry_parent[entry]
        return b"/".join(reversed(parts)).decode("utf-8", "surrogateescape")


class _EntryNames(Sequence[bytes]):
    """A read-only view of a directory's entry names, for `bisect`."""

    __slots__ = ("_hi", "_lo", "_tree")

    def __init__(self, tree: LayerTree, lo: int, hi: int) -> None:
        self._tree, self._lo, self._hi = tree, lo, hi

    def __len__(self) -> int:
        return self._hi - self._lo

    def __getitem__(self, i: int) -> bytes:  # type: ignore[override]
        return self._tree._entry_name(self._lo + i)


class _NodeArrays:
    """Growable per-node attribute columns used while building."""

    __slots__ = ("data_off", "gid", "hdr_off", "mode", "mtime", "nlink", "rdev", "size", "uid")

    def __init__(self) -> None:
        self.mode = array("I")
        self.uid = array("I")
        self.gid = array("I")
        self.size = array("q")
        self.mtime = array("q")
        self.rdev = array("Q")
        self.nlink = array("I")
        self.data_off = array("q")
        self.hdr_off = array("q")

    def add(
        self,
        *,
        mode: int,
        uid: int = 0,
        gid: int = 0,
        size: int = 0,
        mtime: int = 0,
        rdev: int = 0,
        data_off: int = 0,
        hdr_off: int = 0,
    ) -> NodeId:
        node = len(self.mode)
        if node >= MAX_NODES:
            raise TreeBuildError(f"layer has more than {MAX_NODES} nodes")
        self.mode.append(mode)
        self.uid.append(uid)
        self.gid.append(gid)
        self.size.append(size)
        self.mtime.append(mtime)
        self.rdev.append(rdev)
        self.nlink.append(0)
        self.data_off.append(data_off)
        self.hdr_off.append(hdr_off)
        return NodeId(node)


class _Builder:
    """One pass over the entries in tar order, then whiteout conversion and sorting."""

    def __init__(self, opaque_xattr: bytes) -> None:
        self.opaque_xattr = opaque_xattr
        self.nodes = _NodeArrays()
        self.nodes.add(mode=stat.S_IFDIR | 0o755)
        self.e_node = array("I")
        self.e_parent = array("I")
        self.e_name: list[bytes] = []
        self.paths: dict[str, int] = {}
        self.links: dict[int, bytes] = {}
        self.xattrs: dict[int, Xattrs] = {}
        self.origin: dict[int, HeaderAttr] = {}
        self._mtimes: dict[str, int] = {}
        self.node_first = array("I")

    def _is_dir(self, node: int) -> bool:
        return stat.S_ISDIR(self.nodes.mode[node])

    def _ensure_dir(self, path: str, for_name: str) -> NodeId:
        if not path:
            return ROOT_NODE
        entry = self.paths.get(path)
        if entry is not None:
            node = self.e_node[entry]
            if not self._is_dir(node):
                raise TreeBuildError(
                    f"entry {for_name!r}: parent {path!r} is not a directory in this layer"
                )
            return NodeId(node)
        parent_path, _, base = path.rpartition("/")
        parent = self._ensure_dir(parent_path, for_name)
        node = self.nodes.add(mode=stat.S_IFDIR | 0o755)
        self._link(path, parent, base, node)
        return node

    def _link(self, path: str, parent: int, base: str, node: int) -> None:
        entry = self.paths.get(path)
        if entry is not None:
            self.e_node[entry] = node
        else:
            entry = self.paths[path] = len(self.e_node)
            self.e_node.append(node)
            self.e_parent.append(parent)
            self.e_name.append(_encode(base))
        self._note_first_entry(node, entry)

    def _note_first_entry(self, node: int, entry: int) -> None:
        # The entry that created a node names it in path_of (and in header verification),
        # even when a hardlink to it sorts first.
        first = self.node_first
        if len(first) <= node:
            first.extend([_NO_ENTRY] * (node + 1 - len(first)))
        if first[node] == _NO_ENTRY:
            first[node] = entry

    def _add_xattrs(self, node: int, meta: FileMetadata, *, chowned: bool = False) -> None:
        """setxattr for each record the applier keeps, over what the inode has; `chowned`: a
        later header's lchown of a non-directory removed `security.capability` first."""
        old = self.xattrs.get(node, ())
        if not meta.xattrs and not (chowned and old):
            return
        merged = dict(old)
        if chowned:
            merged.pop(_CAPABILITY_XATTR, None)
        if meta.xattrs:
            merged.update(archive_xattrs(meta.xattrs, self.nodes.mode[node]))
        if merged:
            self.xattrs[node] = tuple(sorted(merged.items()))
        else:
            self.xattrs.pop(node, None)

    def add(self, meta: FileMetadata, hdr_off: int) -> None:
        path = clean_path(meta.name)
        mtime = self._mtimes.get(meta.mod_time)
        if mtime is None:
            try:
                mtime = bound_time_ns(parse_rfc3339_ns(meta.mod_time))
            except ValueError as e:
                raise TreeBuildError(f"entry {meta.name!r}: bad mod_time: {e}") from e
            if len(self._mtimes) < 4096:  # layers reuse a few timestamps; keep the cache small
                self._mtimes[meta.mod_time] = mtime
        if not path:
            return  # containerd ignores an entry that resolves to the root
        if meta.type == EntryType.HARDLINK:
            self._add_hardlink(meta, path, mtime)
            return
        type_bits = _TYPE_BITS.get(meta.type)
        if type_bits is None:
            raise TreeBuildError(f"entry {meta.name!r}: unsupported type {meta.type!r}")
        mode = type_bits | (0o777 if meta.type == EntryType.SYMLINK else meta.mode & 0o7777)
        parent_path, _, base = path.rpartition("/")
        parent = self._ensure_dir(parent_path, meta.name)
        existing = self.paths.get(path)
        if meta.type == EntryType.DIR and existing is not None:
            node = self.e_node[existing]
            if self._is_dir(node):
                self._update_dir(NodeId(node), meta, mode, mtime)
                return
        rdev = 0
        if meta.devmajor or meta.devminor:
            if not (0 <= meta.devmajor <= _MAX_DEVICE and 0 <= meta.devminor <= _MAX_DEVICE):
                raise TreeBuildError(
                    f"entry {meta.name!r}: device numbers {meta.devmajor}:{meta.devminor} "
                    "out of range"
                )
            rdev = os.makedev(meta.devmajor, meta.devminor)
        size = meta.uncompressed_size if meta.type == EntryType.REG else 0
        if meta.type == EntryType.SYMLINK:
            size = len(_encode(meta.linkname))
        node = self.nodes.add(
            mode=mode,
            uid=meta.uid,
            gid=meta.gid,
            size=size,
            mtime=mtime,
            rdev=rdev,
            data_off=meta.uncompressed_offset,
            hdr_off=hdr_off,
        )
        if meta.type == EntryType.SYMLINK:
            self.links[node] = _encode(meta.linkname)
        self._add_xattrs(node, meta)
        self._link(path, parent, base, node)

    def _update_dir(self, node: NodeId, meta: FileMetadata, mode: int, mtime: int) -> None:
        self.nodes.mode[node] = mode
        self.nodes.uid[node] = meta.uid
        self.nodes.gid[node] = meta.gid
        self.nodes.mtime[node] = mtime
        self._add_xattrs(node, meta)

    def _add_hardlink(self, meta: FileMetadata, path: str, mtime: int) -> None:
        target = clean_path(meta.linkname)
        entry = self.paths.get(target)
        if entry is None:
            raise TreeBuildError(
                f"hardlink {meta.name!r} -> {meta.linkname!r}: the target does not appear "
                "earlier in the layer"
            )
        node = self.e_node[entry]
        if self._is_dir(node):
            raise TreeBuildError(f"hardlink {meta.name!r} -> {meta.linkname!r}: target is a dir")
        parent_path, _, base = path.rpartition("/")
        parent = self._ensure_dir(parent_path, meta.name)
        self._link(path, parent, base, node)
        self._apply_link_header(node, meta, mtime)

    def _apply_link_header(self, node: int, meta: FileMetadata, mtime: int) -> None:
        """The hardlink header's lchown, setxattr, chmod (not on a symlink) and utimes land on
        the shared inode; what its creating header recorded is kept for verification."""
        nodes = self.nodes
        self._keep_origin(node)
        nodes.uid[node] = meta.uid
        nodes.gid[node] = meta.gid
        self._add_xattrs(node, meta, chowned=True)
        if not stat.S_ISLNK(nodes.mode[node]):
            nodes.mode[node] = stat.S_IFMT(nodes.mode[node]) | (meta.mode & 0o7777)
        nodes.mtime[node] = mtime

    def _keep_origin(self, node: int) -> None:
        """Remember what `node`'s creating header recorded, before anything else changes it."""
        if node not in self.origin:
            nodes = self.nodes
            self.origin[node] = HeaderAttr(
                perm=nodes.mode[node] & 0o7777,
                uid=nodes.uid[node],
                gid=nodes.gid[node],
                mtime_ns=nodes.mtime[node],
                xattrs=self.xattrs.get(node, ()),
            )

    def finish(self) -> LayerTree:
        self.paths.clear()
        groups: dict[int, list[int]] = {}
        for entry, parent in enumerate(self.e_parent):
            groups.setdefault(parent, []).append(entry)
        opaque: set[int] = set()
        for parent, entries in groups.items():
            if not any(self.e_name[e].startswith(WHITEOUT_PREFIX_BYTES) for e in entries):
                continue
            real = {
                self.e_name[e]
                for e in entries
                if not self.e_name[e].startswith(WHITEOUT_PREFIX_BYTES)
            }
            kept: list[int] = []
            for e in entries:
                name = self.e_name[e]
                if not name.startswith(WHITEOUT_PREFIX_BYTES):
                    kept.append(e)
                elif name == OPAQUE_MARKER_BYTES:
                    opaque.add(parent)
                else:
                    hidden = name[len(WHITEOUT_PREFIX_BYTES) :]
                    if hidden and hidden not in real:
                        real.add(hidden)
                        self.e_name[e] = hidden
                        header = self.e_node[e]  # the `.wh.` entry's own node: its owner
                        self.e_node[e] = self.nodes.add(
                            mode=stat.S_IFCHR,
                            uid=self.nodes.uid[header],
                            gid=self.nodes.gid[header],
                        )
                        self._note_first_entry(self.e_node[e], e)
                        kept.append(e)
            groups[parent] = kept
        for node in opaque:
            self._keep_origin(node)
            others = tuple(kv for kv in self.xattrs.get(node, ()) if kv[0] != self.opaque_xattr)
            self.xattrs[node] = ((self.opaque_xattr, b"y"), *others)
        return self._layout(groups)

    def _layout(self, groups: dict[int, list[int]]) -> LayerTree:
        n_nodes = len(self.nodes.mode)
        child_start = array("I", bytes(4 * n_nodes))
        child_count = array("I", bytes(4 * n_nodes))
        node_entry = array("I", [_NO_ENTRY]) * n_nodes
        nlink = self.nodes.nlink
        names = bytearray()
        name_off = array("Q", [0])
        entry_node = array("I")
        entry_parent = array("I")
        queue = [int(ROOT_NODE)]
        nlink[ROOT_NODE] = 2
        for dir_node in queue:  # breadth first; the list grows while we walk it
            children = sorted(groups.get(dir_node, ()), key=self.e_name.__getitem__)
            child_start[dir_node] = len(entry_node)
            child_count[dir_node] = len(children)
            for e in children:
                node = self.e_node[e]
                if node_entry[node] == _NO_ENTRY or self.node_first[node] == e:
                    node_entry[node] = len(entry_node)
                names += self.e_name[e]
                name_off.append(len(names))
                entry_node.append(node)
                entry_parent.append(dir_node)
                if self._is_dir(node):
                    nlink[dir_node] += 1
                    nlink[node] = 2
                    queue.append(node)
                else:
                    nlink[node] += 1
        return LayerTree(
            nodes=self.nodes,
            names=bytes(names),
            name_off=name_off,
            entry_node=entry_node,
            entry_parent=entry_parent,
            child_start=child_start,
            child_count=child_count,
            node_entry=node_entry,
            links=self.links,
            xattrs=self.xattrs,
            origin=self.origin,
        )


def header_offsets(files: Sequence[FileMetadata]) -> list[int]:
    """The derived tar header offset of each entry (docs/format.md), in the input order.

    In offset order, the first entry's header starts at 0 and each later one at the 512-aligned
    end of the previous entry's data.

    A `ZtocView` (already sorted and checked at construction) answers from its compact
    offset arrays without decoding any entry.

    Raises:
        TreeBuildError: a derived header offset lies beyond the entry's data offset.
    """
    if isinstance(files, ZtocView):
        return files.tar_header_offsets()
    order = sorted(range(len(files)), key=lambda i: files[i].uncompressed_offset)
    result = [0] * len(files)
    position = 0
    for i in order:
        meta = files[i]
        if position > meta.uncompressed_offset:
            raise TreeBuildError(
                f"invalid toc entry {meta.name!r}: header offset {position} is past its data "
                f"offset {meta.uncompressed_offset}"
            )
        result[i] = position
        end = meta.uncompressed_offset + meta.uncompressed_size
        position = (end + 511) // 512 * 512
    return result


def build_tree(files: Sequence[FileMetadata], *, userxattr: bool = False) -> LayerTree:
    """Build the tree of one layer from its zTOC entries (`Ztoc.files`, in tar order).

    `userxattr` selects `user.overlay.opaque` instead of `trusted.overlay.opaque` for opaque
    directories (overlayfs mounted with `userxattr`).

    Raises:
        TreeBuildError: an entry cannot be placed (message names it): a hardlink whose target is
            not earlier in the layer or is a directory, a parent path that is not a directory,
            an unsupported type, a malformed mod_time, device numbers out of range or
            inconsistent offsets.
    """
    builder = _Builder(opaque_xattr(userxattr).encode())
    entries = files.entries(owner_names=False) if isinstance(files, ZtocView) else files
    add = builder.add
    for meta, hdr_off in zip(entries, header_offsets(files), strict=True):
        add(meta, hdr_off)
    return builder.finish()
