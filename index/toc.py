"""The TOC half of a zTOC: a push-style tar scanner that sees what Go's `archive/tar` sees.

`TocBuilder` is fed the *uncompressed* tar stream in chunks of any size and produces the
`FileMetadata` entries and the `uncompressed_archive_size` that the AWS builder (Go
`archive/tar` behind a byte-counting reader; see docs/format.md) produces for the same bytes.

Speed matters (the layer builder feeds it hundreds of MB/s): file data is never looked at or
copied, only skipped by arithmetic; Python touches 512-byte headers and the payloads of PAX
(`x`, `g`) and GNU long-name (`L`, `K`) records, nothing else.

Strings in a tar header are bytes. They are decoded as UTF-8 with `surrogateescape`, so a name
that is not UTF-8 survives unchanged into the zTOC (`index.ztoc_codec` encodes the same way).

Go compatibility, in detail:

* header checksum: the octal field must equal the unsigned or the signed byte sum;
* formats: V7 (no magic), USTAR/PAX (`ustar\\0`), star (`ustar\\0` + `tar\\0` trailer) and GNU
  (`ustar  \\0`); the prefix field of USTAR/star, and Go's fallback for pre-1.8 Go writers that
  put a prefix into a GNU header;
* numbers: octal (leading/trailing spaces and NULs ignored) or base-256 (two's complement);
* PAX records are parsed strictly as Go does; `path`, `linkpath`, `uname`, `gname`, `uid`,
  `gid`, `size` and `mtime` override the header when non-empty, `atime`/`ctime` are validated;
  only the *last* `x` record before an entry applies, and GNU `L`/`K` names win over PAX;
* the legacy `'\\0'` typeflag becomes `reg`, or `dir` when the name ends with `/`;
* link, symlink, device, directory and fifo entries have no data, whatever their size field
  says (the size field is still recorded, as Go reports it);
* the end: the first all-zero block must be followed by another (else `TarFormatError`), and the
  archive size counts both; an archive that simply ends at a header boundary, after one zero
  block, or inside the padding after an entry's data, ends cleanly there (Go returns `io.EOF`).

Deliberate divergences (each fails the build, where Go would give a zTOC that cannot serve the
entry correctly): PAX-format GNU sparse files (`GNU.sparse.*` records) raise
`UnsupportedTarEntry` like the old GNU sparse type `S` does.
"""

from __future__ import annotations

import re
from typing import Final

from index import tartime
from index.errors import SociableError
from index.model import EntryType, FileMetadata, UncompressedOffset

BLOCK_SIZE: Final = 512
MAX_SPECIAL_FILE_SIZE: Final = 1 << 20
"""Largest PAX or GNU long-name payload accepted, in bytes (Go's `maxSpecialFileSize`)."""

_ZERO_BLOCK: Final = bytes(BLOCK_SIZE)
_HIGH_BYTES: Final = bytes(range(0x80, 0x100))
_OCTAL_RE: Final = re.compile(rb"[0-7]+")
_UINT32_MASK: Final = 0xFFFF_FFFF

_TYPE_X_HEADER: Final = ord("x")
_TYPE_X_GLOBAL: Final = ord("g")
_TYPE_GNU_LONG_NAME: Final = ord("L")
_TYPE_GNU_LONG_LINK: Final = ord("K")
_TYPE_REG_A: Final = 0
_TYPE_DIR: Final = ord("5")
_SPECIAL_TYPES: Final = frozenset(
    (_TYPE_X_HEADER, _TYPE_X_GLOBAL, _TYPE_GNU_LONG_NAME, _TYPE_GNU_LONG_LINK)
)
_HEADER_ONLY_TYPES: Final = frozenset(b"123456")
_ENTRY_TYPES: Final = {
    ord("0"): EntryType.REG,
    ord("1"): EntryType.HARDLINK,
    ord("2"): EntryType.SYMLINK,
    ord("3"): EntryType.CHAR,
    ord("4"): EntryType.BLOCK,
    ord("5"): EntryType.DIR,
    ord("6"): EntryType.FIFO,
}

