"""`sociable convert --standalone`, `create` from an OCI layout, and the inspection commands,
run as a user runs them (the console script in a subprocess) on generated and real images."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest

from index.digest import Digest
from index.manifest import parse_index
from index.oci import mediatypes as mt
from tests.support import images
from tests.support.cli import check_layer_files, sociable


def blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / Digest(digest).hex).read_bytes()


def jblob(layout: Path, digest: str) -> Any:
    return json.loads(blob(layout, digest))


@pytest.fixture(scope="module")
def source_layout(tmp_path_factory: pytest.TempPathFactory) -> images.Image:
    return images.busybox_image(tmp_path_factory.mktemp("img") / "layout", tag="v1")


def test_convert_standalone_oci_dir(source_layout: images.Image, tmp_path: Path) -> None:
    out = tmp_path / "out"
    root = tmp_path / "root"
    proc = sociable(
        "convert",
        "--standalone",
        "--format",
        "oci-dir",
        "--min-layer-size",
        "0",
        "--span-size",
        "65536",
        str(source_layout.layout),
        str(out),
        root=root,
    )
    assert "image index sha256:" in proc.stdout

    index_json = json.loads((out / "index.json").read_text())
    [top] = index_json["manifests"]
    assert top["mediaType"] == mt.OCI_INDEX
    assert top["annotations"][mt.ANNOTATION_REF_NAME] == "v1"
    image_index = jblob(out, top["digest"])
    image_desc, soci_desc = image_index["manifests"]
    assert soci_desc["artifactType"] == mt.SOCI_INDEX_V2
    assert soci_desc["annotations"][mt.ANNOTATION_IMAGE_MANIFEST_DIGEST] == image_desc["digest"]
    manifest = jblob(out, image_desc["digest"])
    assert manifest["annotations"][mt.ANNOTATION_INDEX_DIGEST] == soci_desc["digest"]
    assert manifest["config"]["mediaType"] == mt.OCI_CONFIG
    # The rewritten manifest still points at the original, unchanged layers.
    assert [d["digest"] for d in manifest["layers"]] == [lyr.digest for lyr in source_layout.layers]

    raw_index = blob(out, soci_desc["digest"])
    soci = parse_index(raw_index)
    assert soci.version == "v2" and soci.subject is None
    assert blob(out, mt.EMPTY_CONFIG_DIGEST) == b"{}"
    assert [z.layer_digest for z in soci.ztocs] == [lyr.digest for lyr in source_layout.layers]
    files = 0
    for z, layer in zip(soci.ztocs, source_layout.layers, strict=True):
        files += check_layer_files(layer.path, blob(out, z.digest))
    assert files > 5

    # The build is recorded in the local store and inspectable.
    listing = sociable("index", "list", root=root).stdout
    assert soci_desc["digest"] in listing and "v2" in listing
    info = json.loads(sociable("ztoc", "info", soci.ztocs[0].digest, root=root).stdout)
    assert list(info) == [
        "version",
        "build_tool",
        "size",
        "span_size",
        "num_spans",
        "num_multi_span_files",
        "num_files",
        "files",
    ]
    assert info["version"] == "0.9" and info["build_tool"] == "AWS SOCI CLI v0.2"
    assert info["span_size"] == 65536
    assert info["num_files"] == len(info["files"]) > 0
    assert set(info["files"][0]) == {"filename", "offset", "size", "type", "start_span", "end_span"}

    # get-file reads only what it needs from the layer blob and equals the tar member.
    with tarfile.open(source_layout.layers[0].path, "r:gz") as tf:
        member = next(m for m in tf if m.isreg() and m.size > 1000)
        expected = tf.extractfile(member).read()  # type: ignore[union-attr]
    target = tmp_path / "file"
    sociable(
        "ztoc",
        "get-file",
        soci.ztocs[0].digest,
        member.name,
        "-o",
        str(target),
        "--layer-file",
        str(source_layout.layers[0].path),
        root=root,
    )
    assert target.read_bytes() == expected

    # Converting again is deterministic: the same index digests (zTOCs reused from the store).
    again = tmp_path / "again"
    sociable(
        "convert",
        "--standalone",
        "--format",
        "oci-dir",
        "--min-layer-size",
        "0",
        "--span-size",
        "65536",
        str(source_layout.layout),
        str(again),
        root=root,
    )
    assert json.loads((again / "index.json").read_text())["manifests"][0]["digest"] == top["digest"]


def test_convert_standalone_archive_and_errors(source_layout: images.Image, tmp_path: Path) -> None:
    root = tmp_path / "root"
    out = tmp_path / "out.tar"
    sociable(
        "convert",
        "--standalone",
        "--min-layer-size",
        "0",
        str(source_layout.layout),
        str(out),
        root=root,
    )
    with tarfile.open(out) as tf:
        names = tf.getnames()
    assert "index.json" in names and "oci-layout" in names

    again = sociable(
        "convert", "--standalone", str(source_layout.layout), str(out), root=root, check=False
    )
    assert again.returncode == 2 and "already exists" in again.stderr

    # Every layer under the default 10 MiB minimum: a clear error, non-zero exit.
    small = sociable(
        "convert",
        "--standalone",
        str(source_layout.layout),
        str(tmp_path / "x"),
        root=root,
        check=False,
    )
    assert small.returncode == 1
    assert "no ztocs created" in small.stderr
    assert "is less than min-layer-size 10485760" in small.stderr

    missing = sociable("create", "oci-layout:/nonexistent/layout:tag", root=root, check=False)
    assert missing.returncode == 3 and "does not exist" in missing.stderr


def test_create_v1_from_layout(source_layout: images.Image, tmp_path: Path) -> None:
    root = tmp_path / "root"
    proc = sociable(
        "create", "--min-layer-size", "0", f"oci-layout:{source_layout.layout}:v1", root=root
    )
    digest = proc.stdout.split()[0]
    info = json.loads(sociable("index", "info", digest, root=root).stdout)
    assert info["config"]["mediaType"] == mt.SOCI_INDEX_V1
    assert info["subject"]["digest"] == source_layout.manifest_digest
    ztocs = sociable(
        "ztoc", "list", "-q", "--image-ref", f"oci-layout:{source_layout.layout}:v1", root=root
    ).stdout.split()
    assert len(ztocs) == len(source_layout.layers)
    sociable("index", "rm", digest, root=root)
    assert sociable("index", "list", "-q", root=root).stdout.strip() == ""
    assert sociable("ztoc", "list", "-q", root=root).stdout.strip() == ""


def _two_platform_layout(tmp: Path) -> tuple[Path, list[str]]:
    """A layout whose tag points at an image index with linux/amd64 and linux/arm64 images
    (same layer content, different configs), as multi-platform images in registries are."""
    amd = images.busybox_image(tmp / "amd", tag="x")
    layout = tmp / "multi"
    shutil.copytree(amd.layout, layout)
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / Digest(amd.manifest_digest).hex).read_bytes())
    config = json.loads((blobs / Digest(amd.config_digest).hex).read_bytes())
    config["architecture"] = "arm64"
    config_raw = json.dumps(config).encode()
    (blobs / Digest.of(config_raw).hex).write_bytes(config_raw)
    manifest["config"] = {
        **manifest["config"],
        "digest": Digest.of(config_raw),
        "size": len(config_raw),
    }
    arm_raw = json.dumps(manifest).encode()
    (blobs / Digest.of(arm_raw).hex).write_bytes(arm_raw)
    amd_raw = (blobs / Digest(amd.manifest_digest).hex).read_bytes()
    index = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_INDEX,
        "manifests": [
            {
                "mediaType": mt.OCI_MANIFEST,
                "digest": amd.manifest_digest,
                "size": len(amd_raw),
                "platform": {"architecture": "amd64", "os": "linux"},
            },
            {
                "mediaType": mt.OCI_MANIFEST,
                "digest": Digest.of(arm_raw),
                "size": len(arm_raw),
                "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"},
            },
        ],
    }
    index_raw = json.dumps(index).encode()
    (blobs / Digest.of(index_raw).hex).write_bytes(index_raw)
    (layout / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": mt.OCI_INDEX,
                        "digest": Digest.of(index_raw),
                        "size": len(index_raw),
                        "annotations": {mt.ANNOTATION_REF_NAME: "multi"},
                    }
                ],
            }
        )
    )
    return layout, [amd.manifest_digest, str(Digest.of(arm_raw))]


def test_convert_platform_selection(tmp_path: Path) -> None:
    layout, manifest_digests = _two_platform_layout(tmp_path)
    root = tmp_path / "root"

    def converted(*flags: str) -> list[dict[str, Any]]:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        sociable(
            "convert",
            "--standalone",
            "--format",
            "oci-dir",
            "--min-layer-size",
            "0",
            *flags,
            str(layout),
            str(out),
            root=root,
        )
        top = json.loads((out / "index.json").read_text())["manifests"][0]
        manifests: list[dict[str, Any]] = jblob(out, top["digest"])["manifests"]
        return manifests

    # Only arm64: its manifest is rewritten and indexed, amd64 is left exactly as it was.
    entries = converted("--platform", "linux/arm64")
    assert entries[0]["digest"] == manifest_digests[0]
    assert entries[1]["digest"] != manifest_digests[1]
    socis = [e for e in entries if e.get("artifactType") == mt.SOCI_INDEX_V2]
    assert [s["platform"]["architecture"] for s in socis] == ["arm64"]

    # Every platform: two SOCI indexes, each bound to its own rewritten manifest.
    entries = converted("--all-platforms")
    socis = [e for e in entries if e.get("artifactType") == mt.SOCI_INDEX_V2]
    images_ = [e for e in entries if e.get("artifactType") != mt.SOCI_INDEX_V2]
    assert sorted(s["platform"]["architecture"] for s in socis) == ["amd64", "arm64"]
    assert {s["annotations"][mt.ANNOTATION_IMAGE_MANIFEST_DIGEST] for s in socis} == {
        i["digest"] for i in images_
    }

    missing = sociable(
        "convert",
        "--standalone",
        "--platform",
        "linux/s390x",
        str(layout),
        str(tmp_path / "none"),
        root=root,
        check=False,
    )
    assert missing.returncode == 1 and "no manifest for linux/s390x" in missing.stderr


def test_failed_convert_records_nothing(source_layout: images.Image, tmp_path: Path) -> None:
    """A convert whose destination cannot be written leaves `index list` as it was."""
    root = tmp_path / "root"
    src = f"oci-layout:{source_layout.layout}:v1"
    sociable("create", "--min-layer-size", "0", src, root=root)
    before = sociable("index", "list", "-q", root=root).stdout
    assert len(before.split()) == 1
    for dst in ("127.0.0.1:9/nobody/app:soci", "oci-layout:/proc/sociable-cannot-write:soci"):
        r = sociable("-q", "convert", "--min-layer-size", "0", src, dst, root=root, check=False)
        assert r.returncode != 0
        [line] = r.stderr.splitlines()
        assert "127.0.0.1:9" in line or "/proc/sociable-cannot-write" in line, line
        assert sociable("index", "list", "-q", root=root).stdout == before
