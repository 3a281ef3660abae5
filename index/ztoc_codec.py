"""zTOC flatbuffers codec, byte-identical to the AWS SOCI implementation (docs/format.md).

* `encode_ztoc` performs the Go marshaler's builder calls in their exact order (docs/format.md) on
  `index.fbwriter.FlatWriter`, a fast writer that gives the same bytes as the `flatbuffers`
  runtime's `Builder`; so equal inputs give equal bytes and equal digests.
* `decode_ztoc` / `ZtocView` read a buffer with their own bounds-checked flatbuffers reader:
  every offset is checked against the buffer, so garbage raises `ZtocFormatError`, never an
  `IndexError` or `struct.error`. They accept what Go's decoder accepts (absent fields take
  their defaults, any `mod_time`, `version` or digest string is kept as-is), sort entries by
  `uncompressed_offset` as Go does, and apply Go's one semantic check: each entry's derived
  tar header offset (`tar_header_offsets`) must not lie after its data (`invalid toc entry`).
  Two checks go beyond Go, because a reader could not act on such a zTOC: an unknown
  `compression_algorithm` value, and (in `decode_ztoc` / `ZtocView.entry`) an entry `type`
  that is not one of the seven `EntryType` names. `ZtocView.type_name` gives the raw string.

Strings are UTF-8 with `surrogateescape` in both directions, so names that are not UTF-8 (tar
names are bytes) survive a round trip unchanged.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterator, Mapping, Sequence
from typing import Final

from index.errors import SociableError
from index.fbwriter import UOFFSET, Field, FlatBufferSizeError, FlatWriter
from index.model import (
    NO_XATTRS,
    CompressionAlgorithm,
    CompressionInfo,
    EntryType,
    FileMetadata,
    SpanId,
    UncompressedOffset,
    Ztoc,
)

TAR_BLOCK_SIZE: Final = 512

_ENCODING: Final = "utf-8"
_ERRORS: Final = "surrogateescape"
_INT8: Final = (-(1 << 7), (1 << 7) - 1)
_INT32: Final = (-(1 << 31), (1 << 31) - 1)
_INT64: Final = (-(1 << 63), (1 << 63) - 1)
_UINT32: Final = (0, (1 << 32) - 1)

# vtable slots
_ZTOC_VERSION, _ZTOC_TOOL, _ZTOC_CSIZE, _ZTOC_USIZE, _ZTOC_TOC, _ZTOC_CINFO = range(6)
_TOC_METADATA: Final = 0
_CI_ALGORITHM, _CI_MAX_SPAN_ID, _CI_SPAN_DIGESTS, _CI_CHECKPOINTS = range(4)
(
    _FM_NAME,
    _FM_TYPE,
    _FM_OFFSET,
    _FM_SIZE,
    _FM_LINKNAME,
    _FM_MODE,
    _FM_UID,
    _FM_GID,
    _FM_UNAME,
    _FM_GNAME,
    _FM_MOD_TIME,
    _FM_DEVMAJOR,
    _FM_DEVMINOR,
    _FM_XATTRS,
) = range(14)
_FM_NUM_FIELDS: Final = 14
_XATTR_KEY, _XATTR_VALUE = range(2)

_ENTRY_TYPES: Final = {t.value: t for t in EntryType}
_ALGORITHMS: Final = {a.value: a for a in CompressionAlgorithm}

_unpack_u16 = struct.Struct("<H").unpack_from
_unpack_u32 = struct.Struct("<I").unpack_from
_unpack_i32 = struct.Struct("<i").unpack_from
_unpack_i64 = struct.Struct("<q").unpack_from
_unpack_i8 = struct.Struct("<b").unpack_from


class ZtocError(SociableError, ValueError):
    """Base of the codec's errors."""


class ZtocFormatError(ZtocError):
    """The bytes are not a zTOC this reader can use: truncated or garbage flatbuffers, an
    offset pointing outside the buffer, a missing TOC or compression info, an unknown
    compression algorithm or entry type, or entries whose derived tar header offsets overlap
    their data (`invalid toc entry`). The message names the field or entry."""


