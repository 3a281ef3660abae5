"""The one-pass layer builder (index.builder): zTOC fields, media types, errors, parallel builds."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from index import builder
from index.builder import (
    LayerBuildError,
    LayerJob,
    LayerOutcome,
    LayerSkipped,
    NotALayer,
    algorithm_for_media_type,
    build_ztoc,
    build_ztocs_parallel,
)
from index.extract import extract_file
from index.model import (
    BUILD_TOOL_IDENTIFIER,
    ZTOC_VERSION,
    CompressionAlgorithm,
    EntryType,
)
from index.toc import UnsupportedTarEntry
from index.zinfo import (
    SpanMap,
    TarZinfo,
    build_gzip_checkpoints,
    decode_gzip_zinfo,
    decode_tar_zinfo,
)
from index.ztoc_codec import decode_ztoc, encode_ztoc
from tests.support.tarfixtures import TarEntrySpec, compress, make_tar

GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_GZ = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

SPECS = [
    TarEntrySpec("app/", "dir"),
    TarEntrySpec("app/bin", size=600_000, content="mixed", seed=1),
    TarEntrySpec("app/doc.txt", size=900_000, content="text", seed=2),
    TarEntrySpec("app/link", "symlink", target="bin"),
    TarEntrySpec("app/hard", "hardlink", target="app/bin"),
    TarEntrySpec("app/empty"),
    TarEntrySpec("dev/null", "char"),
    TarEntrySpec("app/" + "deep/" * 30 + "file", size=3000, content="text", seed=3),
]


@pytest.fixture(scope="module")
def tar_bytes() -> bytes:
    return make_tar(SPECS)


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("media_type", "algorithm"),
    [
        (GZ, CompressionAlgorithm.GZIP),
        (DOCKER_GZ, CompressionAlgorithm.GZIP),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", CompressionAlgorithm.GZIP),
        ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", CompressionAlgorithm.GZIP),
        (OCI_TAR, CompressionAlgorithm.UNCOMPRESSED),
        (DOCKER_TAR, CompressionAlgorithm.UNCOMPRESSED),
    ],
)
def test_media_type_mapping(media_type: str, algorithm: CompressionAlgorithm) -> None:
    assert algorithm_for_media_type(media_type) == algorithm


def test_zstd_is_skipped_and_non_layers_fail() -> None:
    with pytest.raises(LayerSkipped, match=r"ztoc skipped - layer sha256:abc \(.*zstd\)"):
        algorithm_for_media_type(ZSTD, name="sha256:abc")
    with pytest.raises(NotALayer, match="not a layer mediaType"):
        algorithm_for_media_type("application/vnd.oci.image.config.v1+json")


def test_gzip_layer_ztoc(tmp_path: Path, tar_bytes: bytes) -> None:
    blob = compress(tar_bytes, "py6")
    path = _write(tmp_path, "layer.tar.gz", blob)
    ztoc = build_ztoc(path, GZ, 65536)

    assert ztoc.version == ZTOC_VERSION == "0.9"
    assert ztoc.build_tool_identifier == BUILD_TOOL_IDENTIFIER == "AWS SOCI CLI v0.2"
    assert ztoc.compressed_archive_size == len(blob)
    # The tar EOF position: past the two zero blocks, before tarfile's record padding.
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        members = tf.getmembers()
        eof = tf.offset
    assert ztoc.uncompressed_archive_size == eof + 1024
    assert ztoc.uncompressed_archive_size < len(tar_bytes)

    # Entries: the tar members in order, with their data offsets.
    assert [f.name for f in ztoc.files] == [m.name + ("/" if m.isdir() else "") for m in members]
    for f, m in zip(ztoc.files, members, strict=True):
        assert f.uncompressed_offset == m.offset_data
        assert f.uncompressed_size == m.size
    assert {f.type for f in ztoc.files} >= {
        EntryType.DIR,
        EntryType.REG,
        EntryType.SYMLINK,
        EntryType.HARDLINK,
        EntryType.CHAR,
    }

    # Compression info is exactly what the checkpoint pass gives.
    expected = build_gzip_checkpoints(io.BytesIO(blob), 65536, lambda mv: None)
    info = ztoc.compression
    assert info.algorithm == CompressionAlgorithm.GZIP
    assert info.span_digests == expected.span_digests
    assert info.max_span_id == len(expected.checkpoints) - 1 > 3
    assert decode_gzip_zinfo(info.checkpoints) == expected.zinfo

    # And it works: every file extracts.
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        for m in members:
            if m.isreg():
                fobj = tf.extractfile(m)
                assert fobj is not None
                assert extract_file(ztoc, m.name, lambda s, e: blob[s:e]) == fobj.read()


def test_gzip_ztoc_codec_round_trip(tmp_path: Path, tar_bytes: bytes) -> None:
    path = _write(tmp_path, "layer.tar.gz", compress(tar_bytes, "multi-member"))
    ztoc = build_ztoc(path, DOCKER_GZ, 4096)
    encoded = encode_ztoc(ztoc)
    assert decode_ztoc(encoded) == ztoc
    assert encode_ztoc(decode_ztoc(encoded)) == encoded


@pytest.mark.parametrize("media_type", [OCI_TAR, DOCKER_TAR])
def test_tar_layer_ztoc(tmp_path: Path, tar_bytes: bytes, media_type: str) -> None:
    path = _write(tmp_path, "layer.tar", tar_bytes)
    span = 100_000
    ztoc = build_ztoc(path, media_type, span)
    info = ztoc.compression
    assert info.algorithm == CompressionAlgorithm.UNCOMPRESSED
    assert decode_tar_zinfo(info.checkpoints) == TarZinfo(span_size=span, size=len(tar_bytes))
    n = len(tar_bytes)
    assert info.max_span_id == n // span - (1 if n % span == 0 else 0)
    assert info.span_digests == tuple(
        "sha256:" + hashlib.sha256(tar_bytes[i : i + span]).hexdigest() for i in range(0, n, span)
    )
    assert ztoc.compressed_archive_size == n
    assert ztoc.uncompressed_archive_size < n
    assert decode_ztoc(encode_ztoc(ztoc)) == ztoc
    data = extract_file(ztoc, "app/doc.txt", lambda s, e: tar_bytes[s:e])
    assert data == SPECS[2].data()
    assert SpanMap.from_ztoc(ztoc).span_count == info.max_span_id + 1


def test_exact_multiple_of_span_size(tmp_path: Path) -> None:
    tar = make_tar([TarEntrySpec("f", size=9000, content="text")])
    assert len(tar) % 10240 == 0
    ztoc = build_ztoc(_write(tmp_path, "l.tar", tar), OCI_TAR, 10240)
    assert ztoc.compression.max_span_id == len(tar) // 10240 - 1


def test_errors(tmp_path: Path, tar_bytes: bytes) -> None:
    with pytest.raises(LayerBuildError, match="cannot open"):
        build_ztoc(tmp_path / "missing.tar.gz", GZ, 65536)
    corrupt = bytearray(compress(tar_bytes, "py6"))
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 50] = b"\xff" * 50
    with pytest.raises(LayerBuildError, match="cannot index") as info:
        build_ztoc(_write(tmp_path, "bad.tar.gz", bytes(corrupt)), GZ, 65536)
    assert info.value.__cause__ is not None
    with pytest.raises(LayerSkipped):
        build_ztoc(tmp_path / "whatever", ZSTD, 65536)
    with pytest.raises(NotALayer):
        build_ztoc(tmp_path / "whatever", "text/plain", 65536)


def test_unsupported_tar_entry_fails_the_layer(tmp_path: Path) -> None:
    # A PAX global header (as `git archive` writes) is an entry Go's reader returns: unsupported.
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "x"}
    ) as tf:
        info = tarfile.TarInfo("f")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    path = _write(tmp_path, "g.tar.gz", gzip.compress(buf.getvalue()))
    with pytest.raises(LayerBuildError) as err:
        build_ztoc(path, GZ, 65536)
    assert isinstance(err.value.__cause__, UnsupportedTarEntry)


def test_parallel_builds_match_sequential(tmp_path: Path, tar_bytes: bytes) -> None:
    jobs = [
        LayerJob(_write(tmp_path, "a.tar.gz", compress(tar_bytes, "py1")), GZ),
        LayerJob(_write(tmp_path, "b.tar.gz", compress(tar_bytes, "py9")), DOCKER_GZ),
        LayerJob(_write(tmp_path, "c.tar", tar_bytes), OCI_TAR),
        LayerJob(tmp_path / "d.tar.zst", ZSTD),
        LayerJob(_write(tmp_path, "e.tar.gz", b"\x1f\x8b garbage"), GZ),
        LayerJob(_write(tmp_path, "f.tar.gz", compress(tar_bytes, "multi-member-3", 4)), GZ),
    ]
    seen: list[LayerOutcome] = []
    outcomes = build_ztocs_parallel(jobs, 65536, max_workers=3, on_done=seen.append)
    assert [o.job for o in outcomes] == jobs
    assert sorted(id(o) for o in seen) == sorted(id(o) for o in outcomes)
    assert isinstance(outcomes[3].error, LayerSkipped) and outcomes[3].ztoc is None
    assert isinstance(outcomes[4].error, LayerBuildError) and outcomes[4].ztoc is None
    for i in (0, 1, 2, 5):
        assert outcomes[i].error is None
        assert outcomes[i].ztoc == build_ztoc(jobs[i].path, jobs[i].media_type, 65536)
        assert 0 < outcomes[i].seconds < 60  # measured, in seconds (not ns, not unset)
    with pytest.raises(ValueError):
        build_ztocs_parallel(jobs, 65536, max_workers=0)


def test_parallel_propagates_bugs(tmp_path: Path, tar_bytes: bytes) -> None:
    class Broken:
        def feed(self, data: bytes | memoryview) -> None:
            raise RuntimeError("bug in the TOC builder")

        def finish(self) -> tuple[list[object], int]:
            raise AssertionError("not reached")

    path = _write(tmp_path, "a.tar.gz", compress(tar_bytes, "py1"))
    with pytest.raises(RuntimeError, match="bug"):
        build_ztocs_parallel([LayerJob(path, GZ)], 65536, toc_factory=Broken)  # type: ignore[arg-type]


def test_default_parallelism_is_positive() -> None:
    assert builder.default_parallelism() >= 1


def test_read_size_does_not_change_the_ztoc(tmp_path: Path, tar_bytes: bytes) -> None:
    path = _write(tmp_path, "a.tar.gz", compress(tar_bytes, "gzip-cmd"))
    big = build_ztoc(path, GZ, 4096, read_size=1 << 20)
    small = build_ztoc(path, GZ, 4096, read_size=16384)
    assert big == small
    assert big.compression.max_span_id > 10


def test_progress_reports_bytes_read(tmp_path: Path, tar_bytes: bytes) -> None:
    blob = compress(tar_bytes, "py6")
    path = _write(tmp_path, "a.tar.gz", blob)
    seen: list[int] = []
    ztoc = build_ztoc(path, GZ, 65536, read_size=50_000, on_progress=seen.append)
    assert seen == sorted(seen)
    assert seen[-1] == len(blob) == ztoc.compressed_archive_size
    assert len(seen) >= len(blob) // 50_000
