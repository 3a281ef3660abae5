"""OCI image layouts: directory and archive, atomic writes, verified reads, tags."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from index.digest import Digest
from index.oci import mediatypes
from index.oci.descriptor import Descriptor
from index.oci.errors import BlobNotInLayoutError, LayoutError
from index.oci.layout import OciLayout, parse_layout_ref
from index.oci.platform import Platform


def test_directory_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "img"
    with OciLayout.open(root, create=True) as layout:
        blob = layout.write_blob(b"layer bytes", mediatypes.OCI_LAYER_GZIP)
        assert layout.write_blob(b"layer bytes", mediatypes.OCI_LAYER_GZIP) == blob
        manifest = layout.write_blob(b'{"schemaVersion":2}', mediatypes.OCI_MANIFEST)
        layout.tag(manifest, "v1")
        assert layout.blob_path(blob.digest).read_bytes() == b"layer bytes"
    assert json.loads((root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((root / "index.json").read_bytes())
    assert index["manifests"][0]["annotations"] == {mediatypes.ANNOTATION_REF_NAME: "v1"}
    with OciLayout.open(root) as layout:
        assert layout.resolve("v1").digest == manifest.digest
        assert layout.resolve(None).digest == manifest.digest
        assert layout.read_blob(blob.digest) == b"layer bytes"
        assert not list((root / "blobs" / "sha256").glob(".tmp-*"))


def test_tag_replaces_and_resolve_rules(tmp_path: Path) -> None:
    with OciLayout.open(tmp_path / "l", create=True) as layout:
        a = layout.write_blob(b"a", mediatypes.OCI_MANIFEST)
        b = layout.write_blob(b"b", mediatypes.OCI_MANIFEST)
        layout.tag(a, "t")
        layout.tag(b, "other")
        with pytest.raises(LayoutError, match="2 manifests"):
            layout.resolve(None)
        layout.tag(b, "t")
        assert layout.resolve("t").digest == b.digest
        assert len(layout.manifests()) == 2
        layout.tag(a, "docker.io/library/x:full")
        assert layout.resolve("full").digest == a.digest
        with pytest.raises(LayoutError, match="'nope' not found"):
            layout.resolve("nope")


def test_corrupt_and_missing_blobs(tmp_path: Path) -> None:
    with OciLayout.open(tmp_path / "l", create=True) as layout:
        desc = layout.write_blob(b"good")
        layout.blob_path(desc.digest).write_bytes(b"evil")
        with pytest.raises(LayoutError, match="corrupt"):
            layout.read_blob(desc.digest)
        with pytest.raises(LayoutError, match="corrupt"):
            layout.verify()
        missing = Digest.of(b"missing")
        with pytest.raises(BlobNotInLayoutError, match=missing):
            layout.read_blob(missing)
        good = layout.write_blob(b"12345")
        with pytest.raises(LayoutError):
            layout.read_blob(good.digest, size=4)


def test_write_blob_from_file_and_open_blob(tmp_path: Path) -> None:
    src = tmp_path / "big"
    src.write_bytes(bytes(range(256)) * 10000)
    with OciLayout.open(tmp_path / "l", create=True) as layout:
        desc = layout.write_blob_from_file(src, mediatypes.OCI_LAYER_TAR)
        assert desc.size == 2560000 and desc.digest == Digest.of(src.read_bytes())
        with layout.open_blob(desc.digest, desc.size) as f:
            assert f.read(10) == bytes(range(10))
            f.read()


def test_archive_round_trip(tmp_path: Path) -> None:
    archive = tmp_path / "img.tar"
    with OciLayout.open(archive, create=True) as layout:
        desc = layout.write_blob(b"content", mediatypes.OCI_MANIFEST)
        layout.tag(desc, "latest")
        with pytest.raises(LayoutError):
            layout.blob_path(desc.digest)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        assert "oci-layout" in names and "index.json" in names
        assert f"blobs/sha256/{desc.digest.hex}" in names
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())
    first = archive.read_bytes()
    with OciLayout.open(archive) as layout:
        assert layout.read_blob(layout.resolve("latest").digest) == b"content"
    assert archive.read_bytes() == first  # unmodified archives are not rewritten
    with OciLayout.open(archive) as layout:
        layout.save_as(tmp_path / "as-dir", "oci-dir")
    assert (tmp_path / "as-dir" / "index.json").exists()


def test_archive_not_replaced_when_the_block_fails(tmp_path: Path) -> None:
    archive = tmp_path / "img.tar"
    with OciLayout.open(archive, create=True) as layout:
        layout.tag(layout.write_blob(b"v1", mediatypes.OCI_MANIFEST), "v1")
    before = archive.read_bytes()
    with pytest.raises(RuntimeError), OciLayout.open(archive) as layout:
        layout.write_blob(b"half")
        raise RuntimeError("boom")
    assert archive.read_bytes() == before


def test_not_a_layout(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "file").write_text("x")
    with pytest.raises(LayoutError, match="no oci-layout"):
        OciLayout.open(tmp_path / "d")
    with pytest.raises(LayoutError, match="does not exist"):
        OciLayout.open(tmp_path / "nothing")
    (tmp_path / "junk.tar").write_bytes(b"not a tar")
    with pytest.raises(LayoutError, match="cannot unpack"):
        OciLayout.open(tmp_path / "junk.tar")


@pytest.mark.parametrize(
    ("text", "path", "tag"),
    [
        ("oci-layout:/a/b", "/a/b", None),
        ("oci-layout:/a/b:v1", "/a/b", "v1"),
        ("oci-layout:rel/dir:latest", "rel/dir", "latest"),
        ("oci-layout:/x:y/z", "/x:y/z", None),
    ],
)
def test_parse_layout_ref(text: str, path: str, tag: str | None) -> None:
    assert parse_layout_ref(text) == (Path(path), tag)


def test_parse_layout_ref_errors() -> None:
    with pytest.raises(LayoutError):
        parse_layout_ref("docker://x")
    with pytest.raises(LayoutError):
        parse_layout_ref("oci-layout:")


def test_descriptor_json_is_go_ordered() -> None:
    desc = Descriptor.of(
        mediatypes.OCI_MANIFEST,
        b"{}",
        annotations={"z": "1", "a": "2"},
        platform=Platform.parse("linux/arm64"),
        artifact_type=mediatypes.SOCI_INDEX_V2,
    )
    assert desc.marshal() == (
        b'{"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        b'"digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2,'
        b'"annotations":{"a":"2","z":"1"},"platform":{"architecture":"arm64","os":"linux","variant":"v8"},'
        b'"artifactType":"application/vnd.amazon.soci.index.v2+json"}'
    )
    assert Descriptor.from_json(json.loads(desc.marshal())) == desc


def test_platforms() -> None:
    assert str(Platform.parse("linux/aarch64")) == "linux/arm64/v8"
    assert str(Platform.parse("x86_64")) == "linux/amd64"
    assert str(Platform.parse("linux/arm")) == "linux/arm/v7"
    assert Platform.parse("linux/arm64").matches(Platform("linux", "arm64"))
    assert Platform.parse("linux/arm/v7").matches(Platform("linux", "arm", "v6"))
    assert not Platform.parse("linux/arm/v6").matches(Platform("linux", "arm", "v7"))
    assert not Platform.parse("linux/amd64").matches(Platform("linux", "arm64"))
    assert not Platform.parse("linux/amd64").matches(Platform("windows", "amd64"))
    assert Platform.host().os == "linux"
    assert Platform.from_json(
        {"architecture": "amd64", "os": "linux", "os.features": ["x"]}
    ).os_features == ("x",)
