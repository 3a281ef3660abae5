"""Checkpoints, checkpoint blobs, span maps and span inflation (index.zinfo, index.zlib_ctypes)."""

from __future__ import annotations

import ctypes
import gzip
import hashlib
import io
import itertools
import os
import struct
import zlib

import flatbuffers
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from index import zlib_ctypes as zc
from index.model import (
    DEFAULT_SPAN_SIZE,
    CompressedOffset,
    CompressionAlgorithm,
    CompressionInfo,
    SpanId,
    UncompressedOffset,
)
from index.zinfo import (
    CHECKPOINT_RECORD_SIZE,
    Checkpoint,
    GzipBuildResult,
    GzipSpanMap,
    GzipZinfo,
    SpanDigestMismatch,
    SpanError,
    SpanInflateError,
    SpanMap,
    TarSpanMap,
    TarZinfo,
    ZinfoBuildError,
    ZinfoFormatError,
    build_gzip_checkpoints,
    build_tar_spans,
    decode_gzip_zinfo,
    decode_tar_zinfo,
    encode_gzip_zinfo,
    encode_tar_zinfo,
    inflate_span,
)
from tests.support.tarfixtures import (
    COMPRESSORS,
    Compressor,
    TarEntrySpec,
    compress,
    content,
    have_pigz,
    make_tar,
)

SPAN_SIZES = (4096, 65536, 1 << 20, DEFAULT_SPAN_SIZE)


# ---------------------------------------------------------------------------------------------
# A reference zran: SOCI's loop literally (16 KiB reads, 32 KiB circular output buffer).


def reference_checkpoints(blob: bytes, span_size: int) -> list[tuple[int, int, int, bytes]]:
    out = (ctypes.c_char * zc.WINDOW_SIZE)()
    out_addr = ctypes.addressof(out)
    inf = zc.Inflater(zc.WBITS_AUTO, zc.system_backend())  # as soci builds
    s = inf.stream
    s.avail_out = 0
    totin = totout = last = 0
    points: list[tuple[int, int, int, bytes]] = []
    pos = 0
    keep: bytes = b""
    while pos < len(blob):
        keep = blob[pos : pos + 16384]
        pos += len(keep)
        s.next_in = ctypes.cast(ctypes.c_char_p(keep), ctypes.c_void_p).value
        s.avail_in = len(keep)
        while True:
            if s.avail_out == 0:
                s.avail_out = zc.WINDOW_SIZE
                s.next_out = out_addr
            totin += s.avail_in
            totout += s.avail_out
            ret = inf.inflate(zc.Z_BLOCK)
            totin -= s.avail_in
            totout -= s.avail_out
            if ret == zc.Z_STREAM_END:
                if s.avail_in or pos < len(blob):
                    inf.reset2(zc.WBITS_AUTO)
                    if not s.avail_in:
                        break
                    continue
                break
            dt = s.data_type
            if dt & 128 and not dt & 64 and (totout == 0 or totout - last > span_size):
                left = zc.WINDOW_SIZE - s.avail_out
                window = bytes(out)[left:] + bytes(out)[:left]
                points.append((totin, totout, dt & 7, window))
                last = totout
            if s.avail_in == 0 and s.avail_out != 0:
                break
    inf.close()
    return points


# ---------------------------------------------------------------------------------------------
# Strategies

names = st.text(alphabet="abcdefghij_-.", min_size=1, max_size=12)
sizes = st.sampled_from([0, 1, 100, 511, 512, 513, 4096, 40000, 70000, 300000])
entry_specs = st.builds(
    TarEntrySpec,
    name=names,
    kind=st.sampled_from(["reg", "reg", "reg", "dir", "symlink", "fifo", "char"]),
    size=sizes,
    content=st.sampled_from(["random", "text", "zeros", "mixed"]),
    seed=st.integers(0, 1000),
    target=names,
)