class ZtocEncodeError(ZtocError):
    """A `Ztoc` value cannot be serialised: a number outside its flatbuffers field type
    (int64 offsets and sizes, uint32 uid/gid, int32 max_span_id) or a string that is not
    encodable."""


# --- encoding ------------------------------------------------------------------------------------


def _sort_key(key: str) -> bytes:
    return key.encode(_ENCODING, _ERRORS)


def _encode_str(text: str, what: str) -> bytes:
    try:
        return text.encode(_ENCODING, _ERRORS)
    except UnicodeEncodeError as e:
        raise ZtocEncodeError(f"{what} is not encodable as UTF-8: {text!r}") from e


def _int_field(slot: int, kind: str, value: int, bounds: tuple[int, int], what: str) -> Field:
    if not bounds[0] <= value <= bounds[1]:
        raise ZtocEncodeError(f"{what} = {value} does not fit its flatbuffers field")
    return (slot, kind, value)


def _encode_entry(w: FlatWriter, index: int, entry: FileMetadata) -> int:
    try:
        name = w.string(entry.name.encode(_ENCODING, _ERRORS))
        type_ = w.string(str(entry.type).encode(_ENCODING, _ERRORS))
        linkname = w.string(entry.linkname.encode(_ENCODING, _ERRORS))
        uname = w.string(entry.uname.encode(_ENCODING, _ERRORS))
        gname = w.string(entry.gname.encode(_ENCODING, _ERRORS))
        mod_time = w.string(entry.mod_time.encode(_ENCODING, _ERRORS))
        encoded = sorted(  # bytewise key order, like Go's sort.Strings
            (k.encode(_ENCODING, _ERRORS), v.encode(_ENCODING, _ERRORS))
            for k, v in entry.xattrs.items()
        )
    except UnicodeEncodeError as e:
        raise ZtocEncodeError(
            f"entry {index} ({entry.name!r}) has a string not encodable as UTF-8"
        ) from e
    xattrs: list[int] = []
    for key_raw, value_raw in encoded:
        key_off = w.string(key_raw)
        value_off = w.string(value_raw)
        xattrs.append(
            w.table(2, ((_XATTR_KEY, UOFFSET, key_off), (_XATTR_VALUE, UOFFSET, value_off)))
        )
    xattrs_vec = w.offset_vector(xattrs)

    offset, size, mode = entry.uncompressed_offset, entry.uncompressed_size, entry.mode
    uid, gid, devmajor, devminor = entry.uid, entry.gid, entry.devmajor, entry.devminor
    lo, hi = _INT64
    if not (
        lo <= offset <= hi
        and lo <= size <= hi
        and lo <= mode <= hi
        and lo <= devmajor <= hi
        and lo <= devminor <= hi
        and 0 <= uid <= _UINT32[1]
        and 0 <= gid <= _UINT32[1]
    ):
        raise ZtocEncodeError(
            f"entry {index} ({entry.name!r}) has a number outside its flatbuffers field: "
            f"offset={offset} size={size} mode={mode} uid={uid} gid={gid} "
            f"devmajor={devmajor} devminor={devminor}"
        )
    # Add order and default-skipping as in the Go marshaler (docs/format.md, "zTOC bytes").
    fields: list[Field] = [
        (_FM_NAME, UOFFSET, name),
        (_FM_TYPE, UOFFSET, type_),
        (_FM_OFFSET, "q", offset),
        (_FM_SIZE, "q", size),
        (_FM_LINKNAME, UOFFSET, linkname),
        (_FM_MODE, "q", mode),
        (_FM_UID, "I", uid),
        (_FM_GID, "I", gid),
        (_FM_UNAME, UOFFSET, uname),
        (_FM_GNAME, UOFFSET, gname),
        (_FM_MOD_TIME, UOFFSET, mod_time),
        (_FM_DEVMAJOR, "q", devmajor),
        (_FM_DEVMINOR, "q", devminor),
        (_FM_XATTRS, UOFFSET, xattrs_vec),
    ]
    return w.table(_FM_NUM_FIELDS, [f for f in fields if f[2]])


