"""zstd images served lazily: the tree is containerd's, the bytes are right, corruption is EIO.

One image of four zstd layers: busybox and a layer with every tar entry kind, both made
``zstd:chunked`` by Debian's skopeo; a layer in the zstd seekable format (whiteouts, an opaque
directory, a file across many frames); and a plain one-frame zstd layer from skopeo. It is
pushed to a local registry and indexed with ``sociable convert --zstd``: three layers get a
zTOC, the plain one is unpacked by the daemon at pull time. containerd 1.6 pulls it with its
own overlayfs snapshotter and through CRI with sociable; the two trees must be equal
attribute by attribute, and a container run on sociable's snapshots prints the right
checksums.

The fault test corrupts one byte of a frame of a zstd:chunked layer in the registry's
storage after indexing: reading a file in that span fails with EIO, a file elsewhere in the
layer still reads right.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from index.builder import build_ztoc
from index.model import UncompressedOffset
from index.zinfo import SpanMap
from tests.integration.test_lazy_tree import (
    REMOTE_LABEL,
    mounted_view,
    push_and_convert,
)
from tests.support import images, zstdimages
from tests.support.containerd import PROXY_NAME, start_containerd
from tests.support.images import Dir, File, Opaque, Whiteout
from tests.support.registry import RegistryServer
from tests.support.snapclient import run_daemon
from tests.support.treecompare import assert_same_tree, scan_tree

pytestmark = [pytest.mark.root, pytest.mark.slow]

SPAN_SIZE = 256 * 1024
SEEKABLE_LAYER: list[images.Entry] = [
    # Every parent is listed: a missing parent's mtime is the unpack time in containerd.
    Dir(path="data"),
    Dir(path="data/opaque"),
    Dir(path="seek"),
    Whiteout(path="data/doomed.txt"),
    Opaque(path="data/opaque"),
    File(path="data/opaque/new.txt", data=b"after opaque\n"),
    File(path="data/hello.txt", data=b"hello from the seekable layer\n"),
    File(path="seek/frames.bin", data=b"SEEK", size=1_700_000),
    Dir(path="seek/empty-dir"),
]
PLAIN_LAYER: list[images.Entry] = [
    Dir(path="etc"),
    Dir(path="plain"),
    File(path="etc/motd", data=b"from a plain zstd layer\n"),
    File(path="plain/data.bin", data=b"PLAIN", size=400_000),
]
CHECKED = ("data/big.bin", "data/hello.txt", "seek/frames.bin", "plain/data.bin", "bin/busybox")


@dataclass(frozen=True)
class Built:
    image: images.Image
    contents: dict[str, bytes]
    """The final content of the files in CHECKED (upper layers win)."""


def _tar_files(tar: bytes) -> dict[str, bytes]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        for m in tf:
            f = tf.extractfile(m) if m.isfile() else None
            if f is not None:
                out[m.name.lstrip("./")] = f.read()
    return out


def _features_layer() -> list[images.Entry]:
    """The standard image's layer of every entry kind, with its one unlisted parent listed."""
    entries = list(images.FEATURES_LAYER)
    long_dir = "data/" + "n" * 120
    at = next(i for i, e in enumerate(entries) if getattr(e, "path", "").startswith(long_dir))
    entries.insert(at, Dir(path=long_dir))
    return entries


def build_zstd_image(layout: Path, scratch: Path) -> Built:
    tars = [
        zstdimages.unpadded_tar(spec, scratch / "tars")
        for spec in (images.busybox_layer(), _features_layer(), SEEKABLE_LAYER, PLAIN_LAYER)
    ]
    (scratch / "chunked").mkdir(parents=True)
    (scratch / "plain").mkdir()
    chunked = zstdimages.chunked_layers(tars[:2], scratch / "chunked", "zstd:chunked")
    seekable = zstdimages.hand_layer(tars[2], scratch / "hand", "seekable", frame_size=100_000)
    [plain] = zstdimages.chunked_layers(tars[3:], scratch / "plain", "zstd")
    assert all(c.annotations for c in chunked) and not plain.annotations
    image = zstdimages.write_zstd_image(layout, [*chunked, seekable, plain], tag="v1")
    contents: dict[str, bytes] = {}
    for tar in tars:
        contents.update(_tar_files(tar))
    return Built(image, {p: contents[p] for p in CHECKED})


@pytest.fixture(scope="module")
def zstd_image(
    registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Built, str]:
    base = tmp_path_factory.mktemp("zstd-lazy")
    built: list[Built] = []

    def build(layout: Path) -> images.Image:
        built.append(build_zstd_image(layout, base / "scratch"))
        return built[0].image

    args = ("--zstd", "--min-layer-size", "0", "--span-size", str(SPAN_SIZE))
    pushed = push_and_convert(registry, base, build, "zstd-lazy", *args)
    return built[0], pushed.ref


