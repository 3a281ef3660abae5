"""The local fallback for a layer the index does not cover: download, decompress, apply.

The blob is streamed from the registry (native trio I/O through the client, one gate slot
for the whole download) into a temporary file, verified against the layer digest by the
client, then decompressed (gzip, zstd or plain tar by media type) and applied into the
snapshot's empty `fs` directory by `apply.apply_tar` in a worker thread. The uncompressed
stream is hashed on the way and must equal the image config's `rootfs.diff_ids` entry for
the layer.

Cancellation (the caller's timeout, daemon shutdown) is prompt: the download's request is
cancelled, and the apply thread stops between tar members; `dest` is then emptied and the
temporary file removed before `trio.Cancelled` propagates. Blocking file work runs in worker
threads under `UNPACK_THREADS`.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio
import zstandard

from index.digest import Digest
from index.oci.blobs import FileSink
from index.oci.client import AsyncRegistryClient
from index.oci.errors import OciError
from index.oci.reference import Reference

from .apply import apply_tar, clear_dir, decompressed
from .errors import UnpackError

T = TypeVar("T")

DEFAULT_UNPACK_TIMEOUT_SEC = 600.0
"""How long the mounter lets one local unpack (download and apply) take."""
UNPACK_THREADS = trio.CapacityLimiter(2)
"""Worker threads for local unpack: temp-file writes, decompress+apply, cleanup."""


async def _in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await trio.to_thread.run_sync(
        functools.partial(fn, *args, **kwargs), limiter=UNPACK_THREADS
    )


async def _offload(fn: Callable[[], object]) -> object:
    return await _in_thread(fn)


def _cancel_requested() -> bool:
    """True in an unpack worker thread once its trio caller is cancelled."""
    try:
        trio.from_thread.check_cancelled()
    except trio.Cancelled:
        return True
    return False


def _apply(tmp: Path, media_type: str, dest: Path, userxattr: bool) -> Digest:
    """Decompress and apply (worker thread). Raises UnpackError."""
    try:
        with decompressed(tmp, media_type) as stream:
            return apply_tar(stream, dest, userxattr=userxattr, cancelled=_cancel_requested)
    except (OSError, EOFError, zstandard.ZstdError) as e:
        raise UnpackError(f"decompressing {tmp.name} into {dest}: {e}") from e


async def layer_diff_id(
    client: AsyncRegistryClient, ref: Reference, manifest: Digest, layer: Digest
) -> tuple[Digest, str]:
    """The diffID and media type of `layer` in image manifest `manifest`.

    Raises UnpackError when the manifest or config cannot be read or does not list the layer.
    """
    try:
        _, data = await client.get_manifest(ref, manifest)
        doc = json.loads(data)
        layers = doc["layers"]
        position = next(i for i, d in enumerate(layers) if d.get("digest") == layer)
        config = json.loads(await client.read_blob(ref, Digest(doc["config"]["digest"])))
        diff_id = Digest(config["rootfs"]["diff_ids"][position])
        return diff_id, str(layers[position].get("mediaType", ""))
    except StopIteration as e:
        raise UnpackError(f"layer {layer} is not in image manifest {ref.name}@{manifest}") from e
    except (OciError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        # AttributeError: a document of the wrong JSON shape (a layer that is not an object)
        raise UnpackError(f"image {ref.name}@{manifest}: cannot read diffID of {layer}: {e}") from e


async def unpack_layer(
    client: AsyncRegistryClient,
    ref: Reference,
    manifest: Digest,
    layer: Digest,
    dest: Path,
    tmp_dir: Path,
    *,
    userxattr: bool = False,
) -> int:
    """Download `layer` of image `manifest` and apply it into the empty directory `dest`.

    Returns the compressed bytes downloaded. On failure `dest` is emptied again and
    UnpackError raised (download, digest, decompress, apply or diffID mismatch); on
    cancellation `dest` is emptied and `trio.Cancelled` propagates. The temporary file in
    `tmp_dir` is always removed.
    """
    diff_id, media_type = await layer_diff_id(client, ref, manifest, layer)
    try:
        await _in_thread(tmp_dir.mkdir, parents=True, exist_ok=True)
        fd, tmp_name = await _in_thread(tempfile.mkstemp, prefix="layer-", dir=tmp_dir)
    except OSError as e:
        raise UnpackError(f"temporary file in {tmp_dir}: {e}") from e
    tmp = Path(tmp_name)
    try:
        try:
            try:
                desc = await client.fetch_blob(ref, layer, FileSink(fd, _offload))
            finally:
                os.close(fd)
        except (OciError, OSError) as e:
            raise UnpackError(f"downloading {ref.name}@{layer}: {e}") from e
        got = await trio.to_thread.run_sync(
            _apply, tmp, media_type, dest, userxattr, limiter=UNPACK_THREADS
        )
        if got != diff_id:
            raise UnpackError(
                f"layer {layer}: uncompressed content hashes to {got}, config says {diff_id}"
            )
        return desc.size
    except BaseException:
        with trio.CancelScope(shield=True):
            await _in_thread(clear_dir, dest)
        # An apply stopped by cancellation surfaces as UnpackError: report the cancellation.
        await trio.lowlevel.checkpoint_if_cancelled()
        raise
    finally:
        with trio.CancelScope(shield=True):
            await _in_thread(tmp.unlink, missing_ok=True)
