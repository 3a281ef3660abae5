"""Find an image's SOCI index and bring its zTOCs into the local store (spec/soci.md §3.5).

Discovery order, fixed: the explicit `soci.index.digest` label; the v2 annotation
`com.amazon.soci.index-digest` on the image manifest fetched from the registry by its
digest; v1 referrers (referrers API, then the `sha256-<hex>` tag schema) when enabled;
the local store's record of an index for that manifest. The index manifest and every zTOC
are read from the local store when present, otherwise fetched from the image's repository
(zTOCs in parallel, each verified by digest) and stored. Everything here is synchronous and
runs in worker threads; the registry client and the store are thread-safe.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from index import manifest as soci_manifest
from index.digest import Digest, DigestError
from index.manifest import IndexManifestError, SociIndex, ZtocDescriptor
from index.oci import mediatypes as mt
from index.oci.errors import NotFoundError, OciError
from index.oci.reference import Reference
from index.oci.registry import RegistryClient
from index.store import LocalStore, StoreError

from .errors import IndexFetchError, NoIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DiscoveryModes:
    """Which discovery steps run (`[remote]` config keys `soci_v2`, `soci_v1`, `local_store`)."""

    soci_v2: bool = True
    soci_v1: bool = False
    local_store: bool = True


@dataclass(frozen=True, slots=True)
class ImageArtifacts:
    """An image's SOCI index, with every zTOC it lists present in the local store."""

    manifest_digest: Digest
    index_digest: Digest
    index: SociIndex
    found_by: str
    """How the index was found: `label`, `v2`, `v1` or `local`."""


def _manifest_annotation(client: RegistryClient, ref: Reference, manifest: Digest) -> str | None:
    try:
        _, data = client.get_manifest(ref, manifest)
        doc = json.loads(data)
    except NotFoundError:
        return None
    except (OciError, ValueError) as e:
        raise IndexFetchError(f"image manifest {ref.name}@{manifest}: {e}") from e
    annotations = doc.get("annotations") if isinstance(doc, dict) else None
    value = (annotations or {}).get(mt.ANNOTATION_INDEX_DIGEST)
    return str(value) if value else None


def find_index_digest(
    client: RegistryClient,
    store: LocalStore,
    ref: Reference,
    manifest: Digest,
    explicit: Digest | None,
    modes: DiscoveryModes,
) -> tuple[Digest, str]:
    """The index digest for image manifest `manifest` and how it was found.

    Raises NoIndex (nothing found, or every mode disabled), IndexFetchError (the registry
    failed in a way other than "not found", or an annotation is not a digest).
    """
    if explicit is not None:
        return explicit, "label"
    if not (modes.soci_v2 or modes.soci_v1 or modes.local_store):
        raise NoIndex("all lazy pull modes are disabled")
    if modes.soci_v2:
        value = _manifest_annotation(client, ref, manifest)
        if value:
            try:
                return Digest(value), "v2"
            except DigestError as e:
                raise IndexFetchError(
                    f"image manifest {ref.name}@{manifest}: bad {mt.ANNOTATION_INDEX_DIGEST}: {e}"
                ) from e
    if modes.soci_v1:
        try:
            found = client.referrers(ref, manifest, mt.SOCI_INDEX_V1)
        except OciError as e:
            raise IndexFetchError(f"referrers of {ref.name}@{manifest}: {e}") from e
        if found:
            return found[0].digest, "v1"
    if modes.local_store:
        records = store.list_indexes(image_digest=str(manifest))
        if records:
            return records[-1].digest, "local"
    raise NoIndex(f"no SOCI index for image manifest {ref.name}@{manifest}")


def _index_bytes(
    client: RegistryClient, store: LocalStore, ref: Reference, digest: Digest
) -> bytes:
    if store.has_blob(digest):
        try:
            return store.get_blob(digest)
        except StoreError as e:
            log.warning(
                "local index copy unusable, refetching", extra={"digest": digest, "error": str(e)}
            )
    try:
        _, data = client.get_manifest(ref, digest, accept=(mt.OCI_MANIFEST,))
    except OciError as e:
        raise IndexFetchError(f"SOCI index {ref.name}@{digest}: {e}") from e
    store.put_blob(data)
    return data


def _fetch_ztoc(client: RegistryClient, store: LocalStore, ref: Reference, digest: Digest) -> int:
    """Bring zTOC `digest` into the store; returns the bytes fetched (0 if already there)."""
    if store.has_blob(digest):
        return 0
    try:
        data = client.read_blob(ref, digest)
    except OciError as e:
        raise IndexFetchError(f"zTOC {ref.name}@{digest}: {e}") from e
    store.put_blob(data)
    return len(data)


def fetch_artifacts(
    client: RegistryClient,
    store: LocalStore,
    ref: Reference,
    manifest: Digest,
    explicit: Digest | None,
    modes: DiscoveryModes,
    *,
    parallel: int = 4,
    on_ztoc: Callable[[ZtocDescriptor], None] | None = None,
) -> ImageArtifacts:
    """Find the index of `manifest` and make it and all its zTOCs local (see module doc).

    `on_ztoc` is called (from a worker thread) with each zTOC's descriptor as soon as that
    zTOC is in the local store, so work on it can start while others still download; what
    it raises is logged and ignored.

    Raises NoIndex, IndexFetchError (any fetch, digest or decode failure: a partial fetch
    is a failure).
    """
    digest, how = find_index_digest(client, store, ref, manifest, explicit, modes)
    data = _index_bytes(client, store, ref, digest)
    try:
        index = soci_manifest.parse_index(data)
    except IndexManifestError as e:
        raise IndexFetchError(f"SOCI index {ref.name}@{digest}: {e}") from e

    def fetch(z: ZtocDescriptor) -> int:
        size = _fetch_ztoc(client, store, ref, z.digest)
        if on_ztoc is not None:
            try:
                on_ztoc(z)
            except Exception as e:
                log.debug("zTOC callback failed", extra={"digest": z.digest, "error": repr(e)})
        return size

    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="ztoc") as pool:
        fetched = sum(pool.map(fetch, index.ztocs))
    try:
        for z in index.ztocs:
            store.add_ztoc(z.digest, z.size, z.layer_digest, z.layer_media_type, z.span_size)
        store.add_index(
            digest,
            len(data),
            str(manifest),
            str(ref),
            "",
            index.artifact_type,
            [z.digest for z in index.ztocs],
        )
    except Exception as e:  # records are a convenience for `sociable index list`
        log.warning(
            "cannot record index in the local store", extra={"digest": digest, "error": repr(e)}
        )
    log.info(
        "soci index found",
        extra={
            "image": str(ref),
            "manifest": manifest,
            "index": digest,
            "found_by": how,
            "ztocs": len(index.ztocs),
            "ztoc_bytes_fetched": fetched,
        },
    )
    return ImageArtifacts(manifest, digest, index, how)