def encode_ztoc(z: Ztoc) -> bytes:
    """Serialise `z` to zTOC flatbuffers bytes, identical to what the AWS tools write.

    Entries are written in the order of `z.files` (tar order; the builder never reorders),
    each entry's `xattrs` sorted bytewise by key. The entry `type` is written as the string
    value it holds. Raises `ZtocEncodeError` for numbers outside their field types,
    unencodable strings, or a result larger than 2 GiB.
    """
    w = FlatWriter()
    version = w.string(_encode_str(z.version, "version"))
    tool = w.string(_encode_str(z.build_tool_identifier, "build_tool_identifier"))

    entries = [0] * len(z.files)
    for i in range(len(z.files) - 1, -1, -1):
        entries[i] = _encode_entry(w, i, z.files[i])
    metadata = w.offset_vector(entries)
    toc = w.table(1, [(_TOC_METADATA, UOFFSET, metadata)])

    info = z.compression
    checkpoints = w.byte_vector(bytes(info.checkpoints))
    digests = [w.string(_encode_str(d, "span digest")) for d in info.span_digests]
    digests_vec = w.offset_vector(digests)
    info_fields: list[Field] = [
        _int_field(_CI_MAX_SPAN_ID, "i", info.max_span_id, _INT32, "max_span_id"),
        (_CI_SPAN_DIGESTS, UOFFSET, digests_vec),
        (_CI_CHECKPOINTS, UOFFSET, checkpoints),
    ]
    algorithm = _int_field(_CI_ALGORITHM, "b", int(info.algorithm), _INT8, "compression_algorithm")
    if algorithm[2] != CompressionAlgorithm.GZIP:  # the schema default is not written
        info_fields.append(algorithm)
    compression_info = w.table(4, [f for f in info_fields if f[2]])

    root_fields: list[Field] = [
        (_ZTOC_VERSION, UOFFSET, version),
        (_ZTOC_TOOL, UOFFSET, tool),
        (_ZTOC_TOC, UOFFSET, toc),
        _int_field(_ZTOC_CSIZE, "q", z.compressed_archive_size, _INT64, "compressed size"),
        _int_field(_ZTOC_USIZE, "q", z.uncompressed_archive_size, _INT64, "uncompressed size"),
        (_ZTOC_CINFO, UOFFSET, compression_info),
    ]
    try:
        return w.finish(w.table(6, [f for f in root_fields if f[2]]))
    except FlatBufferSizeError as e:
        raise ZtocEncodeError(f"zTOC with {len(z.files)} entries is too large: {e}") from e


# --- bounds-checked flatbuffers reading ----------------------------------------------------------