_FMT_V7: Final = 0
_FMT_USTAR: Final = 1
_FMT_STAR: Final = 2
_FMT_GNU: Final = 3

_PAX_PATH: Final = b"path"
_PAX_LINKPATH: Final = b"linkpath"
_PAX_UNAME: Final = b"uname"
_PAX_GNAME: Final = b"gname"
_PAX_NUL_VALUE_KEYS: Final = frozenset((_PAX_PATH, _PAX_LINKPATH, _PAX_UNAME, _PAX_GNAME))
_PAX_SPARSE_OFFSET: Final = b"GNU.sparse.offset"
_PAX_SPARSE_NUMBYTES: Final = b"GNU.sparse.numbytes"
_PAX_SPARSE_MAP: Final = b"GNU.sparse.map"
_PAX_SPARSE_MAJOR: Final = b"GNU.sparse.major"
_PAX_SPARSE_MINOR: Final = b"GNU.sparse.minor"

# scanner states
_ST_HEADER: Final = 0
_ST_ZERO: Final = 1  # one zero block seen; the next must be zero too
_ST_SPECIAL: Final = 2  # collecting the payload of an x/g/L/K record
_ST_DONE: Final = 3


class TarError(SociableError, ValueError):
    """Base of the errors `TocBuilder` raises; the builder cannot be used after one."""


class TarFormatError(TarError):
    """The stream is not a tar archive Go's reader accepts: bad checksum, unparsable number,
    invalid PAX record, a zero block followed by data, or a stream cut off inside a header,
    an entry's data or an extension payload. The message names the offset and the entry."""


class UnsupportedTarEntry(TarError):
    """A well-formed entry of a type a zTOC cannot describe: GNU sparse (`S` or PAX sparse),
    contiguous (`7`), PAX global header (`g`), volume labels and any other typeflag.
    The AWS builder fails on these too (`unsupported input tar entry`)."""


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _cstring(field: bytes) -> bytes:
    """Go's `parser.parseString`: the bytes before the first NUL."""
    end = field.find(0)
    return field if end < 0 else field[:end]


def _parse_octal(field: bytes) -> int:
    """Go's `parser.parseOctal`; raises `ValueError` where Go sets `ErrHeader`."""
    field = field.strip(b" \x00")
    if not field:
        return 0
    digits = _cstring(field)
    if not _OCTAL_RE.fullmatch(digits):
        raise ValueError(f"invalid octal number {field!r}")
    value = int(digits, 8)
    if value >> 64:
        raise ValueError(f"octal number overflows 64 bits: {field!r}")
    return value - (1 << 64) if value >> 63 else value  # Go's int64(uint64) conversion


_NUMERIC_CACHE: dict[bytes, int] = {}
_NUMERIC_CACHE_MAX: Final = 4096


def _parse_numeric(field: bytes) -> int:
    """Go's `parser.parseNumeric`: base-256 when the top bit is set, else octal.

    Mode, owner and device fields repeat across headers, so parsed values are memoised
    (a small bounded dict; only successful parses are kept)."""
    value = _NUMERIC_CACHE.get(field)
    if value is None:
        value = _parse_numeric_uncached(field)
        if len(_NUMERIC_CACHE) >= _NUMERIC_CACHE_MAX:
            _NUMERIC_CACHE.clear()
        _NUMERIC_CACHE[field] = value
    return value


def _parse_numeric_uncached(field: bytes) -> int:
    first = field[0]
    if not first & 0x80:
        return _parse_octal(field)
    negative = bool(first & 0x40)
    magnitude = int.from_bytes(field, "big") & ((1 << (8 * len(field) - 1)) - 1)
    if negative:
        magnitude ^= (1 << (8 * len(field) - 1)) - 1  # invert every data bit
    if magnitude >> 63:
        raise ValueError(f"base-256 number overflows int64: {field.hex()}")
    return -magnitude - 1 if negative else magnitude


def _pad(size: int) -> int:
    return -size % BLOCK_SIZE


