"""The multi-layer host: one filesystem whose top-level directories are layers.

Pure domain logic: no FUSE protocol. The FUSE server (`snapshotter.fs.fuse`) only translates the
calls below and their `FsError`s.

Layout of the mounted filesystem::

    /                          the FUSE root (inode 1): one directory per layer, by slot order
    /<layer>/...               the layer's tree (`snapshotter.fs.tree`)
    /<layer>/.sociable/        state directory: mode 0500, found by lookup, never listed
    /<layer>/.sociable/status.json
                               JSON: {"layer", "digest", "slot", "fetchedSize", "totalSize",
                               "fetchedPercent", "bytesServed", "bytesPushed", "readErrors",
                               "error"?} + "\\n"

The state directory shadows a real `.sociable` at the layer root (as SOCI's
`.soci-snapshotter` does); layer contents are unaffected everywhere else.

Every directory lists `.` and `..` first, as Linux filesystems do (readdir offsets 1 and 2):
`.` is the directory itself, `..` its parent; a layer root's parent is the FUSE root (a layer
is a subdirectory of this one filesystem, bind-mounted elsewhere, and a bind mount of a
subdirectory of ext4 lists its real parent too) and the FUSE root's parent is itself.

Handles are stateless: files are read by inode number (the kernel opens them without the
server), a directory handle IS its inode number, so a restarted daemon answers for what the
kernel got from the previous process (reads, listings), `releasedir` has nothing to free, and
a status file is rendered when read.

Reads of regular files go through the layer's `LayerReader`. Before the first read of a file
the host (unless `verify_headers=False`) reads its tar header through the same reader and checks
it against the tree (`snapshotter.fs.verify`). Every read failure is recorded as the layer's
last error and raised as `LayerReadError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Container, Iterator
from dataclasses import dataclass
from typing import Final

from index.model import UncompressedOffset
from snapshotter.fs.errors import (
    BadHandle,
    HeaderMismatch,
    LayerExists,
    LayerReadError,
    NoSuchAttribute,
    NotADirectory,
    NotASymlink,
    NotFound,
    PermissionDenied,
    ReadOnly,
)
from snapshotter.fs.inodes import (
    FUSE_ROOT_INODE,
    MAX_SLOT,
    STATE_DIR_LOCAL,
    STATUS_FILE_LOCAL,
    InodeNo,
    local_to_node,
    make_inode,
    node_inode,
    split_inode,
)
from snapshotter.fs.readers import LayerReader, ReadsLocal, ReadsNow, ReportsProgress
from snapshotter.fs.tree import BLOCK_SIZE, ROOT_NODE, Attr, LayerTree, NodeId, blocks_of
from snapshotter.fs.verify import check_header

STATE_DIR_NAME: Final = b".sociable"
STATUS_FILE_NAME: Final = b"status.json"
DOT_ENTRIES: Final = 2
"""`.` and `..`: readdir offsets 1 and 2; a directory's own entries follow from offset 3."""


@dataclass(frozen=True, slots=True)
class Listing:
    """One readdir row; `next_offset` resumes the listing after it."""

    name: bytes
    attr: Attr
    next_offset: int


@dataclass(frozen=True, slots=True)
class FsStats:
    """statfs answers: sizes in `block_size` units, counts of inodes."""

    block_size: int
    blocks: int
    files: int
    name_max: int


@dataclass(frozen=True, slots=True)
class LayerStatus:
    """What an operator sees in `<layer>/.sociable/status.json`."""

    layer: str
    digest: str
    slot: int
    fetched_bytes: int
    total_bytes: int
    bytes_served: int
    bytes_pushed: int
    read_errors: int
    last_error: str | None

    @property
    def fetched_percent(self) -> float:
        return 100.0 if self.total_bytes <= 0 else 100.0 * self.fetched_bytes / self.total_bytes

    def to_json(self) -> bytes:
        doc: dict[str, object] = {
            "layer": self.layer,
            "digest": self.digest,
            "slot": self.slot,
            "fetchedSize": self.fetched_bytes,
            "totalSize": self.total_bytes,
            "fetchedPercent": round(self.fetched_percent, 2),
            "bytesServed": self.bytes_served,
            "bytesPushed": self.bytes_pushed,
            "readErrors": self.read_errors,
        }
        if self.last_error is not None:
            doc["error"] = self.last_error
        return json.dumps(doc, sort_keys=True).encode() + b"\n"


