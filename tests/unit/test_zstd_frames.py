"""zstd zTOCs: frame walking, kinds, the checkpoint blob, spans, and the build's refusals.

Layers come from `tests.support.zstdimages`: zstd:chunked and plain zstd written by Debian's
skopeo, seekable and multi-frame written here. Every regular file of every indexed layer is
read back through its spans and compared with the tar."""

from __future__ import annotations

import io
import json
import shutil
import struct
import tarfile
from pathlib import Path

import pytest
import zstandard

from index.builder import LayerBuildError, LayerSkipped, build_ztoc, describe_compression
from index.model import CompressionAlgorithm, EntryType, Ztoc
from index.toc import TocBuilder
from index.zinfo import SpanDigestMismatch, SpanInflateError, SpanMap, ZinfoFormatError, assemble
from index.zstd_frames import (
    ZstdFormatError,
    ZstdKind,
    ZstdSpanMap,
    ZstdZinfo,
    classify,
    decode_zstd_zinfo,
    scan_frames,
)
from index.ztoc_codec import decode_ztoc, encode_ztoc
from tests.support import images, zstdimages
from tests.support.images import Dir, File, Hardlink, Symlink

ZSTD = images.MEDIA_LAYER_ZSTD
SPAN = 512 * 1024


def _spec() -> list[images.Entry]:
    return [
        Dir(path="data"),
        File(path="data/random.bin", size=1_500_000),
        File(path="data/text.txt", data=b"a line of text that repeats\n" * 40_000),
        File(path="data/zeros", data=bytes(700_000)),
        File(path="data/empty"),
        Symlink(path="data/ln", target="text.txt"),
        Hardlink(path="data/hl", target="data/text.txt"),
        File(path="etc/x", data=b"x", xattrs=(("user.k", "v"),)),
    ]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zstd")


@pytest.fixture(scope="module")
def tar(work: Path) -> bytes:
    return zstdimages.unpadded_tar(_spec(), work / "scratch")


@pytest.fixture(scope="module")
def skopeo_layers(work: Path, tar: bytes) -> dict[str, zstdimages.ZstdLayer]:
    if shutil.which("skopeo") is None:
        pytest.fail("skopeo is part of the test machine (scripts/setup.sh)")
    out = {}
    for fmt in ("zstd:chunked", "zstd"):
        d = work / fmt.replace(":", "-")
        d.mkdir()
        [out[fmt]] = zstdimages.chunked_layers([tar], d, fmt)
    return out


def _gzip_entries(tar: bytes) -> tuple[list[object], int]:
    toc = TocBuilder()
    toc.feed(tar)
    entries, size = toc.finish()
    return list(entries), size


def _check_reads(ztoc: Ztoc, blob: bytes, tar: bytes) -> None:
    spans = SpanMap.from_ztoc(decode_ztoc(encode_ztoc(ztoc)))
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        regular = [f for f in ztoc.files if f.type is EntryType.REG]
        assert len(regular) >= 4
        for f in regular:
            slices = spans.slices_for_range(f.uncompressed_offset, f.uncompressed_size)
            parts = [
                spans.read_span(s.span, blob[slice(*spans.compressed_range(s.span))])
                for s in slices
            ]
            member = tf.extractfile(f.name)
            assert member is not None
            assert assemble(slices, parts) == member.read(), f.name


def test_skopeo_zstd_chunked_is_indexed_with_the_tar_toc(
    skopeo_layers: dict[str, zstdimages.ZstdLayer], tar: bytes
) -> None:
    layer = skopeo_layers["zstd:chunked"]
    # Debian 12's skopeo: the old annotation names, the 40-byte footer.
    assert "io.containers.zstd-chunked.manifest-position" in layer.annotations
    blob = layer.path.read_bytes()
    assert blob[-8:] == b"GnUlInUx"
    ztoc = build_ztoc(
        layer.path, ZSTD, SPAN, zstd=True, annotations=layer.annotations, diff_id=layer.diff_id
    )
    assert ztoc.compression.algorithm is CompressionAlgorithm.ZSTD
    assert describe_compression(ztoc.compression) == "zstd:chunked"
    entries, size = _gzip_entries(tar)
    assert list(ztoc.files) == entries and ztoc.uncompressed_archive_size == size
    zinfo = decode_zstd_zinfo(ztoc.compression.checkpoints)
    assert zinfo.kind is ZstdKind.CHUNKED and zinfo.span_size == SPAN
    assert 4 <= zinfo.span_count == len(ztoc.compression.span_digests)
    # The last span ends where the TOC's skippable frame starts, not at the blob end.
    toc_offset = int(
        layer.annotations["io.containers.zstd-chunked.manifest-position"].split(":")[0]
    )
    assert zinfo.boundaries[-1] == (toc_offset - 8, len(tar))
    _check_reads(ztoc, blob, tar)