class _Header:
    """The fields of one 512-byte header block, parsed as Go's `Reader.readHeader` does."""

    __slots__ = (
        "devmajor",
        "devminor",
        "gid",
        "gname",
        "linkname",
        "mode",
        "mtime",
        "name",
        "size",
        "typeflag",
        "uid",
        "uname",
    )

    def __init__(self, block: bytes) -> None:
        """Raises `ValueError` for a bad checksum or an unparsable numeric field."""
        checksum = _parse_octal(block[148:156])
        unsigned = sum(block) - sum(block[148:156]) + 8 * 0x20
        if checksum != unsigned:
            high = BLOCK_SIZE - len(block.translate(None, _HIGH_BYTES))
            high -= 8 - len(block[148:156].translate(None, _HIGH_BYTES))
            if checksum != unsigned - 256 * high:
                raise ValueError(f"header checksum {checksum:o} does not match the block")
        magic = block[257:263]
        if magic == b"ustar\x00":
            fmt = _FMT_STAR if block[508:512] == b"tar\x00" else _FMT_USTAR
        elif magic == b"ustar " and block[263:265] == b" \x00":
            fmt = _FMT_GNU
        else:
            fmt = _FMT_V7

        self.typeflag: int = block[156]
        name = _cstring(block[0:100])
        self.linkname: bytes = _cstring(block[157:257])
        self.size: int = _parse_numeric(block[124:136])
        self.mode: int = _parse_numeric(block[100:108])
        self.uid: int = _parse_numeric(block[108:116])
        self.gid: int = _parse_numeric(block[116:124])
        self.mtime: int = _parse_numeric(block[136:148])
        self.uname: bytes = b""
        self.gname: bytes = b""
        self.devmajor: int = 0
        self.devminor: int = 0
        if fmt != _FMT_V7:
            self.uname = _cstring(block[265:297])
            self.gname = _cstring(block[297:329])
            self.devmajor = _parse_numeric(block[329:337])
            self.devminor = _parse_numeric(block[337:345])
            prefix = b""
            if fmt == _FMT_USTAR:
                prefix = _cstring(block[345:500])
            elif fmt == _FMT_STAR:
                prefix = _cstring(block[345:476])
                _parse_numeric(block[476:488])  # atime: only its validity matters
                _parse_numeric(block[488:500])  # ctime
            else:
                try:
                    if block[345]:
                        _parse_numeric(block[345:357])
                    if block[357]:
                        _parse_numeric(block[357:369])
                except ValueError:
                    # A pre-Go-1.8 writer put a USTAR prefix into a GNU header.
                    candidate = _cstring(block[345:500])
                    if candidate.isascii():
                        prefix = candidate
            if prefix:
                name = prefix + b"/" + name
        self.name: bytes = name


def parse_pax_records(payload: bytes) -> dict[bytes, bytes]:
    """Parse a PAX extended header payload as Go's `parsePAX` does.

    Returns every record (later duplicates win). Old-style GNU sparse `offset`/`numbytes`
    pairs are folded into one `GNU.sparse.map` record, as Go does. Raises `ValueError` for a
    malformed record (bad length, missing newline or `=`, empty key, NUL where Go forbids it).
    """
    records: dict[bytes, bytes] = {}
    sparse: list[bytes] = []
    end = len(payload)
    pos = 0
    while pos < end:
        space = payload.find(b" ", pos)
        if space < 0:
            raise ValueError(f"PAX record at byte {pos} has no length")
        length = tartime.parse_go_int64(payload[pos:space])
        if length < 5 or length > end - pos:
            raise ValueError(f"PAX record at byte {pos} has invalid length {length}")
        rec_end = pos + length
        if rec_end <= space + 1 or payload[rec_end - 1] != 0x0A:
            raise ValueError(f"PAX record at byte {pos} does not end with a newline")
        record = payload[space + 1 : rec_end - 1]
        key, eq, value = record.partition(b"=")
        if not eq or not key:
            raise ValueError(f"PAX record at byte {pos} has no key")
        if (value if key in _PAX_NUL_VALUE_KEYS else key).find(0) >= 0:
            raise ValueError(f"PAX record {key!r} contains a NUL byte")
        if key in (_PAX_SPARSE_OFFSET, _PAX_SPARSE_NUMBYTES):
            expected = _PAX_SPARSE_OFFSET if len(sparse) % 2 == 0 else _PAX_SPARSE_NUMBYTES
            if key != expected or b"," in value:
                raise ValueError(f"PAX sparse record {key!r} out of order or invalid")
            sparse.append(value)
        else:
            records[key] = value
        pos = rec_end
    if sparse:
        records[_PAX_SPARSE_MAP] = b",".join(sparse)
    return records