class _Reader:
    """Bounds-checked access to flatbuffers tables in one buffer; raises ZtocFormatError."""

    __slots__ = ("buf", "size")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.size = len(buf)

    def need(self, pos: int, length: int, what: str) -> None:
        if pos < 0 or pos + length > self.size:
            raise ZtocFormatError(
                f"zTOC {what}: {length} bytes at offset {pos} lie outside the "
                f"{self.size}-byte buffer"
            )

    def u32(self, pos: int, what: str) -> int:
        self.need(pos, 4, what)
        return int(_unpack_u32(self.buf, pos)[0])

    def table(self, pos: int, what: str) -> tuple[int, int, int]:
        """(table position, vtable position, vtable length in bytes)."""
        self.need(pos, 4, what)
        vtable = pos - int(_unpack_i32(self.buf, pos)[0])
        self.need(vtable, 2, f"{what} vtable")
        return pos, vtable, int(_unpack_u16(self.buf, vtable)[0])

    def field(self, table: tuple[int, int, int], slot: int, what: str) -> int:
        """Absolute position of a field, or 0 when it is absent (take the default)."""
        pos, vtable, vtable_len = table
        entry = 4 + 2 * slot
        if entry >= vtable_len:
            return 0
        self.need(vtable + entry, 2, f"{what} vtable entry")
        offset = int(_unpack_u16(self.buf, vtable + entry)[0])
        return pos + offset if offset else 0

    def indirect(self, pos: int, what: str) -> int:
        return pos + self.u32(pos, what)

    def raw_string(self, table: tuple[int, int, int], slot: int, what: str) -> bytes:
        pos = self.field(table, slot, what)
        if not pos:
            return b""
        start = self.indirect(pos, what)
        length = self.u32(start, what)
        self.need(start + 4, length, what)
        return self.buf[start + 4 : start + 4 + length]

    def string(self, table: tuple[int, int, int], slot: int, what: str) -> str:
        return self.raw_string(table, slot, what).decode(_ENCODING, _ERRORS)

    def i64(self, table: tuple[int, int, int], slot: int, what: str) -> int:
        pos = self.field(table, slot, what)
        if not pos:
            return 0
        self.need(pos, 8, what)
        return int(_unpack_i64(self.buf, pos)[0])

    def i32(self, table: tuple[int, int, int], slot: int, what: str) -> int:
        pos = self.field(table, slot, what)
        if not pos:
            return 0
        self.need(pos, 4, what)
        return int(_unpack_i32(self.buf, pos)[0])

    def u32_field(self, table: tuple[int, int, int], slot: int, what: str) -> int:
        pos = self.field(table, slot, what)
        return self.u32(pos, what) if pos else 0

    def i8(self, table: tuple[int, int, int], slot: int, default: int, what: str) -> int:
        pos = self.field(table, slot, what)
        if not pos:
            return default
        self.need(pos, 1, what)
        return int(_unpack_i8(self.buf, pos)[0])

    def vector(
        self, table: tuple[int, int, int], slot: int, elem: int, what: str
    ) -> tuple[int, int]:
        """(position of the first element, element count); (0, 0) when absent."""
        pos = self.field(table, slot, what)
        if not pos:
            return 0, 0
        start = self.indirect(pos, what)
        count = self.u32(start, what)
        self.need(start + 4, count * elem, what)
        return start + 4, count

    def sub_table(
        self, table: tuple[int, int, int], slot: int, what: str
    ) -> tuple[int, int, int] | None:
        pos = self.field(table, slot, what)
        if not pos:
            return None
        return self.table(self.indirect(pos, what), what)


_VTABLE_UNPACKERS: Final = tuple(
    struct.Struct(f"<{n}H").unpack_from for n in range(_FM_NUM_FIELDS + 1)
)
_ABSENT_SLOTS: Final = tuple((0,) * (_FM_NUM_FIELDS - n) for n in range(_FM_NUM_FIELDS + 1))


def _str_at(buf: bytes, pos: int) -> str:
    """The string referenced by the offset at `pos`; `struct.error` if outside `buf`."""
    target = pos + _unpack_u32(buf, pos)[0]
    start = target + 4
    stop = start + _unpack_u32(buf, target)[0]
    if stop > len(buf):
        raise struct.error("string beyond the buffer")
    return buf[start:stop].decode(_ENCODING, _ERRORS)


_OFFSET_SLOT: Final = 4 + 2 * _FM_OFFSET
_SIZE_SLOT: Final = 4 + 2 * _FM_SIZE


