"""zstd layers with random access: frames, their kinds, the zstd checkpoint blob, its spans.

A zstd stream is a run of frames, each decodable on its own; blocks inside a frame are not
(they share the window and entropy state, and libzstd cannot resume mid-frame). So a zstd
span is a run of whole frames and needs no window data (docs/format.md, "zstd layers"):

* `scan_frames` walks the frame and block headers of a blob without decoding anything;
* `classify` tells which kind a multi-frame layer is: zstd:chunked (containers/storage: its
  TOC in a skippable frame at the position the layer annotations or the footer give),
  the seekable format (a seek table in a final skippable frame) or plain multi-frame zstd;
  a single-frame layer (what containerd, BuildKit and c/image write for `zstd`) has no
  random access and is `ZstdKind.SINGLE_FRAME`;
* `ZstdZinfo` is the `checkpoints` blob of a zstd zTOC: span boundaries only;
* `ZstdSpanMap` reads spans: verify the compressed bytes, decode them with a multi-frame
  decoder (skippable frames inside a span are skipped).

The build itself (one pass: frames decoded in order, the tar stream fed to the TOC builder)
is `index.zstd_build`. Units: bytes; compressed offsets index the blob, uncompressed ones
the tar stream.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import itertools
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

import zstandard

from index.model import CompressedOffset, SpanId, UncompressedOffset
from index.zinfo import SpanError, SpanInflateError, SpanMap, ZinfoBuildError, ZinfoFormatError

ZSTD_MAGIC: Final = 0xFD2FB528
SKIPPABLE_MAGIC_MIN: Final = 0x184D2A50
SKIPPABLE_MAGIC_MAX: Final = 0x184D2A5F
SEEKABLE_SKIPPABLE_MAGIC: Final = 0x184D2A5E
SEEKABLE_FOOTER_MAGIC: Final = 0x8F92EAB1
SEEKABLE_FOOTER_SIZE: Final = 9
CHUNKED_FOOTER_MAGIC_OLD: Final = b"GnUlInUx"
"""containers/storage before v1.50 (40-byte footer; 56 bytes in v1.47-v1.49)."""
CHUNKED_FOOTER_MAGIC_NEW: Final = b"GNUlInUx"
"""containers/storage v1.50 and later (64-byte footer)."""

CHUNKED_ANNOTATION_PREFIXES: Final = (
    "io.github.containers.zstd-chunked.",  # containers/storage v1.44 and later
    "io.containers.zstd-chunked.",  # v1.31-v1.43 (Debian 12's skopeo 1.9)
)
MANIFEST_POSITION: Final = "manifest-position"
MANIFEST_CHECKSUM: Final = "manifest-checksum"

ZSTD_ZINFO_VERSION: Final = 1
_ZINFO_HEADER = struct.Struct("<BBHIq")
_ZINFO_BOUNDARY = struct.Struct("<qq")
_U32 = struct.Struct("<I")
_SEEK_ENTRY = struct.Struct("<II")
_SEEK_FOOTER = struct.Struct("<IBI")

_FCS_SIZES: Final = (0, 2, 4, 8)
_DID_SIZES: Final = (0, 1, 2, 4)
_BLOCK_HEADER_SIZE: Final = 3
_CHECKSUM_SIZE: Final = 4
_BLOCK_RLE: Final = 1
_BLOCK_RESERVED: Final = 3

INFLATE_READ_SIZE: Final = 1 << 20


class ZstdFormatError(ZinfoBuildError):
    """The blob is not a zstd stream this module can walk (bad magic, truncated frame,
    reserved block type), or its zstd:chunked/seekable metadata contradicts its frames."""


class ZstdKind(enum.IntEnum):
    """What kind of zstd layer a zTOC was built from (byte 1 of the zstd checkpoint blob)."""

    SINGLE_FRAME = 0
    CHUNKED = 1
    SEEKABLE = 2
    MULTI_FRAME = 3

    @property
    def label(self) -> str:
        """How `sociable` reports the kind."""
        return _KIND_LABELS[self]


_KIND_LABELS: Final = {
    ZstdKind.SINGLE_FRAME: "plain zstd",
    ZstdKind.CHUNKED: "zstd:chunked",
    ZstdKind.SEEKABLE: "seekable zstd",
    ZstdKind.MULTI_FRAME: "multi-frame zstd",
}


class Frame(NamedTuple):
    """One frame of the blob: compressed bytes `[start, end)`; `skippable` frames decode to
    nothing (`magic` is theirs; 0 for regular frames)."""

    start: int
    end: int
    skippable: bool
    magic: int = 0


def _is_skippable(magic: int) -> bool:
    return SKIPPABLE_MAGIC_MIN <= magic <= SKIPPABLE_MAGIC_MAX


def frame_end(buf: memoryview | bytes, start: int) -> Frame:
    """The frame starting at `start`: its end found from the frame header and the block
    headers alone. Raises `ZstdFormatError`."""
    size = len(buf)
    if start + 4 > size:
        raise ZstdFormatError(f"truncated frame header at {start}")
    magic = _U32.unpack_from(buf, start)[0]
    if _is_skippable(magic):
        if start + 8 > size:
            raise ZstdFormatError(f"truncated skippable frame header at {start}")
        length = _U32.unpack_from(buf, start + 4)[0]
        end = start + 8 + length
        if end > size:
            raise ZstdFormatError(f"skippable frame at {start} runs past the blob end")
        return Frame(start, end, True, magic)
    if magic != ZSTD_MAGIC:
        raise ZstdFormatError(f"no zstd frame at offset {start} (magic {magic:#010x})")
    pos = start + 4
    if pos >= size:
        raise ZstdFormatError(f"truncated frame header at {start}")
    fhd = buf[pos]
    pos += 1
    single_segment = (fhd >> 5) & 1
    if (fhd >> 3) & 1:
        raise ZstdFormatError(f"frame at {start}: reserved header bit set")
    fcs_flag = fhd >> 6
    fcs_size = _FCS_SIZES[fcs_flag] if fcs_flag or not single_segment else 1
    pos += (0 if single_segment else 1) + _DID_SIZES[fhd & 3] + fcs_size
    has_checksum = (fhd >> 2) & 1
    while True:
        if pos + _BLOCK_HEADER_SIZE > size:
            raise ZstdFormatError(f"frame at {start}: truncated block header at {pos}")
        header = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16)
        pos += _BLOCK_HEADER_SIZE
        block_type = (header >> 1) & 3
        if block_type == _BLOCK_RESERVED:
            raise ZstdFormatError(f"frame at {start}: reserved block type at {pos - 3}")
        pos += 1 if block_type == _BLOCK_RLE else header >> 3
        if header & 1:
            break
    pos += _CHECKSUM_SIZE if has_checksum else 0
    if pos > size:
        raise ZstdFormatError(f"frame at {start} runs past the blob end")
    return Frame(start, pos, False)


def scan_frames(buf: memoryview | bytes) -> list[Frame]:
    """Every frame of `buf` in order, without decoding. Raises `ZstdFormatError` when the
    blob is empty or something other than a zstd frame follows a frame."""
    if len(buf) == 0:
        raise ZstdFormatError("empty blob")
    frames: list[Frame] = []
    pos = 0
    while pos < len(buf):
        frame = frame_end(buf, pos)
        frames.append(frame)
        pos = frame.end
    return frames


def data_frames(frames: Sequence[Frame]) -> list[Frame]:
    """The frames up to the last regular one: trailing skippable frames (a zstd:chunked TOC
    and footer, a seek table) belong to no span."""
    last = max((i for i, f in enumerate(frames) if not f.skippable), default=-1)
    return list(frames[: last + 1])


def chunked_annotations(annotations: Mapping[str, str]) -> tuple[str, str] | None:
    """The zstd:chunked `(manifest-position, manifest-checksum)` of a layer descriptor's
    annotations, under either key spelling; None when the layer has none."""
    for prefix in CHUNKED_ANNOTATION_PREFIXES:
        position = annotations.get(prefix + MANIFEST_POSITION)
        if position is not None:
            return position, annotations.get(prefix + MANIFEST_CHECKSUM, "")
    return None


def _check_chunked_toc(
    buf: memoryview | bytes, frames: Sequence[Frame], position: str, checksum: str
) -> None:
    """The TOC the annotations locate is a skippable frame of the blob with that digest."""
    try:
        offset_text, length_text, *_ = position.split(":")
        offset, length = int(offset_text), int(length_text)
    except ValueError as e:
        raise ZstdFormatError(f"zstd:chunked manifest-position {position!r} is malformed") from e
    frame = next((f for f in frames if f.start + 8 == offset), None)
    if frame is None or not frame.skippable or frame.end - frame.start - 8 != length:
        raise ZstdFormatError(
            f"zstd:chunked manifest-position {position!r} names no skippable frame of the blob"
        )
    if checksum:
        actual = "sha256:" + hashlib.sha256(buf[offset : offset + length]).hexdigest()
        if actual != checksum:
            raise ZstdFormatError(
                f"zstd:chunked TOC digest is {actual}, the manifest-checksum says {checksum}"
            )


def _chunked_footer(buf: memoryview | bytes, frames: Sequence[Frame]) -> tuple[int, int] | None:
    """(TOC offset, compressed TOC length) from a zstd:chunked footer frame, or None."""
    last = frames[-1]
    if not last.skippable:
        return None
    payload = bytes(buf[last.start + 8 : last.end])
    old = len(payload) in (40, 56) and payload[32:40] == CHUNKED_FOOTER_MAGIC_OLD
    new = len(payload) == 64 and payload[56:64] == CHUNKED_FOOTER_MAGIC_NEW
    if not (old or new):
        return None
    offset, length = struct.unpack_from("<QQ", payload)
    return offset, length


def seek_table(buf: memoryview | bytes, frames: Sequence[Frame]) -> list[tuple[int, int]] | None:
    """The seekable format's `(compressed size, decompressed size)` per frame from the final
    seek-table frame, or None when the blob has none. Raises `ZstdFormatError` for a table
    that is malformed."""
    last = frames[-1]
    if not last.skippable or last.magic != SEEKABLE_SKIPPABLE_MAGIC:
        return None
    if last.end - last.start < 8 + SEEKABLE_FOOTER_SIZE:
        return None
    count, descriptor, magic = _SEEK_FOOTER.unpack_from(buf, last.end - SEEKABLE_FOOTER_SIZE)
    if magic != SEEKABLE_FOOTER_MAGIC:
        return None
    if descriptor & 0x7C:
        raise ZstdFormatError(f"seek table descriptor {descriptor:#04x} has reserved bits set")
    entry = _SEEK_ENTRY.size + (4 if descriptor & 0x80 else 0)
    if 8 + count * entry + SEEKABLE_FOOTER_SIZE != last.end - last.start:
        raise ZstdFormatError(f"seek table of {count} frames does not fill its frame")
    base = last.start + 8
    return [_SEEK_ENTRY.unpack_from(buf, base + i * entry) for i in range(count)]


def classify(
    buf: memoryview | bytes, frames: Sequence[Frame], annotations: Mapping[str, str]
) -> ZstdKind:
    """The kind of zstd layer `buf` is (its `frames` from `scan_frames`).

    zstd:chunked needs its annotations (either spelling) or its footer, and the TOC they
    locate must be a skippable frame of the blob (with the annotated digest); seekable needs
    a seek table whose compressed sizes are the frames'. Raises `ZstdFormatError` when the
    metadata contradicts the frames.
    """
    if sum(not f.skippable for f in frames) <= 1:
        return ZstdKind.SINGLE_FRAME
    located = chunked_annotations(annotations)
    if located is not None:
        _check_chunked_toc(buf, frames, *located)
        return ZstdKind.CHUNKED
    footer = _chunked_footer(buf, frames)
    if footer is not None:
        _check_chunked_toc(buf, frames, f"{footer[0]}:{footer[1]}", "")
        return ZstdKind.CHUNKED
    table = seek_table(buf, frames)
    if table is not None:
        listed = frames[:-1]
        if [c for c, _ in table] != [f.end - f.start for f in listed]:
            raise ZstdFormatError("the seek table's frame sizes are not the blob's frames")
        return ZstdKind.SEEKABLE
    return ZstdKind.MULTI_FRAME


@dataclass(frozen=True, slots=True)
class ZstdZinfo:
    """The `checkpoints` blob of a zstd zTOC: span `i` is the compressed bytes
    `[boundaries[i][0], boundaries[i+1][0])`, which decode to the tar bytes
    `[boundaries[i][1], boundaries[i+1][1])`; the last boundary is the end of the last
    regular frame and of its output."""

    kind: ZstdKind
    span_size: int
    boundaries: tuple[tuple[int, int], ...]

    @property
    def span_count(self) -> int:
        return max(len(self.boundaries) - 1, 0)

    def encode(self) -> bytes:
        """LE: `u8 version`, `u8 kind`, `u16 0`, `u32 spans`, `i64 span_size`, then
        spans + 1 pairs `i64 compressed, i64 uncompressed`."""
        head = _ZINFO_HEADER.pack(ZSTD_ZINFO_VERSION, self.kind, 0, self.span_count, self.span_size)
        return head + b"".join(_ZINFO_BOUNDARY.pack(c, u) for c, u in self.boundaries)


def decode_zstd_zinfo(data: bytes) -> ZstdZinfo:
    """Parse a zstd checkpoint blob. Raises `ZinfoFormatError` for a bad length, version,
    kind, or boundaries that go backwards."""
    if len(data) < _ZINFO_HEADER.size:
        raise ZinfoFormatError(f"zstd checkpoint blob of {len(data)} bytes is too short")
    version, kind, reserved, spans, span_size = _ZINFO_HEADER.unpack_from(data)
    if version != ZSTD_ZINFO_VERSION or reserved:
        raise ZinfoFormatError(f"zstd checkpoint blob version {version} is not supported")
    try:
        zkind = ZstdKind(kind)
    except ValueError as e:
        raise ZinfoFormatError(f"zstd checkpoint blob names unknown kind {kind}") from e
    want = _ZINFO_HEADER.size + (spans + 1) * _ZINFO_BOUNDARY.size
    if len(data) != want:
        raise ZinfoFormatError(
            f"zstd checkpoint blob of {spans} spans is {len(data)} bytes, not {want}"
        )
    bounds = tuple(
        _ZINFO_BOUNDARY.unpack_from(data, _ZINFO_HEADER.size + i * _ZINFO_BOUNDARY.size)
        for i in range(spans + 1)
    )
    for (c0, u0), (c1, u1) in itertools.pairwise(bounds):
        if c1 <= c0 or u1 < u0 or c0 < 0 or u0 < 0:
            raise ZinfoFormatError("zstd checkpoint blob boundaries do not increase")
    return ZstdZinfo(zkind, span_size, bounds)


class ZstdSpanMap(SpanMap):
    """Spans that are runs of whole zstd frames; inflating decodes them with a multi-frame
    decoder (skippable frames inside are skipped)."""

    __slots__ = ("_starts", "zinfo")

    def __init__(
        self,
        zinfo: ZstdZinfo,
        span_digests: Sequence[str],
        compressed_archive_size: int,
        uncompressed_archive_size: int,
    ) -> None:
        super().__init__(span_digests, compressed_archive_size, uncompressed_archive_size)
        if zinfo.boundaries and zinfo.boundaries[-1][0] > compressed_archive_size:
            raise ZinfoFormatError("zstd spans end past the blob")
        if zinfo.boundaries and zinfo.boundaries[-1][1] < uncompressed_archive_size:
            raise ZinfoFormatError("zstd spans end before the tar stream does")
        self.zinfo = zinfo
        self._starts = [u for _, u in zinfo.boundaries[:-1]]

    @property
    def span_count(self) -> int:
        return self.zinfo.span_count

    def compressed_range(self, span_id: SpanId) -> tuple[CompressedOffset, CompressedOffset]:
        self._check(span_id)
        b = self.zinfo.boundaries
        return CompressedOffset(b[span_id][0]), CompressedOffset(b[span_id + 1][0])

    def uncompressed_range(self, span_id: SpanId) -> tuple[UncompressedOffset, UncompressedOffset]:
        self._check(span_id)
        b = self.zinfo.boundaries
        return UncompressedOffset(b[span_id][1]), UncompressedOffset(b[span_id + 1][1])

    def span_for_offset(self, offset: UncompressedOffset) -> SpanId:
        if not self._starts:
            raise SpanError("layer has no spans")
        if not 0 <= offset <= self.uncompressed_archive_size:
            raise SpanError(
                f"offset {offset} outside the tar stream [0, {self.uncompressed_archive_size}]"
            )
        return SpanId(max(bisect.bisect_right(self._starts, offset) - 1, 0))

    def inflate(self, span_id: SpanId, compressed: bytes | bytearray | memoryview) -> bytes:
        start, end = self.uncompressed_range(span_id)
        return inflate_frames(compressed, end - start, f"span {span_id}")


def inflate_frames(compressed: bytes | bytearray | memoryview, length: int, what: str) -> bytes:
    """Decode a run of whole frames that must give exactly `length` bytes.

    Raises `SpanInflateError` for corrupt frames (checksums included) or another length.
    """
    out = bytearray(length + 1)  # one spare byte: a longer output is noticed
    view = memoryview(out)
    got = 0
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(
            compressed, read_size=INFLATE_READ_SIZE, read_across_frames=True
        )
        with reader:
            while got <= length:
                n = reader.readinto(view[got:])
                if n == 0:
                    break
                got += n
    except zstandard.ZstdError as e:
        raise SpanInflateError(f"{what}: corrupt zstd data: {e}") from e
    finally:
        view.release()
    if got != length:
        raise SpanInflateError(f"{what}: decodes to {got} bytes, want {length}")
    del out[length:]
    return bytes(out)


class SingleFrameZstd(ZinfoBuildError):
    """The layer is one zstd frame: no span can start anywhere but at byte 0, so it gets no
    zTOC (the snapshotter unpacks it when it is pulled)."""


@dataclass(frozen=True, slots=True)
class ZstdBuild:
    """What one pass over a zstd layer gives: its kind, its spans and their digests, and the
    sha256 of the decoded stream (the layer's diffID)."""

    zinfo: ZstdZinfo
    span_digests: tuple[str, ...]
    compressed_size: int
    diff_id: str


def build_zstd_spans(
    buf: memoryview | bytes,
    span_size: int,
    on_output: Callable[[bytes], None],
    *,
    annotations: Mapping[str, str] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> ZstdBuild:
    """Walk, classify and decode the zstd layer `buf` once, frame by frame, passing every
    decoded byte to `on_output` in order.

    A span starts at a regular frame once the previous span has `span_size` uncompressed
    bytes (so spans are a little larger, as gzip spans are, and a frame larger than
    `span_size` is a span of its own); skippable frames between regular frames stay inside
    their span; trailing skippable frames belong to none. `on_progress` gets the blob bytes
    done after each frame.

    Raises `SingleFrameZstd` for a one-frame layer, `ZstdFormatError` for a blob that is not
    zstd or whose zstd:chunked/seekable metadata contradicts it, `SpanInflateError` for a
    frame that does not decode, and whatever `on_output` raises.
    """
    if span_size <= 0:
        raise ZinfoBuildError(f"span size must be positive, got {span_size}")
    frames = scan_frames(buf)
    kind = classify(buf, frames, annotations or {})
    if kind is ZstdKind.SINGLE_FRAME:
        raise SingleFrameZstd("one zstd frame: no random access")
    table = seek_table(buf, frames) if kind is ZstdKind.SEEKABLE else None
    data = data_frames(frames)
    dctx = zstandard.ZstdDecompressor()
    hasher = hashlib.sha256()
    boundaries: list[tuple[int, int]] = []
    sizes: list[int] = []
    u = 0
    for frame in data:
        if frame.skippable:
            sizes.append(0)
            continue
        if not boundaries or u - boundaries[-1][1] >= span_size:
            boundaries.append((frame.start, u))
        before = u
        try:
            with dctx.stream_reader(buf[frame.start : frame.end], read_size=INFLATE_READ_SIZE) as r:
                while chunk := r.read(INFLATE_READ_SIZE):
                    hasher.update(chunk)
                    on_output(chunk)
                    u += len(chunk)
        except zstandard.ZstdError as e:
            raise SpanInflateError(f"zstd frame at {frame.start}: {e}") from e
        sizes.append(u - before)
        if on_progress is not None:
            on_progress(frame.end)
    if table is not None and [d for _, d in table] != sizes + [0] * (len(table) - len(sizes)):
        raise ZstdFormatError("the seek table's decompressed sizes are not the frames' sizes")
    boundaries.append((data[-1].end, u))
    digests = tuple(
        "sha256:" + hashlib.sha256(buf[c0:c1]).hexdigest()
        for (c0, _), (c1, _) in itertools.pairwise(boundaries)
    )
    return ZstdBuild(
        ZstdZinfo(kind, span_size, tuple(boundaries)),
        digests,
        len(buf),
        "sha256:" + hasher.hexdigest(),
    )
