"""Building SOCI indexes for an image: `sociable create` (v1) and `sociable convert` (v2).

The image comes from an `ImageSource` (a registry or an OCI layout); zTOCs and indexes go to the
`LocalStore`. Layers are built in parallel threads (the inflate loop and hashing release the
GIL). The v2 output (the rewritten manifests and OCI index, docs/format.md) is returned as
bytes for a sink to write; nothing here talks to a registry directly, and a converted image's
indexes are recorded in the store (`record_converted`) only once its sink has written it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from index.builder import LayerSkipped, build_ztoc, describe_compression, is_zstd_layer
from index.digest import Digest
from index.errors import SociableError
from index.manifest import (
    SociIndex,
    ZtocDescriptor,
    add_index_descriptor,
    image_index_json,
    index_descriptor_v2,
    new_index,
    rewrite_image_manifest,
)
from index.model import DEFAULT_MIN_LAYER_SIZE, DEFAULT_SPAN_SIZE
from index.oci import mediatypes as mt
from index.oci.descriptor import Descriptor
from index.oci.errors import OciError
from index.oci.platform import Platform, select_platform
from index.store import LocalStore, StoreError
from index.ztoc_codec import encode_ztoc


class ConvertError(SociableError):
    """An image cannot be indexed: the message names the image, platform or layer and why."""


class ImageSource(Protocol):
    """Where an image's manifests and blobs are read from (a registry or an OCI layout)."""

    name: str
    """How the image is named to the user (a reference, or `oci-layout:PATH:TAG`)."""

    def resolve(self) -> Descriptor:
        """The top-level descriptor (an image manifest or an image index)."""
        ...

    def read_manifest(self, desc: Descriptor) -> bytes:
        """The manifest's bytes, verified against `desc.digest`."""
        ...

    def read_blob(self, desc: Descriptor) -> bytes:
        """A small blob (a config), verified."""
        ...

    @contextlib.contextmanager
    def blob_file(self, desc: Descriptor) -> Iterator[Path]:
        """A local file holding the verified blob for the duration of the context."""
        ...


Reporter = Callable[[str], None]
"""Receives one-line messages for the user (skips, reuse, warnings)."""


@dataclass(frozen=True)
class BuildOptions:
    span_size: int = DEFAULT_SPAN_SIZE
    min_layer_size: int = DEFAULT_MIN_LAYER_SIZE
    platforms: tuple[Platform, ...] = ()
    all_platforms: bool = False
    force: bool = False
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    zstd: bool = False
    """Index zstd layers that allow random access (`--zstd`); AWS's readers cannot use
    their zTOCs (docs/format.md, "zstd layers")."""


@dataclass(frozen=True)
class ImageManifest:
    """One platform's image manifest, as the source has it."""

    desc: Descriptor
    raw: bytes
    doc: dict[str, Any]
    platform: Platform

    @property
    def layers(self) -> list[Descriptor]:
        """The layer descriptors. Raises ConvertError, DescriptorError (malformed)."""
        return [Descriptor.from_json(d) for d in _array(self.doc, "layers", str(self.desc.digest))]


@dataclass(frozen=True)
class BuiltIndex:
    image: ImageManifest
    index: SociIndex
    index_bytes: bytes

    @property
    def digest(self) -> Digest:
        return Digest.of(self.index_bytes)