@st.composite
def tar_archives(draw: st.DrawFn) -> bytes:
    specs = draw(st.lists(entry_specs, min_size=0, max_size=12))
    # Unique names (paths made unique by index), one long name to exercise PAX headers.
    specs = [
        TarEntrySpec(f"d{i}/{s.name}", s.kind, s.size, s.content, s.seed, s.target)
        for i, s in enumerate(specs)
    ]
    if draw(st.booleans()):
        specs.append(TarEntrySpec("long/" + "x" * 150, "reg", 1000, "text", 3))
    return make_tar(specs)


def _compressors() -> list[Compressor]:
    return [c for c in COMPRESSORS if c != "pigz" or have_pigz()]


def _build(blob: bytes, span_size: int, read_size: int = 1 << 20) -> tuple[GzipBuildResult, bytes]:
    pieces: list[bytes] = []
    result = build_gzip_checkpoints(
        io.BytesIO(blob), span_size, lambda mv: pieces.append(bytes(mv)), read_size=read_size
    )
    return result, b"".join(pieces)


def _span_map(result: GzipBuildResult, blob: bytes, usize: int) -> SpanMap:
    info = CompressionInfo(
        CompressionAlgorithm.GZIP,
        SpanId(len(result.checkpoints) - 1),
        result.span_digests,
        result.zinfo.encode(),
    )
    return SpanMap.from_compression_info(info, len(blob), usize)


def inflate_arriving(smap: SpanMap, sid: SpanId, piece: bytes, step: int) -> bytes:
    """`smap.inflate_arriving` of `piece`, whose bytes arrive `step` at a time when the
    inflation asks for more."""
    buffer = bytearray(len(piece))
    have = 0
    asked: list[int] = []

    def arrived(n: int) -> int:
        nonlocal have
        asked.append(n)
        assert have < n <= len(piece) or n <= have  # never beyond the buffer
        while have < n:
            stop = min(len(piece), have + step)
            buffer[have:stop] = piece[have:stop]
            have = stop
        return have

    data = smap.inflate_arriving(sid, memoryview(buffer), arrived)
    assert asked == sorted(asked), "the inflation only moves forward"
    return data


def check_layer(blob: bytes, span_size: int) -> GzipBuildResult:
    """Every property a gzip layer's checkpoints must have."""
    expected = gzip.decompress(blob)
    result, output = _build(blob, span_size)
    assert output == expected
    assert result.uncompressed_size == len(expected)
    assert result.compressed_size == len(blob)

    # Same checkpoints whatever the input chunking, and the same as SOCI's loop.
    small, _ = _build(blob, span_size, read_size=16384)
    odd, _ = _build(blob, span_size, read_size=7919)
    assert small == result
    assert odd == result
    ref = reference_checkpoints(blob, span_size)
    assert [(c.in_, c.out, c.bits, c.window) for c in result.checkpoints] == ref

    # Checkpoint invariants: window = the 32 KiB before out; spacing > span_size.
    cps = result.checkpoints
    assert cps, "a gzip stream always has a checkpoint after its first header"
    assert cps[0].out == 0 and cps[0].window == bytes(32768)
    for prev, cp in itertools.pairwise(cps):
        assert cp.out - prev.out > span_size
    for cp in cps:
        start = max(0, cp.out - 32768)
        assert cp.window == bytes(32768 - (cp.out - start)) + expected[start : cp.out]
    assert len(result.span_digests) == len(cps)

    # Blob round trip.
    blob_bytes = result.zinfo.encode()
    assert len(blob_bytes) == 12 + CHECKPOINT_RECORD_SIZE * len(cps)
    assert decode_gzip_zinfo(blob_bytes) == result.zinfo

    # Spans: digest of the compressed range, each inflates alone, together they are the stream.
    smap = _span_map(result, blob, len(expected))
    assert smap.span_count == len(cps)
    inflated = []
    for i in range(smap.span_count):
        sid = SpanId(i)
        c0, c1 = smap.compressed_range(sid)
        assert c0 == cps[i].in_ - (1 if cps[i].bits else 0)
        piece = blob[c0:c1]
        assert "sha256:" + hashlib.sha256(piece).hexdigest() == result.span_digests[i]
        smap.verify(sid, piece)
        data = smap.inflate(sid, piece)
        u0, u1 = smap.uncompressed_range(sid)
        assert data == expected[u0:u1]
        for step in (97, 4099):  # and while its bytes arrive, in pieces of odd sizes
            assert inflate_arriving(smap, sid, piece, step) == data
        inflated.append(data)
    assert b"".join(inflated) == expected
    return result


