"""Checkpoints (zInfo) and spans: building them, (de)serializing them, reading one span.

This is the `compression_info.checkpoints` part of a zTOC (docs/format.md, "Checkpoint blob"):

* gzip layers: zran checkpoints at deflate block boundaries, each with the 32 KiB of output
  before it, in the LE "v2" blob (legacy v1 blobs are read and re-written as v1);
* uncompressed tar layers: the `TarZinfo` flatbuffer, spans are fixed slices.

`SpanMap` is the one interface readers use over both: span ranges, offset → span, digest
verification and inflation of one span on its own, and the one span read every reader shares
(`slices_for_range` → fetch → `split_compressed` → verify/inflate → `assemble`).

Units: every size and offset is in bytes. Compressed offsets index the layer blob,
uncompressed offsets the tar stream; they are different types (`index.model`).
"""

from __future__ import annotations

import abc
import bisect
import ctypes
import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple, Protocol

from index.errors import SociableError
from index.model import (
    CompressedOffset,
    CompressionAlgorithm,
    CompressionInfo,
    SpanId,
    UncompressedOffset,
    Ztoc,
)
from index.zlib_ctypes import (
    DATA_TYPE_BITS_MASK,
    DATA_TYPE_BLOCK_BOUNDARY,
    DATA_TYPE_LAST_BLOCK,
    WBITS_AUTO,
    WBITS_RAW,
    WINDOW_SIZE,
    Z_BLOCK,
    Z_BUF_ERROR,
    Z_NO_FLUSH,
    Z_STREAM_END,
    Inflater,
    ZlibError,
    address,
    system_backend,
)

CHECKPOINT_RECORD_SIZE: Final = 8 + 8 + 1 + WINDOW_SIZE
"""One checkpoint in the blob: in (int64), out (int64), bits (uint8), window: 32785 bytes."""

GZIP_ZINFO_HEADER_SIZE: Final = 12
"""Blob header: N (int32) and span_size (int64)."""

TAR_ZINFO_VERSION: Final = 2

DEFAULT_READ_SIZE: Final = 1 << 20
"""Input chunk of the builder. Checkpoints do not depend on it (see `build_gzip_checkpoints`)."""

DEFAULT_OUTPUT_SIZE: Final = 1 << 20
"""Uncompressed bytes the builder collects before handing them to `on_output`."""

GZIP_TRAILER_SIZE: Final = 8

_HEADER = struct.Struct("<iq")
_RECORD_HEAD = struct.Struct("<qqB")
_ZERO_WINDOW: Final = bytes(WINDOW_SIZE)
_LEGACY_FIRST_IN: Final = 10


class ZinfoError(SociableError):
    """Base of the errors raised by this module."""


class ZinfoFormatError(ZinfoError):
    """A checkpoint blob (gzip zinfo or TarZinfo) is malformed: bad length, bad field."""


class ZinfoBuildError(ZinfoError):
    """A layer could not be indexed: corrupt or truncated gzip data, bad span size."""


class SpanError(ZinfoError):
    """A span id or offset is out of range, or a span cannot be read."""


class SpanDigestMismatch(SpanError):
    """The compressed bytes of a span do not match the zTOC's span digest."""

    def __init__(self, span_id: SpanId, expected: str, actual: str) -> None:
        super().__init__(f"span {span_id}: digest mismatch, zTOC says {expected}, got {actual}")
        self.span_id = span_id
        self.expected = expected
        self.actual = actual


class SpanInflateError(SpanError):
    """A span's compressed bytes do not inflate to the expected length."""