def _is_pax_sparse(records: dict[bytes, bytes]) -> bool:
    """Whether Go's `readGNUSparsePAXHeaders` would treat the entry as a sparse file."""
    major = records.get(_PAX_SPARSE_MAJOR, b"")
    minor = records.get(_PAX_SPARSE_MINOR, b"")
    if (major, minor) in ((b"0", b"0"), (b"0", b"1"), (b"1", b"0")):
        return True
    if major or minor:
        return False
    return bool(records.get(_PAX_SPARSE_MAP, b""))


class TocBuilder:
    """Scan an uncompressed tar stream into zTOC entries, exactly as the AWS builder would.

    Call `feed` with consecutive pieces of the stream (any sizes, including empty), then
    `finish` once. Both raise `TarFormatError` or `UnsupportedTarEntry` (subclasses of
    `TarError`) at the first problem; the builder is unusable afterwards. Bytes after the
    end-of-archive marker are accepted and ignored without being inspected.
    """

    __slots__ = (
        "_buf",
        "_entries",
        "_entry_offset",
        "_failed",
        "_finished",
        "_long_link",
        "_long_name",
        "_pax",
        "_pos",
        "_skip_data",
        "_skip_pad",
        "_special_name",
        "_special_offset",
        "_special_size",
        "_special_type",
        "_state",
    )

    def __init__(self) -> None:
        self._pos = 0  # bytes of the stream consumed so far (frozen once the end is seen)
        self._state = _ST_HEADER
        self._buf = bytearray()
        self._skip_data = 0  # entry data still to skip; EOF inside it is an error
        self._skip_pad = 0  # block padding still to skip; EOF inside it ends the archive
        self._entries: list[FileMetadata] = []
        self._entry_offset = 0  # offset of the first header block of the current entry
        self._pax: dict[bytes, bytes] | None = None
        self._long_name = b""
        self._long_link = b""
        self._special_type = 0
        self._special_size = 0
        self._special_offset = 0
        self._special_name = b""
        self._finished = False
        self._failed = False

    def __repr__(self) -> str:
        states = {_ST_HEADER: "header", _ST_ZERO: "zero", _ST_SPECIAL: "ext", _ST_DONE: "end"}
        return (
            f"<TocBuilder pos={self._pos} entries={len(self._entries)} "
            f"state={states[self._state]} finished={self._finished}>"
        )

    @property
    def position(self) -> int:
        """Bytes of the stream consumed so far (stops growing after the end-of-archive)."""
        return self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Consume the next piece of the tar stream (bytes, bytearray or memoryview).

        Raises `TarFormatError` / `UnsupportedTarEntry` at the first bad header, and
        `TarError` if called after `finish` or after an earlier error.
        """
        if self._finished or self._failed:
            raise TarError("TocBuilder.feed called after finish() or an error")
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        try:
            self._consume(view)
        except TarError:
            self._failed = True
            raise

    def _consume(self, view: memoryview) -> None:
        n = len(view)
        i = 0
        base = self._pos
        buf = self._buf
        try:
            while i < n:
                if self._skip_data:
                    step = min(self._skip_data, n - i)
                    self._skip_data -= step
                    i += step
                    continue
                if self._skip_pad:
                    step = min(self._skip_pad, n - i)
                    self._skip_pad -= step
                    i += step
                    continue
                state = self._state
                if state == _ST_DONE:
                    return
                if state == _ST_SPECIAL:
                    step = min(self._special_size - len(buf), n - i)
                    buf += view[i : i + step]
                    i += step
                    if len(buf) == self._special_size:
                        payload = bytes(buf)
                        buf.clear()
                        self._pos = base + i
                        self._on_special(payload)
                    continue
                if not buf and n - i >= BLOCK_SIZE:
                    block = bytes(view[i : i + BLOCK_SIZE])
                    i += BLOCK_SIZE
                else:
                    step = min(BLOCK_SIZE - len(buf), n - i)
                    buf += view[i : i + step]
                    i += step
                    if len(buf) < BLOCK_SIZE:
                        continue
                    block = bytes(buf)
                    buf.clear()
                self._pos = base + i
                self._on_block(block)
        finally:
            self._pos = base + i

    def _on_block(self, block: bytes) -> None:
        offset = self._pos - BLOCK_SIZE
        if self._state == _ST_ZERO:
            if block != _ZERO_BLOCK:
                raise TarFormatError(
                    f"tar stream: a zero block at offset {offset - BLOCK_SIZE} is followed by "
                    f"a non-zero block at offset {offset}"
                )
            self._state = _ST_DONE
            return
        if block == _ZERO_BLOCK:
            self._state = _ST_ZERO
            return
        if self._pax is None and not self._long_name and not self._long_link:
            self._entry_offset = offset
        try:
            header = _Header(block)
        except ValueError as e:
            raise TarFormatError(f"tar stream: invalid header at offset {offset}: {e}") from e
        typeflag = header.typeflag
        if header.size < 0 and typeflag not in _HEADER_ONLY_TYPES:
            raise TarFormatError(
                f"tar stream: header at offset {offset} ({_text(header.name)!r}) "
                f"has negative size {header.size}"
            )
        if typeflag in _SPECIAL_TYPES:
            if header.size > MAX_SPECIAL_FILE_SIZE:
                raise TarFormatError(
                    f"tar stream: extension header {chr(typeflag)!r} at offset {offset} has "
                    f"{header.size} bytes, more than {MAX_SPECIAL_FILE_SIZE}"
                )
            self._special_type = typeflag
            self._special_size = header.size
            self._special_offset = offset
            self._state = _ST_SPECIAL
            self._special_name = header.name
            if header.size == 0:
                self._on_special(b"")
            return
        self._on_entry(header)

    def _on_special(self, payload: bytes) -> None:
        typeflag = self._special_type
        self._state = _ST_HEADER
        self._skip_pad = _pad(self._special_size)
        if typeflag in (_TYPE_X_HEADER, _TYPE_X_GLOBAL):
            try:
                records = parse_pax_records(payload)
            except ValueError as e:
                raise TarFormatError(
                    f"tar stream: PAX header at offset {self._special_offset}: {e}"
                ) from e
            if typeflag == _TYPE_X_GLOBAL:
                raise UnsupportedTarEntry(
                    f"unsupported input tar entry {_text(self._special_name)!r} at offset "
                    f"{self._special_offset}: type 'g' (PAX global header)"
                )
            self._pax = records
        elif typeflag == _TYPE_GNU_LONG_NAME:
            self._long_name = _cstring(payload)
        else:
            self._long_link = _cstring(payload)

    def _on_entry(self, header: _Header) -> None:
        name = header.name
        linkname = header.linkname
        uname = header.uname
        gname = header.gname
        uid = header.uid
        gid = header.gid
        size = header.size
        mtime_s, mtime_ns = header.mtime, 0
        records = self._pax or {}
        if records:
            try:
                for key, value in records.items():
                    if not value:
                        continue  # an empty record keeps the header's value
                    if key == _PAX_PATH:
                        name = value
                    elif key == _PAX_LINKPATH:
                        linkname = value
                    elif key == _PAX_UNAME:
                        uname = value
                    elif key == _PAX_GNAME:
                        gname = value
                    elif key == b"uid":
                        uid = tartime.parse_go_int64(value)
                    elif key == b"gid":
                        gid = tartime.parse_go_int64(value)
                    elif key == b"size":
                        size = tartime.parse_go_int64(value)
                    elif key == b"mtime":
                        mtime_s, mtime_ns = tartime.parse_pax_time(value)
                    elif key in (b"atime", b"ctime"):
                        tartime.parse_pax_time(value)
            except ValueError as e:
                raise TarFormatError(
                    f"tar stream: entry {_text(name)!r} at offset {self._entry_offset}: "
                    f"invalid PAX record: {e}"
                ) from e
        if self._long_name:
            name = self._long_name
        if self._long_link:
            linkname = self._long_link
        typeflag = header.typeflag
        if typeflag == _TYPE_REG_A:
            typeflag = _TYPE_DIR if name.endswith(b"/") else ord("0")
        header_only = typeflag in _HEADER_ONLY_TYPES
        if size < 0 and not header_only:
            raise TarFormatError(
                f"tar stream: entry {_text(name)!r} at offset {self._entry_offset} "
                f"has negative size {size}"
            )
        if records and _is_pax_sparse(records):
            if header_only:
                raise TarFormatError(
                    f"tar stream: entry {_text(name)!r} at offset {self._entry_offset} "
                    "has no data but GNU sparse records"
                )
            raise UnsupportedTarEntry(
                f"unsupported input tar entry {_text(name)!r} at offset {self._entry_offset}: "
                "PAX GNU sparse file"
            )
        entry_type = _ENTRY_TYPES.get(typeflag)
        if entry_type is None:
            raise UnsupportedTarEntry(
                f"unsupported input tar entry {_text(name)!r} at offset {self._entry_offset}: "
                f"type {chr(typeflag)!r}"
            )
        self._entries.append(
            FileMetadata(
                name=_text(name),
                type=entry_type,
                uncompressed_offset=UncompressedOffset(self._pos),
                uncompressed_size=size,
                linkname=_text(linkname),
                mode=header.mode,
                uid=uid & _UINT32_MASK,
                gid=gid & _UINT32_MASK,
                uname=_text(uname),
                gname=_text(gname),
                mod_time=tartime.format_mod_time(mtime_s, mtime_ns),
                devmajor=header.devmajor,
                devminor=header.devminor,
                xattrs={_text(k): _text(v) for k, v in sorted(records.items())},
            )
        )
        data = 0 if header_only else size
        self._skip_data = data
        self._skip_pad = _pad(data)
        self._pax = None
        self._long_name = b""
        self._long_link = b""

    def finish(self) -> tuple[list[FileMetadata], int]:
        """End the stream; return the entries in tar order and `uncompressed_archive_size`.

        The size is the stream position where Go's reader reports the end: just past the two
        zero blocks that end a well-formed archive (record padding after them not counted), or
        where the stream stops when it stops early at a place Go accepts (see the module doc).
        Raises `TarFormatError` when the stream stops inside a header block, an entry's data
        or an extension payload; `TarError` if called twice or after an error. (A stream that
        stops right after a complete extension header ends cleanly, its records unused, as in
        Go.)
        """
        if self._finished or self._failed:
            raise TarError("TocBuilder.finish called twice or after an error")
        self._finished = True
        if self._state == _ST_DONE:
            return self._entries, self._pos
        if self._skip_data:
            entry = self._entries[-1]
            raise TarFormatError(
                f"tar stream: unexpected end of stream at offset {self._pos}, "
                f"{self._skip_data} bytes short in the data of {entry.name!r}"
            )
        if self._state == _ST_SPECIAL:
            raise TarFormatError(
                f"tar stream: unexpected end of stream at offset {self._pos} inside the "
                f"extension header at offset {self._special_offset}"
            )
        if self._buf:
            raise TarFormatError(
                f"tar stream: unexpected end of stream at offset {self._pos} inside a "
                f"header block ({len(self._buf)} of {BLOCK_SIZE} bytes)"
            )
        return self._entries, self._pos