# ---------------------------------------------------------------------------------------------
# Building and reading


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    tar=tar_archives(),
    how=st.sampled_from(_compressors()),
    span_size=st.sampled_from(SPAN_SIZES),
    split_seed=st.integers(0, 1 << 16),
)
def test_checkpoints_and_spans_on_generated_layers(
    tar: bytes, how: Compressor, span_size: int, split_seed: int
) -> None:
    blob = compress(tar, how, split_seed)
    check_layer(blob, span_size)


@pytest.mark.parametrize("how", COMPRESSORS)
def test_every_compressor_on_a_mixed_layer(how: Compressor, span_backend: str) -> None:
    if how == "pigz" and not have_pigz():
        pytest.skip("PREREQUISITE MISSING: pigz is not installed; pigz layers untested")
    specs = [
        TarEntrySpec("a/text", size=900_000, content="text", seed=1),
        TarEntrySpec("a/random", size=300_000, content="random", seed=2),
        TarEntrySpec("a/mixed", size=700_000, content="mixed", seed=3),
        TarEntrySpec("a/zeros", size=200_000, content="zeros"),
    ]
    tar = make_tar(specs)
    for span_size in (4096, 65536):
        result = check_layer(compress(tar, how, 7), span_size)
        assert len(result.checkpoints) > 3


def test_stored_blocks_and_unaligned_checkpoints_inflate(span_backend: str) -> None:
    # Level 0 gives stored blocks only (byte aligned after their header); level 6 on mixed
    # data switches between stored and coded blocks, which leaves boundaries mid-byte.
    tar = make_tar([TarEntrySpec("m", size=3_000_000, content="mixed", seed=11)])
    stored = check_layer(compress(tar, "py0"), 4096)
    assert len(stored.checkpoints) > 10
    mixed = check_layer(compress(tar, "py6"), 4096)
    assert any(cp.bits != 0 for cp in mixed.checkpoints), "want checkpoints with bits != 0"
    # A span that starts mid-byte and contains a stored block (the case bit shifting breaks).
    sync = check_layer(compress(tar, "zlib-sync", 5), 4096)
    assert any(cp.bits != 0 for cp in sync.checkpoints)


def test_multi_member_checkpoint_after_member_header() -> None:
    part1 = content("text", 400_000, 1)
    part2 = content("text", 400_000, 2)
    member1 = gzip.compress(part1, mtime=0)
    blob = member1 + gzip.compress(part2, mtime=0)
    result, out = _build(blob, 4096)
    assert out == part1 + part2
    # The second member gets a checkpoint right after its 10-byte header.
    assert any(cp.in_ == len(member1) + 10 and cp.out == len(part1) for cp in result.checkpoints)
    check_layer(blob, 4096)


def test_first_checkpoint_after_fname_header() -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="layer.tar", mode="wb", fileobj=buf, mtime=0) as f:
        f.write(content("text", 100_000, 4))
    result = check_layer(buf.getvalue(), 65536)
    assert result.checkpoints[0].in_ == 10 + len(b"layer.tar\0")


def test_span_size_zero_checkpoints_every_block() -> None:
    blob = compress(content("mixed", 500_000, 9), "py6")
    result = check_layer(blob, 0)
    assert len(result.checkpoints) > 5


