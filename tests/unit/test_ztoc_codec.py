"""zTOC codec: the AWS golden vector, round trips, Go's decoding rules, and fuzzing."""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import tarfile
from dataclasses import replace
from typing import cast

import flatbuffers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from index.model import (
    BUILD_TOOL_IDENTIFIER,
    ZTOC_VERSION,
    CompressionAlgorithm,
    CompressionInfo,
    EntryType,
    FileMetadata,
    SpanId,
    UncompressedOffset,
    Ztoc,
)
from index.toc import TocBuilder
from index.ztoc_codec import (
    ZtocEncodeError,
    ZtocFormatError,
    ZtocView,
    decode_ztoc,
    encode_ztoc,
    tar_header_offsets,
)

GOLDEN_SIZE = 65928
GOLDEN_SHA256 = "eba28fdf50b1b57543f57dd051b2468c1d4f57b64d2006c75aa4de1d03e6c7ec"


def golden_ztoc() -> Ztoc:
    """The inputs of the AWS repository's TestWriteZtoc: two zero-valued Go structs, whose
    type is the empty string (not a valid EntryType, hence the cast)."""
    zero = FileMetadata(
        name="",
        type=cast(EntryType, ""),
        uncompressed_offset=UncompressedOffset(0),
        uncompressed_size=0,
        mod_time="0001-01-01T00:00:00Z",
    )
    return Ztoc(
        version="0.9",
        build_tool_identifier="AWS SOCI CLI",
        compressed_archive_size=2_000_000,
        uncompressed_archive_size=2_500_000,
        files=(zero, zero),
        compression=CompressionInfo(
            algorithm=CompressionAlgorithm.GZIP,
            max_span_id=SpanId(3),
            span_digests=(),
            checkpoints=bytes(65536),
        ),
    )


def test_golden_vector_matches_the_aws_implementation() -> None:
    data = encode_ztoc(golden_ztoc())
    assert len(data) == GOLDEN_SIZE
    assert hashlib.sha256(data).hexdigest() == GOLDEN_SHA256


def test_golden_vector_reads_back_raw_and_is_rejected_strictly() -> None:
    view = ZtocView(encode_ztoc(golden_ztoc()))
    assert (view.version, view.build_tool_identifier) == ("0.9", "AWS SOCI CLI")
    assert (view.compressed_archive_size, view.uncompressed_archive_size) == (2_000_000, 2_500_000)
    assert len(view) == 2
    assert [view.type_name(i) for i in range(2)] == ["", ""]
    assert [view.tar_header_offset(i) for i in range(2)] == [0, 0]
    assert view.compression == golden_ztoc().compression
    with pytest.raises(ZtocFormatError, match="unknown type ''"):
        view.entry(0)


# --- strategies ----------------------------------------------------------------------------------

_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",)) | st.sampled_from("\udc80\udcff\x00"), max_size=16
)
_INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
_DIGEST = st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex())


@st.composite
def ztocs(draw: st.DrawFn) -> Ztoc:
    files: list[FileMetadata] = []
    next_header = 0
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(list(EntryType)))
        offset = next_header + 512 * draw(st.integers(1, 3))
        size = draw(st.integers(0, 5000)) if kind == EntryType.REG else 0
        files.append(
            FileMetadata(
                name=draw(_TEXT),
                type=kind,
                uncompressed_offset=UncompressedOffset(offset),
                uncompressed_size=size,
                linkname=draw(_TEXT),
                mode=draw(_INT64),
                uid=draw(st.integers(0, (1 << 32) - 1)),
                gid=draw(st.integers(0, (1 << 32) - 1)),
                uname=draw(_TEXT),
                gname=draw(_TEXT),
                mod_time=draw(st.sampled_from(("", "2024-01-02T03:04:05.5Z", "garbage"))),
                devmajor=draw(_INT64),
                devminor=draw(_INT64),
                xattrs=dict(
                    sorted(
                        draw(st.dictionaries(_TEXT, _TEXT, max_size=4)).items(),
                        key=lambda kv: kv[0].encode("utf-8", "surrogateescape"),
                    )
                ),
            )
        )
        next_header = (offset + size + 511) // 512 * 512
    return Ztoc(
        version=draw(st.sampled_from((ZTOC_VERSION, ""))),
        build_tool_identifier=draw(st.sampled_from((BUILD_TOOL_IDENTIFIER, "other tool"))),
        compressed_archive_size=draw(st.integers(0, 1 << 40)),
        uncompressed_archive_size=next_header + 1024,
        files=tuple(files),
        compression=CompressionInfo(
            algorithm=draw(st.sampled_from(list(CompressionAlgorithm))),
            max_span_id=SpanId(draw(st.integers(0, 1000))),
            span_digests=tuple(draw(st.lists(_DIGEST, max_size=4))),
            checkpoints=draw(st.binary(max_size=300)),
        ),
    )


