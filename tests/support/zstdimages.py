"""zstd test layers and images, made with the tools that make them in the field.

- :func:`chunked_layers`: layers compressed to ``zstd:chunked`` (or plain ``zstd``) by
  ``skopeo copy --dest-compress --dest-compress-format ...`` from an OCI layout whose tars end
  right after the two zero blocks, as umoci writes them. Debian 12's skopeo (containers/storage
  1.43) drops whatever follows the tar's end, so a tar with record padding (Python's tarfile,
  GNU tar) would no longer match its diffID.
- :func:`seekable_blob`: the zstd seekable format written by hand with ``zstandard``: one
  frame per ``frame_size`` bytes, then the seek table in a skippable frame (magic
  ``0x184D2A5E``; entries of compressed and decompressed size, optionally the low 32 bits of
  each frame's XXH64; the 9-byte footer ending in ``0x8F92EAB1``).
- :func:`multi_frame_blob`: independent frames, optionally each after a 12-byte skippable
  frame holding its size (as ``pzstd`` writes).
- :func:`write_zstd_image`: an OCI layout of such layers, with each layer's annotations kept
  in the manifest.

Errors: :class:`images.ImageBuildError` (chaining skopeo's stderr or the cause).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import struct
import subprocess
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import zstandard

from tests.support import images

SEEKABLE_SKIPPABLE_MAGIC = 0x184D2A5E
SEEKABLE_FOOTER_MAGIC = 0x8F92EAB1
PZSTD_SKIPPABLE_MAGIC = 0x184D2A50


@dataclass(frozen=True)
class ZstdLayer:
    """A layer blob at ``path`` with its manifest descriptor's annotations."""

    path: Path
    digest: str
    diff_id: str
    size: int
    media_type: str = images.MEDIA_LAYER_ZSTD
    annotations: dict[str, str] = field(default_factory=dict)

    def as_layer(self) -> images.Layer:
        return images.Layer(self.path, self.digest, self.diff_id, self.size, self.media_type)


def unpadded_tar(spec: Iterable[images.Entry | images.TreeSource], scratch: Path) -> bytes:
    """The tar stream of ``spec`` (as :func:`images.write_layer` writes it) cut right after its
    two zero blocks: no record padding."""
    layer = images.write_layer(spec, scratch)
    raw = gzip.decompress(layer.path.read_bytes())
    layer.path.unlink()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        tf.getmembers()
        end = tf.offset
    return raw[:end] + bytes(1024)


def _store(blobs: Path, data: bytes, diff_id: str, media_type: str, **kw: object) -> ZstdLayer:
    blobs.mkdir(parents=True, exist_ok=True)
    hexd = hashlib.sha256(data).hexdigest()
    path = blobs / hexd
    path.write_bytes(data)
    return ZstdLayer(path, "sha256:" + hexd, diff_id, len(data), media_type, **kw)  # type: ignore[arg-type]


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def seekable_blob(tar: bytes, frame_size: int, *, checksums: bool = True, level: int = 3) -> bytes:
    """``tar`` in the zstd seekable format, one frame per ``frame_size`` bytes."""
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
    frames = [cctx.compress(tar[i : i + frame_size]) for i in range(0, len(tar), frame_size)]
    pieces = [tar[i : i + frame_size] for i in range(0, len(tar), frame_size)]
    entries = b""
    for frame, piece in zip(frames, pieces, strict=True):
        entries += struct.pack("<II", len(frame), len(piece))
        if checksums:
            entries += struct.pack("<I", _xxh64_low32(frame))
    footer = struct.pack("<IBI", len(frames), 0x80 if checksums else 0, SEEKABLE_FOOTER_MAGIC)
    table = entries + footer
    return b"".join(frames) + struct.pack("<II", SEEKABLE_SKIPPABLE_MAGIC, len(table)) + table


def _xxh64_low32(frame: bytes) -> int:
    """The low 32 bits of XXH64 of the frame's content: zstd stores exactly that as the
    frame's content checksum (its last 4 bytes when written with checksums)."""
    return int(struct.unpack("<I", frame[-4:])[0])