def _scan_entries(buf: bytes, first: int, count: int) -> tuple[array[int], array[int], array[int]]:
    """The table position, data offset and size of each of the `count` entries whose offsets
    start at `first`, in stored order; `struct.error` on any read outside `buf` (one loop
    without per-entry diagnostics: the scan is part of every lazy layer's mount)."""
    positions, offsets, sizes = array("Q"), array("q"), array("q")
    for p in range(first, first + 4 * count, 4):
        pos = p + _unpack_u32(buf, p)[0]
        vtable = pos - _unpack_i32(buf, pos)[0]
        if vtable < 0:
            raise struct.error("vtable before the buffer")
        vtable_len = _unpack_u16(buf, vtable)[0]
        at = _unpack_u16(buf, vtable + _OFFSET_SLOT)[0] if vtable_len > _OFFSET_SLOT else 0
        positions.append(pos)
        offsets.append(_unpack_i64(buf, pos + at)[0] if at else 0)
        at = _unpack_u16(buf, vtable + _SIZE_SLOT)[0] if vtable_len > _SIZE_SLOT else 0
        sizes.append(_unpack_i64(buf, pos + at)[0] if at else 0)
    return positions, offsets, sizes


def _align_to_tar_block(offset: int) -> int:
    """Go's `AlignToTarBlock`: round a positive offset up to 512; others are unchanged."""
    if offset > 0:
        return (offset + TAR_BLOCK_SIZE - 1) // TAR_BLOCK_SIZE * TAR_BLOCK_SIZE
    return offset


def _derive_header_offsets(offsets: Sequence[int], sizes: Sequence[int]) -> list[int]:
    """Header offsets of entries already sorted by data offset; raises ZtocFormatError."""
    result: list[int] = []
    next_header = 0
    for i, (offset, size) in enumerate(zip(offsets, sizes, strict=True)):
        if next_header > offset:
            raise ZtocFormatError(
                f"invalid toc entry: entry {i} starts its data at {offset}, before the end of "
                f"the previous entry (its header would be at {next_header})"
            )
        result.append(next_header)
        next_header = _align_to_tar_block(offset + size)
    return result


def tar_header_offsets(files: Sequence[FileMetadata]) -> list[UncompressedOffset]:
    """The offset of each entry's first tar header block (PAX/GNU extension headers included),
    derived as the AWS reader does: 0 for the first entry, then the 512-aligned end of the
    previous entry's data. `files` must be in `uncompressed_offset` order (as `decode_ztoc`
    returns them). Raises `ZtocFormatError` (`invalid toc entry`) when a derived header offset
    lies after the entry's data offset.
    """
    derived = _derive_header_offsets(
        [f.uncompressed_offset for f in files], [f.uncompressed_size for f in files]
    )
    return [UncompressedOffset(o) for o in derived]


# --- decoding ------------------------------------------------------------------------------------


