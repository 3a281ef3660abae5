"""Find an image's SOCI index and bring its zTOCs into the local store.

Discovery order, fixed: the explicit `soci.index.digest` label; the v2 annotation
`com.amazon.soci.index-digest` on the image manifest fetched from the registry by its
digest; v1 referrers (referrers API, then the `sha256-<hex>` tag schema) when enabled;
the local store's record of an index for that manifest. The index manifest and every zTOC
are read from the local store when present, otherwise fetched from the image's repository
(zTOCs concurrently, each verified by digest; the client's gate bounds how many requests
are in flight) and stored. Registry reads are native trio I/O; local store calls (blocking
file and sqlite I/O) run in worker threads under `STORE_THREADS`.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from index import manifest as soci_manifest
from index.digest import Digest, DigestError
from index.manifest import IndexManifestError, SociIndex, ZtocDescriptor
from index.model import Ztoc
from index.oci import mediatypes as mt
from index.oci.client import AsyncRegistryClient
from index.oci.errors import NotFoundError, OciError
from index.oci.reference import Reference
from index.store import LocalStore, StoreError
from index.ztoc_codec import decode_ztoc

from .errors import IndexFetchError, NoIndex

log = logging.getLogger(__name__)

T = TypeVar("T")

STORE_THREADS = trio.CapacityLimiter(4)
"""Worker threads for local store calls made by discovery (process-wide)."""


async def _store(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` (a blocking LocalStore call) in a worker thread under
    STORE_THREADS."""
    return await trio.to_thread.run_sync(
        functools.partial(fn, *args, **kwargs), limiter=STORE_THREADS
    )


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


async def _manifest_annotation(
    client: AsyncRegistryClient, ref: Reference, manifest: Digest
) -> str | None:
    try:
        _, data = await client.get_manifest(ref, manifest)
        doc = json.loads(data)
    except NotFoundError:
        return None
    except (OciError, ValueError) as e:
        raise IndexFetchError(f"image manifest {ref.name}@{manifest}: {e}") from e
    annotations = doc.get("annotations") if isinstance(doc, dict) else None
    value = annotations.get(mt.ANNOTATION_INDEX_DIGEST) if isinstance(annotations, dict) else None
    return str(value) if value else None


async def find_index_digest(
    client: AsyncRegistryClient,
    store: LocalStore,
    ref: Reference,
    manifest: Digest,
    explicit: Digest | None,
    modes: DiscoveryModes,
) -> tuple[Digest, str]:
    """The index digest for image manifest `manifest` and how it was found.

    Raises NoIndex (nothing found, or every mode disabled), IndexFetchError (the registry
    failed in a way other than "not found", or an annotation is not a digest), StoreError.
    """
    if explicit is not None:
        return explicit, "label"
    if not (modes.soci_v2 or modes.soci_v1 or modes.local_store):
        raise NoIndex("all lazy pull modes are disabled")
    if modes.soci_v2:
        value = await _manifest_annotation(client, ref, manifest)
        if value:
            try:
                return Digest(value), "v2"
            except DigestError as e:
                raise IndexFetchError(
                    f"image manifest {ref.name}@{manifest}: bad {mt.ANNOTATION_INDEX_DIGEST}: {e}"
                ) from e
    if modes.soci_v1:
        try:
            found = await client.referrers(ref, manifest, mt.SOCI_INDEX_V1)
        except OciError as e:
            raise IndexFetchError(f"referrers of {ref.name}@{manifest}: {e}") from e
        if found:
            return found[0].digest, "v1"
    if modes.local_store:
        records = await _store(store.list_indexes, image_digest=str(manifest))
        if records:
            return records[-1].digest, "local"
    raise NoIndex(f"no SOCI index for image manifest {ref.name}@{manifest}")


async def _index_bytes(
    client: AsyncRegistryClient, store: LocalStore, ref: Reference, digest: Digest
) -> bytes:
    if await _store(store.has_blob, digest):
        try:
            return await _store(store.get_blob, digest)
        except StoreError as e:
            log.warning(
                "local index copy unusable, refetching", extra={"digest": digest, "error": str(e)}
            )
    try:
        _, data = await client.get_manifest(ref, digest, accept=(mt.OCI_MANIFEST,))
    except OciError as e:
        raise IndexFetchError(f"SOCI index {ref.name}@{digest}: {e}") from e
    await _store(store.put_blob, data)
    return data