# --------------------------------------------------------------------------------------------
# gzip checkpoint blob


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A zran access point.

    `in_` is the compressed offset of the first full byte after a deflate block boundary,
    `out` the uncompressed offset of that boundary, `bits` (0..7) the number of bits of byte
    `in_ - 1` that belong to the next block, `window` the 32 KiB of output before `out`.
    """

    in_: CompressedOffset
    out: UncompressedOffset
    bits: int
    window: bytes

    def __repr__(self) -> str:
        return f"Checkpoint(in_={self.in_}, out={self.out}, bits={self.bits})"


@dataclass(frozen=True, slots=True)
class GzipZinfo:
    """A decoded gzip checkpoint blob. `legacy_v1` blobs re-encode in v1 form."""

    span_size: int
    checkpoints: tuple[Checkpoint, ...]
    legacy_v1: bool = False

    def encode(self) -> bytes:
        """The blob bytes, in the form this zinfo was read in (v2 unless `legacy_v1`)."""
        return encode_gzip_zinfo(self.span_size, self.checkpoints, legacy_v1=self.legacy_v1)


def encode_gzip_zinfo(
    span_size: int, checkpoints: Sequence[Checkpoint], *, legacy_v1: bool = False
) -> bytes:
    """Serialize checkpoints to the gzip zinfo blob (docs/format.md).

    With `legacy_v1` the first checkpoint is left out (it must be the synthetic
    in=10/out=0/bits=0/zero-window one) and N still counts it. Raises `ZinfoFormatError` for a
    window that is not 32 KiB, bits outside 0..7, or a v1 blob without checkpoints.
    """
    parts = [_HEADER.pack(len(checkpoints), span_size)]
    records = checkpoints
    if legacy_v1:
        if not checkpoints:
            raise ZinfoFormatError("legacy v1 zinfo blob needs at least one checkpoint")
        records = checkpoints[1:]
    for i, cp in enumerate(records):
        if len(cp.window) != WINDOW_SIZE:
            raise ZinfoFormatError(
                f"checkpoint {i}: window is {len(cp.window)} bytes, want {WINDOW_SIZE}"
            )
        if not 0 <= cp.bits <= 7:
            raise ZinfoFormatError(f"checkpoint {i}: bits={cp.bits} outside 0..7")
        parts.append(_RECORD_HEAD.pack(cp.in_, cp.out, cp.bits))
        parts.append(cp.window)
    return b"".join(parts)


def decode_gzip_zinfo(blob: bytes) -> GzipZinfo:
    """Parse a gzip zinfo blob, v2 or legacy v1 (told apart by length).

    Raises `ZinfoFormatError` when the length fits neither form, N is negative, a bits field is
    outside 0..7, or checkpoint offsets go backwards.
    """
    if len(blob) < GZIP_ZINFO_HEADER_SIZE:
        raise ZinfoFormatError(
            f"gzip zinfo blob is {len(blob)} bytes, shorter than its {GZIP_ZINFO_HEADER_SIZE}-byte header"
        )
    count, span_size = _HEADER.unpack_from(blob, 0)
    if count < 0:
        raise ZinfoFormatError(f"gzip zinfo blob claims {count} checkpoints")
    body = len(blob) - GZIP_ZINFO_HEADER_SIZE
    if body == CHECKPOINT_RECORD_SIZE * count:
        stored, legacy = count, False
    elif count >= 1 and body == CHECKPOINT_RECORD_SIZE * (count - 1):
        stored, legacy = count - 1, True
    else:
        raise ZinfoFormatError(
            f"gzip zinfo blob of {len(blob)} bytes does not hold {count} checkpoints "
            f"(want {GZIP_ZINFO_HEADER_SIZE + CHECKPOINT_RECORD_SIZE * count} bytes, "
            f"or {GZIP_ZINFO_HEADER_SIZE + CHECKPOINT_RECORD_SIZE * max(count - 1, 0)} for v1)"
        )
    checkpoints: list[Checkpoint] = []
    if legacy:
        checkpoints.append(
            Checkpoint(CompressedOffset(_LEGACY_FIRST_IN), UncompressedOffset(0), 0, _ZERO_WINDOW)
        )
    pos = GZIP_ZINFO_HEADER_SIZE
    for _ in range(stored):
        in_, out, bits = _RECORD_HEAD.unpack_from(blob, pos)
        start = pos + _RECORD_HEAD.size
        window = blob[start : start + WINDOW_SIZE]
        pos = start + WINDOW_SIZE
        index = len(checkpoints)
        if bits > 7:
            raise ZinfoFormatError(f"checkpoint {index}: bits={bits} outside 0..7")
        if in_ < 0 or out < 0:
            raise ZinfoFormatError(f"checkpoint {index}: negative offset in={in_} out={out}")
        if checkpoints and (out < checkpoints[-1].out or in_ < checkpoints[-1].in_):
            raise ZinfoFormatError(
                f"checkpoint {index}: offsets in={in_} out={out} go backwards from "
                f"in={checkpoints[-1].in_} out={checkpoints[-1].out}"
            )
        checkpoints.append(
            Checkpoint(CompressedOffset(in_), UncompressedOffset(out), bits, bytes(window))
        )
    return GzipZinfo(span_size, tuple(checkpoints), legacy)


# --------------------------------------------------------------------------------------------
# TarZinfo flatbuffer


@dataclass(frozen=True, slots=True)
class TarZinfo:
    """The `TarZinfo` table of an uncompressed layer: spans are `span_size` slices of `size`."""

    span_size: int
    size: int
    version: int = TAR_ZINFO_VERSION

    @property
    def span_count(self) -> int:
        """Number of spans (`max_span_id + 1`); 0 for an empty blob."""
        if self.span_size <= 0:
            raise SpanError(f"TarZinfo span_size {self.span_size} is not positive")
        return -(-self.size // self.span_size)

    def encode(self) -> bytes:
        """The flatbuffer bytes, as the Go builder writes them (slots 0,1,2; zeros omitted)."""
        return encode_tar_zinfo(self)


def encode_tar_zinfo(zinfo: TarZinfo) -> bytes:
    """Serialize a `TarZinfo` flatbuffer (docs/format.md, "Uncompressed tar layers")."""
    import flatbuffers

    builder = flatbuffers.Builder(0)
    builder.StartObject(3)
    builder.PrependInt32Slot(0, zinfo.version, 0)
    builder.PrependInt64Slot(1, zinfo.span_size, 0)
    builder.PrependInt64Slot(2, zinfo.size, 0)
    root = builder.EndObject()
    builder.Finish(root)
    return bytes(builder.Output())


def decode_tar_zinfo(blob: bytes) -> TarZinfo:
    """Parse a `TarZinfo` flatbuffer, checking every offset against the buffer bounds.

    Raises `ZinfoFormatError` on a truncated or inconsistent buffer.
    """
    try:
        (root,) = struct.unpack_from("<I", blob, 0)
        (vt_rel,) = struct.unpack_from("<i", blob, root)
        vtable = root - vt_rel
        vt_size, _obj_size = struct.unpack_from("<HH", blob, vtable)
        if vtable < 0 or vt_size < 4 or vt_size % 2:
            raise ZinfoFormatError(f"TarZinfo vtable at {vtable} has bad size {vt_size}")

        def field(slot: int, fmt: str) -> int:
            voff = 4 + 2 * slot
            if voff + 2 > vt_size:
                return 0
            (rel,) = struct.unpack_from("<H", blob, vtable + voff)
            if rel == 0:
                return 0
            (value,) = struct.unpack_from(fmt, blob, root + rel)
            return int(value)

        version = field(0, "<i")
        span_size = field(1, "<q")
        size = field(2, "<q")
    except struct.error as e:
        raise ZinfoFormatError(f"TarZinfo flatbuffer of {len(blob)} bytes is truncated") from e
    if span_size < 0 or size < 0:
        raise ZinfoFormatError(f"TarZinfo has negative span_size={span_size} or size={size}")
    return TarZinfo(span_size=span_size, size=size, version=version)


# --------------------------------------------------------------------------------------------
# Building


class Readable(Protocol):
    """A byte stream the builders read from (a file opened "rb", `io.BytesIO`, ...)."""

    def read(self, size: int = -1, /) -> bytes:
        """Up to `size` bytes; b"" at the end."""
        ...


OutputCallback = Callable[[memoryview], None]
"""Receives uncompressed bytes in order. The view is only valid during the call."""


@dataclass(frozen=True, slots=True)
class GzipBuildResult:
    """What one pass over a gzip blob yields.

    `uncompressed_size` is the full decompressed length (all members), `compressed_size` the
    number of blob bytes read, `span_digests` one `sha256:<hex>` per checkpoint.
    """

    span_size: int
    checkpoints: tuple[Checkpoint, ...]
    uncompressed_size: int
    compressed_size: int
    span_digests: tuple[str, ...]

    @property
    def zinfo(self) -> GzipZinfo:
        return GzipZinfo(self.span_size, self.checkpoints)


@dataclass(frozen=True, slots=True)
class TarBuildResult:
    """What one pass over an uncompressed tar blob yields: its size and per-slice digests."""

    span_size: int
    size: int
    span_digests: tuple[str, ...]

    @property
    def zinfo(self) -> TarZinfo:
        return TarZinfo(span_size=self.span_size, size=self.size)


_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)


def _uninitialized_bytes(size: int) -> bytes:
    """A new `bytes` object of `size` (> 0) bytes whose contents are not yet written, for
    inflating straight into it: C code fills such an object before anyone else sees it. It
    saves zeroing a bytearray and copying it into a bytes object (two passes over every
    inflated span)."""
    out: bytes = _new_bytes(None, size)
    return out


def build_gzip_checkpoints(
    src: Readable,
    span_size: int,
    on_output: OutputCallback,
    *,
    read_size: int = DEFAULT_READ_SIZE,
    output_size: int = DEFAULT_OUTPUT_SIZE,
) -> GzipBuildResult:
    """Inflate a gzip blob once: zran checkpoints, span digests, and the output stream.

    The checkpoint rules are SOCI's (docs/format.md): inflate with windowBits 47 and `Z_BLOCK`; after
    each return, when `data_type` has bit 128 and not bit 64, add a checkpoint if nothing has
    been output yet or more than `span_size` uncompressed bytes were output since the last one.
    Concatenated members are followed (`inflateReset2(47)`, totals kept). `Z_BLOCK` stops at
    every block boundary whatever the input chunking, so `read_size` does not change the result.

    `on_output` receives the decompressed bytes in order, in pieces of up to `output_size`;
    the view is reused afterwards, so copy what you keep. Exceptions it raises propagate.

    Raises `ZinfoBuildError` for corrupt or truncated gzip data, trailing garbage or a negative
    `span_size`; `OSError` from `src` propagates.
    """
    if span_size < 0:
        raise ZinfoBuildError(f"span size {span_size} is negative")
    if read_size <= 0 or output_size < WINDOW_SIZE:
        raise ValueError(f"read_size {read_size} / output_size {output_size} too small")
    buf_len = WINDOW_SIZE + output_size
    # The first WINDOW_SIZE bytes hold the history (zeros at the start), so the window before
    # any output position is always the 32 KiB right before it in this buffer.
    outbuf = bytearray(buf_len)
    out_c = (ctypes.c_char * buf_len).from_buffer(outbuf)
    out_base = ctypes.addressof(out_c)
    out_view = memoryview(outbuf)
    pos = WINDOW_SIZE

    checkpoints: list[Checkpoint] = []
    digests: list[str] = []
    hasher: hashlib._Hash | None = None
    hashed_to = 0  # absolute compressed offset up to which `hasher` has been fed
    prev_last_byte = b""
    chunk_start = 0
    totin = 0
    totout = 0
    last = 0
    member_done = False
    finished_any = False

    inflater = Inflater(WBITS_AUTO, system_backend())  # soci's checkpoints: see zlib_ctypes
    stream = inflater.stream
    try:
        while True:
            chunk = src.read(read_size)
            if not chunk:
                break
            chunk_len = len(chunk)
            chunk_view = memoryview(chunk)
            stream.next_in = address(chunk)
            stream.avail_in = chunk_len
            if member_done:
                # Another member follows the one that ended exactly at the previous chunk's end.
                inflater.reset2(WBITS_AUTO)
                member_done = False
            while True:
                if pos == buf_len:
                    on_output(out_view[WINDOW_SIZE:pos])
                    outbuf[:WINDOW_SIZE] = out_view[pos - WINDOW_SIZE : pos]
                    pos = WINDOW_SIZE
                avail_in = stream.avail_in
                avail_out = buf_len - pos
                stream.next_out = out_base + pos
                stream.avail_out = avail_out
                try:
                    status = inflater.inflate(Z_BLOCK)
                except ZlibError as e:
                    raise ZinfoBuildError(
                        f"corrupt gzip data near compressed offset {totin}: {e}"
                    ) from e
                totin += avail_in - stream.avail_in
                produced = avail_out - stream.avail_out
                totout += produced
                pos += produced
                if status == Z_STREAM_END:
                    finished_any = True
                    if stream.avail_in:
                        inflater.reset2(WBITS_AUTO)
                        continue
                    member_done = True
                    break
                if status == Z_BUF_ERROR:
                    break  # needs more input (output space is never zero here)
                data_type = stream.data_type
                if (
                    data_type & DATA_TYPE_BLOCK_BOUNDARY
                    and not data_type & DATA_TYPE_LAST_BLOCK
                    and (totout == 0 or totout - last > span_size)
                ):
                    bits = data_type & DATA_TYPE_BITS_MASK
                    rel = totin - chunk_start
                    if hasher is not None:
                        hasher.update(chunk_view[hashed_to - chunk_start : rel])
                        digests.append("sha256:" + hasher.hexdigest())
                    hasher = hashlib.sha256()
                    if bits:
                        hasher.update(chunk_view[rel - 1 : rel] if rel > 0 else prev_last_byte)
                    hashed_to = totin
                    checkpoints.append(
                        Checkpoint(
                            CompressedOffset(totin),
                            UncompressedOffset(totout),
                            bits,
                            bytes(out_view[pos - WINDOW_SIZE : pos]),
                        )
                    )
                    last = totout
                if stream.avail_in == 0 and stream.avail_out != 0:
                    break
            if stream.avail_in:
                raise ZinfoBuildError(
                    f"gzip data stopped decoding at compressed offset {totin} "
                    f"with {stream.avail_in} bytes unread"
                )
            if hasher is not None:
                hasher.update(chunk_view[hashed_to - chunk_start :])
            chunk_start += chunk_len
            hashed_to = chunk_start
            prev_last_byte = chunk[-1:]
            chunk_view.release()
        if not member_done:
            if chunk_start == 0:
                raise ZinfoBuildError("gzip blob is empty")
            what = "trailing data after the last member" if finished_any else "truncated"
            raise ZinfoBuildError(f"gzip stream is {what} (ended at compressed offset {totin})")
        if pos > WINDOW_SIZE:
            on_output(out_view[WINDOW_SIZE:pos])
        if hasher is not None:
            digests.append("sha256:" + hasher.hexdigest())
    finally:
        inflater.close()
        del out_c
    return GzipBuildResult(
        span_size=span_size,
        checkpoints=tuple(checkpoints),
        uncompressed_size=totout,
        compressed_size=chunk_start,
        span_digests=tuple(digests),
    )


def build_tar_spans(
    src: Readable,
    span_size: int,
    on_output: OutputCallback,
    *,
    read_size: int = DEFAULT_READ_SIZE,
) -> TarBuildResult:
    """Read an uncompressed tar blob once: size, sha256 per `span_size` slice, and the bytes.

    `on_output` gets the blob's bytes in order (the view is only valid during the call).
    Raises `ZinfoBuildError` if `span_size` is not positive.
    """
    if span_size <= 0:
        raise ZinfoBuildError(f"span size {span_size} must be positive for tar layers")
    digests: list[str] = []
    hasher = hashlib.sha256()
    in_span = 0
    size = 0
    while True:
        chunk = src.read(read_size)
        if not chunk:
            break
        view = memoryview(chunk)
        on_output(view)
        size += len(chunk)
        offset = 0
        while offset < len(view):
            take = min(span_size - in_span, len(view) - offset)
            hasher.update(view[offset : offset + take])
            offset += take
            in_span += take
            if in_span == span_size:
                digests.append("sha256:" + hasher.hexdigest())
                hasher = hashlib.sha256()
                in_span = 0
        view.release()
    if in_span:
        digests.append("sha256:" + hasher.hexdigest())
    return TarBuildResult(span_size=span_size, size=size, span_digests=tuple(digests))


# --------------------------------------------------------------------------------------------
# Reading


def _as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    return data if isinstance(data, bytes) else bytes(data)


def gzip_span_length(zinfo: GzipZinfo, span_id: int, uncompressed_archive_size: int) -> int:
    """Uncompressed length of gzip span `span_id`. Raises `SpanError` when out of range."""
    cps = zinfo.checkpoints
    if not 0 <= span_id < len(cps):
        raise SpanError(f"span {span_id} out of range (layer has {len(cps)} spans)")
    end = cps[span_id + 1].out if span_id + 1 < len(cps) else uncompressed_archive_size
    length = end - cps[span_id].out
    if length < 0:
        raise SpanError(
            f"span {span_id}: ends at {end} before it starts at {cps[span_id].out} "
            "(uncompressed archive size smaller than the last checkpoint)"
        )
    return length


ARRIVING_STEP_BYTES: Final = 128 * 1024
"""How much more compressed input an inflation of arriving bytes waits for at a time (fewer
wake-ups than byte by byte; a few hundred microseconds of link at 200 Mbit/s)."""

Arrived = Callable[[int], int]
"""`arrived(n)`: block until at least `n` (at most the buffer's size) bytes of a span's
compressed input are in its buffer and return how many are there; raise when they never will
be (the inflation stops with that exception)."""


def inflate_span(
    zinfo: GzipZinfo,
    span_id: int,
    compressed: bytes | bytearray | memoryview,
    uncompressed_archive_size: int,
    arrived: Arrived | None = None,
) -> bytes:
    """Inflate gzip span `span_id` from its compressed bytes alone.

    `compressed` is blob range `[in_i - (bits_i ? 1 : 0), end_i)` as the span map gives it. The
    result is exactly the span's uncompressed length. Member boundaries inside the span are
    crossed (the first trailer is skipped in raw mode, later ones by zlib).

    With `arrived`, `compressed` is a writable buffer of the span's full size that is still
    being filled from the start (a Range answer arriving); the inflation follows the bytes in,
    asking `arrived` for more whenever it has used what is there.

    Raises `SpanError` for a bad span id and `SpanInflateError` if the bytes are corrupt or too
    short. Verify the digest first: corrupt input may also inflate to wrong bytes.
    """
    cp_length = gzip_span_length(zinfo, span_id, uncompressed_archive_size)
    cp = zinfo.checkpoints[span_id]
    if cp_length == 0:
        return b""
    if arrived is None:
        data = _as_bytes(compressed)
        base = address(data)
        total = have = len(data)
    else:
        total = len(compressed)
        pinned = (ctypes.c_char * total).from_buffer(compressed)  # the buffer cannot move
        base = ctypes.addressof(pinned)
        have = arrived(1) if total else 0
    skip = 1 if cp.bits else 0
    if have < skip:
        raise SpanInflateError(f"span {span_id}: no compressed bytes")
    out = _uninitialized_bytes(cp_length)  # written only here, before it is returned
    try:
        with Inflater(WBITS_RAW) as inflater:
            stream = inflater.stream
            try:
                if cp.bits:
                    first = compressed[0] if arrived is None else pinned[0][0]
                    inflater.prime(cp.bits, first >> (8 - cp.bits))
                inflater.set_dictionary(cp.window)
            except ZlibError as e:
                raise SpanInflateError(f"span {span_id}: cannot prime inflater: {e}") from e
            stream.next_in = base + skip
            stream.avail_in = have - skip
            stream.next_out = address(out)
            stream.avail_out = cp_length
            raw = True
            while stream.avail_out:
                if arrived is not None and have < total and stream.avail_in < GZIP_TRAILER_SIZE:
                    # used (nearly) all there is: wait for the next step's worth
                    more = arrived(min(total, have + ARRIVING_STEP_BYTES)) - have
                    stream.avail_in += more
                    have += more
                    if more:
                        continue
                try:
                    status = inflater.inflate(Z_NO_FLUSH)
                except ZlibError as e:
                    raise SpanInflateError(f"span {span_id}: corrupt deflate data: {e}") from e
                if status == Z_STREAM_END and stream.avail_out:
                    if raw:
                        if arrived is not None and have < total:
                            need = min(GZIP_TRAILER_SIZE - stream.avail_in, total - have)
                            if need > 0:
                                more = arrived(have + need) - have
                                stream.avail_in += more
                                have += more
                        if stream.avail_in < GZIP_TRAILER_SIZE:
                            raise SpanInflateError(
                                f"span {span_id}: member ends without a full gzip trailer"
                            )
                        stream.next_in = (stream.next_in or 0) + GZIP_TRAILER_SIZE
                        stream.avail_in -= GZIP_TRAILER_SIZE
                        raw = False
                    inflater.reset2(WBITS_AUTO)
                    continue
                if status == Z_BUF_ERROR or (stream.avail_in == 0 and stream.avail_out):
                    if have < total:
                        continue  # more is coming
                    raise SpanInflateError(
                        f"span {span_id}: compressed bytes ran out with "
                        f"{stream.avail_out} of {cp_length} uncompressed bytes missing"
                    )
    except BaseException:
        del out  # never handed out half written
        raise
    return out


class SpanSlice(NamedTuple):
    """The part of one span a read takes: `span`, its tar-stream `start` and inflated `length`,
    and the bytes `[lo, hi)` of its inflated data (offsets relative to `start`)."""

    span: SpanId
    start: UncompressedOffset
    length: int
    lo: int
    hi: int


def assemble(slices: Sequence[SpanSlice], inflated: Sequence[bytes]) -> bytes:
    """The bytes a read asked for: each `slices[i]` cut from `inflated[i]` (the whole inflated
    span), joined. One span is one slice, without a join."""
    if len(slices) == 1:
        s = slices[0]
        return inflated[0][s.lo : s.hi]
    return b"".join(data[s.lo : s.hi] for s, data in zip(slices, inflated, strict=True))


def _digest(data: bytes | bytearray | memoryview) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class SpanMap(abc.ABC):
    """Spans of one layer, whatever its compression: ranges, lookup, verify, inflate.

    Build it with `SpanMap.from_ztoc(ztoc)` (or `from_compression_info`). Span ids run from 0
    to `span_count - 1`. Ranges are half-open `(start, end)` pairs.
    """

    __slots__ = ("compressed_archive_size", "span_digests", "uncompressed_archive_size")

    def __init__(
        self,
        span_digests: Sequence[str],
        compressed_archive_size: int,
        uncompressed_archive_size: int,
    ) -> None:
        self.span_digests = tuple(span_digests)
        self.compressed_archive_size = compressed_archive_size
        self.uncompressed_archive_size = uncompressed_archive_size

    @staticmethod
    def from_compression_info(
        info: CompressionInfo, compressed_archive_size: int, uncompressed_archive_size: int
    ) -> SpanMap:
        """The span map for `info`. Raises `ZinfoFormatError` if the blob or digests are bad."""
        if info.algorithm == CompressionAlgorithm.GZIP:
            zinfo = decode_gzip_zinfo(info.checkpoints)
            span_map: SpanMap = GzipSpanMap(
                zinfo, info.span_digests, compressed_archive_size, uncompressed_archive_size
            )
        elif info.algorithm == CompressionAlgorithm.UNCOMPRESSED:
            tar = decode_tar_zinfo(info.checkpoints)
            if tar.span_size <= 0 and tar.size > 0:
                raise ZinfoFormatError(f"TarZinfo span_size {tar.span_size} is not positive")
            span_map = TarSpanMap(tar, info.span_digests, uncompressed_archive_size)
        elif info.algorithm == CompressionAlgorithm.ZSTD:
            from index.zstd_frames import ZstdSpanMap, decode_zstd_zinfo  # imports this module

            span_map = ZstdSpanMap(
                decode_zstd_zinfo(info.checkpoints),
                info.span_digests,
                compressed_archive_size,
                uncompressed_archive_size,
            )
        else:
            raise ZinfoFormatError(f"unknown compression algorithm {info.algorithm!r}")
        if len(info.span_digests) != span_map.span_count:
            raise ZinfoFormatError(
                f"zTOC has {len(info.span_digests)} span digests for {span_map.span_count} spans"
            )
        if info.max_span_id != span_map.span_count - 1:
            raise ZinfoFormatError(
                f"zTOC max_span_id {info.max_span_id} does not match {span_map.span_count} spans"
            )
        return span_map

    @staticmethod
    def from_ztoc(ztoc: Ztoc) -> SpanMap:
        """The span map of a decoded zTOC. Raises `ZinfoFormatError`."""
        return SpanMap.from_compression_info(
            ztoc.compression, ztoc.compressed_archive_size, ztoc.uncompressed_archive_size
        )

    @property
    @abc.abstractmethod
    def span_count(self) -> int:
        """Number of spans (`max_span_id + 1`)."""

    def _check(self, span_id: int) -> None:
        if not 0 <= span_id < self.span_count:
            raise SpanError(f"span {span_id} out of range (layer has {self.span_count} spans)")

    @abc.abstractmethod
    def compressed_range(self, span_id: SpanId) -> tuple[CompressedOffset, CompressedOffset]:
        """Blob bytes `[start, end)` to fetch for `span_id`. Raises `SpanError`."""

    @abc.abstractmethod
    def uncompressed_range(self, span_id: SpanId) -> tuple[UncompressedOffset, UncompressedOffset]:
        """Tar-stream bytes `[start, end)` that `span_id` inflates to. Raises `SpanError`."""

    @abc.abstractmethod
    def span_for_offset(self, offset: UncompressedOffset) -> SpanId:
        """The span holding uncompressed `offset`: the largest i with start_i <= offset.

        Offsets up to and including `uncompressed_archive_size` are accepted (the end maps to
        the last span). Raises `SpanError` for negative offsets, larger ones, or no spans.
        """

    def spans_for_range(self, offset: UncompressedOffset, size: int) -> range:
        """Span ids needed to read `[offset, offset + size)`; empty when `size` is 0.

        Raises `SpanError` if the range is outside the tar stream.
        """
        if size < 0:
            raise SpanError(f"negative read size {size}")
        if size == 0:
            return range(0)
        first = self.span_for_offset(offset)
        last = self.span_for_offset(UncompressedOffset(offset + size - 1))
        return range(first, last + 1)

    def slices_for_range(self, offset: UncompressedOffset, size: int) -> list[SpanSlice]:
        """What reading `[offset, offset + size)` takes from each span, in span order; empty
        when `size` is 0. Raises `SpanError` if the range is outside the tar stream."""
        out: list[SpanSlice] = []
        end = offset + size
        for i in self.spans_for_range(offset, size):
            span = SpanId(i)
            start, stop = self.uncompressed_range(span)
            out.append(
                SpanSlice(span, start, stop - start, max(offset - start, 0), min(end, stop) - start)
            )
        return out

    def split_compressed(
        self, spans: Sequence[SpanId], data: bytes | bytearray | memoryview
    ) -> list[memoryview]:
        """`data`, the blob bytes from the compressed start of `spans[0]` to the end of
        `spans[-1]` (consecutive ids), cut into one view per span (no copy). Raises `SpanError`
        when `data` has the wrong length."""
        base = self.compressed_range(spans[0])[0]
        want = self.compressed_range(spans[-1])[1] - base
        if len(data) != want:
            raise SpanError(f"spans {spans[0]}-{spans[-1]}: fetched {len(data)} bytes, want {want}")
        view = memoryview(data)
        out: list[memoryview] = []
        for span in spans:
            start, end = self.compressed_range(span)
            out.append(view[start - base : end - base])
        return out

    def soci_spans_for_range(self, offset: UncompressedOffset, size: int) -> range:
        """SOCI's span range `span(offset) .. span(offset + size)` (inclusive).

        An exclusive end on a span boundary includes the next span, as the AWS code does; use
        this where output must match it (prefetch artifacts), `spans_for_range` to read.
        """
        first = self.span_for_offset(offset)
        last = self.span_for_offset(UncompressedOffset(offset + size))
        return range(first, last + 1)

    def verify(self, span_id: SpanId, compressed: bytes | bytearray | memoryview) -> None:
        """Check `compressed` against the span digest. Raises `SpanDigestMismatch`."""
        self._check(span_id)
        actual = _digest(compressed)
        expected = self.span_digests[span_id]
        if actual != expected:
            raise SpanDigestMismatch(span_id, expected, actual)

    @abc.abstractmethod
    def inflate(self, span_id: SpanId, compressed: bytes | bytearray | memoryview) -> bytes:
        """The uncompressed bytes of `span_id` from its compressed bytes (not verified).

        Raises `SpanError` / `SpanInflateError`.
        """

    @property
    def inflates_arriving(self) -> bool:
        """Whether `inflate_arriving` follows the input in (else it waits for all of it)."""
        return False

    def inflate_arriving(self, span_id: SpanId, buffer: memoryview, arrived: Arrived) -> bytes:
        """`inflate` of compressed bytes still arriving in `buffer` (writable, the span's full
        size, filled from the start; see `Arrived`). Not verified. This one waits for all of
        them; a map that can start earlier says so (`inflates_arriving`). Raises what
        `inflate` and `arrived` raise."""
        arrived(len(buffer))
        return self.inflate(span_id, buffer)

    def read_span(self, span_id: SpanId, compressed: bytes | bytearray | memoryview) -> bytes:
        """Verify, then inflate. Raises `SpanDigestMismatch`, `SpanInflateError`."""
        self.verify(span_id, compressed)
        return self.inflate(span_id, compressed)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} spans={self.span_count} "
            f"compressed={self.compressed_archive_size} "
            f"uncompressed={self.uncompressed_archive_size}>"
        )


class GzipSpanMap(SpanMap):
    """Spans between gzip checkpoints."""

    __slots__ = ("_outs", "zinfo")

    def __init__(
        self,
        zinfo: GzipZinfo,
        span_digests: Sequence[str],
        compressed_archive_size: int,
        uncompressed_archive_size: int,
    ) -> None:
        super().__init__(span_digests, compressed_archive_size, uncompressed_archive_size)
        self.zinfo = zinfo
        self._outs = [cp.out for cp in zinfo.checkpoints]

    @property
    def span_count(self) -> int:
        return len(self.zinfo.checkpoints)

    def compressed_range(self, span_id: SpanId) -> tuple[CompressedOffset, CompressedOffset]:
        self._check(span_id)
        cps = self.zinfo.checkpoints
        cp = cps[span_id]
        start = cp.in_ - (1 if cp.bits else 0)
        end = cps[span_id + 1].in_ if span_id + 1 < len(cps) else self.compressed_archive_size
        return CompressedOffset(start), CompressedOffset(end)

    def uncompressed_range(self, span_id: SpanId) -> tuple[UncompressedOffset, UncompressedOffset]:
        self._check(span_id)
        cps = self.zinfo.checkpoints
        end = cps[span_id + 1].out if span_id + 1 < len(cps) else self.uncompressed_archive_size
        return cps[span_id].out, UncompressedOffset(end)

    def span_for_offset(self, offset: UncompressedOffset) -> SpanId:
        if not self._outs:
            raise SpanError("layer has no spans")
        if not 0 <= offset <= self.uncompressed_archive_size:
            raise SpanError(
                f"offset {offset} outside the tar stream [0, {self.uncompressed_archive_size}]"
            )
        i = bisect.bisect_right(self._outs, offset) - 1
        return SpanId(max(i, 0))

    def inflate(self, span_id: SpanId, compressed: bytes | bytearray | memoryview) -> bytes:
        return inflate_span(self.zinfo, span_id, compressed, self.uncompressed_archive_size)

    @property
    def inflates_arriving(self) -> bool:
        return True

    def inflate_arriving(self, span_id: SpanId, buffer: memoryview, arrived: Arrived) -> bytes:
        return inflate_span(
            self.zinfo, span_id, buffer, self.uncompressed_archive_size, arrived=arrived
        )


class TarSpanMap(SpanMap):
    """Fixed slices of an uncompressed tar blob; inflating is the identity."""

    __slots__ = ("tar",)

    def __init__(
        self, tar: TarZinfo, span_digests: Sequence[str], uncompressed_archive_size: int
    ) -> None:
        super().__init__(span_digests, tar.size, uncompressed_archive_size)
        self.tar = tar

    @property
    def span_count(self) -> int:
        return 0 if self.tar.size == 0 else self.tar.span_count

    def compressed_range(self, span_id: SpanId) -> tuple[CompressedOffset, CompressedOffset]:
        self._check(span_id)
        start = span_id * self.tar.span_size
        end = min(start + self.tar.span_size, self.tar.size)
        return CompressedOffset(start), CompressedOffset(end)

    def uncompressed_range(self, span_id: SpanId) -> tuple[UncompressedOffset, UncompressedOffset]:
        start, end = self.compressed_range(span_id)
        return UncompressedOffset(start), UncompressedOffset(end)

    def span_for_offset(self, offset: UncompressedOffset) -> SpanId:
        if self.span_count == 0:
            raise SpanError("layer has no spans")
        if not 0 <= offset <= self.tar.size:
            raise SpanError(f"offset {offset} outside the tar blob [0, {self.tar.size}]")
        return SpanId(min(offset // self.tar.span_size, self.span_count - 1))

    def inflate(self, span_id: SpanId, compressed: bytes | bytearray | memoryview) -> bytes:
        start, end = self.compressed_range(span_id)
        if len(compressed) != end - start:
            raise SpanInflateError(
                f"span {span_id}: got {len(compressed)} bytes, want {end - start}"
            )
        return _as_bytes(compressed)