@dataclass(frozen=True)
class SelectedImage:
    root: Descriptor
    image_index: dict[str, Any] | None
    """The parsed image index when the source's top level is one; None for a lone manifest."""
    manifests: list[ImageManifest]


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise ConvertError(f"{what} is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ConvertError(f"{what} is not a JSON object")
    return doc


def _array(doc: dict[str, Any], key: str, what: str) -> list[Any]:
    """`doc[key]` as a list ([] when absent or null). Raises ConvertError for another type."""
    value = doc.get(key) or []
    if not isinstance(value, list):
        raise ConvertError(f"{what}: {key} is not a JSON array")
    return value


def select_manifests(source: ImageSource, opts: BuildOptions) -> SelectedImage:
    """The platform manifests to index: all, the requested ones, or the host's.

    Raises ConvertError, or the source's OciError (a document of the wrong shape is a
    DescriptorError naming the field)."""
    root = source.resolve()
    if mt.is_manifest(root.media_type):
        raw = source.read_manifest(root)
        doc = _json(raw, f"manifest {root.digest} of {source.name}")
        config = _json(
            source.read_blob(Descriptor.from_json(doc.get("config"))), f"config of {source.name}"
        )
        platform = root.platform or Platform(
            os=str(config.get("os", "linux")),
            architecture=str(config.get("architecture", "amd64")),
            variant=str(config.get("variant", "")),
        )
        if opts.platforms and not any(p.matches(platform) for p in opts.platforms):
            wanted = ", ".join(map(str, opts.platforms))
            raise ConvertError(f"{source.name} is {platform}, not {wanted}")
        return SelectedImage(root, None, [ImageManifest(root, raw, doc, platform)])
    if not mt.is_index(root.media_type):
        raise ConvertError(f"{source.name} is a {root.media_type}, not an image or image index")
    image_index = _json(source.read_manifest(root), f"image index of {source.name}")
    candidates = [
        Descriptor.from_json(m)  # an entry that is not an object: DescriptorError
        for m in _array(image_index, "manifests", f"image index of {source.name}")
        if not isinstance(m, dict)
        or (
            mt.is_manifest(str(m.get("mediaType", "")))
            and not mt.is_soci_index(str(m.get("artifactType", "")))
        )
    ]
    platforms = [c.platform or Platform("unknown", "unknown") for c in candidates]
    if opts.all_platforms:
        chosen = list(range(len(candidates)))
    else:
        chosen = []
        for want in opts.platforms or (Platform.host(),):
            i = select_platform(want, platforms)
            if i is None:
                have = ", ".join(map(str, platforms)) or "none"
                raise ConvertError(f"{source.name} has no manifest for {want} (it has: {have})")
            if i not in chosen:
                chosen.append(i)
    manifests = []
    for i in chosen:
        raw = source.read_manifest(candidates[i])
        doc = _json(raw, f"manifest {candidates[i].digest} of {source.name}")
        Descriptor.from_json(doc.get("config"))  # a manifest without a usable config is refused
        manifests.append(ImageManifest(candidates[i], raw, doc, platforms[i]))
    return SelectedImage(root, image_index, manifests)


def _build_one_layer(
    source: ImageSource,
    layer: Descriptor,
    opts: BuildOptions,
    store: LocalStore,
    report: Reporter,
    advance: Callable[[int], None],
    diff_id: str | None = None,
) -> ZtocDescriptor | None:
    """The zTOC for one layer, built or reused; None (with a message) when the layer is skipped.

    Every layer gets one message saying what was done: indexed (and how: gzip, tar,
    zstd:chunked, seekable or multi-frame zstd), reused, or skipped and why. `advance(n)` is
    told of every `n` more blob bytes indexed (from the building thread). `diff_id`, when
    known, is checked against a zstd layer's decoded stream.
    """
    if not mt.is_layer(layer.media_type):
        raise ConvertError(f"layer {layer.digest}: {layer.media_type} is not a layer mediaType")
    if layer.size < opts.min_layer_size:
        report(
            f"ztoc skipped - layer {layer.digest} ({layer.media_type}) size {layer.size} "
            f"is less than min-layer-size {opts.min_layer_size}"
        )
        return None
    zstd = is_zstd_layer(layer.media_type)
    if zstd and not opts.zstd:
        report(
            f"ztoc skipped - layer {layer.digest} ({layer.media_type}): zstd layers are "
            "indexed only with --zstd; unpacked when pulled"
        )
        return None
    if not opts.force and (found := store.find_ztoc(layer.digest, opts.span_size)) is not None:
        report(f"layer {layer.digest}: reusing zTOC {found.digest}")
        return ZtocDescriptor(
            found.digest, found.size, layer.digest, layer.media_type, opts.span_size
        )
    done = 0

    def on_progress(total: int) -> None:
        nonlocal done
        advance(total - done)
        done = total

    try:
        with source.blob_file(layer) as path:
            ztoc = build_ztoc(
                path,
                layer.media_type,
                opts.span_size,
                on_progress=on_progress,
                zstd=opts.zstd,
                annotations=layer.annotations,
                diff_id=diff_id if zstd else None,
            )
    except LayerSkipped as e:
        report(f"ztoc skipped - layer {layer.digest} ({layer.media_type}): {e}")
        return None
    report(
        f"layer {layer.digest}: indexed {describe_compression(ztoc.compression)}, "
        f"{ztoc.compression.max_span_id + 1} spans"
    )
    data = encode_ztoc(ztoc)
    digest = store.put_blob(data)
    store.add_ztoc(digest, len(data), layer.digest, layer.media_type, opts.span_size)
    return ZtocDescriptor(digest, len(data), layer.digest, layer.media_type, opts.span_size)


def _zstd_diff_ids(source: ImageSource, manifests: Sequence[ImageManifest]) -> dict[Digest, str]:
    """Layer digest -> the image config's diffID, for the zstd layers of `manifests`."""
    out: dict[Digest, str] = {}
    for m in manifests:
        if not any(is_zstd_layer(layer.media_type) for layer in m.layers):
            continue
        config = _json(
            source.read_blob(Descriptor.from_json(m.doc["config"])), f"config of {source.name}"
        )
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        for layer, diff_id in zip(m.layers, diff_ids, strict=False):
            if isinstance(diff_id, str):
                out.setdefault(layer.digest, diff_id)
    return out


def build_layer_ztocs(
    source: ImageSource,
    manifests: Sequence[ImageManifest],
    opts: BuildOptions,
    store: LocalStore,
    report: Reporter,
    advance: Callable[[int], None] = lambda n: None,
) -> dict[Digest, ZtocDescriptor | None]:
    """Build (or reuse) one zTOC per distinct layer of `manifests`, in parallel.

    `advance(n)` is called (from worker threads) as `n` more bytes of layer blobs are done, so
    that the sizes of all layers add up to the total once every layer is built or skipped.

    A layer that fails (an unsupported tar entry, a corrupt blob) is reported and left out, as
    the AWS CLI does; the caller decides whether an index with what is left is worth having.
    """
    layers: dict[Digest, Descriptor] = {}
    for m in manifests:
        for layer in m.layers:
            layers.setdefault(layer.digest, layer)
    diff_ids = _zstd_diff_ids(source, manifests) if opts.zstd else {}
    results: dict[Digest, ZtocDescriptor | None] = {}

    def work(layer: Descriptor) -> tuple[Descriptor, ZtocDescriptor | None]:
        counted = 0

        def count(n: int) -> None:
            nonlocal counted
            counted += n
            advance(n)

        try:
            return layer, _build_one_layer(
                source, layer, opts, store, report, count, diff_ids.get(layer.digest)
            )
        except (ConvertError, OciError, StoreError):
            raise  # the source or the store failed, not this layer: stop
        except Exception as e:
            report(f"ztoc failed - layer {layer.digest} of {source.name}: {e}")
            return layer, None
        finally:
            advance(max(0, layer.size - counted))  # skipped, reused or failed: count it done

    # Largest first so that the longest build starts early and the pool stays busy.
    ordered = sorted(layers.values(), key=lambda d: d.size, reverse=True)
    with ThreadPoolExecutor(max_workers=max(1, opts.workers), thread_name_prefix="ztoc") as pool:
        for layer, ztoc in pool.map(work, ordered):
            results[layer.digest] = ztoc
    return results


def build_indexes(
    source: ImageSource,
    selected: SelectedImage,
    ztocs: Mapping[Digest, ZtocDescriptor | None],
    *,
    v2: bool,
    store: LocalStore,
    report: Reporter,
) -> list[BuiltIndex]:
    """One SOCI index per platform manifest, stored locally.

    A platform whose layers all ended up without a zTOC is skipped with a message; raises
    ConvertError when every platform is.
    """
    built: list[BuiltIndex] = []
    for m in selected.manifests:
        entries = [z for layer in m.layers if (z := ztocs.get(layer.digest)) is not None]
        if not entries:
            report(f"{source.name} ({m.platform}): no ztocs created, platform skipped")
            continue
        subject = None if v2 else m.desc.to_json()
        index = new_index(entries, v2=v2, subject=subject)
        built.append(BuiltIndex(m, index, index.to_json()))
    if not built:
        raise ConvertError(
            f"{source.name}: no ztocs created, all layers either skipped or produced errors"
        )
    store.put_blob(mt.EMPTY_CONFIG_DATA)
    for b in built:
        store.put_blob(b.index_bytes)
    return built


@dataclass(frozen=True)
class BoundIndex:
    """A v2 index and the rewritten image manifest that now carries it."""

    built: BuiltIndex
    manifest_digest: Digest
    """The digest of the rewritten image manifest (annotated with the index digest)."""


@dataclass(frozen=True)
class ConvertedImage:
    """The v2 output of `convert`: new blobs and manifests to add next to the original image."""

    root: Descriptor
    """The new top-level descriptor: an OCI image index."""
    root_bytes: bytes
    manifests: dict[Digest, bytes]
    """Rewritten image manifests and the SOCI index manifests, by digest."""
    blobs: dict[Digest, bytes]
    """zTOCs and the `{}` config blob, by digest."""
    bound: tuple[BoundIndex, ...] = ()
    """Each index with the rewritten manifest it is bound to (for `record_converted`)."""


def bind_v2(
    selected: SelectedImage, built: Sequence[BuiltIndex], store: LocalStore
) -> ConvertedImage:
    """Rewrite the image's manifests and OCI index to carry the v2 indexes (docs/format.md).

    Reads the zTOC blobs from `store`; records nothing (see `record_converted`).
    Raises StoreError when a zTOC blob is missing or corrupt.
    """
    by_manifest = {b.image.desc.digest: b for b in built}
    if selected.image_index is not None:
        image_index = dict(selected.image_index)
        entries = [dict(e) for e in image_index.get("manifests") or []]
    else:
        image_index = {"schemaVersion": 2}
        entries = [{**selected.root.to_json(), "platform": built[0].image.platform.to_json()}]
    manifests: dict[Digest, bytes] = {}
    blobs: dict[Digest, bytes] = {mt.EMPTY_CONFIG_DIGEST: mt.EMPTY_CONFIG_DATA}
    image_by_digest = {m.desc.digest: m for m in selected.manifests}
    new_entries: list[dict[str, Any]] = []
    index_descs: list[dict[str, Any]] = []
    bound: list[BoundIndex] = []
    for entry in entries:
        digest = entry.get("digest")
        m = image_by_digest.get(Digest(digest)) if isinstance(digest, str) else None
        if m is None:
            new_entries.append(entry)  # not local, not indexed: untouched
            continue
        b = by_manifest.get(m.desc.digest)
        rewritten = rewrite_image_manifest(m.doc, b.digest if b is not None else None)
        new_digest = Digest.of(rewritten)
        manifests[new_digest] = rewritten
        doc = json.loads(rewritten)
        entry = {
            **entry,
            "mediaType": mt.OCI_MANIFEST,
            "digest": new_digest,
            "size": len(rewritten),
        }
        if doc.get("annotations"):
            entry["annotations"] = doc["annotations"]
        new_entries.append(entry)
        if b is not None:
            manifests[b.digest] = b.index_bytes
            for z in b.index.ztocs:
                blobs[z.digest] = store.get_blob(z.digest)
            index_descs.append(index_descriptor_v2(b.index_bytes, new_digest, m.platform.to_json()))
            bound.append(BoundIndex(b, new_digest))
    image_index["manifests"] = new_entries
    for desc in index_descs:
        add_index_descriptor(image_index, desc)
    root_bytes = image_index_json(image_index)
    root = Descriptor(mt.OCI_INDEX, Digest.of(root_bytes), len(root_bytes))
    return ConvertedImage(root, root_bytes, manifests, blobs, tuple(bound))


def record_converted(store: LocalStore, converted: ConvertedImage, image_ref: str) -> None:
    """Record each index of `converted` in `store` under `image_ref` (the destination).

    Call only after the destination holds the converted image: a failed write must leave
    `sociable index list` as it was. Raises StoreError.
    """
    for bi in converted.bound:
        b = bi.built
        store.add_index(
            b.digest,
            len(b.index_bytes),
            bi.manifest_digest,
            image_ref,
            str(b.image.platform),
            b.index.artifact_type,
            [z.digest for z in b.index.ztocs],
        )


@contextlib.contextmanager
def temp_blob_file(dir_hint: Path | None = None) -> Iterator[Path]:
    """A temporary file path for a downloaded blob, removed afterwards."""
    fd, name = tempfile.mkstemp(prefix="sociable-layer-", dir=dir_hint)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