def multi_frame_blob(tar: bytes, frame_size: int, *, pzstd_headers: bool = False) -> bytes:
    """``tar`` as independent frames of ``frame_size`` input bytes; with ``pzstd_headers``
    each frame follows a skippable frame holding its compressed size, as ``pzstd`` writes."""
    cctx = zstandard.ZstdCompressor(level=3, write_content_size=False)
    out = io.BytesIO()
    for i in range(0, len(tar), frame_size):
        frame = cctx.compress(tar[i : i + frame_size])
        if pzstd_headers:
            out.write(struct.pack("<III", PZSTD_SKIPPABLE_MAGIC, 4, len(frame)))
        out.write(frame)
    return out.getvalue()


def hand_layer(
    tar: bytes,
    blobs: Path,
    kind: Literal["seekable", "multi-frame", "pzstd", "single"],
    frame_size: int = 256 * 1024,
) -> ZstdLayer:
    """A zstd layer of ``tar`` made here, stored in ``blobs``."""
    if kind == "seekable":
        blob = seekable_blob(tar, frame_size)
    elif kind == "single":
        blob = zstandard.ZstdCompressor(level=3).compress(tar)
    else:
        blob = multi_frame_blob(tar, frame_size, pzstd_headers=kind == "pzstd")
    return _store(blobs, blob, _sha(tar), images.MEDIA_LAYER_ZSTD)


def chunked_layers(
    tars: Sequence[bytes],
    work: Path,
    fmt: Literal["zstd:chunked", "zstd"] = "zstd:chunked",
) -> list[ZstdLayer]:
    """The layers ``tars`` (unpadded, see :func:`unpadded_tar`) compressed by skopeo into
    ``fmt``, with the annotations skopeo gave them; the blobs are in ``work/dst``."""
    src, dst = work / "src", work / "dst"
    blobs = src / "blobs" / "sha256"
    layers = []
    for tar in tars:
        gz = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=gz, mtime=0, compresslevel=1) as f:
            f.write(tar)
        stored = _store(blobs, gz.getvalue(), _sha(tar), images.MEDIA_LAYER_GZIP)
        layers.append(stored.as_layer())
    images.write_image_layout(src, layers, tag="src")
    cmd = [
        "skopeo",
        "copy",
        "--quiet",
        "--dest-compress",
        "--dest-compress-format",
        fmt,
        f"oci:{src}:src",
        f"oci:{dst}:dst",
    ]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    except subprocess.CalledProcessError as e:
        raise images.ImageBuildError(f"skopeo {fmt}: {e.stderr.strip()}") from e
    index = json.loads((dst / "index.json").read_text())
    dst_blobs = dst / "blobs" / "sha256"
    manifest = json.loads((dst_blobs / index["manifests"][0]["digest"][7:]).read_text())
    config = json.loads((dst_blobs / manifest["config"]["digest"][7:]).read_text())
    out = []
    for desc, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        out.append(
            ZstdLayer(
                dst_blobs / desc["digest"][7:],
                desc["digest"],
                diff_id,
                desc["size"],
                desc["mediaType"],
                dict(desc.get("annotations") or {}),
            )
        )
    shutil.rmtree(src)
    return out


def write_zstd_image(
    layout: Path,
    layers: Sequence[ZstdLayer],
    *,
    tag: str = "latest",
    cmd: Sequence[str] = ("/bin/sh",),
) -> images.Image:
    """An OCI layout of ``layers`` (blobs copied in) whose manifest keeps each layer's
    annotations. Returns it as :class:`images.Image`."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        target = blobs / layer.digest[7:]
        if not target.exists():
            shutil.copyfile(layer.path, target)
    plain = [
        images.Layer(blobs / lyr.digest[7:], lyr.digest, lyr.diff_id, lyr.size, lyr.media_type)
        for lyr in layers
    ]
    image = images.write_image_layout(layout, plain, tag=tag, cmd=cmd)
    manifest_path = blobs / image.manifest_digest[7:]
    manifest = json.loads(manifest_path.read_text())
    for desc, layer in zip(manifest["layers"], layers, strict=True):
        if layer.annotations:
            desc["annotations"] = dict(sorted(layer.annotations.items()))
    data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    digest = _sha(data)
    (blobs / digest[7:]).write_bytes(data)
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0]["digest"] = digest
    index["manifests"][0]["size"] = len(data)
    (layout / "index.json").write_text(json.dumps(index, sort_keys=True, separators=(",", ":")))
    return images.Image(layout, tag, digest, image.config_digest, tuple(plain), tuple(cmd))
