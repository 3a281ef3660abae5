"""Find an image's SOCI index and bring its zTOCs into the local store.

Discovery order, fixed: the explicit `soci.index.digest` label; the v2 annotation
`com.amazon.soci.index-digest` on the image manifest fetched from the registry by its
digest; v1 referrers (referrers API, then the `sha256-<hex>` tag schema) when enabled;
the local store's record of an index for that manifest. The index manifest and every zTOC
are read from the local store when present, otherwise fetched from the image's repository
(each verified by digest) and stored. Registry reads are native trio I/O; local store calls
(blocking file and sqlite I/O) run in worker threads under `STORE_THREADS`.

zTOCs download in the background once the index is in (`fetch_artifacts` given a task
scope): a Prepare waits only for its own layer's zTOC (`ZtocDownloads.wait`), so a layer
the index does not cover is unpacked while the zTOCs still arrive. The largest zTOC is
fetched first and alone, with the whole link: its layer tree takes longest to build (about
a second per 50k entries), and containerd's Prepares cannot all finish before it is built;
the others follow concurrently (the client's gate bounds how many requests are in flight),
requested once all but `ZTOC_LEAD_BYTES` of the largest arrived, so that its last bytes,
its check and its store write overlap their requests instead of idling the link.
A failed zTOC fails only its own layer, which falls back; the others mount lazily.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from index import manifest as soci_manifest
from index.digest import Digest, DigestError
from index.manifest import IndexManifestError, SociIndex, ZtocDescriptor
from index.model import Ztoc
from index.oci import mediatypes as mt
from index.oci.blobs import MemorySink
from index.oci.client import AsyncRegistryClient
from index.oci.errors import NotFoundError, OciError
from index.oci.reference import Reference
from index.store import LocalStore, StoreError
from index.ztoc_codec import decode_ztoc
from snapshotter.tasks import TaskScope

from .errors import IndexFetchError, NoIndex

log = logging.getLogger(__name__)

T = TypeVar("T")

STORE_THREADS = trio.CapacityLimiter(4)
"""Worker threads for local store calls made by discovery (process-wide)."""

ZTOC_LEAD_BYTES = 2 * 1024 * 1024
"""The other zTOCs of an image are requested when the largest has this much left to arrive
(80 ms at 200 Mbit/s): ending it, checking and storing it took 0.1-0.2 s of idle link."""


class _NearlyInSink(MemorySink):
    """A zTOC collected in memory (at most `size` bytes); `nearly_in` is set once all but
    `lead` bytes of it arrived."""

    def __init__(self, what: str, size: int, lead: int, nearly_in: trio.Event) -> None:
        super().__init__(what, size)
        self._near = max(0, size - lead)
        self._nearly_in = nearly_in

    async def write(self, chunk: bytes) -> None:
        await super().write(chunk)
        if len(self.buf) >= self._near:
            self._nearly_in.set()


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


class ZtocDownloads:
    """Which zTOCs of an index are in the local store yet (`wait` for one). Made with the
    pending digests; without any, every zTOC counts as present. Use from the trio thread."""

    def __init__(self, pending: Iterable[Digest] = ()) -> None:
        self._events: dict[Digest, trio.Event] = {Digest(d): trio.Event() for d in pending}
        self._failed: dict[Digest, str] = {}

    def __repr__(self) -> str:
        waiting = sum(1 for e in self._events.values() if not e.is_set())
        return f"<ZtocDownloads waiting={waiting} failed={len(self._failed)}>"

    @property
    def failed(self) -> bool:
        """Whether some zTOC could not be fetched (the image is worth rediscovering)."""
        return bool(self._failed)

    def ready(self, digest: Digest) -> bool:
        """Whether zTOC `digest` is in the local store (or was never pending)."""
        event = self._events.get(digest)
        return event is None or (event.is_set() and digest not in self._failed)

    def settled(self, digest: Digest) -> bool:
        """Whether the outcome of zTOC `digest` is known (present, or failed)."""
        event = self._events.get(digest)
        return event is None or event.is_set()

    def done(self, digest: Digest, error: str | None = None) -> None:
        """zTOC `digest` is in the store (`error` None) or could not be fetched."""
        if error is not None:
            self._failed[digest] = error
        event = self._events.get(digest)
        if event is not None:
            event.set()

    async def wait(self, digest: Digest) -> None:
        """Return once zTOC `digest` is in the local store. Raises IndexFetchError when its
        download failed."""
        event = self._events.get(digest)
        if event is not None:
            await event.wait()
        error = self._failed.get(digest)
        if error is not None:
            raise IndexFetchError(error)


@dataclass(frozen=True, slots=True)
class ImageArtifacts:
    """An image's SOCI index and its zTOCs' downloads (`ztocs`: all present by default)."""

    manifest_digest: Digest
    index_digest: Digest
    index: SociIndex
    found_by: str
    """How the index was found: `label`, `v2`, `v1` or `local`."""
    ztocs: ZtocDownloads = field(default_factory=ZtocDownloads, compare=False)


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
    client: AsyncRegistryClient,
    store: LocalStore,
    ref: Reference,
    digest: Digest,
    size: int | None = None,
    nearly_in: trio.Event | None = None,
) -> int:
    """Bring zTOC `digest` into the store; returns the bytes fetched (0 if already there).
    With its `size`, `nearly_in` is set once all but `ZTOC_LEAD_BYTES` arrived (the caller
    sets it on every other outcome)."""
    if await _store(store.has_blob, digest):
        return 0
    try:
        if size is None or nearly_in is None:
            data = await client.read_blob(ref, digest)
        else:
            sink = _NearlyInSink(f"zTOC {ref.name}@{digest}", size, ZTOC_LEAD_BYTES, nearly_in)
            await client.fetch_blob(ref, digest, sink, size)
            data = bytes(sink.buf)
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
    downloads: ZtocDownloads,
    on_ztoc: Callable[[ZtocDescriptor], None] | None,
) -> int:
    """Every zTOC of `index` into the store, the largest first and alone, then the others
    concurrently; the bytes fetched. Each outcome goes to `downloads` as it is known (a
    failure, IndexFetchError, StoreError or OSError, only there); never raises those."""
    fetched = 0

    async def one(z: ZtocDescriptor, nearly_in: trio.Event | None = None) -> None:
        nonlocal fetched
        digest = Digest(z.digest)
        try:
            n = await _fetch_ztoc(client, store, ref, digest, z.size, nearly_in)
        except IndexFetchError as e:  # names the zTOC already
            downloads.done(digest, str(e))
            return
        except (StoreError, OSError) as e:
            downloads.done(digest, f"zTOC {ref.name}@{digest}: local store: {e}")
            return
        finally:
            if nearly_in is not None:
                nearly_in.set()
        fetched += n
        downloads.done(digest)
        if on_ztoc is not None:
            try:
                on_ztoc(z)
            except Exception as e:
                log.debug("zTOC callback failed", extra={"digest": z.digest, "error": repr(e)})

    largest_first = sorted(index.ztocs, key=lambda z: z.size, reverse=True)
    try:
        async with trio.open_nursery() as nursery:
            if largest_first:
                nearly_in = trio.Event()
                z = largest_first[0]
                nursery.start_soon(one, z, nearly_in, name=f"ztoc {z.digest}")
                await nearly_in.wait()
            for z in largest_first[1:]:
                nursery.start_soon(one, z, name=f"ztoc {z.digest}")
    finally:  # cancelled, or an unexpected error: no waiter may wait for nothing
        for z in index.ztocs:
            if not downloads.settled(Digest(z.digest)):
                downloads.done(Digest(z.digest), f"zTOC {ref.name}@{z.digest}: download ended")
    return fetched


async def fetch_artifacts(
    client: AsyncRegistryClient,
    store: LocalStore,
    ref: Reference,
    manifest: Digest,
    explicit: Digest | None,
    modes: DiscoveryModes,
    *,
    tasks: TaskScope | None = None,
    on_ztoc: Callable[[ZtocDescriptor], None] | None = None,
) -> ImageArtifacts:
    """Find the index of `manifest` and make it and all its zTOCs local (see module doc).

    With `tasks`, returns once the index is in: the zTOCs download in a task there, and
    `ImageArtifacts.ztocs` tells when each is local (or failed). Without, returns once all
    are local. `on_ztoc` is called (in the calling trio thread) with each zTOC's descriptor
    as soon as that zTOC is in the local store, so work on it can start while others still
    download; what it raises is logged and ignored.

    Raises NoIndex, IndexFetchError (the index, or without `tasks` any zTOC: a partial fetch
    is a failure), StoreError or OSError (the local store).
    """
    digest, how = await find_index_digest(client, store, ref, manifest, explicit, modes)
    data = await _index_bytes(client, store, ref, digest)
    try:
        index = soci_manifest.parse_index(data)
    except IndexManifestError as e:
        raise IndexFetchError(f"SOCI index {ref.name}@{digest}: {e}") from e
    downloads = ZtocDownloads(Digest(z.digest) for z in index.ztocs)
    artifacts = ImageArtifacts(manifest, digest, index, how, downloads)
    log.info(
        "soci index found",
        extra={"image": str(ref), "manifest": manifest, "index": digest, "found_by": how},
    )

    async def fetch_all() -> None:
        begin = trio.current_time()
        fetched = await _fetch_ztocs(client, store, ref, index, downloads, on_ztoc)
        log.info(
            "ztocs fetched",
            extra={
                "image": str(ref),
                "index": digest,
                "ztocs": len(index.ztocs),
                "ztoc_bytes_fetched": fetched,
                "failed": downloads.failed,
                "ms": round((trio.current_time() - begin) * 1000),
            },
        )
        if downloads.failed:
            return
        try:
            await _store(_record, store, ref, manifest, digest, len(data), index)
        except Exception as e:  # records are a convenience for `sociable index list`
            log.warning(
                "cannot record index in the local store", extra={"digest": digest, "error": repr(e)}
            )

    if tasks is not None and tasks.start_soon(fetch_all, name=f"ztocs of {digest}"):
        return artifacts
    await fetch_all()
    for z in index.ztocs:
        await downloads.wait(Digest(z.digest))  # raises the first failure
    return artifacts


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
