"""Binary formats a registry hands the daemon: zTOC bytes and the checkpoint blobs in them.

A damaged zTOC goes the way the daemon takes it (`decode_ztoc` → `SpanMap.from_ztoc` →
`build_tree`, `remote/trees.py`, then every call the FUSE host makes on the tree) and meets
only the documented errors on the way: `ZtocFormatError`, `ZinfoError`, `FsError`
(`TreeBuildError` and the tree's lookups). A damaged checkpoint blob (gzip zinfo or TarZinfo)
meets `ZinfoFormatError`; a span map built from one answers ranges and lookups or raises
`SpanError`. Valid samples round-trip byte for byte.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import stat
import tarfile
import zlib
from functools import cache

from hypothesis import example, given
from hypothesis import strategies as st

from index.builder import build_ztoc_from_stream
from index.model import (
    CompressionAlgorithm,
    CompressionInfo,
    EntryType,
    FileMetadata,
    SpanId,
    UncompressedOffset,
    Ztoc,
)
from index.zinfo import (
    SpanError,
    SpanMap,
    TarZinfo,
    ZinfoError,
    ZinfoFormatError,
    decode_gzip_zinfo,
    decode_tar_zinfo,
    encode_tar_zinfo,
)
from index.ztoc_codec import ZtocEncodeError, ZtocFormatError, decode_ztoc, encode_ztoc
from snapshotter.fs.errors import FsError
from snapshotter.fs.tree import ROOT_NODE, LayerTree, build_tree
from tests.fuzz.strategies import fuzz_settings, mutated_bytes
from tests.support.tarfixtures import content, member, members_tar

SPAN_SIZE = 4096


@cache
def sample_layer() -> tuple[bytes, Ztoc]:
    """A small gzip layer with every entry type and several spans, and its zTOC."""
    members = [
        (member("d", tarfile.DIRTYPE), b""),
        (member("d/a.txt"), content("text", 20000, 1)),
        (member("d/b.bin"), content("random", 9000, 2)),
        (member("d/link", tarfile.LNKTYPE, linkname="d/a.txt"), b""),
        (member("d/sym", tarfile.SYMTYPE, linkname="a.txt"), b""),
        (member("d/fifo", tarfile.FIFOTYPE), b""),
        (member("d/null", tarfile.CHRTYPE, devmajor=1, devminor=3), b""),
        (member("d/.wh.gone"), b""),
        (member("e/.wh..wh..opq"), b""),
        (member("e/x", pax_headers={"SCHILY.xattr.user.k": "v"}), content("mixed", 30000, 3)),
    ]
    # memLevel 1: deflate blocks of a few hundred symbols, so the layer has many checkpoints.
    z = zlib.compressobj(6, zlib.DEFLATED, 31, memLevel=1)
    blob = z.compress(members_tar(members)) + z.flush()
    ztoc = build_ztoc_from_stream(io.BytesIO(blob), CompressionAlgorithm.GZIP, SPAN_SIZE)
    return blob, ztoc


def sample_ztoc_bytes() -> bytes:
    return encode_ztoc(sample_layer()[1])


def test_sample_round_trips() -> None:
    blob, ztoc = sample_layer()
    data = encode_ztoc(ztoc)
    assert decode_ztoc(data) == ztoc
    assert encode_ztoc(decode_ztoc(data)) == data
    span_map = SpanMap.from_ztoc(ztoc)
    assert span_map.span_count >= 4
    assert decode_gzip_zinfo(ztoc.compression.checkpoints).encode() == ztoc.compression.checkpoints
    # Every span of the real blob verifies and inflates to its stated length.
    stream = gzip.decompress(blob)
    for i in range(span_map.span_count):
        span = SpanId(i)
        start, end = span_map.compressed_range(span)
        lo, hi = span_map.uncompressed_range(span)
        assert span_map.read_span(span, blob[start:end]) == stream[lo:hi]
    tree = build_tree(ztoc.files)
    assert tree.lookup(ROOT_NODE, b"d") != ROOT_NODE


def _through_the_daemon(data: bytes) -> None:
    """What the daemon does with zTOC bytes before a layer is served; raises only the
    documented errors."""
    ztoc = decode_ztoc(data)
    span_map = SpanMap.from_ztoc(ztoc)
    _walk(build_tree(ztoc.files), span_map)
    for span in range(min(span_map.span_count, 8)):
        try:
            span_map.compressed_range(SpanId(span))
            span_map.uncompressed_range(SpanId(span))
        except SpanError:
            pass
    for offset in (0, ztoc.uncompressed_archive_size // 2, ztoc.uncompressed_archive_size):
        with contextlib.suppress(SpanError):
            span_map.slices_for_range(UncompressedOffset(offset), 4096)


def _walk(tree: LayerTree, span_map: SpanMap) -> None:
    """Every call the FUSE host makes on a layer tree, on every node (`FsError`s aside), and
    the span slices a read of each file takes (`SpanError` aside)."""
    todo = [ROOT_NODE]
    seen = 0
    while todo and seen < 200:
        node = todo.pop()
        seen += 1
        attr = tree.attr(node)
        tree.path_of(node)
        tree.header_attr(node)
        for name in tree.listxattr(node):
            tree.getxattr(node, name)
        if stat.S_ISLNK(attr.mode):
            tree.readlink(node)
        if stat.S_ISDIR(attr.mode):
            for entry in tree.readdir(node):
                assert tree.lookup(node, entry.name) == entry.node
                todo.append(entry.node)
        elif stat.S_ISREG(attr.mode):
            offset, size = tree.data_range(node)
            with contextlib.suppress(SpanError):
                span_map.slices_for_range(offset, min(size, 1 << 20))


@fuzz_settings(300)
@given(st.deferred(lambda: mutated_bytes(sample_ztoc_bytes())))
def test_damaged_ztoc_meets_documented_errors(damaged: bytes) -> None:
    with contextlib.suppress(ZtocFormatError, ZinfoError, FsError):
        _through_the_daemon(damaged)


@fuzz_settings(100)
@given(st.binary(max_size=2048))
def test_random_bytes_as_ztoc(data: bytes) -> None:
    with contextlib.suppress(ZtocFormatError, ZinfoError, FsError):
        _through_the_daemon(data)


def _use_span_map(info: CompressionInfo, compressed: int, uncompressed: int) -> None:
    span_map = SpanMap.from_compression_info(info, compressed, uncompressed)
    for span in range(min(span_map.span_count, 6)):
        try:
            span_map.compressed_range(SpanId(span))
            span_map.uncompressed_range(SpanId(span))
            span_map.span_for_offset(UncompressedOffset(span * SPAN_SIZE))
        except SpanError:
            pass


@fuzz_settings(250)
@given(st.deferred(lambda: mutated_bytes(sample_layer()[1].compression.checkpoints, max_ops=3)))
def test_damaged_gzip_checkpoints(blob: bytes) -> None:
    ztoc = sample_layer()[1]
    try:
        zinfo = decode_gzip_zinfo(blob)
    except ZinfoFormatError:
        return
    assert decode_gzip_zinfo(zinfo.encode()) == zinfo
    count = len(zinfo.checkpoints)
    info = CompressionInfo(
        CompressionAlgorithm.GZIP,
        SpanId(count - 1),
        tuple(f"sha256:{i:064x}" for i in range(count)),
        blob,
    )
    with contextlib.suppress(ZinfoError):
        _use_span_map(info, ztoc.compressed_archive_size, ztoc.uncompressed_archive_size)


TAR_ZINFO_SAMPLE = encode_tar_zinfo(TarZinfo(span_size=SPAN_SIZE, size=50000))


@fuzz_settings(200)
@example(b"\x00\x00\x00\x00")
@example(b"\x08\x00\x00\x00\xfc\xff\xff\xff")
@given(mutated_bytes(TAR_ZINFO_SAMPLE))
def test_damaged_tar_zinfo(blob: bytes) -> None:
    try:
        tar = decode_tar_zinfo(blob)
    except ZinfoFormatError:
        return
    assert decode_tar_zinfo(encode_tar_zinfo(tar)) == tar
    try:
        count = 0 if tar.size == 0 else tar.span_count
    except SpanError:
        return
    if count > 1000:
        return
    info = CompressionInfo(
        CompressionAlgorithm.UNCOMPRESSED,
        SpanId(count - 1),
        tuple(f"sha256:{i:064x}" for i in range(count)),
        blob,
    )
    with contextlib.suppress(ZinfoError):
        _use_span_map(info, tar.size, tar.size)


@fuzz_settings(150)
@given(
    st.integers(1, 1 << 40),
    st.integers(0, 1 << 50),
    st.integers(0, (1 << 31) - 1),
)
def test_tar_zinfo_round_trips(span_size: int, size: int, version: int) -> None:
    tar = TarZinfo(span_size=span_size, size=size, version=version)
    assert decode_tar_zinfo(encode_tar_zinfo(tar)) == tar


_NAMES = st.lists(
    st.sampled_from(("a", "b", "..", ".", "", "c", ".wh.a", ".wh..wh..opq", "é")),
    min_size=1,
    max_size=4,
).map("/".join)


@st.composite
def odd_ztocs(draw: st.DrawFn) -> Ztoc:
    """zTOCs that encode fine but describe odd layers: `..` and duplicate names, links to
    themselves or to nothing, negative and huge sizes and modes, odd times and PAX records."""
    files = []
    offset = 512
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(list(EntryType)))
        size = draw(st.sampled_from((0, 1, 511, 4096, -1, 1 << 40, -(1 << 62))))
        files.append(
            FileMetadata(
                name=draw(_NAMES),
                type=kind,
                uncompressed_offset=UncompressedOffset(offset),
                uncompressed_size=size,
                linkname=draw(st.one_of(_NAMES, st.sampled_from(("/etc", "")))),
                mode=draw(st.sampled_from((0o644, 0o40755, 0o120777, -1, 1 << 40, 0o7777))),
                uid=draw(st.sampled_from((0, 1000, (1 << 32) - 1))),
                gid=draw(st.sampled_from((0, 1000, (1 << 32) - 1))),
                mod_time=draw(
                    st.sampled_from(
                        ("", "2024-01-02T03:04:05.5Z", "0001-01-01T00:00:00Z", "garbage")
                    )
                ),
                devmajor=draw(st.sampled_from((0, 1, -1, 1 << 40))),
                devminor=draw(st.sampled_from((0, 3, -1))),
                xattrs=draw(
                    st.sampled_from(
                        (
                            {},
                            {"SCHILY.xattr.user.k": "v"},
                            {"SCHILY.xattr.trusted.overlay.opaque": "y"},
                            {"mtime": "1.5.5", "atime": "-3"},
                            {"SCHILY.xattr.": ""},
                        )
                    )
                ),
            )
        )
        # Huge sizes are claimed, not laid out: the stream (and its span list) stays small.
        offset += 512 * draw(st.integers(1, 4)) + min(max(size, 0), 8192) // 512 * 512
    size = draw(st.sampled_from((offset, offset + 1024, 0)))
    spans = -(-size // SPAN_SIZE)
    return Ztoc(
        version="0.9",
        build_tool_identifier="fuzz",
        compressed_archive_size=size,
        uncompressed_archive_size=size,
        files=tuple(files),
        compression=CompressionInfo(  # an uncompressed layer: a small checkpoint blob
            CompressionAlgorithm.UNCOMPRESSED,
            SpanId(spans - 1),
            tuple(f"sha256:{i:064x}" for i in range(spans)),
            encode_tar_zinfo(TarZinfo(span_size=SPAN_SIZE, size=size)),
        ),
    )


def _one_file(devmajor: int) -> Ztoc:
    entry = FileMetadata("a", EntryType.REG, UncompressedOffset(512), 0, devmajor=devmajor)
    return Ztoc(
        version="0.9",
        build_tool_identifier="fuzz",
        compressed_archive_size=1024,
        uncompressed_archive_size=1024,
        files=(entry,),
        compression=CompressionInfo(
            CompressionAlgorithm.UNCOMPRESSED,
            SpanId(0),
            ("sha256:" + "0" * 64,),
            encode_tar_zinfo(TarZinfo(span_size=SPAN_SIZE, size=1024)),
        ),
    )


@fuzz_settings(300)
@example(_one_file(1 << 40))  # os.makedev's OverflowError leaked out of build_tree
@example(_one_file(-1))  # a negative rdev did not fit the node array
@given(odd_ztocs())
def test_odd_but_encodable_ztocs(ztoc: Ztoc) -> None:
    try:
        data = encode_ztoc(ztoc)
    except ZtocEncodeError:
        return
    with contextlib.suppress(ZtocFormatError, ZinfoError, FsError):
        _through_the_daemon(data)