def test_zstd_layers_are_lazy_and_equal_to_overlayfs(
    zstd_image: tuple[Built, str], registry: RegistryServer, tmp_path: Path
) -> None:
    built, ref = zstd_image
    image = built.image
    top = image.chain_ids[-1]
    with (
        run_daemon(tmp_path / "sociable") as daemon,
        start_containerd(
            tmp_path / "containerd",
            proxy_address=daemon.address,
            proxy_name=PROXY_NAME,
            cri_snapshotter=PROXY_NAME,
            registry_hosts=[registry.host],
        ) as ctd,
    ):
        backend = daemon.client()
        try:
            ctd.pull(ref, snapshotter="overlayfs")
            ctd.cri().pull_image(ref)
            remote = sum(1 for i in backend.list() if REMOTE_LABEL in i.labels)
            assert remote == 3, f"{remote} of 4 layers were mounted lazily:\n{daemon.log_tail()}"
            with (
                mounted_view(ctd, "overlayfs", "default", top, tmp_path / "ovl") as ovl,
                mounted_view(ctd, PROXY_NAME, "k8s.io", top, tmp_path / "soc") as soc,
            ):
                reference = scan_tree(ovl)
                n = reference.nodes
                assert "data/doomed.txt" not in n and "data/opaque/old.txt" not in n
                assert n["seek/frames.bin"].size == 1_700_000 and n["data/fifo"].kind == "fifo"
                assert dict(n["data/xattr.txt"].xattrs)["user.sociable.test"] == b"value-1"
                assert_same_tree(reference, scan_tree(soc))
            out = ctd.run(
                ref, "zstd-sums", "sha256sum", *(f"/{p}" for p in CHECKED), namespace="k8s.io"
            )
            sums = {line.split()[1].lstrip("/"): line.split()[0] for line in out.splitlines()}
            assert sums == {p: hashlib.sha256(d).hexdigest() for p, d in built.contents.items()}
        finally:
            backend.close()


def _blob_file(registry: RegistryServer, digest: str) -> Path:
    hexd = digest.removeprefix("sha256:")
    return registry.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def test_a_corrupt_frame_in_the_registry_is_eio(registry: RegistryServer, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    spec: list[images.Entry] = [
        Dir(path="f"),
        File(path="f/first.bin", data=os.urandom(16), size=900_000),
        File(path="f/second.bin", data=os.urandom(16), size=900_000),
    ]
    tar = zstdimages.unpadded_tar(spec, scratch / "tars")
    (scratch / "c").mkdir(parents=True)
    [layer] = zstdimages.chunked_layers([tar], scratch / "c", "zstd:chunked")

    def build(layout: Path) -> images.Image:
        return zstdimages.write_zstd_image(layout, [layer], tag="v1")

    args = ("--zstd", "--min-layer-size", "0", "--span-size", str(SPAN_SIZE))
    pushed = push_and_convert(registry, tmp_path, build, "zstd-fault", *args)
    # The span holding the middle of second.bin, found as the daemon will find it.
    ztoc = build_ztoc(layer.path, layer.media_type, SPAN_SIZE, zstd=True)
    spans = SpanMap.from_ztoc(ztoc)
    second = next(f for f in ztoc.files if f.name == "f/second.bin")
    span = spans.span_for_offset(
        UncompressedOffset(second.uncompressed_offset + second.uncompressed_size // 2)
    )
    start, end = spans.compressed_range(span)
    blob = _blob_file(registry, layer.digest)
    data = bytearray(blob.read_bytes())
    data[(start + end) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    files = _tar_files(tar)

    with (
        run_daemon(tmp_path / "sociable") as daemon,
        start_containerd(
            tmp_path / "containerd",
            proxy_address=daemon.address,
            proxy_name=PROXY_NAME,
            cri_snapshotter=PROXY_NAME,
            registry_hosts=[registry.host],
        ) as ctd,
    ):
        backend = daemon.client()
        try:
            ctd.cri().pull_image(pushed.ref)
            assert sum(1 for i in backend.list() if REMOTE_LABEL in i.labels) == 1
            top = pushed.image.chain_ids[-1]
            with mounted_view(ctd, PROXY_NAME, "k8s.io", top, tmp_path / "soc") as soc:
                assert (soc / "f/first.bin").read_bytes() == files["f/first.bin"]
                with pytest.raises(OSError) as err:
                    (soc / "f/second.bin").read_bytes()
                assert err.value.errno == errno.EIO
                # The file's first bytes are in an earlier, sound span: they still read.
                lo, _ = spans.uncompressed_range(span)
                assert second.uncompressed_offset + 4096 <= lo
                with open(soc / "f/second.bin", "rb") as f:
                    assert f.read(4096) == files["f/second.bin"][:4096]
        finally:
            backend.close()