@settings(max_examples=80, deadline=None)
@given(ztocs())
def test_round_trip(z: Ztoc) -> None:
    data = encode_ztoc(z)
    decoded = decode_ztoc(data)
    assert decoded == z
    assert encode_ztoc(decoded) == data
    view = ZtocView(data)
    assert len(view) == len(z.files)
    assert list(view) == list(z.files)
    # the fast entry reader and the fully checked one (used for diagnostics) agree
    assert [view._checked_entry(i) for i in range(len(view))] == list(z.files)
    assert [view.tar_header_offset(i) for i in range(len(view))] == tar_header_offsets(z.files)
    # what a layer tree reads: the same entries, owner names not decoded
    blank = [f._replace(uname="", gname="") for f in z.files]
    assert list(view.entries(owner_names=False)) == blank


def test_gzip_algorithm_is_the_default_and_not_written() -> None:
    base = golden_ztoc()
    gzip = encode_ztoc(base)
    plain = encode_ztoc(
        replace(
            base, compression=replace(base.compression, algorithm=CompressionAlgorithm.UNCOMPRESSED)
        )
    )
    assert len(plain) > len(gzip)  # one more field in the CompressionInfo table
    assert ZtocView(plain).compression.algorithm == CompressionAlgorithm.UNCOMPRESSED
    assert ZtocView(gzip).compression.algorithm == CompressionAlgorithm.GZIP


# --- built from a real archive -------------------------------------------------------------------


def _archive() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(30):
            info = tarfile.TarInfo(("deep/" * (i % 5)) + f"file-{i}-" + "n" * (i * 7))
            info.size = (i * 997) % 3000
            info.mtime = 1_700_000_000 + i
            if i % 4 == 0:
                info.pax_headers = {"SCHILY.xattr.user.i": str(i)}
            tf.addfile(info, io.BytesIO(random.Random(i).randbytes(info.size)))
        link = tarfile.TarInfo("link")
        link.type = tarfile.SYMTYPE
        link.linkname = "file-0-"
        tf.addfile(link)
    return buf.getvalue()


def _built_ztoc() -> tuple[Ztoc, bytes]:
    archive = _archive()
    builder = TocBuilder()
    builder.feed(archive)
    files, size = builder.finish()
    z = Ztoc(
        version=ZTOC_VERSION,
        build_tool_identifier=BUILD_TOOL_IDENTIFIER,
        compressed_archive_size=len(archive),
        uncompressed_archive_size=size,
        files=tuple(files),
        compression=CompressionInfo(
            algorithm=CompressionAlgorithm.GZIP,
            max_span_id=SpanId(1),
            span_digests=("sha256:" + "ab" * 32, "sha256:" + "cd" * 32),
            checkpoints=bytes(range(256)) * 4,
        ),
    )
    return z, archive


def test_header_offsets_point_at_the_first_header_of_each_member() -> None:
    z, archive = _built_ztoc()
    data = encode_ztoc(z)
    assert decode_ztoc(data) == z
    assert encode_ztoc(decode_ztoc(data)) == data
    with tarfile.open(fileobj=io.BytesIO(archive)) as tf:
        starts = [m.offset for m in tf.getmembers()]  # includes PAX extension headers
    assert tar_header_offsets(z.files) == starts
    view = ZtocView(data)
    assert [view.tar_header_offset(i) for i in range(len(view))] == starts
    assert view.name(3) == z.files[3].name
    assert view[-1] == z.files[-1]
    with pytest.raises(IndexError):
        view.entry(len(view))
    assert "entries=31" in repr(view)


def test_decoding_sorts_by_offset_like_go() -> None:
    z, _ = _built_ztoc()
    shuffled = list(z.files)
    random.Random(1).shuffle(shuffled)
    decoded = decode_ztoc(encode_ztoc(replace(z, files=tuple(shuffled))))
    assert decoded.files == z.files


def test_overlapping_entries_are_an_invalid_toc_entry() -> None:
    z, _ = _built_ztoc()
    files = list(z.files)
    files[5] = files[5]._replace(uncompressed_size=files[5].uncompressed_size + 2000)
    with pytest.raises(ZtocFormatError, match="invalid toc entry"):
        decode_ztoc(encode_ztoc(replace(z, files=tuple(files))))
    with pytest.raises(ZtocFormatError, match="invalid toc entry"):
        tar_header_offsets(files)
    first_at_negative = (files[0]._replace(uncompressed_offset=UncompressedOffset(-1)),)
    with pytest.raises(ZtocFormatError, match="invalid toc entry"):
        decode_ztoc(encode_ztoc(replace(z, files=first_at_negative)))


