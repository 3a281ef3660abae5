"""Media types, artifact types and annotation keys of OCI, Docker and SOCI."""

from __future__ import annotations

import enum

from index.digest import Digest

# OCI image-spec
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND_TAR = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

# Docker image manifest v2 schema 2
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"

# SOCI
SOCI_INDEX_V1 = "application/vnd.amazon.soci.index.v1+json"
"""Artifact type (config media type) of a v1 SOCI index, found through referrers."""
SOCI_INDEX_V2 = "application/vnd.amazon.soci.index.v2+json"
"""Artifact type of a v2 SOCI index, bound into the image's OCI index."""
SOCI_ZTOC = "application/octet-stream"
"""Media type of a zTOC blob descriptor in an index's `layers`."""
SOCI_PREFETCH = "application/vnd.amazon.soci.prefetch.v1+json"

ANNOTATION_INDEX_DIGEST = "com.amazon.soci.index-digest"
"""On an image manifest (v2): the digest of its SOCI index manifest."""
ANNOTATION_IMAGE_MANIFEST_DIGEST = "com.amazon.soci.image-manifest-digest"
"""On the index descriptor inside the OCI index (v2): the image manifest it belongs to."""
ANNOTATION_LAYER_DIGEST = "com.amazon.soci.image-layer-digest"
ANNOTATION_LAYER_MEDIA_TYPE = "com.amazon.soci.image-layer-mediaType"
ANNOTATION_SPAN_SIZE = "com.amazon.soci.span-size"
ANNOTATION_DISABLE_XATTRS = "com.amazon.soci.disable-xattrs"
ANNOTATION_BUILD_TOOL = "com.amazon.soci.build-tool-identifier"

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
"""On a descriptor in an OCI layout's `index.json`: the tag it is known by."""

EMPTY_CONFIG_DATA = b"{}"
EMPTY_CONFIG_DIGEST = Digest(
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
)
EMPTY_CONFIG_SIZE = 2

MANIFEST_ACCEPT = (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_MANIFEST,
    OCI_INDEX,
    "*/*",
)
"""The Accept list containerd sends when resolving a tag."""


class LayerCompression(enum.Enum):
    """How a layer blob is compressed, judged from its media type."""

    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


_INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
_MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
_LAYER_COMPRESSION = {
    OCI_LAYER_TAR: LayerCompression.NONE,
    OCI_LAYER_ND_TAR: LayerCompression.NONE,
    DOCKER_LAYER_TAR: LayerCompression.NONE,
    OCI_LAYER_GZIP: LayerCompression.GZIP,
    OCI_LAYER_ND_GZIP: LayerCompression.GZIP,
    DOCKER_LAYER_GZIP: LayerCompression.GZIP,
    DOCKER_LAYER_FOREIGN_GZIP: LayerCompression.GZIP,
    OCI_LAYER_ZSTD: LayerCompression.ZSTD,
    OCI_LAYER_ND_ZSTD: LayerCompression.ZSTD,
    DOCKER_LAYER_ZSTD: LayerCompression.ZSTD,
}


def is_index(media_type: str) -> bool:
    """True for an OCI image index or a Docker manifest list."""
    return media_type in _INDEX_TYPES


def is_manifest(media_type: str) -> bool:
    """True for a single-platform OCI or Docker image manifest."""
    return media_type in _MANIFEST_TYPES


def is_config(media_type: str) -> bool:
    """True for an OCI or Docker image config."""
    return media_type in (OCI_CONFIG, DOCKER_CONFIG)


def is_layer(media_type: str) -> bool:
    """True for a known OCI or Docker layer media type (any compression)."""
    return media_type in _LAYER_COMPRESSION


def is_soci_index(artifact_type: str) -> bool:
    """True for the v1 or v2 SOCI index artifact type."""
    return artifact_type in (SOCI_INDEX_V1, SOCI_INDEX_V2)


def layer_compression(media_type: str) -> LayerCompression:
    """The compression of a layer with `media_type`.

    Raises ValueError when `media_type` is not a known layer type.
    """
    try:
        return _LAYER_COMPRESSION[media_type]
    except KeyError:
        raise ValueError(f"not a layer media type: {media_type!r}") from None
