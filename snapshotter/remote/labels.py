"""Snapshot label keys of the remote-snapshot handshake, and the parsed `LayerLabels`.

containerd passes a Prepare only the labels under `containerd.io/snapshot/` plus
`containerd.io/snapshot.ref`; CRI adds the `cri.*` keys when
`disable_snapshot_annotations = false` (see docs/snapshotter.md). The two keys the Snapshots
service itself reads or writes (`TARGET_REF`, `REMOTE`) are defined once in
`snapshotter.snapshots.model` and re-exported here; the others exist only here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from index.digest import Digest, DigestError
from snapshotter.snapshots.model import LABEL_REMOTE as REMOTE
from snapshotter.snapshots.model import LABEL_TARGET_REF as TARGET_REF

from .errors import BadLabels

__all__ = [
    "CRI_IMAGE_LAYERS",
    "CRI_IMAGE_REF",
    "CRI_LAYER_DIGEST",
    "CRI_MANIFEST_DIGEST",
    "REMOTE",
    "SOCI_INDEX_DIGEST",
    "TARGET_REF",
    "LayerLabels",
]

CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
"""Normalised image reference given to PullImage (`docker.io/library/x:tag`)."""
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
"""Digest of the platform manifest holding the layer; the key of index discovery."""
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
"""Digest of this layer's (compressed) blob."""
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"
"""Comma-separated layer digests from this layer to the top (cut at 4096 bytes)."""
SOCI_INDEX_DIGEST = "containerd.io/snapshot/remote/soci.index.digest"
"""Explicit SOCI index digest (nerdctl `--soci-index-digest`): used as-is."""


@dataclass(frozen=True, slots=True)
class LayerLabels:
    """What a remote Prepare tells about its layer. Digests are validated."""

    target: str
    image_ref: str
    manifest_digest: Digest
    layer_digest: Digest
    image_layers: tuple[Digest, ...] = ()
    index_digest: Digest | None = None

    @classmethod
    def parse(cls, labels: Mapping[str, str]) -> LayerLabels:
        """Read the labels of an unpack Prepare.

        Raises BadLabels naming the missing or malformed key (a Prepare without the CRI
        labels, e.g. from `ctr pull`, cannot be served lazily).
        """
        missing = [
            k
            for k in (TARGET_REF, CRI_IMAGE_REF, CRI_MANIFEST_DIGEST, CRI_LAYER_DIGEST)
            if not labels.get(k)
        ]
        if missing:
            raise BadLabels(f"missing label(s) {', '.join(missing)}")
        try:
            manifest = Digest(labels[CRI_MANIFEST_DIGEST])
            layer = Digest(labels[CRI_LAYER_DIGEST])
            layers = tuple(
                Digest(d) for d in labels.get(CRI_IMAGE_LAYERS, "").split(",") if d.strip()
            )
            explicit = labels.get(SOCI_INDEX_DIGEST)
            index = Digest(explicit) if explicit else None
        except DigestError as e:
            raise BadLabels(f"malformed digest label: {e}") from e
        return cls(
            target=labels[TARGET_REF],
            image_ref=labels[CRI_IMAGE_REF],
            manifest_digest=manifest,
            layer_digest=layer,
            image_layers=layers,
            index_digest=index,
        )