def test_encode_rejects_values_outside_their_field_types() -> None:
    z = golden_ztoc()
    entry = z.files[0]._replace(type=EntryType.REG)
    for bad in (
        entry._replace(uid=1 << 32),
        entry._replace(gid=-1),
        entry._replace(uncompressed_size=1 << 63),
        entry._replace(mode=-(1 << 63) - 1),
    ):
        with pytest.raises(ZtocEncodeError):
            encode_ztoc(replace(z, files=(bad,)))
    with pytest.raises(ZtocEncodeError, match="max_span_id"):
        encode_ztoc(replace(z, compression=replace(z.compression, max_span_id=SpanId(1 << 31))))


# --- the flatbuffers runtime's Builder as the oracle for the fast writer -------------------------


def builder_encode(z: Ztoc) -> bytes:
    """The Go marshaler's call sequence on the flatbuffers runtime's own
    `Builder`, which the spec verified against the AWS output; the oracle for `encode_ztoc`."""
    b = flatbuffers.Builder(0)

    def s(text: str) -> int:
        return int(b.CreateString(text, "utf-8", "surrogateescape"))

    def offsets_vector(offsets: list[int]) -> int:
        b.StartVector(4, len(offsets), 4)
        for off in reversed(offsets):
            b.PrependUOffsetTRelative(off)
        return int(b.EndVector())

    version, tool = s(z.version), s(z.build_tool_identifier)
    entries = [0] * len(z.files)
    for i in range(len(z.files) - 1, -1, -1):
        e = z.files[i]
        strings = [s(x) for x in (e.name, str(e.type), e.linkname, e.uname, e.gname, e.mod_time)]
        xattrs = []
        for key in sorted(e.xattrs, key=lambda k: k.encode("utf-8", "surrogateescape")):
            k, v = s(key), s(e.xattrs[key])
            b.StartObject(2)
            b.PrependUOffsetTRelativeSlot(0, k, 0)
            b.PrependUOffsetTRelativeSlot(1, v, 0)
            xattrs.append(b.EndObject())
        xvec = offsets_vector(xattrs)
        b.StartObject(14)
        b.PrependUOffsetTRelativeSlot(0, strings[0], 0)
        b.PrependUOffsetTRelativeSlot(1, strings[1], 0)
        b.PrependInt64Slot(2, e.uncompressed_offset, 0)
        b.PrependInt64Slot(3, e.uncompressed_size, 0)
        b.PrependUOffsetTRelativeSlot(4, strings[2], 0)
        b.PrependInt64Slot(5, e.mode, 0)
        b.PrependUint32Slot(6, e.uid, 0)
        b.PrependUint32Slot(7, e.gid, 0)
        b.PrependUOffsetTRelativeSlot(8, strings[3], 0)
        b.PrependUOffsetTRelativeSlot(9, strings[4], 0)
        b.PrependUOffsetTRelativeSlot(10, strings[5], 0)
        b.PrependInt64Slot(11, e.devmajor, 0)
        b.PrependInt64Slot(12, e.devminor, 0)
        b.PrependUOffsetTRelativeSlot(13, xvec, 0)
        entries[i] = b.EndObject()
    metadata = offsets_vector(entries)
    b.StartObject(1)
    b.PrependUOffsetTRelativeSlot(0, metadata, 0)
    toc = b.EndObject()
    checkpoints = b.CreateByteVector(z.compression.checkpoints)
    digests = offsets_vector([s(d) for d in z.compression.span_digests])
    b.StartObject(4)
    b.PrependInt32Slot(1, z.compression.max_span_id, 0)
    b.PrependUOffsetTRelativeSlot(2, digests, 0)
    b.PrependUOffsetTRelativeSlot(3, checkpoints, 0)
    b.PrependInt8Slot(0, int(z.compression.algorithm), 1)
    info = b.EndObject()
    b.StartObject(6)
    b.PrependUOffsetTRelativeSlot(0, version, 0)
    b.PrependUOffsetTRelativeSlot(1, tool, 0)
    b.PrependUOffsetTRelativeSlot(4, toc, 0)
    b.PrependInt64Slot(2, z.compressed_archive_size, 0)
    b.PrependInt64Slot(3, z.uncompressed_archive_size, 0)
    b.PrependUOffsetTRelativeSlot(5, info, 0)
    b.Finish(b.EndObject())
    return bytes(b.Output())


def test_golden_vector_with_the_runtime_builder() -> None:
    assert hashlib.sha256(builder_encode(golden_ztoc())).hexdigest() == GOLDEN_SHA256


@settings(max_examples=80, deadline=None)
@given(ztocs())
def test_fast_writer_gives_the_runtime_builder_bytes(z: Ztoc) -> None:
    assert encode_ztoc(z) == builder_encode(z)


