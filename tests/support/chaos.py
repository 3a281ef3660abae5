"""What the chaos tests share: a seeded RNG, an indexed image of pseudo-random files, lazy
layers mounted by a real daemon through the Snapshots API, and bounded FUSE reads.

- `chaos_seed(name)`: the seed of one randomised case, from `SOCIABLE_CHAOS_SEED` when set
  (replay), else drawn; printed either way.
- `push_chaos_image(...)`: layers of pseudo-random files converted with `sociable convert`
  (SOCI v2, small spans) into a registry; the files' contents are kept to compare reads with.
- `prepare_remote(...)`: a Prepare with CRI's labels, as containerd's unpacker sends it; the
  daemon mounts the layer lazily and answers ALREADY_EXISTS.
- `read_file(path)`: the whole file, or the `OSError` the read failed with, within a time
  bound, with the file's pages dropped from the kernel's cache first (so the daemon serves it).
"""

from __future__ import annotations

import json
import os
import random
import tarfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx

from index.builder import build_ztoc
from index.zinfo import SpanMap
from snapshotter.remote import labels as L
from tests.support import images
from tests.support.cli import sociable
from tests.support.snapclient import SnapClient, SnapDaemon

KIB = 1024
MIB = 1024 * KIB
READ_TIMEOUT_SEC = 60.0
"""Longest one whole-file FUSE read may take in a chaos test (a hang fails the test)."""


def chaos_seed(name: str) -> int:
    """The seed of the randomised case `name`: `SOCIABLE_CHAOS_SEED` or a fresh one; printed."""
    seed = int(os.environ.get("SOCIABLE_CHAOS_SEED", random.randrange(2**32)))
    print(f"{name}: chaos seed {seed} (SOCIABLE_CHAOS_SEED={seed} replays it)")
    return seed


@dataclass(frozen=True)
class ChaosLayer:
    """One layer of the image: its digest, its files (path in the layer → content), the gzip
    blob and the span size it was indexed with."""

    digest: str
    files: dict[str, bytes]
    path: Path
    span_size: int

    def span_digests(self) -> frozenset[str]:
        """The digests of the layer's compressed spans (`sha256:<hex>`), as its zTOC has
        them: every file of the span cache must hash to one of them."""
        ztoc = build_ztoc(self.path, images.MEDIA_LAYER_GZIP, self.span_size)
        return frozenset(SpanMap.from_ztoc(ztoc).span_digests)


@dataclass(frozen=True)
class ChaosImage:
    """The converted image in a registry: repository, tag, indexed platform manifest."""

    repository: str
    tag: str
    manifest: str
    layers: tuple[ChaosLayer, ...]

    def ref(self, host: str) -> str:
        return f"{host}/{self.repository}:{self.tag}"


def _layer_files(layer: images.Layer, span_size: int) -> ChaosLayer:
    files: dict[str, bytes] = {}
    with tarfile.open(layer.path, "r:gz") as tf:
        for member in tf:
            if member.isreg():
                f = tf.extractfile(member)
                assert f is not None
                files[member.name.lstrip("./")] = f.read()
    return ChaosLayer(layer.digest, files, layer.path, span_size)


def _indexed_manifest(registry_url: str, repository: str, tag: str) -> str:
    resp = httpx.get(
        f"{registry_url}/v2/{repository}/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.index.v1+json"},
        timeout=30,
    )
    resp.raise_for_status()
    for desc in resp.json()["manifests"]:
        if "com.amazon.soci.index-digest" in desc.get("annotations", {}):
            return str(desc["digest"])
    raise AssertionError(f"no indexed manifest in {resp.text}")


