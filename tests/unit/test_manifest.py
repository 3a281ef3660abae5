"""SOCI index manifests: Go-canonical bytes, decoding rules and the v2 binding."""

from __future__ import annotations

import json

import pytest

from index import gojson
from index.digest import Digest
from index.manifest import (
    IndexManifestError,
    ZtocDescriptor,
    add_index_descriptor,
    image_index_json,
    index_descriptor_v2,
    new_index,
    parse_index,
    rewrite_image_manifest,
)
from index.oci import mediatypes as mt

LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"


def _z(n: int, *, disable_xattrs: bool = False) -> ZtocDescriptor:
    return ZtocDescriptor(
        digest=Digest("sha256:" + f"{n:064x}"),
        size=1000 + n,
        layer_digest=Digest("sha256:" + f"{n + 100:064x}"),
        layer_media_type=LAYER_GZ,
        span_size=4194304,
        disable_xattrs=disable_xattrs,
    )


def test_empty_config_digest() -> None:
    assert Digest.of(mt.EMPTY_CONFIG_DATA) == mt.EMPTY_CONFIG_DIGEST


def test_v1_index_bytes_follow_go_field_order() -> None:
    subject = {"mediaType": mt.OCI_MANIFEST, "digest": "sha256:" + "c" * 64, "size": 7, "x": 1}
    idx = new_index([_z(1), _z(2, disable_xattrs=True)], v2=False, subject=subject)
    raw = idx.to_json()
    assert b", " not in raw and b": " not in raw and not raw.endswith(b"\n")
    doc = json.loads(raw)
    assert list(doc) == ["schemaVersion", "mediaType", "config", "layers", "subject", "annotations"]
    assert doc["config"] == {
        "mediaType": mt.SOCI_INDEX_V1,
        "digest": mt.EMPTY_CONFIG_DIGEST,
        "size": 2,
    }
    assert list(doc["layers"][1]["annotations"]) == [
        "com.amazon.soci.disable-xattrs",
        "com.amazon.soci.image-layer-digest",
        "com.amazon.soci.image-layer-mediaType",
        "com.amazon.soci.span-size",
    ]
    assert doc["subject"] == {
        "mediaType": mt.OCI_MANIFEST,
        "digest": "sha256:" + "c" * 64,
        "size": 7,
    }
    assert parse_index(raw) == idx
    # Same inputs, same bytes.
    assert (
        new_index([_z(1), _z(2, disable_xattrs=True)], v2=False, subject=subject).to_json() == raw
    )


def test_go_escaping() -> None:
    assert gojson.marshal({"a": "<&>\u2028é"}) == '{"a":"\\u003c\\u0026\\u003e\\u2028é"}'.encode()


def test_parse_rejects_non_soci_and_garbage() -> None:
    with pytest.raises(IndexManifestError, match="not a SOCI index"):
        parse_index(b'{"config":{"mediaType":"application/vnd.oci.image.config.v1+json"}}')
    with pytest.raises(IndexManifestError, match="not valid JSON"):
        parse_index(b"\xff{")
    bad = new_index([_z(1)], v2=True).to_json().replace(b"image-layer-digest", b"other")
    with pytest.raises(IndexManifestError, match="zTOC descriptor 0"):
        parse_index(bad)


def test_no_ztocs_is_an_error() -> None:
    with pytest.raises(IndexManifestError, match="no ztocs created"):
        new_index([], v2=True)


def test_v2_binding() -> None:
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": "sha256:" + "1" * 64,
            "size": 3,
        },
        "layers": [
            {"mediaType": LAYER_GZ, "digest": "sha256:" + "2" * 64, "size": 9, "unknown": True}
        ],
    }
    idx = new_index([_z(1)], v2=True).to_json()
    rewritten = json.loads(rewrite_image_manifest(manifest, Digest.of(idx)))
    assert rewritten["mediaType"] == mt.OCI_MANIFEST
    assert rewritten["config"]["mediaType"] == mt.OCI_CONFIG
    assert rewritten["annotations"] == {mt.ANNOTATION_INDEX_DIGEST: Digest.of(idx)}
    assert "unknown" not in rewritten["layers"][0]

    platform = {"os": "linux", "architecture": "amd64"}
    image_index: dict[str, object] = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": mt.OCI_MANIFEST,
                "digest": "sha256:" + "3" * 64,
                "size": 5,
                "platform": platform,
            }
        ],
    }
    desc = index_descriptor_v2(idx, "sha256:" + "3" * 64, platform)
    assert list(desc) == ["mediaType", "digest", "size", "annotations", "platform", "artifactType"]
    assert desc["annotations"] == {mt.ANNOTATION_IMAGE_MANIFEST_DIGEST: "sha256:" + "3" * 64}
    assert list(desc["platform"]) == ["architecture", "os"]
    add_index_descriptor(image_index, desc)
    again = index_descriptor_v2(
        new_index([_z(2)], v2=True).to_json(), "sha256:" + "3" * 64, platform
    )
    add_index_descriptor(image_index, again)  # replaces, same platform
    doc = json.loads(image_index_json(image_index))
    assert [m.get("artifactType") for m in doc["manifests"]] == [None, mt.SOCI_INDEX_V2]
    assert doc["manifests"][1]["digest"] == again["digest"]
    assert doc["mediaType"] == "application/vnd.oci.image.index.v1+json"