class ZtocView:
    """A validated, lazy view of zTOC bytes: header fields eagerly, entries on demand.

    Building the view reads every entry's offset and size (compact arrays, about 24 bytes per
    entry), sorts the entries by `uncompressed_offset` as the Go reader does and checks the
    derived tar header offsets; strings are read only when an entry is asked for. Index `i`
    always refers to the sorted order. Construction and entry access raise `ZtocFormatError`.
    """

    __slots__ = (
        "_entries_pos",
        "_header_offsets",
        "_offsets",
        "_order",
        "_reader",
        "_sizes",
        "build_tool_identifier",
        "compressed_archive_size",
        "compression",
        "uncompressed_archive_size",
        "version",
    )

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        buf = bytes(data)
        reader = self._reader = _Reader(buf)
        root = reader.table(reader.u32(0, "root offset"), "root table")
        self.version = reader.string(root, _ZTOC_VERSION, "version")
        self.build_tool_identifier = reader.string(root, _ZTOC_TOOL, "build_tool_identifier")
        self.compressed_archive_size = reader.i64(root, _ZTOC_CSIZE, "compressed_archive_size")
        self.uncompressed_archive_size = reader.i64(root, _ZTOC_USIZE, "uncompressed_archive_size")
        toc = reader.sub_table(root, _ZTOC_TOC, "toc")
        if toc is None:
            raise ZtocFormatError("zTOC has no toc table")
        info = reader.sub_table(root, _ZTOC_CINFO, "compression_info")
        if info is None:
            raise ZtocFormatError("zTOC has no compression_info table")
        self.compression = self._read_compression(info)

        first, count = reader.vector(toc, _TOC_METADATA, 4, "toc.metadata")
        try:
            positions, offsets, sizes = _scan_entries(reader.buf, first, count)
        except struct.error:  # something lies outside the buffer: the checked scan says what
            positions, offsets, sizes = self._scan_entries_checked(first, count)
        order: array[int] | None = None
        if any(offsets[i] > offsets[i + 1] for i in range(count - 1)):
            order = array("Q", sorted(range(count), key=offsets.__getitem__))
            positions = array("Q", (positions[j] for j in order))
            offsets = array("q", (offsets[j] for j in order))
            sizes = array("q", (sizes[j] for j in order))
        self._order = order
        self._entries_pos = positions
        self._offsets = offsets
        self._sizes = sizes
        self._header_offsets = array("q", _derive_header_offsets(offsets, sizes))

    def _scan_entries_checked(
        self, first: int, count: int
    ) -> tuple[array[int], array[int], array[int]]:
        """`_scan_entries` with every read bounds-checked and named in the error message."""
        reader = self._reader
        positions, offsets, sizes = array("Q"), array("q"), array("q")
        for i in range(count):
            what = f"toc entry {i}"
            table = reader.table(reader.indirect(first + 4 * i, what), what)
            positions.append(table[0])
            offsets.append(reader.i64(table, _FM_OFFSET, f"{what} uncompressed_offset"))
            sizes.append(reader.i64(table, _FM_SIZE, f"{what} uncompressed_size"))
        return positions, offsets, sizes

    def _read_compression(self, info: tuple[int, int, int]) -> CompressionInfo:
        reader = self._reader
        raw_algorithm = reader.i8(
            info, _CI_ALGORITHM, int(CompressionAlgorithm.GZIP), "compression_algorithm"
        )
        algorithm = _ALGORITHMS.get(raw_algorithm)
        if algorithm is None:
            raise ZtocFormatError(f"zTOC has unknown compression_algorithm {raw_algorithm}")
        max_span_id = reader.i32(info, _CI_MAX_SPAN_ID, "max_span_id")
        first, count = reader.vector(info, _CI_SPAN_DIGESTS, 4, "span_digests")
        digests: list[str] = []
        for i in range(count):
            what = f"span digest {i}"
            start = reader.indirect(first + 4 * i, what)
            length = reader.u32(start, what)
            reader.need(start + 4, length, what)
            digests.append(reader.buf[start + 4 : start + 4 + length].decode(_ENCODING, _ERRORS))
        first, count = reader.vector(info, _CI_CHECKPOINTS, 1, "checkpoints")
        return CompressionInfo(
            algorithm=algorithm,
            max_span_id=SpanId(max_span_id),
            span_digests=tuple(digests),
            checkpoints=reader.buf[first : first + count],
        )

    def __repr__(self) -> str:
        return (
            f"<ZtocView version={self.version!r} entries={len(self)} "
            f"uncompressed={self.uncompressed_archive_size} "
            f"spans={self.compression.max_span_id + 1}>"
        )

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i: int) -> FileMetadata:
        return self.entry(i)

    def __iter__(self) -> Iterator[FileMetadata]:
        return self.entries()

    def entries(self, *, owner_names: bool = True) -> Iterator[FileMetadata]:
        """Every entry in order, as `entry` decodes it; without `owner_names`, `uname` and
        `gname` are left empty (not decoded: a layer tree does not show them)."""
        for i in range(len(self._offsets)):  # `entry` without its index checks
            try:
                meta = self._fast_entry(i, owner_names)
            except struct.error:
                meta = self._checked_entry(i)
            yield meta

    def _table(self, i: int) -> tuple[int, int, int]:
        return self._reader.table(self._entries_pos[i], f"toc entry {i}")

    def uncompressed_offset(self, i: int) -> UncompressedOffset:
        """Where entry `i`'s data starts in the tar stream."""
        return UncompressedOffset(self._offsets[i])

    def uncompressed_size(self, i: int) -> int:
        """Entry `i`'s size field, in bytes."""
        return self._sizes[i]

    def tar_header_offset(self, i: int) -> UncompressedOffset:
        """Where entry `i`'s first tar header block starts (see `tar_header_offsets`)."""
        return UncompressedOffset(self._header_offsets[i])

    def tar_header_offsets(self) -> list[int]:
        """`tar_header_offset` of every entry, in sorted order."""
        return self._header_offsets.tolist()

    def name(self, i: int) -> str:
        """Entry `i`'s name, without decoding the rest of the entry."""
        return self._reader.string(self._table(i), _FM_NAME, f"toc entry {i} name")

    def type_name(self, i: int) -> str:
        """Entry `i`'s raw `type` string, unvalidated (may be any string Go wrote)."""
        return self._reader.string(self._table(i), _FM_TYPE, f"toc entry {i} type")

    def entry(self, i: int) -> FileMetadata:
        """Decode entry `i` (sorted order). Raises `ZtocFormatError` for an unknown type or
        a field outside the buffer, and `IndexError` for `i` out of range."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"zTOC entry index {i} out of range ({len(self)} entries)")
        i %= len(self)
        try:
            return self._fast_entry(i)
        except struct.error:
            pass  # something lies outside the buffer: the checked path says what
        return self._checked_entry(i)

    def _fast_entry(self, i: int, owner_names: bool = True) -> FileMetadata:
        """`entry` without per-field diagnostics; raises `struct.error` on any bound problem
        (the caller then re-reads with `_checked_entry`) and ZtocFormatError for a bad type."""
        buf = self._reader.buf
        pos = self._entries_pos[i]
        vtable = pos - _unpack_i32(buf, pos)[0]  # checked at construction
        n = (_unpack_u16(buf, vtable)[0] - 3) // 2
        n = 0 if n < 0 else _FM_NUM_FIELDS if n > _FM_NUM_FIELDS else n
        fo = _VTABLE_UNPACKERS[n](buf, vtable + 4) + _ABSENT_SLOTS[n]
        name = _str_at(buf, pos + fo[_FM_NAME]) if fo[_FM_NAME] else ""
        raw_type = _str_at(buf, pos + fo[_FM_TYPE]) if fo[_FM_TYPE] else ""
        entry_type = _ENTRY_TYPES.get(raw_type)
        if entry_type is None:
            raise ZtocFormatError(f"zTOC toc entry {i} ({name!r}) has unknown type {raw_type!r}")
        xattrs: Mapping[str, str] = NO_XATTRS
        if fo[_FM_XATTRS]:
            found: dict[str, str] = {}
            p = pos + fo[_FM_XATTRS]
            vec = p + _unpack_u32(buf, p)[0]
            count = _unpack_u32(buf, vec)[0]
            if vec + 4 + 4 * count > len(buf):
                raise struct.error("xattrs vector beyond the buffer")
            for j in range(vec + 4, vec + 4 + 4 * count, 4):
                xt = j + _unpack_u32(buf, j)[0]
                xvt = xt - _unpack_i32(buf, xt)[0]
                if xvt < 0:
                    raise struct.error("xattr vtable before the buffer")
                xvt_len = _unpack_u16(buf, xvt)[0]
                key_off = _unpack_u16(buf, xvt + 4)[0] if xvt_len > 4 else 0
                value_off = _unpack_u16(buf, xvt + 6)[0] if xvt_len > 6 else 0
                key = _str_at(buf, xt + key_off) if key_off else ""
                found[key] = _str_at(buf, xt + value_off) if value_off else ""
            xattrs = {k: found[k] for k in sorted(found, key=_sort_key)} if count > 1 else found
        return FileMetadata(  # positional: the named-keyword call costs more per entry
            name,
            entry_type,
            UncompressedOffset(self._offsets[i]),
            self._sizes[i],
            _str_at(buf, pos + fo[_FM_LINKNAME]) if fo[_FM_LINKNAME] else "",
            _unpack_i64(buf, pos + fo[_FM_MODE])[0] if fo[_FM_MODE] else 0,
            _unpack_u32(buf, pos + fo[_FM_UID])[0] if fo[_FM_UID] else 0,
            _unpack_u32(buf, pos + fo[_FM_GID])[0] if fo[_FM_GID] else 0,
            _str_at(buf, pos + fo[_FM_UNAME]) if owner_names and fo[_FM_UNAME] else "",
            _str_at(buf, pos + fo[_FM_GNAME]) if owner_names and fo[_FM_GNAME] else "",
            _str_at(buf, pos + fo[_FM_MOD_TIME]) if fo[_FM_MOD_TIME] else "",
            _unpack_i64(buf, pos + fo[_FM_DEVMAJOR])[0] if fo[_FM_DEVMAJOR] else 0,
            _unpack_i64(buf, pos + fo[_FM_DEVMINOR])[0] if fo[_FM_DEVMINOR] else 0,
            xattrs,
        )

    def _checked_entry(self, i: int) -> FileMetadata:
        """`entry` with every read bounds-checked and named in the error message."""
        reader = self._reader
        table = self._table(i)
        what = f"toc entry {i}"
        name = reader.string(table, _FM_NAME, f"{what} name")
        what = f"toc entry {i} ({name!r})"
        raw_type = reader.string(table, _FM_TYPE, f"{what} type")
        entry_type = _ENTRY_TYPES.get(raw_type)
        if entry_type is None:
            raise ZtocFormatError(f"zTOC {what} has unknown type {raw_type!r}")
        xattrs: dict[str, str] = {}
        first, count = reader.vector(table, _FM_XATTRS, 4, f"{what} xattrs")
        for j in range(count):
            xwhat = f"{what} xattr {j}"
            xtable = reader.table(reader.indirect(first + 4 * j, xwhat), xwhat)
            key = reader.string(xtable, _XATTR_KEY, f"{xwhat} key")
            xattrs[key] = reader.string(xtable, _XATTR_VALUE, f"{xwhat} value")
        if count > 1:
            xattrs = {k: xattrs[k] for k in sorted(xattrs, key=_sort_key)}
        return FileMetadata(
            name=name,
            type=entry_type,
            uncompressed_offset=UncompressedOffset(self._offsets[i]),
            uncompressed_size=self._sizes[i],
            linkname=reader.string(table, _FM_LINKNAME, f"{what} linkname"),
            mode=reader.i64(table, _FM_MODE, f"{what} mode"),
            uid=reader.u32_field(table, _FM_UID, f"{what} uid"),
            gid=reader.u32_field(table, _FM_GID, f"{what} gid"),
            uname=reader.string(table, _FM_UNAME, f"{what} uname"),
            gname=reader.string(table, _FM_GNAME, f"{what} gname"),
            mod_time=reader.string(table, _FM_MOD_TIME, f"{what} mod_time"),
            devmajor=reader.i64(table, _FM_DEVMAJOR, f"{what} devmajor"),
            devminor=reader.i64(table, _FM_DEVMINOR, f"{what} devminor"),
            xattrs=xattrs,
        )

    def to_ztoc(self) -> Ztoc:
        """Decode every entry into a `Ztoc`; raises `ZtocFormatError`."""
        return Ztoc(
            version=self.version,
            build_tool_identifier=self.build_tool_identifier,
            compressed_archive_size=self.compressed_archive_size,
            uncompressed_archive_size=self.uncompressed_archive_size,
            files=tuple(self.entry(i) for i in range(len(self))),
            compression=self.compression,
        )


def decode_ztoc(data: bytes | bytearray | memoryview) -> Ztoc:
    """Parse zTOC flatbuffers bytes into a `Ztoc`, entries sorted by `uncompressed_offset`.

    Raises `ZtocFormatError` for anything Go's decoder rejects, plus unknown compression
    algorithms and entry types (see the module docstring).
    """
    return ZtocView(data).to_ztoc()