def push_chaos_image(
    registry_host: str,
    registry_url: str,
    base: Path,
    repository: str,
    *,
    layers: int = 1,
    files: int = 16,
    file_bytes: int = 160 * KIB,
    span_size: int = 128 * KIB,
) -> ChaosImage:
    """`layers` layers of `files` pseudo-random files each (incompressible: the compressed
    layer is about as large as its files), converted with `span_size` spans."""
    tag = "v1"
    specs = [
        [
            images.File(path=f"chaos/{repository}/l{n}/f{i:02d}.bin", size=file_bytes + i * 1021)
            for i in range(files)
        ]
        for n in range(layers)
    ]
    image = images.write_oci_layout(base / "layout", specs, tag=tag)
    sociable(
        "convert",
        "--min-layer-size",
        "0",
        "--span-size",
        str(span_size),
        f"oci-layout:{image.layout}:{tag}",
        f"{registry_host}/{repository}:{tag}-soci",
        root=base / "convert-root",
    )
    return ChaosImage(
        repository,
        f"{tag}-soci",
        _indexed_manifest(registry_url, repository, f"{tag}-soci"),
        tuple(_layer_files(layer, span_size) for layer in image.layers),
    )


def write_config(base: Path, remote: str) -> Path:
    """A daemon config file with `[remote]` settings `remote` (no hosts.toml directory)."""
    base.mkdir(parents=True, exist_ok=True)
    path = base / "sociable.toml"
    path.write_text(f'[remote]\nhosts_dir = ""\n{remote}\n')
    return path


def prepare_remote(
    snap: SnapClient, host: str, image: ChaosImage, layer: ChaosLayer, parent: str = ""
) -> str:
    """Prepare `layer` (on `parent`) with CRI's labels; asserts the daemon mounted it lazily.
    Returns the committed snapshot's name."""
    target = f"sha256:{uuid.uuid4().hex}{uuid.uuid4().hex}"
    labels = {
        L.TARGET_REF: target,
        L.CRI_IMAGE_REF: image.ref(host),
        L.CRI_MANIFEST_DIGEST: image.manifest,
        L.CRI_LAYER_DIGEST: layer.digest,
    }
    try:
        snap.prepare(f"extract-{target}", parent, labels)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.ALREADY_EXISTS, e.details()
    else:
        raise AssertionError(f"{layer.digest} was not mounted lazily (Prepare answered mounts)")
    info = snap.stat(target)
    assert info.labels.get(L.REMOTE), f"{layer.digest} was not mounted lazily: {info}"
    snap.wait_ready(target)
    return target


def fuse_dirs(root: Path) -> dict[str, list[Path]]:
    """The FUSE host's layer directories by layer digest."""
    out: dict[str, list[Path]] = {}
    fuse = root / "fuse"
    if not fuse.is_dir():
        return out
    for d in sorted(fuse.iterdir()):
        try:
            status = json.loads((d / ".sociable" / "status.json").read_bytes())
        except (OSError, ValueError):
            continue
        out.setdefault(str(status.get("digest")), []).append(d)
    return out


def fuse_dir(root: Path, digest: str) -> Path:
    """The (first) FUSE directory serving layer `digest`."""
    dirs = fuse_dirs(root).get(digest)
    assert dirs, f"no FUSE directory serves {digest}"
    return dirs[0]


def _read_uncached(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        parts: list[bytes] = []
        while True:
            part = os.read(fd, 1 * MIB)
            if not part:
                return b"".join(parts)
            parts.append(part)
    finally:
        os.close(fd)


def read_file(path: Path, timeout: float = READ_TIMEOUT_SEC) -> bytes | OSError:
    """All of `path`, or the OSError a read raised; fails the test when it takes longer than
    `timeout` seconds (a FUSE read the daemon never answers)."""
    out: list[bytes | OSError] = []

    def run() -> None:
        try:
            out.append(_read_uncached(path))
        except OSError as e:
            out.append(e)

    thread = threading.Thread(target=run, name="chaos-read", daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"reading {path} did not return within {timeout} s"
    return out[0]


def log_events(daemon: SnapDaemon) -> list[dict[str, object]]:
    """The daemon's JSON log records so far."""
    out = []
    for line in daemon.log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out
