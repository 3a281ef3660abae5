"""The CLI's registry side: images read from a registry, converted images and v1 indexes
pushed to one, and Range reads of a layer for `ztoc get-file`."""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from index.convert import ConvertedImage, ConvertError, ImageSource, SelectedImage
from index.digest import Digest
from index.oci import mediatypes as mt
from index.oci.descriptor import Descriptor
from index.oci.dockerconfig import (
    ChainedCredentials,
    CredentialProvider,
    DockerConfig,
    StaticCredentials,
)
from index.oci.reference import Reference
from index.oci.registry import RegistryClient
from index.store import IndexRecord, LocalStore


class _Console(Protocol):
    def info(self, message: str) -> None: ...


def make_client(args: argparse.Namespace) -> RegistryClient:
    """A registry client configured from the CLI's registry flags."""
    providers: list[CredentialProvider] = []
    if getattr(args, "user", None):
        providers.append(StaticCredentials.parse(args.user))
    providers.append(DockerConfig())
    return RegistryClient(
        credentials=ChainedCredentials(*providers),
        hosts_dirs=getattr(args, "hosts_dir", None) or (),
        plain_http=True if getattr(args, "plain_http", False) else None,
        skip_verify=getattr(args, "skip_verify", False),
    )


class RegistrySource:
    """An image in a registry. Layers are downloaded to temp files, verified, for building."""

    def __init__(self, client: RegistryClient, ref: Reference, name: str) -> None:
        self.client = client
        self.ref = ref
        self.name = name

    def __repr__(self) -> str:
        return f"RegistrySource({self.name!r})"

    # RegistryError passes through unchanged: its message names the reference and digest.

    def resolve(self) -> Descriptor:
        return self.client.resolve(self.ref)

    def read_manifest(self, desc: Descriptor) -> bytes:
        return self.client.get_manifest(self.ref, desc.digest)[1]

    def read_blob(self, desc: Descriptor) -> bytes:
        return self.client.read_blob(self.ref, desc.digest)

    @contextlib.contextmanager
    def blob_file(self, desc: Descriptor) -> Iterator[Path]:
        tmpdir = Path(tempfile.mkdtemp(prefix="sociable-layer-"))
        path = tmpdir / desc.digest.hex
        try:
            self.client.fetch_blob(self.ref, desc.digest, path, desc.size)
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            os.rmdir(tmpdir)


@contextlib.contextmanager
def open_registry_source(text: str, args: argparse.Namespace) -> Iterator[RegistrySource]:
    ref = Reference.parse(text)
    with make_client(args) as client:
        yield RegistrySource(client, ref, text)


def push_converted(
    source: ImageSource,
    selected: SelectedImage,
    converted: ConvertedImage,
    args: argparse.Namespace,
    console: _Console,
) -> None:
    """Push the converted image to `args.dst`: the original blobs (mounted when the source is
    the same registry), the zTOCs, the manifests, then the new image index under the tag."""
    dst = Reference.parse(args.dst)
    if dst.digest is not None or dst.tag is None:
        raise ConvertError(f"destination {args.dst} must be a tagged reference without a digest")
    with make_client(args) as client:
        mount_from = (
            source.ref.repository
            if isinstance(source, RegistrySource) and source.ref.registry == dst.registry
            else None
        )
        for m in selected.manifests:
            config = Descriptor.from_json(m.doc["config"])
            client.push_blob(dst, source.read_blob(config), config.media_type)
            for layer in m.layers:
                if client.blob_exists(dst, layer.digest):
                    continue
                console.info(f"copying layer {layer.digest} ({layer.size} bytes)")
                with source.blob_file(layer) as path:
                    client.push_blob(dst, path, layer.media_type, mount_from=mount_from)
            client.push_manifest(dst, m.raw, m.desc.media_type, tag=str(m.desc.digest))
        for data in converted.blobs.values():
            client.push_blob(dst, data)
        for data in converted.manifests.values():
            client.push_manifest(dst, data, mt.OCI_MANIFEST, tag=str(Digest.of(data)))
        client.push_manifest(dst, converted.root_bytes, mt.OCI_INDEX, tag=dst.tag)
    console.info(f"pushed {dst}")


def push_v1_indexes(store: LocalStore, args: argparse.Namespace, console: _Console) -> None:
    """`sociable push REF`: the v1 indexes built for REF, newest per platform, with their zTOCs."""
    ref = Reference.parse(args.image)
    with make_client(args) as client:
        records = [r for r in store.list_indexes(ref=args.image) if r.manifest_version == "v1"]
        if not records:
            # Built under another spelling of the reference: match by the image's manifests.
            top = client.resolve(ref)
            records = [
                r
                for r in store.list_indexes()
                if r.manifest_version == "v1" and r.image_digest == top.digest
            ]
        wanted = set(args.platform or ())
        newest: dict[str, IndexRecord] = {}
        for r in records:
            if wanted and r.platform not in wanted:
                continue
            newest[r.platform] = r
        if not newest:
            raise ConvertError(
                f"no v1 SOCI index built for {args.image}; run `sociable create` first"
            )
        for r in newest.values():
            _push_one_v1(client, ref, store, r.digest, r.image_digest, args, console)


def _push_one_v1(
    client: RegistryClient,
    ref: Reference,
    store: LocalStore,
    index_digest: Digest,
    image_digest: Digest,
    args: argparse.Namespace,
    console: _Console,
) -> None:
    existing = client.referrers(ref, image_digest, mt.SOCI_INDEX_V1)
    if existing and args.existing_index != "allow":
        names = ", ".join(str(d.digest) for d in existing)
        if args.existing_index == "skip":
            console.info(f"skipping {index_digest}: {image_digest} already has SOCI index {names}")
            return
        console.info(f"warning: {image_digest} already has SOCI index {names}; pushing anyway")
    data = store.get_blob(index_digest)
    client.push_blob(ref, mt.EMPTY_CONFIG_DATA)
    for z in store.list_ztocs(index_digests=[index_digest]):
        client.push_blob(ref, store.get_blob(z.digest))
    result = client.push_manifest(ref, data, mt.OCI_MANIFEST, tag=str(index_digest))
    how = "registry indexes referrers" if result.subject_indexed else "referrers tag updated"
    print(f"pushed {index_digest} for {image_digest} ({how})")


@contextlib.contextmanager
def layer_range_reader(
    image: str, layer_digest: Digest, args: argparse.Namespace
) -> Iterator[Callable[[int, int], bytes]]:
    """A `read(start, end)` over the layer blob, served by Range requests."""
    ref = Reference.parse(image)
    with make_client(args) as client:

        def read(start: int, end: int) -> bytes:
            return client.fetch_blob_range(ref, layer_digest, start, end - start)

        yield read
