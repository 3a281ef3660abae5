"""SOCI index manifests (v1 and v2) and the v2 binding of an image (docs/format.md).

Everything here produces bytes in Go's canonical JSON (index.gojson) with the field order of
image-spec v1.1.1's structs, so an index built here has the digest the AWS tools would give it.
Inputs and outputs are plain JSON-shaped dicts; nothing here does I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from index import gojson
from index.digest import Digest, DigestError
from index.errors import SociableError
from index.model import BUILD_TOOL_IDENTIFIER
from index.oci import mediatypes as mt
from index.oci.descriptor import Descriptor
from index.oci.errors import DescriptorError, PlatformError
from index.oci.platform import Platform


class IndexManifestError(SociableError, ValueError):
    """A SOCI index or an image manifest/index is not what the format requires."""


# --- descriptors, in Go struct order -------------------------------------------------------------


def go_platform(platform: Mapping[str, Any]) -> dict[str, Any]:
    """A platform object in image-spec field order, empty optional fields dropped.

    Raises IndexManifestError when `os` or `architecture` is missing.
    """
    try:
        return Platform.from_json(platform).to_json()
    except PlatformError as e:
        raise IndexManifestError(str(e)) from e


def go_descriptor(desc: Mapping[str, Any]) -> dict[str, Any]:
    """A descriptor as Go's `ocispec.Descriptor` re-marshals it: field order, empty
    `omitempty` fields and unknown fields dropped, annotations sorted.

    Raises IndexManifestError for a descriptor without a valid digest or size.
    """
    try:
        return Descriptor.from_json(desc).to_json()
    except DescriptorError as e:
        raise IndexManifestError(str(e)) from e


def go_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """An image manifest as `ocispec.Manifest` re-marshals it (unknown fields dropped)."""
    out: dict[str, Any] = {"schemaVersion": manifest.get("schemaVersion", 2)}
    for key in ("mediaType", "artifactType"):
        if manifest.get(key):
            out[key] = manifest[key]
    out["config"] = go_descriptor(manifest.get("config", {}))
    layers = manifest.get("layers")
    out["layers"] = None if layers is None else [go_descriptor(d) for d in layers]
    if manifest.get("subject"):
        out["subject"] = go_descriptor(manifest["subject"])
    if manifest.get("annotations"):
        out["annotations"] = gojson.sorted_map(manifest["annotations"])
    return out


def go_image_index(index: Mapping[str, Any]) -> dict[str, Any]:
    """An image index as `ocispec.Index` re-marshals it."""
    out: dict[str, Any] = {"schemaVersion": index.get("schemaVersion", 2)}
    for key in ("mediaType", "artifactType"):
        if index.get(key):
            out[key] = index[key]
    manifests = index.get("manifests")
    out["manifests"] = None if manifests is None else [go_descriptor(d) for d in manifests]
    if index.get("subject"):
        out["subject"] = go_descriptor(index["subject"])
    if index.get("annotations"):
        out["annotations"] = gojson.sorted_map(index["annotations"])
    return out


# --- the SOCI index -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ZtocDescriptor:
    """One zTOC entry of an index: the zTOC blob and the layer it indexes."""

    digest: Digest
    size: int
    layer_digest: Digest
    layer_media_type: str
    span_size: int
    disable_xattrs: bool = False

    def to_descriptor(self) -> dict[str, Any]:
        annotations = {
            mt.ANNOTATION_LAYER_DIGEST: str(self.layer_digest),
            mt.ANNOTATION_LAYER_MEDIA_TYPE: self.layer_media_type,
            mt.ANNOTATION_SPAN_SIZE: str(self.span_size),
        }
        if self.disable_xattrs:
            annotations[mt.ANNOTATION_DISABLE_XATTRS] = "true"
        return go_descriptor(
            {
                "mediaType": mt.SOCI_ZTOC,
                "digest": self.digest,
                "size": self.size,
                "annotations": annotations,
            }
        )


@dataclass(frozen=True, slots=True)
class SociIndex:
    """A decoded SOCI index manifest."""

    artifact_type: str
    ztocs: tuple[ZtocDescriptor, ...]
    subject: dict[str, Any] | None = None
    prefetch: tuple[dict[str, Any], ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return "v1" if self.artifact_type == mt.SOCI_INDEX_V1 else "v2"

    def ztoc_for_layer(self, layer_digest: str) -> ZtocDescriptor | None:
        for z in self.ztocs:
            if z.layer_digest == layer_digest:
                return z
        return None

    def to_json(self) -> bytes:
        """The manifest bytes, byte-identical to what the AWS CLI writes for the same inputs."""
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": {
                "mediaType": self.artifact_type,
                "digest": str(mt.EMPTY_CONFIG_DIGEST),
                "size": len(mt.EMPTY_CONFIG_DATA),
            },
            "layers": [z.to_descriptor() for z in self.ztocs]
            + [go_descriptor(p) for p in self.prefetch],
        }
        if self.subject is not None:
            manifest["subject"] = go_descriptor(self.subject)
        manifest["annotations"] = gojson.sorted_map(self.annotations)
        return gojson.marshal(manifest)


def new_index(
    ztocs: Sequence[ZtocDescriptor], *, v2: bool, subject: Mapping[str, Any] | None = None
) -> SociIndex:
    """A new index as `soci create` (v1, with subject) or `soci convert` (v2) builds it."""
    if not ztocs:
        raise IndexManifestError("no ztocs created, all layers either skipped or produced errors")
    if v2 and subject is not None:
        raise IndexManifestError("a v2 SOCI index has no subject")
    return SociIndex(
        artifact_type=mt.SOCI_INDEX_V2 if v2 else mt.SOCI_INDEX_V1,
        ztocs=tuple(ztocs),
        subject=(
            {k: subject[k] for k in ("mediaType", "digest", "size")}
            if subject is not None
            else None
        ),
        annotations={mt.ANNOTATION_BUILD_TOOL: BUILD_TOOL_IDENTIFIER},
    )


def parse_index(data: bytes) -> SociIndex:
    """Decode a SOCI index manifest.

    Raises IndexManifestError when the bytes are not JSON, the config media type is not one of
    the two SOCI artifact types (as the Go decoder requires), a field has the wrong JSON type,
    or a zTOC descriptor lacks its layer digest or has a size that is not a number.
    """
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise IndexManifestError(f"SOCI index is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise IndexManifestError("SOCI index is not a JSON object")
    config = doc.get("config")
    artifact_type = config.get("mediaType") if isinstance(config, dict) else None
    if artifact_type not in (mt.SOCI_INDEX_V1, mt.SOCI_INDEX_V2):
        raise IndexManifestError(
            f"not a SOCI index: config mediaType {artifact_type!r} is neither "
            f"{mt.SOCI_INDEX_V1} nor {mt.SOCI_INDEX_V2}"
        )
    ztocs: list[ZtocDescriptor] = []
    prefetch: list[dict[str, Any]] = []
    layers = doc.get("layers") or []
    if not isinstance(layers, list):
        raise IndexManifestError("SOCI index layers is not an array")
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise IndexManifestError(f"SOCI index layer {i} is not an object")
        media_type = layer.get("mediaType")
        ann = layer.get("annotations") or {}
        if not isinstance(ann, dict):
            raise IndexManifestError(f"SOCI index layer {i}: annotations is not an object")
        if media_type == mt.SOCI_PREFETCH:
            prefetch.append(layer)
            continue
        if media_type != mt.SOCI_ZTOC:
            continue
        try:
            ztocs.append(
                ZtocDescriptor(
                    digest=Digest(layer.get("digest", "")),
                    size=int(layer.get("size", 0)),
                    layer_digest=Digest(ann.get(mt.ANNOTATION_LAYER_DIGEST, "")),
                    layer_media_type=str(ann.get(mt.ANNOTATION_LAYER_MEDIA_TYPE, "")),
                    span_size=int(ann.get(mt.ANNOTATION_SPAN_SIZE, "0") or 0),
                    disable_xattrs=ann.get(mt.ANNOTATION_DISABLE_XATTRS) == "true",
                )
            )
        except (DigestError, ValueError, TypeError, OverflowError) as e:
            raise IndexManifestError(f"SOCI index zTOC descriptor {i}: {e}") from e
    subject = doc.get("subject")
    annotations = doc.get("annotations") or {}
    if subject is not None and not isinstance(subject, dict):
        raise IndexManifestError("SOCI index subject is not an object")
    if not isinstance(annotations, dict):
        raise IndexManifestError("SOCI index annotations is not an object")
    return SociIndex(
        artifact_type=artifact_type,
        ztocs=tuple(ztocs),
        subject=subject,
        prefetch=tuple(prefetch),
        annotations=annotations,
    )


# --- v2 binding ----------------------------------------------------------------------------------


def rewrite_image_manifest(manifest: Mapping[str, Any], index_digest: str | None) -> bytes:
    """The image manifest as `soci convert` rewrites it: OCI media types, and the
    `com.amazon.soci.index-digest` annotation when the manifest was indexed."""
    rewritten = dict(manifest)
    rewritten["mediaType"] = mt.OCI_MANIFEST
    config = dict(manifest.get("config") or {})
    config["mediaType"] = mt.OCI_CONFIG
    rewritten["config"] = config
    annotations = dict(manifest.get("annotations") or {})
    if index_digest is not None:
        annotations[mt.ANNOTATION_INDEX_DIGEST] = index_digest
    rewritten["annotations"] = annotations
    return gojson.marshal(go_manifest(rewritten))


def index_descriptor_v2(
    index_bytes: bytes, manifest_digest: str, platform: Mapping[str, Any]
) -> dict[str, Any]:
    """The descriptor of a v2 SOCI index as it sits in the image's OCI index."""
    return go_descriptor(
        {
            "mediaType": mt.OCI_MANIFEST,
            "digest": Digest.of(index_bytes),
            "size": len(index_bytes),
            "annotations": {mt.ANNOTATION_IMAGE_MANIFEST_DIGEST: manifest_digest},
            "platform": platform,
            "artifactType": mt.SOCI_INDEX_V2,
        }
    )


def add_index_descriptor(image_index: dict[str, Any], desc: Mapping[str, Any]) -> None:
    """Append `desc` to the OCI index, replacing a v2 SOCI entry for the same platform."""
    manifests: list[dict[str, Any]] = image_index.setdefault("manifests", [])
    want = go_platform(desc.get("platform") or {})
    for i, existing in enumerate(manifests):
        if (
            existing.get("artifactType") == mt.SOCI_INDEX_V2
            and go_platform(existing.get("platform") or {}) == want
        ):
            manifests[i] = dict(desc)
            return
    manifests.append(dict(desc))


def image_index_json(image_index: Mapping[str, Any]) -> bytes:
    """The OCI image index bytes (media type forced to OCI, Go field order)."""
    doc = dict(image_index)
    doc["mediaType"] = mt.OCI_INDEX
    return gojson.marshal(go_image_index(doc))