def test_newer_annotation_names_and_footer_also_work(
    skopeo_layers: dict[str, zstdimages.ZstdLayer], tar: bytes
) -> None:
    layer = skopeo_layers["zstd:chunked"]
    renamed = {
        k.replace("io.containers.", "io.github.containers."): v
        for k, v in layer.annotations.items()
    }
    blob = layer.path.read_bytes()
    frames = scan_frames(blob)
    assert classify(blob, frames, renamed) is ZstdKind.CHUNKED
    assert classify(blob, frames, {}) is ZstdKind.CHUNKED  # found by its footer alone
    # A 64-byte v1.50+ footer (new magic) in place of the 40-byte one.
    old = frames[-1]
    offset, length, ulength, kind = struct.unpack_from("<QQQQ", blob, old.start + 8)
    payload = struct.pack("<QQQQQQQ", offset, length, ulength, kind, 0, 0, 0) + b"GNUlInUx"
    new_blob = blob[: old.start] + struct.pack("<II", 0x184D2A50, 64) + payload
    assert classify(new_blob, scan_frames(new_blob), {}) is ZstdKind.CHUNKED


def test_chunked_annotations_that_lie_fail_the_layer(
    skopeo_layers: dict[str, zstdimages.ZstdLayer], tmp_path: Path
) -> None:
    layer = skopeo_layers["zstd:chunked"]
    key = "io.containers.zstd-chunked.manifest-checksum"
    wrong = {**layer.annotations, key: "sha256:" + "0" * 64}
    with pytest.raises(LayerBuildError, match="manifest-checksum"):
        build_ztoc(layer.path, ZSTD, SPAN, zstd=True, annotations=wrong)
    pos = "io.containers.zstd-chunked.manifest-position"
    moved = {**layer.annotations, pos: "12:34:56:1"}
    with pytest.raises(LayerBuildError, match="names no skippable frame"):
        build_ztoc(layer.path, ZSTD, SPAN, zstd=True, annotations=moved)


def test_plain_zstd_from_skopeo_is_one_frame_and_skipped(
    skopeo_layers: dict[str, zstdimages.ZstdLayer],
) -> None:
    layer = skopeo_layers["zstd"]
    assert sum(not f.skippable for f in scan_frames(layer.path.read_bytes())) == 1
    with pytest.raises(LayerSkipped, match="plain zstd"):
        build_ztoc(layer.path, ZSTD, SPAN, zstd=True, diff_id=layer.diff_id)
    # Without zstd=True no zstd layer is looked at.
    with pytest.raises(LayerSkipped, match="unsupported format"):
        build_ztoc(skopeo_layers["zstd:chunked"].path, ZSTD, SPAN)


@pytest.mark.parametrize(
    ("kind", "label"),
    [
        ("seekable", "seekable zstd"),
        ("multi-frame", "multi-frame zstd"),
        ("pzstd", "multi-frame zstd"),
    ],
)
def test_hand_made_multi_frame_layers(tar: bytes, tmp_path: Path, kind: str, label: str) -> None:
    layer = zstdimages.hand_layer(tar, tmp_path, kind, frame_size=100_000)  # type: ignore[arg-type]
    ztoc = build_ztoc(layer.path, ZSTD, SPAN, zstd=True, diff_id=layer.diff_id)
    assert describe_compression(ztoc.compression) == label
    entries, size = _gzip_entries(tar)
    assert list(ztoc.files) == entries and ztoc.uncompressed_archive_size == size
    zinfo = decode_zstd_zinfo(ztoc.compression.checkpoints)
    # Spans are runs of whole frames: every boundary but the last is a multiple of the frame
    # input size, and each span holds at least SPAN bytes (the last may hold fewer).
    lengths = [b[1] - a[1] for a, b in zip(zinfo.boundaries, zinfo.boundaries[1:], strict=False)]
    assert all(u % 100_000 == 0 for _, u in zinfo.boundaries[:-1])
    assert all(n >= SPAN for n in lengths[:-1]) and sum(lengths) == len(tar)
    _check_reads(ztoc, layer.path.read_bytes(), tar)


def test_seek_table_that_disagrees_fails(tar: bytes, tmp_path: Path) -> None:
    blob = bytearray(zstdimages.seekable_blob(tar, 100_000, checksums=False))
    # Entry 0's decompressed size, 9 + 8*n bytes before the end.
    frames = scan_frames(bytes(blob))
    table_start = frames[-1].start + 8
    struct.pack_into("<I", blob, table_start + 4, 99_999)
    path = tmp_path / "bad.zst"
    path.write_bytes(bytes(blob))
    with pytest.raises(LayerBuildError, match="seek table"):
        build_ztoc(path, ZSTD, SPAN, zstd=True)
    struct.pack_into("<I", blob, table_start, 5)  # and a compressed size
    path.write_bytes(bytes(blob))
    with pytest.raises(LayerBuildError, match="seek table"):
        build_ztoc(path, ZSTD, SPAN, zstd=True)