class _Layer:
    __slots__ = (
        "at_hand_end",
        "bytes_pushed",
        "bytes_served",
        "digest",
        "last_error",
        "name",
        "read_errors",
        "read_now",
        "reader",
        "removed",
        "slot",
        "tree",
        "verified",
    )

    def __init__(
        self, name: str, slot: int, tree: LayerTree, reader: LayerReader, digest: str
    ) -> None:
        self.name = name
        self.slot = slot
        self.tree = tree
        self.reader = reader
        now = reader if isinstance(reader, ReadsNow) else None
        self.read_now = now.read_now if now is not None else None
        self.at_hand_end = now.at_hand_end if now is not None else None
        self.digest = digest
        self.verified = bytearray((tree.node_count + 7) // 8)
        self.bytes_served = 0
        self.bytes_pushed = 0
        self.read_errors = 0
        self.last_error: str | None = None
        self.removed = False

    def __repr__(self) -> str:
        return f"<layer {self.name!r} slot={self.slot} {self.tree!r}>"

    def status(self) -> LayerStatus:
        fetched, total = 0, 0
        if isinstance(self.reader, ReportsProgress):
            progress = self.reader.progress()
            fetched, total = progress.fetched_bytes, progress.total_bytes
        return LayerStatus(
            layer=self.name,
            digest=self.digest,
            slot=self.slot,
            fetched_bytes=fetched,
            total_bytes=total,
            bytes_served=self.bytes_served,
            bytes_pushed=self.bytes_pushed,
            read_errors=self.read_errors,
            last_error=self.last_error,
        )


@dataclass(frozen=True, slots=True)
class LayerFile:
    """A regular file of a mounted layer (`LayerHost.layer_file`): which layer (the object:
    a layer removed and mounted again is another), its node and its size."""

    layer: _Layer
    node: NodeId
    size: int


def default_slot(name: str) -> int:
    """The slot a layer name gets unless one is given: stable across restarts (a hash)."""
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:4], "big") % MAX_SLOT + 1