def test_output_pieces_are_bounded() -> None:
    data = content("zeros", 3_000_000, 8)
    sizes: list[int] = []
    build_gzip_checkpoints(
        io.BytesIO(gzip.compress(data)),
        1 << 20,
        lambda mv: sizes.append(len(mv)),
        output_size=1 << 16,
    )
    assert sum(sizes) == len(data)
    assert max(sizes) <= 1 << 16


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", "empty"),
        (b"not gzip at all", "corrupt"),
        (gzip.compress(b"x" * 100_000)[:-20], "truncated"),
        (gzip.compress(b"hello") + b"garbage!", "corrupt"),
        (gzip.compress(b"hello") + b"\0" * 10, "corrupt"),
    ],
)
def test_bad_gzip_is_rejected(blob: bytes, message: str) -> None:
    with pytest.raises(ZinfoBuildError, match=message):
        build_gzip_checkpoints(io.BytesIO(blob), 65536, lambda mv: None)


def test_negative_span_size_rejected() -> None:
    with pytest.raises(ZinfoBuildError):
        build_gzip_checkpoints(io.BytesIO(gzip.compress(b"x")), -1, lambda mv: None)


def test_callback_errors_propagate() -> None:
    class Stop(Exception):
        pass

    def boom(mv: memoryview) -> None:
        raise Stop

    with pytest.raises(Stop):
        build_gzip_checkpoints(io.BytesIO(gzip.compress(os.urandom(10))), 4096, boom)


# ---------------------------------------------------------------------------------------------
# Corrupt spans