def test_diff_id_mismatch_and_corrupt_blobs_fail(tar: bytes, tmp_path: Path) -> None:
    layer = zstdimages.hand_layer(tar, tmp_path, "multi-frame", frame_size=200_000)
    with pytest.raises(LayerBuildError, match="image config says"):
        build_ztoc(layer.path, ZSTD, SPAN, zstd=True, diff_id="sha256:" + "1" * 64)
    # Frames without checksums decode corrupt bytes to other bytes: the diffID catches it.
    blob = bytearray(layer.path.read_bytes())
    frames = scan_frames(bytes(blob))
    blob[frames[2].start + 40] ^= 0xFF
    bad = tmp_path / "bad.zst"
    bad.write_bytes(bytes(blob))
    with pytest.raises(LayerBuildError):
        build_ztoc(bad, ZSTD, SPAN, zstd=True, diff_id=layer.diff_id)
    # Frames with checksums (the seekable writer here, skopeo) fail on their own.
    seekable = bytearray(zstdimages.seekable_blob(tar, 200_000))
    seekable[scan_frames(bytes(seekable))[2].start + 40] ^= 0xFF
    bad.write_bytes(bytes(seekable))
    with pytest.raises(LayerBuildError, match="cannot index") as err:
        build_ztoc(bad, ZSTD, SPAN, zstd=True)
    assert err.value.__cause__ is not None
    for junk in (b"", b"not zstd at all", bytes(blob[:-10])):
        bad.write_bytes(junk)
        with pytest.raises(LayerBuildError):
            build_ztoc(bad, ZSTD, SPAN, zstd=True)


def test_span_reads_check_digests_and_lengths(tar: bytes, tmp_path: Path) -> None:
    layer = zstdimages.hand_layer(tar, tmp_path, "seekable", frame_size=150_000)
    ztoc = build_ztoc(layer.path, ZSTD, SPAN, zstd=True)
    spans = SpanMap.from_ztoc(ztoc)
    assert isinstance(spans, ZstdSpanMap)
    blob = layer.path.read_bytes()
    start, end = spans.compressed_range(spans.span_for_offset(ztoc.files[2].uncompressed_offset))
    good = blob[start:end]
    span_id = spans.span_for_offset(ztoc.files[2].uncompressed_offset)
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 1
    with pytest.raises(SpanDigestMismatch):
        spans.read_span(span_id, bytes(bad))
    with pytest.raises(SpanInflateError):  # unverified inflate of corrupt frames still fails
        spans.inflate(span_id, bytes(bad))
    with pytest.raises(SpanInflateError):
        spans.inflate(span_id, good[: len(good) // 2])
    # Whole frames that decode to more than the span: refused, not cut.
    with pytest.raises(SpanInflateError, match="decodes to"):
        spans.inflate(span_id, good + good)


def test_zinfo_blob_round_trip_and_refusals() -> None:
    z = ZstdZinfo(ZstdKind.SEEKABLE, 4096, ((10, 0), (500, 5000), (900, 9000)))
    data = z.encode()
    assert len(data) == 16 + 3 * 16
    assert decode_zstd_zinfo(data) == z
    for broken in (
        data[:-1],
        b"\x02" + data[1:],  # version
        data[:1] + b"\x09" + data[2:],  # kind
        data[:16] + struct.pack("<qq", 10, 0) * 3,  # boundaries that do not increase
    ):
        with pytest.raises(ZinfoFormatError):
            decode_zstd_zinfo(broken)
    with pytest.raises(ZstdFormatError):
        scan_frames(b"")


def test_skippable_frames_inside_a_span_are_skipped(tmp_path: Path) -> None:
    """A pzstd-like layer: every frame follows a skippable frame; the first span starts at the
    first regular frame and the others carry the skippable frames inside them."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(8):
            data = bytes([i]) * 90_000
            info = tarfile.TarInfo(f"f{i}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    tar = raw.getvalue()
    blob = zstdimages.multi_frame_blob(tar, 50_000, pzstd_headers=True)
    path = tmp_path / "p.zst"
    path.write_bytes(blob)
    ztoc = build_ztoc(path, ZSTD, 100_000, zstd=True)
    zinfo = decode_zstd_zinfo(ztoc.compression.checkpoints)
    assert zinfo.boundaries[0][0] == 12  # after the first 12-byte skippable frame
    assert zinfo.span_count >= 3
    _check_reads(ztoc, blob, tar)
    assert json.loads(json.dumps(zinfo.boundaries))  # plain ints
    assert zstandard.ZstdDecompressor().stream_reader(blob).read() == tar