class LayerHost:
    """All mounted layers. Not thread-safe: use from one trio loop.

    Inode numbers follow `snapshotter.fs.inodes`; handles are inode numbers (see the module
    doc). Every method raises `NotFound` for an inode whose layer is not (or no longer)
    mounted.
    """

    def __init__(self, *, verify_headers: bool = True) -> None:
        self.verify_headers = verify_headers
        self._by_name: dict[bytes, _Layer] = {}
        self._by_slot: dict[int, _Layer] = {}

    def __repr__(self) -> str:
        return f"<LayerHost layers={len(self._by_name)}>"

    # -- layers -----------------------------------------------------------------------------

    def add_layer(
        self,
        name: str,
        tree: LayerTree,
        reader: LayerReader,
        *,
        slot: int | None = None,
        digest: str = "",
    ) -> int:
        """Mount `tree` as top-level directory `name`, reading file data through `reader`.

        `slot` fixes the inode range (pass the slot recorded before a restart); by default it
        is `default_slot(name)`, moved to the next free slot on a collision. Returns the slot.

        Raises:
            LayerExists: `name` or an explicit `slot` is already in use.
            ValueError: `name` is empty, contains `/` or is `.`/`..`; `slot` is out of range.
        """
        key = name.encode("utf-8", "surrogateescape")
        if not key or b"/" in key or key in (b".", b"..") or b"\0" in key:
            raise ValueError(f"invalid layer name {name!r}")
        if key in self._by_name:
            raise LayerExists(f"layer {name!r} is already mounted")
        if slot is None:
            slot = default_slot(name)
            while slot in self._by_slot:
                slot = slot % MAX_SLOT + 1
        elif not 1 <= slot <= MAX_SLOT:
            raise ValueError(f"layer {name!r}: slot {slot} outside 1..{MAX_SLOT}")
        elif slot in self._by_slot:
            raise LayerExists(f"layer {name!r}: slot {slot} is used by {self._by_slot[slot]!r}")
        layer = _Layer(name, slot, tree, reader, digest)
        self._by_name[key] = layer
        self._by_slot[slot] = layer
        return slot

    def remove_layer(self, name: str) -> int:
        """Unmount layer `name`; returns its former slot. Its open handles then fail: reads
        with `LayerReadError` (EIO), the rest with `NotFound`.

        Raises `NotFound` if no such layer is mounted.
        """
        key = name.encode("utf-8", "surrogateescape")
        layer = self._by_name.pop(key, None)
        if layer is None:
            raise NotFound(f"no layer {name!r} is mounted")
        del self._by_slot[layer.slot]
        layer.removed = True
        return layer.slot

    def layer_names(self) -> list[str]:
        """Names of the mounted layers, in listing (slot) order."""
        return [self._by_slot[s].name for s in sorted(self._by_slot)]

    def layer_inode(self, name: str) -> InodeNo:
        """The inode of layer `name`'s root directory. Raises `NotFound`."""
        layer = self._layer_by_name(name)
        return node_inode(layer.slot, ROOT_NODE)

    def status(self, name: str) -> LayerStatus:
        """The status record of layer `name`. Raises `NotFound`."""
        return self._layer_by_name(name).status()

    def _layer_by_name(self, name: str) -> _Layer:
        layer = self._by_name.get(name.encode("utf-8", "surrogateescape"))
        if layer is None:
            raise NotFound(f"no layer {name!r} is mounted")
        return layer

    def describe(self, *, inode: int | None = None, fh: int | None = None) -> str:
        """What an inode or open handle belongs to, for log messages (`layer <name>`, `the
        host root`, or `unknown ...`). Never raises."""
        if fh is not None:
            inode = fh
        if inode is None or inode == FUSE_ROOT_INODE:
            return "the host root"
        layer = self._by_slot.get(split_inode(inode)[0])
        return f"unknown inode {inode}" if layer is None else f"layer {layer.name}"

    # -- inodes -----------------------------------------------------------------------------

    def _resolve(self, inode: int) -> tuple[_Layer, int]:
        slot, local = split_inode(inode)
        layer = self._by_slot.get(slot)
        if layer is None or local == 0:
            raise NotFound(f"inode {inode} belongs to no mounted layer")
        return layer, local

    def _root_attr(self) -> Attr:
        return Attr(
            inode=FUSE_ROOT_INODE,
            mode=stat.S_IFDIR | 0o755,
            nlink=2 + len(self._by_slot),
            uid=0,
            gid=0,
            rdev=0,
            size=0,
            mtime_ns=0,
            cacheable=False,
        )

    def _state_attr(self, layer: _Layer, local: int) -> Attr:
        if local == STATE_DIR_LOCAL:
            mode, nlink, size, mtime_ns = stat.S_IFDIR | 0o500, 2, 0, 0
        else:
            # Rendered when read: its mtime is now, so the kernel's page cache of it (kept
            # across opens) is dropped whenever it asks for the attributes again.
            mode, nlink, size = stat.S_IFREG | 0o400, 1, len(layer.status().to_json())
            mtime_ns = time.time_ns()
        return Attr(
            inode=make_inode(layer.slot, local),
            mode=mode,
            nlink=nlink,
            uid=0,
            gid=0,
            rdev=0,
            size=size,
            mtime_ns=mtime_ns,
            cacheable=False,
        )

    @staticmethod
    def _node_attr(layer: _Layer, node: NodeId) -> Attr:
        return layer.tree.attr(node, node_inode(layer.slot, node))

    def getattr(self, inode: int) -> Attr:
        """Attributes of `inode`. Raises `NotFound`."""
        if inode == FUSE_ROOT_INODE:
            return self._root_attr()
        layer, local = self._resolve(inode)
        node = local_to_node(local)
        if node is None:
            return self._state_attr(layer, local)
        return self._node_attr(layer, node)

    def lookup(self, parent: int, name: bytes) -> Attr:
        """Attributes of entry `name` in directory `parent`.

        Raises `NotFound` (no such entry; whiteout names `.wh.*` are never found) and
        `NotADirectory`.
        """
        if parent == FUSE_ROOT_INODE:
            layer = self._by_name.get(name)
            if layer is None:
                raise NotFound(f"no layer {name!r} is mounted")
            return self._node_attr(layer, ROOT_NODE)
        layer, local = self._resolve(parent)
        node = local_to_node(local)
        if node is None:
            if local == STATE_DIR_LOCAL and name == STATUS_FILE_NAME:
                return self._state_attr(layer, STATUS_FILE_LOCAL)
            if local == STATE_DIR_LOCAL:
                raise NotFound(f"layer {layer.name}: no {name!r} in the state directory")
            raise NotADirectory(f"layer {layer.name}: the status file is not a directory")
        if node == ROOT_NODE and name == STATE_DIR_NAME:
            return self._state_attr(layer, STATE_DIR_LOCAL)
        try:
            child = layer.tree.lookup(node, name)
        except NotFound as e:
            raise NotFound(f"layer {layer.name}: {e}") from e
        return self._node_attr(layer, child)

    def readlink(self, inode: int) -> bytes:
        """Target of symlink `inode`. Raises `NotASymlink`, `NotFound`."""
        layer, local = self._resolve(inode)
        node = local_to_node(local)
        if node is None:
            raise NotASymlink(f"layer {layer.name}: state inode {inode} is not a symlink")
        return layer.tree.readlink(node)

    def getxattr(self, inode: int, name: bytes) -> bytes:
        """Extended attribute `name` of `inode`. Raises `NoSuchAttribute`, `NotFound`."""
        if inode == FUSE_ROOT_INODE:
            raise NoSuchAttribute(f"the host root has no xattr {name!r}")
        layer, local = self._resolve(inode)
        node = local_to_node(local)
        if node is None:
            raise NoSuchAttribute(f"layer {layer.name}: state inode has no xattr {name!r}")
        return layer.tree.getxattr(node, name)

    def listxattr(self, inode: int) -> tuple[bytes, ...]:
        """Names of `inode`'s extended attributes (overlay opaque marker first)."""
        if inode == FUSE_ROOT_INODE:
            return ()
        layer, local = self._resolve(inode)
        node = local_to_node(local)
        return () if node is None else layer.tree.listxattr(node)

    def access(self, inode: int, mode: int, uid: int, gids: tuple[int, ...]) -> None:
        """Check `mode` (`os.R_OK | W_OK | X_OK`, or `F_OK`) for a caller.

        Raises `ReadOnly` for W_OK, `PermissionDenied` if the mode bits refuse, `NotFound`.
        """
        attr = self.getattr(inode)
        if mode & os.W_OK:
            raise ReadOnly(f"inode {inode}: the layer filesystem is read-only")
        want = mode & (os.R_OK | os.X_OK)
        if not want:
            return
        if uid == 0:
            if not mode & os.X_OK or stat.S_ISDIR(attr.mode) or attr.mode & 0o111:
                return
            raise PermissionDenied(f"inode {inode}: no execute bit for anyone")
        if uid == attr.uid:
            bits = (attr.mode >> 6) & 7
        elif attr.gid in gids:
            bits = (attr.mode >> 3) & 7
        else:
            bits = attr.mode & 7
        if want & bits != want:
            raise PermissionDenied(f"inode {inode}: mode {attr.mode & 0o7777:o} refuses {want}")

    def statfs(self) -> FsStats:
        """Totals over all mounted layers (statfs must succeed for overlayfs)."""
        blocks = sum(
            blocks_of(layer.tree.total_file_bytes) * 512 // BLOCK_SIZE
            for layer in self._by_slot.values()
        )
        files = 1 + sum(layer.tree.node_count + 2 for layer in self._by_slot.values())
        return FsStats(block_size=BLOCK_SIZE, blocks=blocks, files=files, name_max=255)

    # -- directories ------------------------------------------------------------------------

    def opendir(self, inode: int) -> int:
        """A handle for listing directory `inode` (`inode` itself). Raises `NotADirectory`,
        `NotFound`."""
        attr = self.getattr(inode)
        if not stat.S_ISDIR(attr.mode):
            raise NotADirectory(f"inode {inode} is not a directory")
        return inode

    def readdir(self, inode: int, offset: int) -> Iterator[Listing]:
        """Entries of directory `inode` from position `offset` (0 or an earlier `next_offset`).

        Every directory starts with `.` (offset 1) and `..` (offset 2). Then the root lists
        layers in slot order (`next_offset` = slot + 2, stable while layers come and go); other
        directories list by name (`next_offset` = position + 2). The state directory is not
        listed. Raises `BadHandle` (not a directory), `NotFound` if the layer was removed.
        """
        self._directory_handle(inode)
        if inode == FUSE_ROOT_INODE:
            if offset < DOT_ENTRIES:
                yield from self._dots(offset, self._root_attr(), self._root_attr())
            for slot in sorted(s for s in self._by_slot if s + DOT_ENTRIES > offset):
                layer = self._by_slot[slot]
                attr = self._node_attr(layer, ROOT_NODE)
                name = layer.name.encode("utf-8", "surrogateescape")
                yield Listing(name, attr, slot + DOT_ENTRIES)
            return
        layer, local = self._resolve(inode)
        node = local_to_node(local)
        if node is None:
            if offset < DOT_ENTRIES:
                own = self._state_attr(layer, local)
                yield from self._dots(offset, own, self._node_attr(layer, ROOT_NODE))
            if offset <= DOT_ENTRIES:
                status = self._state_attr(layer, STATUS_FILE_LOCAL)
                yield Listing(STATUS_FILE_NAME, status, DOT_ENTRIES + 1)
            return
        if offset < DOT_ENTRIES:
            tree = layer.tree
            own = self._node_attr(layer, node)
            if node == ROOT_NODE:
                yield from self._dots(offset, own, self._root_attr())
            else:
                yield from self._dots(offset, own, self._node_attr(layer, tree.parent(node)))
        for entry in layer.tree.readdir(node, max(offset - DOT_ENTRIES, 0)):
            attr = self._node_attr(layer, entry.node)
            yield Listing(entry.name, attr, entry.next_offset + DOT_ENTRIES)

    @staticmethod
    def _dots(offset: int, own: Attr, parent: Attr) -> Iterator[Listing]:
        """`.` and `..` from listing position `offset` (0 or 1)."""
        if offset < 1:
            yield Listing(b".", own, 1)
        yield Listing(b"..", parent, 2)

    def releasedir(self, fh: int) -> None:
        """Close a directory handle: nothing to free. Raises `BadHandle` if `fh` names no
        directory (a removed layer's directory is fine)."""
        try:
            self._directory_handle(fh)
        except NotFound:
            return

    def _directory_handle(self, fh: int) -> None:
        """Raises `BadHandle` unless handle `fh` is a directory, `NotFound`."""
        try:
            attr = self.getattr(fh)
        except NotFound:
            if fh != FUSE_ROOT_INODE and split_inode(fh)[0] == 0:
                raise BadHandle(f"directory handle {fh} is not open") from None
            raise
        if not stat.S_ISDIR(attr.mode):
            raise BadHandle(f"directory handle {fh} is not a directory")

    # -- files ------------------------------------------------------------------------------

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        """Up to `size` bytes of file `fh` (its inode number) from `offset` (fewer only at
        end of file).

        Raises:
            BadHandle: `fh` is not a file.
            LayerReadError: the reader failed, returned short data, the tar header did not
                match, or the layer was removed. The error is recorded in the layer status.
        """
        slot, local = split_inode(fh)
        layer = self._by_slot.get(slot)
        if layer is None or layer.removed:
            if slot == 0 or local == 0:
                raise BadHandle(f"file handle {fh} is not a file")
            raise LayerReadError(f"inode {fh}: its layer is not mounted (removed)")
        node = local_to_node(local)
        if node is None:
            if local != STATUS_FILE_LOCAL:
                raise BadHandle(f"file handle {fh} is not a file")
            return layer.status().to_json()[offset : offset + size]
        if not 0 <= node < layer.tree.node_count or layer.tree.attr(node).is_dir:
            raise BadHandle(f"file handle {fh} is not a file")
        tree = layer.tree
        data_off, file_size = tree.data_range(node)
        if offset >= file_size or size <= 0:
            return b""
        length = min(size, file_size - offset)
        try:
            if self.verify_headers and not self._verified(layer, node):
                data = await self._verify(layer, node, offset, length)
            else:
                data = await layer.reader.read(
                    UncompressedOffset(data_off + offset), length, data_off + file_size
                )
            if len(data) != length:
                raise LayerReadError(
                    f"layer {layer.name}: {tree.path_of(node)!r}: reader returned "
                    f"{len(data)} of {length} bytes at file offset {offset}"
                )
        except LayerReadError as e:
            self._record_error(layer, str(e))
            raise
        except Exception as e:
            message = f"layer {layer.name}: reading {tree.path_of(node)!r}: {e!r}"
            self._record_error(layer, message)
            raise LayerReadError(message) from e
        layer.bytes_served += length
        return data

    def read_now(self, fh: int, offset: int, size: int) -> bytes | None:
        """What `read` would return when the layer's reader has the bytes at hand
        (`ReadsNow`): the file's data, and for its first read from offset 0 its tar header
        too, checked here; None when `read` must be awaited, also for every case in which
        `read` raises."""
        slot, local = split_inode(fh)
        layer = self._by_slot.get(slot)
        node = local_to_node(local)
        if layer is None or layer.removed or layer.read_now is None or node is None:
            return None
        tree = layer.tree
        if not 0 <= node < tree.node_count or tree.attr(node).is_dir:
            return None
        data_off, file_size = tree.data_range(node)
        if offset >= file_size or size <= 0:
            return b""
        length = min(size, file_size - offset)
        if not self.verify_headers or self._verified(layer, node):
            data = layer.read_now(
                UncompressedOffset(data_off + offset), length, data_off + file_size
            )
        elif offset == 0:  # header and data in one reader call, as `_verify` reads them
            start, end = tree.header_range(node)
            both = layer.read_now(start, end - start + length, data_off + file_size)
            if both is None or len(both) != end - start + length:
                return None
            try:
                check_header(both[: end - start], tree, node, layer.name)
            except HeaderMismatch:  # `read` checks it again, records it and raises
                return None
            self._mark_verified(layer, node)
            data = both[end - start :]
        else:
            return None
        if data is None or len(data) != length:
            return None
        layer.bytes_served += length
        return data

    def files_after(
        self,
        fh: int,
        *,
        max_bytes: int,
        max_file_bytes: int,
        scan: int,
        skip: Container[int],
        chunk_bytes: int,
    ) -> Iterator[tuple[InodeNo, bytes]]:
        """Whole contents of the small files that follow file `fh` in its layer's tar order
        (`LayerTree.files_after`: regular files of at most `max_file_bytes` among the next
        `scan` nodes, those in `skip` left out), while the reader has their bytes at hand
        and they fit `max_bytes` together: what a reader of `fh` is likely to read next, to
        give the kernel before it asks. Read from the reader in runs of consecutive files of
        at most `chunk_bytes` of tar stream (headers included), one reader call each; tar
        headers are checked as `read_now` checks them; nothing here fetches, and no read-ahead
        policy counts these as reads. Nothing for a layer without a `ReadsNow` reader. A
        generator: each run is read when the caller asks for its first file."""
        slot, local = split_inode(fh)
        layer = self._by_slot.get(slot)
        node = local_to_node(local)
        if layer is None or layer.removed or layer.at_hand_end is None or node is None:
            return
        tree = layer.tree
        left = max_bytes
        run: list[NodeId] = []
        hand_end = -1
        for after in tree.files_after(node, scan, max_file_bytes):
            if node_inode(slot, after) in skip:
                continue
            data_off, size = tree.data_range(after)
            if size > left:
                break
            if hand_end < 0:  # how far the stream is at hand, from the first file on
                first = tree.header_range(after)[0]
                hand_end = layer.at_hand_end(first, max_bytes + chunk_bytes)
            if data_off + size > hand_end:
                break
            if run and _run_bytes(tree, run[0], after) > chunk_bytes:
                found = self._run_at_hand(layer, run)
                yield from found
                if len(found) < len(run):
                    return
                run = []
            run.append(after)
            left -= size
        if run:
            yield from self._run_at_hand(layer, run)

    def _run_at_hand(self, layer: _Layer, run: list[NodeId]) -> list[tuple[InodeNo, bytes]]:
        """The files of `run` (consecutive in tar order) whose bytes are at hand, from one
        reader call; stops at the first whose header does not check (its READ will tell)."""
        assert layer.read_now is not None
        if layer.removed:
            return []
        tree = layer.tree
        start = tree.header_range(run[0])[0]
        end = sum(tree.data_range(run[-1]))
        blob = layer.read_now(start, end - start, end, observe=False)
        if blob is None or len(blob) != end - start:
            return []
        out: list[tuple[InodeNo, bytes]] = []
        for n in run:
            if self.verify_headers and not self._verified(layer, n):
                h_start, h_end = tree.header_range(n)
                try:
                    check_header(blob[h_start - start : h_end - start], tree, n, layer.name)
                except HeaderMismatch:
                    break
                self._mark_verified(layer, n)
            data_off, size = tree.data_range(n)
            out.append(
                (node_inode(layer.slot, n), blob[data_off - start : data_off - start + size])
            )
            layer.bytes_pushed += size
        return out

    def layer_file(self, inode: int) -> LayerFile | None:
        """The regular layer file behind `inode`, None for anything else (a directory, the
        status file, an inode of no mounted layer)."""
        slot, local = split_inode(inode)
        layer = self._by_slot.get(slot)
        node = local_to_node(local)
        if layer is None or layer.removed or node is None or not 0 <= node < layer.tree.node_count:
            return None
        if not stat.S_ISREG(layer.tree.attr(node).mode):
            return None
        return LayerFile(layer, node, layer.tree.data_range(node)[1])

    async def read_local(self, file: LayerFile, offset: int, size: int) -> bytes | None:
        """`size` bytes of `file` from `offset` when they are local and its tar header was
        checked (`ReadsLocal`): nothing is fetched and nothing is counted as served. None
        otherwise: not local, not checked yet, the layer removed or its reader failing."""
        layer, node = file.layer, file.node
        if (
            layer.removed
            or not isinstance(layer.reader, ReadsLocal)
            or (self.verify_headers and not self._verified(layer, node))
        ):
            return None
        data_off, file_size = layer.tree.data_range(node)
        length = max(0, min(size, file_size - offset))
        try:
            data = await layer.reader.read_local(UncompressedOffset(data_off + offset), length)
        except Exception:  # a reader failing here only means "not now"
            return None
        return data if data is not None and len(data) == length else None

    @staticmethod
    def _verified(layer: _Layer, node: NodeId) -> bool:
        return bool(layer.verified[node >> 3] & (1 << (node & 7)))

    @staticmethod
    def _mark_verified(layer: _Layer, node: NodeId) -> None:
        layer.verified[node >> 3] |= 1 << (node & 7)

    async def _verify(self, layer: _Layer, node: NodeId, offset: int, length: int) -> bytes:
        """Check `node`'s tar header, then return `length` bytes of its data from `offset`.

        The data follows the header in the tar stream: a read from the start of the file is
        one reader call for both (one pass through the read path, not two); a read from
        further in reads the header on its own first. Raises what `check_header` and the
        reader raise.
        """
        start, end = layer.tree.header_range(node)
        file_end = end + layer.tree.data_range(node)[1]
        if offset == 0:
            both = await layer.reader.read(start, end - start + length, file_end)
            header, data = both[: end - start], both[end - start :]
        else:
            header = await layer.reader.read(start, end - start, file_end)
            data = b""
        check_header(header, layer.tree, node, layer.name)
        self._mark_verified(layer, node)
        if offset != 0:
            data = await layer.reader.read(UncompressedOffset(end + offset), length, file_end)
        return data

    @staticmethod
    def _record_error(layer: _Layer, message: str) -> None:
        layer.read_errors += 1
        layer.last_error = message


def _run_bytes(tree: LayerTree, first: NodeId, last: NodeId) -> int:
    """Bytes of tar stream from `first`'s header to the end of `last`'s data."""
    return sum(tree.data_range(last)) - tree.header_range(first)[0]