def test_fast_writer_on_a_real_archive_and_shared_vtables() -> None:
    z, _ = _built_ztoc()
    assert encode_ztoc(z) == builder_encode(z)
    # the same entry many times: vtables are deduplicated identically
    same = replace(z, files=(z.files[0],) * 50)
    assert encode_ztoc(same) == builder_encode(same)


# --- hand-built buffers: what Go accepts, what it does not ---------------------------------------


def _buffer(
    *, with_toc: bool = True, with_info: bool = True, algorithm: int | None = None
) -> bytes:
    """A zTOC with one entry that has only a name and a type (every other field absent)."""
    b = flatbuffers.Builder(0)
    name, kind = b.CreateString("only-name"), b.CreateString("dir")
    b.StartObject(14)
    b.PrependUOffsetTRelativeSlot(0, name, 0)
    b.PrependUOffsetTRelativeSlot(1, kind, 0)
    entry = b.EndObject()
    b.StartVector(4, 1, 4)
    b.PrependUOffsetTRelative(entry)
    vec = b.EndVector()
    b.StartObject(1)
    b.PrependUOffsetTRelativeSlot(0, vec, 0)
    toc = b.EndObject()
    b.StartObject(4)
    if algorithm is not None:
        b.PrependInt8Slot(0, algorithm, 1)
    info = b.EndObject()
    b.StartObject(6)
    if with_toc:
        b.PrependUOffsetTRelativeSlot(4, toc, 0)
    if with_info:
        b.PrependUOffsetTRelativeSlot(5, info, 0)
    b.Finish(b.EndObject())
    return bytes(b.Output())


def test_absent_fields_take_their_defaults() -> None:
    z = decode_ztoc(_buffer())
    assert (z.version, z.build_tool_identifier, z.uncompressed_archive_size) == ("", "", 0)
    assert z.files == (
        FileMetadata(
            name="only-name",
            type=EntryType.DIR,
            uncompressed_offset=UncompressedOffset(0),
            uncompressed_size=0,
        ),
    )
    assert z.compression == CompressionInfo(CompressionAlgorithm.GZIP, SpanId(0), (), b"")


def test_missing_tables_and_unknown_algorithms_are_rejected() -> None:
    with pytest.raises(ZtocFormatError, match="no toc"):
        decode_ztoc(_buffer(with_toc=False))
    with pytest.raises(ZtocFormatError, match="no compression_info"):
        decode_ztoc(_buffer(with_info=False))
    assert (
        decode_ztoc(_buffer(algorithm=2)).compression.algorithm == CompressionAlgorithm.UNCOMPRESSED
    )
    assert decode_ztoc(_buffer(algorithm=3)).compression.algorithm == CompressionAlgorithm.ZSTD
    for value in (0, 4, -1):
        with pytest.raises(ZtocFormatError, match=f"unknown compression_algorithm {value}"):
            decode_ztoc(_buffer(algorithm=value))


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x04\x00\x00\x00", b"\xff" * 64, bytes(64)])
def test_garbage_is_a_format_error(data: bytes) -> None:
    with pytest.raises(ZtocFormatError):
        decode_ztoc(data)


def _small_valid() -> bytes:
    z, _ = _built_ztoc()
    return encode_ztoc(
        replace(z, files=z.files[:4], compression=replace(z.compression, checkpoints=b"ck"))
    )


def test_every_truncation_is_rejected_or_decodes() -> None:
    data = _small_valid()
    rejected = 0
    for cut in range(len(data)):
        try:
            decode_ztoc(data[:cut])
        except ZtocFormatError:
            rejected += 1
    assert rejected >= len(data) * 9 // 10  # almost every prefix loses something it needs


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    with contextlib.suppress(ZtocFormatError):
        decode_ztoc(data)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzz_bit_flips(data: st.DataObject) -> None:
    buf = bytearray(_SMALL)
    for _ in range(data.draw(st.integers(1, 8))):
        bit = data.draw(st.integers(0, len(buf) * 8 - 1))
        buf[bit // 8] ^= 1 << (bit % 8)
    try:
        z = decode_ztoc(bytes(buf))
    except ZtocFormatError:
        return
    for i, offset in enumerate(tar_header_offsets(z.files)):  # a decoded zTOC is consistent
        assert offset <= z.files[i].uncompressed_offset


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_overwritten_words(data: st.DataObject) -> None:
    """Offsets replaced by arbitrary 32-bit values (the likeliest way to point outside)."""
    buf = bytearray(_SMALL)
    pos = data.draw(st.integers(0, len(buf) - 4)) & ~3
    buf[pos : pos + 4] = data.draw(st.binary(min_size=4, max_size=4))
    with contextlib.suppress(ZtocFormatError):
        decode_ztoc(bytes(buf))


_SMALL = _small_valid()
