"""The CLI against a real registry (Debian's docker-registry on loopback, anonymous and with
token auth): build, push (v1 and v2), fetch back, decode, compare; plus an image of real
content converted standalone, pushed with skopeo and read back."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from index.digest import Digest
from index.manifest import parse_index
from index.oci import mediatypes as mt
from index.oci.dockerconfig import StaticCredentials
from index.oci.reference import Reference
from index.oci.registry import RegistryClient
from index.ztoc_codec import decode_ztoc
from tests.support import images
from tests.support.cli import check_layer_files, sociable
from tests.support.registry import RegistryServer

pytestmark = pytest.mark.slow

BUSYBOX_IMAGE_REGULAR_FILES = [3, 9, 5]
"""Regular files per layer of `images.busybox_image` (busybox + passwd + group; the features
layer; the whiteout layer, whose `.wh.` markers are regular files too)."""


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> images.Image:
    return images.busybox_image(tmp_path_factory.mktemp("img") / "layout", tag="v1")


def client_for(server: RegistryServer) -> RegistryClient:
    creds = StaticCredentials(server.username, server.password or "") if server.username else None
    return RegistryClient(credentials=creds)


def auth_args(server: RegistryServer) -> list[str]:
    return ["--user", server.user] if server.username else []


def test_create_push_v1_and_read_back(
    registry: RegistryServer, image: images.Image, tmp_path: Path
) -> None:
    ref = images.push(image, registry.host, "cli/v1")
    root = tmp_path / "root"
    created = sociable("create", "--min-layer-size", "0", ref, root=root).stdout
    index_digest = Digest(created.split()[0])
    pushed = sociable("push", ref, root=root).stdout
    assert str(index_digest) in pushed

    with client_for(registry) as client:
        r = Reference.parse(ref)
        # distribution 2.8 has no referrers API: this goes through the sha256-<hex> tag schema.
        found = client.referrers(r, Digest(image.manifest_digest), mt.SOCI_INDEX_V1)
        assert [d.digest for d in found] == [index_digest]
        _, raw = client.get_manifest(r, index_digest)
        local = (root / "content" / "blobs" / "sha256" / index_digest.hex).read_bytes()
        assert raw == local
        soci = parse_index(raw)
        assert soci.subject is not None and soci.subject["digest"] == image.manifest_digest
        assert client.read_blob(r, mt.EMPTY_CONFIG_DIGEST) == b"{}"
        checked = []
        for z, layer in zip(soci.ztocs, image.layers, strict=True):
            data = client.read_blob(r, z.digest)
            assert Digest.of(data) == z.digest
            checked.append(check_layer_files(layer.path, data))
            assert decode_ztoc(data).compressed_archive_size == layer.size
        assert checked == BUSYBOX_IMAGE_REGULAR_FILES

    # A second push finds the existing index; --existing-index skip pushes nothing.
    again = sociable("push", "--existing-index", "skip", ref, root=root)
    assert "skipping" in again.stderr

    # get-file fetches only the spans it needs from the registry with Range requests.
    with tarfile.open(image.layers[1].path, "r:gz") as tf:
        member = next(m for m in tf if m.isreg() and m.size > 0)
        expected = tf.extractfile(member).read()  # type: ignore[union-attr]
    out = tmp_path / "got"
    sociable(
        "ztoc",
        "get-file",
        str(soci.ztocs[1].digest),
        member.name,
        "--image",
        ref,
        "-o",
        str(out),
        root=root,
    )
    assert out.read_bytes() == expected


@pytest.mark.parametrize("which", ["registry", "auth_registry"])
def test_convert_to_registry_and_read_back(
    which: str, request: pytest.FixtureRequest, image: images.Image, tmp_path: Path
) -> None:
    server: RegistryServer = request.getfixturevalue(which)
    root = tmp_path / "root"
    src = server.ref("cli/src", "v1")
    dst = server.ref("cli/dst", "v1-soci")
    # Layout → registry (every blob pushed by our client, through the auth flow when there is one).
    sociable(
        "convert",
        "--min-layer-size",
        "0",
        *auth_args(server),
        f"oci-layout:{image.layout}:v1",
        src,
        root=root,
    )
    # Registry → registry.
    sociable("convert", "--min-layer-size", "0", *auth_args(server), src, dst, root=root)
    if server.token_server is not None:
        assert sum(server.token_server.requests.values()) > 0

    with client_for(server) as client:
        top, raw = client.get_manifest(Reference.parse(dst))
        assert top.media_type == mt.OCI_INDEX
        doc = json.loads(raw)
        image_desc, soci_desc = doc["manifests"]
        assert soci_desc["artifactType"] == mt.SOCI_INDEX_V2
        _, manifest_raw = client.get_manifest(Reference.parse(dst), Digest(image_desc["digest"]))
        manifest = json.loads(manifest_raw)
        assert manifest["annotations"][mt.ANNOTATION_INDEX_DIGEST] == soci_desc["digest"]
        _, index_raw = client.get_manifest(Reference.parse(dst), Digest(soci_desc["digest"]))
        soci = parse_index(index_raw)
        checked = []
        for z, layer in zip(soci.ztocs, image.layers, strict=True):
            ztoc = client.read_blob(Reference.parse(dst), z.digest)
            assert (root / "content" / "blobs" / "sha256" / z.digest.hex).read_bytes() == ztoc
            checked.append(check_layer_files(layer.path, ztoc))
            # The layers were copied to the destination repository unchanged.
            assert client.head_blob(Reference.parse(dst), layer.digest).size == layer.size
        assert checked == BUSYBOX_IMAGE_REGULAR_FILES


def test_real_content_standalone_then_skopeo(registry: RegistryServer, tmp_path: Path) -> None:
    bulk = images.bulk_image()
    root = tmp_path / "root"
    out = tmp_path / "bulk-soci"
    sociable(
        "convert", "--standalone", "--format", "oci-dir", str(bulk.layout), str(out), root=root
    )
    ref = f"{registry.host}/cli/bulk:soci"
    # No --preserve-digests: skopeo 1.9 re-marshals the image index without `artifactType` and
    # then refuses. Dropping the field does not matter for v2 discovery (manifest annotation).
    proc = subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--all",
            "--dest-tls-verify=false",
            f"oci:{out}",
            f"docker://{ref}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"skopeo push failed: {proc.stderr}"
    with client_for(registry) as client:
        r = Reference.parse(ref)
        _, raw = client.get_manifest(r)
        soci_desc = next(
            m
            for m in json.loads(raw)["manifests"]
            if mt.ANNOTATION_IMAGE_MANIFEST_DIGEST in m.get("annotations", {})
        )
        _, index_raw = client.get_manifest(r, Digest(soci_desc["digest"]))
        soci = parse_index(index_raw)
        # Only the big python layer is above the default 10 MiB minimum.
        big = [lyr for lyr in bulk.layers if lyr.size >= 10 * 1024 * 1024]
        assert [z.layer_digest for z in soci.ztocs] == [lyr.digest for lyr in big]
        ztoc_bytes = client.read_blob(r, soci.ztocs[0].digest)
        ztoc = decode_ztoc(ztoc_bytes)
        assert ztoc.compression.max_span_id >= 10
        names = {f.name for f in ztoc.files}
        assert "usr/lib/python3.11/os.py" in names
        assert check_layer_files(big[0].path, ztoc_bytes) > 1000
