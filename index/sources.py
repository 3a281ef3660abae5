"""Image sources and sinks for the CLI: OCI image layouts and registries.

A source gives `index.convert` an image's manifests and blobs; a sink takes the converted
image (new blobs, manifests and the top-level index) and writes it next to the original.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from index.convert import ConvertedImage
from index.oci.descriptor import Descriptor
from index.oci.layout import OciLayout


class LayoutSource:
    """An image in an OCI image layout (directory or archive), selected by tag."""

    def __init__(self, layout: OciLayout, tag: str | None, name: str) -> None:
        self.layout = layout
        self.tag = tag
        self.name = name

    def __repr__(self) -> str:
        return f"LayoutSource({self.name!r})"

    # LayoutError passes through unchanged: its message names the layout and the blob.

    def resolve(self) -> Descriptor:
        return self.layout.resolve(self.tag)

    def read_manifest(self, desc: Descriptor) -> bytes:
        return self.read_blob(desc)

    def read_blob(self, desc: Descriptor) -> bytes:
        return self.layout.read_blob(desc.digest, desc.size)

    @contextlib.contextmanager
    def blob_file(self, desc: Descriptor) -> Iterator[Path]:
        # A layer in a directory layout is already a file: verify it, then hand it over as is.
        with self.layout.open_blob(desc.digest, desc.size) as f:
            while f.read(1 << 20):
                pass
        yield self.layout.root / "blobs" / "sha256" / desc.digest.hex


def write_to_layout(
    layout: OciLayout, converted: ConvertedImage, tag: str | None, replace: Descriptor | None
) -> None:
    """Add the converted image's blobs and manifests to `layout` and point `tag` at its index.

    With `replace`, the index.json entry for the original image (same digest) is swapped for
    the new index, keeping its annotations (ref name); otherwise the new index is tagged.
    """
    for data in [*converted.blobs.values(), *converted.manifests.values(), converted.root_bytes]:
        layout.write_blob(data)
    if tag is not None:
        layout.tag(converted.root, tag)
        return
    entries = layout.manifests()
    out = []
    for e in entries:
        if replace is not None and e.digest == replace.digest:
            out.append(
                Descriptor(
                    converted.root.media_type,
                    converted.root.digest,
                    converted.root.size,
                    annotations=e.annotations,
                )
            )
        else:
            out.append(e)
    if replace is None:
        out.append(converted.root)
    layout.set_index(out, layout.index().get("annotations"))