def test_corrupted_span_is_detected_and_never_returned() -> None:
    data = content("text", 2_000_000, 5)
    blob = gzip.compress(data, mtime=0)
    result, _ = _build(blob, 65536)
    smap = _span_map(result, blob, len(data))
    sid = SpanId(2)
    c0, c1 = smap.compressed_range(sid)
    piece = bytearray(blob[c0:c1])
    piece[len(piece) // 2] ^= 0x40
    with pytest.raises(SpanDigestMismatch) as info:
        smap.read_span(sid, bytes(piece))
    assert info.value.span_id == sid
    assert info.value.expected == result.span_digests[2]
    # Truncated compressed bytes: wrong digest, and inflate alone reports it too.
    with pytest.raises(SpanDigestMismatch):
        smap.read_span(sid, blob[c0 : c1 - 1])
    with pytest.raises(SpanInflateError):
        smap.inflate(sid, blob[c0 : c0 + 100])


def test_arriving_input_that_stops_short_stops_the_inflation() -> None:
    """`arrived` raising (the answer broke off) ends the inflation with its exception; bytes
    that end short without it are the usual SpanInflateError."""
    tar = make_tar([TarEntrySpec("m", size=300_000, content="text", seed=3)])
    blob = compress(tar, "py6")
    result, out = _build(blob, 4096)
    smap = _span_map(result, blob, len(out))
    c0, c1 = smap.compressed_range(SpanId(0))
    buffer = bytearray(blob[c0:c1])

    class BrokeOff(Exception):
        pass

    def arrived(n: int) -> int:
        if n > 100:
            raise BrokeOff
        return 100

    with pytest.raises(BrokeOff):
        smap.inflate_arriving(SpanId(0), memoryview(buffer), arrived)
    with pytest.raises(SpanInflateError, match="ran out"):
        smap.inflate_arriving(SpanId(0), memoryview(buffer)[:100], lambda n: 100)


def test_inflate_span_bad_ids() -> None:
    data = content("text", 300_000, 5)
    blob = gzip.compress(data)
    result, _ = _build(blob, 65536)
    with pytest.raises(SpanError):
        inflate_span(result.zinfo, len(result.checkpoints), b"", len(data))
    with pytest.raises(SpanError):
        inflate_span(result.zinfo, -1, b"", len(data))


# ---------------------------------------------------------------------------------------------
# Checkpoint blob format


def _cp(in_: int, out: int, bits: int = 0, fill: int = 0) -> Checkpoint:
    return Checkpoint(CompressedOffset(in_), UncompressedOffset(out), bits, bytes([fill]) * 32768)


def test_v2_blob_layout() -> None:
    cps = [_cp(10, 0), _cp(5000, 70000, 3, 7)]
    blob = encode_gzip_zinfo(65536, cps)
    assert blob[:12] == struct.pack("<iq", 2, 65536)
    assert blob[12:29] == struct.pack("<qqB", 10, 0, 0)
    rec2 = 12 + CHECKPOINT_RECORD_SIZE
    assert blob[rec2 : rec2 + 17] == struct.pack("<qqB", 5000, 70000, 3)
    assert blob[rec2 + 17 :] == bytes([7]) * 32768
    decoded = decode_gzip_zinfo(blob)
    assert decoded == GzipZinfo(65536, tuple(cps), False)


def test_empty_blob_with_zero_checkpoints() -> None:
    blob = struct.pack("<iq", 0, DEFAULT_SPAN_SIZE)
    z = decode_gzip_zinfo(blob)
    assert z.checkpoints == () and not z.legacy_v1
    assert z.encode() == blob
    smap = GzipSpanMap(z, (), 100, 0)
    assert smap.span_count == 0
    with pytest.raises(SpanError):
        smap.span_for_offset(UncompressedOffset(0))


def test_legacy_v1_blob_is_read_and_kept_v1() -> None:
    # A 12-byte blob that says 1 checkpoint is v1: the first checkpoint is implied.
    one = struct.pack("<iq", 1, 65536)
    z = decode_gzip_zinfo(one)
    assert z.legacy_v1
    assert z.checkpoints == (_cp(10, 0),)
    assert z.encode() == one
    # Two checkpoints, one stored.
    two = struct.pack("<iq", 2, 65536) + struct.pack("<qqB", 9000, 80000, 5) + b"\x01" * 32768
    z2 = decode_gzip_zinfo(two)
    assert z2.legacy_v1
    assert z2.checkpoints == (_cp(10, 0), _cp(9000, 80000, 5, 1))
    assert z2.encode() == two
    assert encode_gzip_zinfo(65536, z2.checkpoints) != two  # v2 form differs


def test_v1_blob_reads_real_spans() -> None:
    data = content("text", 500_000, 12)
    blob = gzip.compress(data, mtime=0)  # minimal 10-byte header, as v1 assumed
    result, _ = _build(blob, 65536)
    v1 = GzipZinfo(65536, result.checkpoints, legacy_v1=True)
    decoded = decode_gzip_zinfo(v1.encode())
    assert decoded.checkpoints == result.checkpoints
    for i in range(len(decoded.checkpoints)):
        smap = GzipSpanMap(decoded, result.span_digests, len(blob), len(data))
        c0, c1 = smap.compressed_range(SpanId(i))
        u0, u1 = smap.uncompressed_range(SpanId(i))
        assert smap.read_span(SpanId(i), blob[c0:c1]) == data[u0:u1]


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x00" * 11,
        struct.pack("<iq", 255, 65536),  # claims 255 checkpoints, has none
        struct.pack("<iq", -1, 65536),
        struct.pack("<iq", 2, 65536) + b"\x00" * 100,
        struct.pack("<iq", 1, 65536) + b"\x00" * (CHECKPOINT_RECORD_SIZE + 1),
        struct.pack("<iq", 1, 65536) + struct.pack("<qqB", 10, 0, 8) + bytes(32768),
        struct.pack("<iq", 2, 65536)
        + struct.pack("<qqB", 100, 5000, 0)
        + bytes(32768)
        + struct.pack("<qqB", 50, 4000, 0)
        + bytes(32768),
    ],
)
def test_bad_blobs_rejected(blob: bytes) -> None:
    with pytest.raises(ZinfoFormatError):
        decode_gzip_zinfo(blob)


def test_encode_rejects_bad_checkpoints() -> None:
    with pytest.raises(ZinfoFormatError):
        encode_gzip_zinfo(1, [Checkpoint(CompressedOffset(10), UncompressedOffset(0), 0, b"x")])
    with pytest.raises(ZinfoFormatError):
        encode_gzip_zinfo(1, [_cp(10, 0, bits=9)])
    with pytest.raises(ZinfoFormatError):
        encode_gzip_zinfo(1, [], legacy_v1=True)


# ---------------------------------------------------------------------------------------------
# TarZinfo


