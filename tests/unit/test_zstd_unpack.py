"""Plain zstd layers unpacked at pull time: one streaming pass, the diffID checked.

The registry is `httpx.MockTransport` (the seam of the client); the decompression, the tar
apply and the files are real."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
import zstandard

from index.digest import Digest
from index.oci import mediatypes as mt
from index.oci.client import AsyncRegistryClient
from snapshotter.remote.errors import UnpackError
from snapshotter.remote.unpack import _Restarted, _StreamSink, unpack_layer
from tests.unit.test_discovery_unpack import REF, blob_server


def zstd_image(
    files: int,
    *,
    size: int = 1000,
    diff_id: str | None = None,
    corrupt: bool = False,
    noise: bool = False,
) -> tuple[dict[str, bytes], Digest, Digest, bytes]:
    """An image with one single-frame zstd layer of `files` files of `size` bytes each
    (random bytes with `noise`, which do not compress)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(files):
            data = (
                random.Random(i).randbytes(size) if noise else (f"file {i} ".encode() * size)[:size]
            )
            info = tarfile.TarInfo(f"d{i % 7}/f{i}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    tar = raw.getvalue()
    layer = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(tar)
    if corrupt:
        damaged = bytearray(layer)
        damaged[len(damaged) // 2] ^= 0xFF
        layer = bytes(damaged)
    config = json.dumps(
        {"rootfs": {"type": "layers", "diff_ids": [diff_id or str(Digest.of(tar))]}}
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "config": {
                "mediaType": mt.OCI_CONFIG,
                "digest": str(Digest.of(config)),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": mt.OCI_LAYER_ZSTD,
                    "digest": str(Digest.of(layer)),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    blobs = {str(Digest.of(b)): b for b in (layer, config, manifest)}
    return blobs, Digest.of(manifest), Digest.of(layer), tar


async def test_plain_zstd_layer_is_applied_and_checked(tmp_path: Path) -> None:
    blobs, manifest, layer, _ = zstd_image(300)
    dest, tmp = tmp_path / "fs", tmp_path / "tmp"
    dest.mkdir()
    async with AsyncRegistryClient(transport=httpx.MockTransport(blob_server(blobs))) as client:
        size = await unpack_layer(client, REF, manifest, layer, dest, tmp)
    assert size == len(blobs[str(layer)])
    assert (dest / "d3" / "f10").read_bytes() == (b"file 10 " * 1000)[:1000]
    assert sum(1 for p in dest.rglob("f*") if p.is_file()) == 300
    assert list(tmp.iterdir()) == []


@pytest.mark.parametrize("case", ["diff_id", "corrupt"])
async def test_wrong_or_corrupt_layers_leave_nothing(tmp_path: Path, case: str) -> None:
    if case == "diff_id":
        blobs, manifest, layer, _ = zstd_image(50, diff_id="sha256:" + "2" * 64)
        match = "config says"
    else:
        blobs, manifest, layer, _ = zstd_image(50, corrupt=True)
        match = "decompressing|applying"
    dest, tmp = tmp_path / "fs", tmp_path / "tmp"
    dest.mkdir()
    async with AsyncRegistryClient(transport=httpx.MockTransport(blob_server(blobs))) as client:
        with pytest.raises(UnpackError, match=match):
            await unpack_layer(client, REF, manifest, layer, dest, tmp)
    assert list(dest.iterdir()) == [] and list(tmp.iterdir()) == []


async def test_files_appear_while_the_download_is_still_running(tmp_path: Path) -> None:
    """One pass: the first half of the blob (some MiB, the client reads 1 MiB at a time) is
    applied before the second half is sent."""
    blobs, manifest, layer, _ = zstd_image(2000, size=3000, noise=True)
    blob = blobs[str(layer)]
    serve = blob_server(blobs)
    dest, tmp = tmp_path / "fs", tmp_path / "tmp"
    dest.mkdir()
    seen_early: list[int] = []
    second_half = trio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(str(layer)):

            async def halves() -> AsyncIterator[bytes]:
                yield blob[: len(blob) // 2]
                with trio.move_on_after(10):
                    while not any(dest.rglob("f*")):
                        await trio.sleep(0.01)
                seen_early.append(sum(1 for _ in dest.rglob("f*")))
                second_half.set()
                yield blob[len(blob) // 2 :]

            return httpx.Response(200, content=halves())
        return await serve(request)

    async with AsyncRegistryClient(transport=httpx.MockTransport(handler)) as client:
        await unpack_layer(client, REF, manifest, layer, dest, tmp)
    assert second_half.is_set() and seen_early and seen_early[0] > 0
    assert sum(1 for p in dest.rglob("f*") if p.is_file()) == 2000


async def test_a_download_that_starts_over_is_refused_by_the_stream() -> None:
    send, receive = trio.open_memory_channel[bytes](4)
    sink = _StreamSink(send)
    await sink.reset()  # nothing sent yet: a first attempt may start
    await sink.write(b"abc")
    with pytest.raises(_Restarted):
        await sink.reset()
    assert receive.receive_nowait() == b"abc"