async def _fetch_ztoc(
    client: AsyncRegistryClient, store: LocalStore, ref: Reference, digest: Digest
) -> int:
    """Bring zTOC `digest` into the store; returns the bytes fetched (0 if already there)."""
    if await _store(store.has_blob, digest):
        return 0
    try:
        data = await client.read_blob(ref, digest)
    except OciError as e:
        raise IndexFetchError(f"zTOC {ref.name}@{digest}: {e}") from e
    await _store(store.put_blob, data)
    return len(data)


async def load_ztoc(
    client: AsyncRegistryClient, store: LocalStore, ref: Reference, digest: Digest
) -> Ztoc:
    """zTOC `digest` from the store, fetched from `ref`'s repository first when absent (for a
    chunk owner serving a layer it has not mounted). Raises IndexFetchError, StoreError,
    and the codec's errors for a blob that is not a zTOC."""
    await _fetch_ztoc(client, store, ref, digest)
    data = await _store(store.get_blob, digest)
    return await trio.to_thread.run_sync(decode_ztoc, data, limiter=STORE_THREADS)


async def _fetch_ztocs(
    client: AsyncRegistryClient,
    store: LocalStore,
    ref: Reference,
    index: SociIndex,
    on_ztoc: Callable[[ZtocDescriptor], None] | None,
) -> int:
    """Every zTOC of `index` into the store, concurrently; the bytes fetched.

    The first failure cancels the others and is raised (IndexFetchError, StoreError,
    OSError).
    """
    fetched = 0
    failures: list[Exception] = []

    async def one(z: ZtocDescriptor, cancel: trio.CancelScope) -> None:
        nonlocal fetched
        try:
            fetched += await _fetch_ztoc(client, store, ref, z.digest)
        except (IndexFetchError, StoreError, OSError) as e:
            failures.append(e)
            cancel.cancel()
            return
        if on_ztoc is not None:
            try:
                on_ztoc(z)
            except Exception as e:
                log.debug("zTOC callback failed", extra={"digest": z.digest, "error": repr(e)})

    async with trio.open_nursery() as nursery:
        for z in index.ztocs:
            nursery.start_soon(one, z, nursery.cancel_scope, name=f"ztoc {z.digest}")
    if failures:
        raise failures[0]
    return fetched


async def fetch_artifacts(
    client: AsyncRegistryClient,
    store: LocalStore,
    ref: Reference,
    manifest: Digest,
    explicit: Digest | None,
    modes: DiscoveryModes,
    *,
    on_ztoc: Callable[[ZtocDescriptor], None] | None = None,
) -> ImageArtifacts:
    """Find the index of `manifest` and make it and all its zTOCs local (see module doc).

    `on_ztoc` is called (in the calling trio thread) with each zTOC's descriptor as soon as
    that zTOC is in the local store, so work on it can start while others still download;
    what it raises is logged and ignored.

    Raises NoIndex, IndexFetchError (any fetch, digest or decode failure: a partial fetch
    is a failure), StoreError or OSError (the local store).
    """
    digest, how = await find_index_digest(client, store, ref, manifest, explicit, modes)
    data = await _index_bytes(client, store, ref, digest)
    try:
        index = soci_manifest.parse_index(data)
    except IndexManifestError as e:
        raise IndexFetchError(f"SOCI index {ref.name}@{digest}: {e}") from e
    fetched = await _fetch_ztocs(client, store, ref, index, on_ztoc)
    try:
        await _store(_record, store, ref, manifest, digest, len(data), index)
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


def _record(
    store: LocalStore,
    ref: Reference,
    manifest: Digest,
    digest: Digest,
    size: int,
    index: SociIndex,
) -> None:
    for z in index.ztocs:
        store.add_ztoc(z.digest, z.size, z.layer_digest, z.layer_media_type, z.span_size)
    store.add_index(
        digest,
        size,
        str(manifest),
        str(ref),
        "",
        index.artifact_type,
        [z.digest for z in index.ztocs],
    )