def test_tar_zinfo_matches_go_builder_bytes() -> None:
    z = TarZinfo(span_size=4194304, size=10_000_000)
    blob = encode_tar_zinfo(z)
    # Same calls as the Go code: StartObject(3), slots 0,1,2, EndObject, Finish.
    b = flatbuffers.Builder(0)
    b.StartObject(3)
    b.PrependInt32Slot(0, 2, 0)
    b.PrependInt64Slot(1, 4194304, 0)
    b.PrependInt64Slot(2, 10_000_000, 0)
    b.Finish(b.EndObject())
    assert blob == bytes(b.Output())
    assert decode_tar_zinfo(blob) == z


@pytest.mark.parametrize(
    "z", [TarZinfo(1, 0), TarZinfo(0, 0, 0), TarZinfo(1 << 40, 3), TarZinfo(512, 1 << 33)]
)
def test_tar_zinfo_round_trip_and_zero_omission(z: TarZinfo) -> None:
    blob = z.encode()
    assert decode_tar_zinfo(blob) == z
    full = TarZinfo(7, 9, 5).encode()
    if z.size == 0:
        assert len(blob) < len(full)


@pytest.mark.parametrize("blob", [b"", b"\x04\x00\x00", b"\xff\xff\xff\x00" + b"\x00" * 20])
def test_tar_zinfo_truncated(blob: bytes) -> None:
    with pytest.raises(ZinfoFormatError):
        decode_tar_zinfo(blob)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096, 50_000])
def test_tar_spans(size: int) -> None:
    data = os.urandom(size)
    seen: list[bytes] = []
    r = build_tar_spans(io.BytesIO(data), 4096, lambda mv: seen.append(bytes(mv)), read_size=3000)
    assert b"".join(seen) == data
    assert r.size == size
    n = -(-size // 4096)
    assert len(r.span_digests) == n
    info = CompressionInfo(
        CompressionAlgorithm.UNCOMPRESSED, SpanId(n - 1), r.span_digests, r.zinfo.encode()
    )
    smap = SpanMap.from_compression_info(info, size, size)
    assert isinstance(smap, TarSpanMap)
    assert smap.span_count == n
    for i in range(n):
        c0, c1 = smap.compressed_range(SpanId(i))
        assert (c0, c1) == (i * 4096, min(size, (i + 1) * 4096))
        assert r.span_digests[i] == "sha256:" + hashlib.sha256(data[c0:c1]).hexdigest()
        assert smap.read_span(SpanId(i), data[c0:c1]) == data[c0:c1]
    if n:
        assert smap.span_for_offset(UncompressedOffset(size)) == n - 1
        bad = bytearray(data[:1] or b"\0")
        bad[0] ^= 1
        with pytest.raises(SpanDigestMismatch):
            smap.verify(SpanId(0), bytes(bad) + data[1 : min(size, 4096)])


def test_tar_spans_need_positive_span_size() -> None:
    with pytest.raises(ZinfoBuildError):
        build_tar_spans(io.BytesIO(b"x"), 0, lambda mv: None)


# ---------------------------------------------------------------------------------------------
# Span lookup


def test_span_lookup_and_ranges() -> None:
    cps = (_cp(10, 0), _cp(100, 1000, 2), _cp(200, 2500))
    z = GzipZinfo(512, cps)
    smap = GzipSpanMap(z, ("a", "b", "c"), 300, 4000)
    assert smap.compressed_range(SpanId(0)) == (10, 100)
    assert smap.compressed_range(SpanId(1)) == (99, 200)  # one byte back for bits != 0
    assert smap.compressed_range(SpanId(2)) == (200, 300)
    assert smap.uncompressed_range(SpanId(2)) == (2500, 4000)
    assert [
        smap.span_for_offset(UncompressedOffset(o)) for o in (0, 999, 1000, 2499, 2500, 4000)
    ] == [
        0,
        0,
        1,
        1,
        2,
        2,
    ]
    assert list(smap.spans_for_range(UncompressedOffset(500), 500)) == [0]
    assert list(smap.soci_spans_for_range(UncompressedOffset(500), 500)) == [0, 1]
    assert list(smap.spans_for_range(UncompressedOffset(999), 2)) == [0, 1]
    assert list(smap.spans_for_range(UncompressedOffset(0), 0)) == []
    assert list(smap.spans_for_range(UncompressedOffset(0), 4000)) == [0, 1, 2]
    with pytest.raises(SpanError):
        smap.span_for_offset(UncompressedOffset(4001))
    with pytest.raises(SpanError):
        smap.compressed_range(SpanId(3))
    with pytest.raises(SpanError):
        smap.spans_for_range(UncompressedOffset(3999), 5)


def test_span_map_rejects_inconsistent_info() -> None:
    blob = encode_gzip_zinfo(1, [_cp(10, 0)])
    with pytest.raises(ZinfoFormatError):
        SpanMap.from_compression_info(
            CompressionInfo(CompressionAlgorithm.GZIP, SpanId(0), (), blob), 100, 100
        )
    with pytest.raises(ZinfoFormatError):
        SpanMap.from_compression_info(
            CompressionInfo(CompressionAlgorithm.GZIP, SpanId(3), ("sha256:x",), blob), 100, 100
        )


# ---------------------------------------------------------------------------------------------
# ctypes binding


def test_stream_layouts_and_backends() -> None:
    assert ctypes.sizeof(zc.ZStream) == 112
    assert ctypes.sizeof(zc.ZngStream) == 104
    system = zc.system_backend()
    assert system.name == f"zlib {zlib.ZLIB_RUNTIME_VERSION}"
    # zlib-ng is a dependency: spans inflate with it, and it passes the self-test
    assert zc.backend().name.startswith("zlib-ng "), zc.backend().name
    assert zc._works(zc.backend()) and zc._works(system)


def test_the_environment_forces_the_system_libz(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zc, "_backend", None)
    monkeypatch.setenv(zc.ENV_BACKEND, "system")
    assert zc.backend() is zc.system_backend()


@pytest.fixture(params=["zlib-ng", "system"])
def span_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Spans inflated with each library (checkpoints are always built with the system's)."""
    if request.param == "system":
        monkeypatch.setattr(zc, "_backend", zc.system_backend())
    assert zc.backend().name.startswith("zlib-ng" if request.param == "zlib-ng" else "zlib 1")
    return str(request.param)


def test_inflater_errors_are_typed() -> None:
    with pytest.raises(zc.ZlibError):
        zc.Inflater(99)
    inf = zc.Inflater(zc.WBITS_RAW)
    inf.close()
    inf.close()
    with pytest.raises(zc.ZlibError, match="closed"):
        inf.reset2(zc.WBITS_RAW)


def test_inflate_releases_the_gil() -> None:
    # Layers build in parallel threads only if libz runs without the GIL (ctypes.CDLL does
    # this; PyDLL would not). One long inflate call in a thread; the main thread must run
    # Python code while that call is in progress.
    import threading
    import time

    data = content("text", 1_000_000, 21) * 20
    comp = zlib.compress(data, 1)
    out = (ctypes.c_char * len(data))()
    inf = zc.Inflater(15)  # zlib header
    inf.set_input(ctypes.cast(ctypes.c_char_p(comp), ctypes.c_void_p).value or 0, len(comp))
    inf.set_output(ctypes.addressof(out), len(data))
    window: list[float] = []
    started = threading.Event()

    def run() -> None:
        started.set()
        window.append(time.perf_counter())
        assert inf.inflate(zc.Z_FINISH) == zc.Z_STREAM_END
        window.append(time.perf_counter())

    thread = threading.Thread(target=run)
    thread.start()
    started.wait()
    ticks: list[float] = []
    while thread.is_alive():
        ticks.append(time.perf_counter())
    thread.join()
    inf.close()
    assert out.raw == data
    t0, t1 = window
    margin = (t1 - t0) * 0.2
    during = [t for t in ticks if t0 + margin < t < t1 - margin]
    assert len(during) > 100, f"main thread ran {len(during)} times in a {t1 - t0:.3f} s C call"
